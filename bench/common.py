"""What every benchmark shares: the machine and commit it ran on, its section of BENCHMARKS.md,
and running commands on local ranks (functions on gloo ranks: cluster_pipeline.testing.multiproc).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from cluster_pipeline.run import checkpoint

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "BENCHMARKS.md"


def new_bench_dir(name: str, announce: bool = True) -> Path:
    """A fresh runs/bench-<name>-<timestamp>/ for a benchmark's runs and files."""
    path = REPO / "runs" / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True)
    if announce:
        print(f"bench directory: {path}", flush=True)
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def cores() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(os.cpu_count())


def machine() -> str:
    """One line: cores, CPU model, RAM, GPU, torch version."""
    ram = ram_gib()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cores()} cores (`nproc`), {cpu_model()}, "
        f"{f'{ram:.0f} GiB RAM' if ram else 'RAM unknown'}, {gpu}; torch {torch.__version__}"
    )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "none (no commit yet)"
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return f"{out}{' + uncommitted changes' if dirty else ''}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


LOAD_AT_START = load_average()  # before the benchmark's own work: is anything else running?


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat; (0, 0) where it cannot be read."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


# The CPU time the hypervisor gave to others ("steal") while the benchmark ran: on a shared
# VM it slows either side of a comparison at random, which is why every ratio is interleaved.
CPU_AT_START = cpu_times()


def steal_share() -> str:
    steal, total = (b - a for a, b in zip(CPU_AT_START, cpu_times(), strict=True))
    return f"{steal / total:.0%}" if total > 0 else "unknown"


def provenance(module: str, runtime_s: float) -> list[str]:
    """The Markdown bullets that say when, where and how a section was measured."""
    return [
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; commit: {git_commit()}",
        f"- Machine: {machine()}",
        f"- Command: `{' '.join([f'.venv/bin/python -m {module}', *sys.argv[1:]])}`",
        f"- Runtime of the benchmark: {runtime_s:.0f} s; load average (1, 5, 15 min) when it "
        f"started: {LOAD_AT_START}, at the end: {load_average()} (its own work included); "
        f"CPU time stolen by the hypervisor during the run: {steal_share()}",
    ]


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put `section` in place of the file's section under `heading`, keeping all others.

    A section runs to the next heading of level 1 or 2 outside a code fence, or to the end.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = [*lines, *([""] if lines and lines[-1].strip() else []), *section.splitlines()]
    else:
        end, fenced = len(lines), False
        for i in range(start + 1, len(lines)):
            if lines[i].lstrip().startswith("```"):
                fenced = not fenced
            elif not fenced and re.match(r"^#{1,2} ", lines[i]):
                end = i
                break
        tail = lines[end:]
        new = [*lines[:start], *section.splitlines(), *([""] if tail else []), *tail]
    while new and not new[-1].strip():
        new.pop()
    path.write_text("\n".join(new) + "\n")


def publish(heading: str, section: str, write: bool) -> None:
    """Print the section and, unless told not to, replace it in BENCHMARKS.md."""
    print("\n" + section)
    if write:
        replace_section(BENCHMARKS, heading, section)
        print(f"wrote section {heading!r} of {BENCHMARKS}")


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """Markdown table lines; `align` has one character per column, l or r (default: l then r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]


# Set by torchrun; a bench process is a world of one, and its subprocesses start their own.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def local_command(nproc: int, command: list[str], log_path: Path) -> float:
    """`cluster-pipeline COMMAND` on `nproc` local ranks (launch.local), W&B off, output in
    `log_path`; returns its wall time, or raises with the end of the log."""
    cmd = [sys.executable, "-m", "launch.local", "--nproc", str(nproc), *command]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["WANDB_MODE"] = "disabled"
    print(f"  {' '.join(cmd[1:])}\n    log: {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{command[0]} exited with status {rc}; end of {log_path}:\n{tail}")
    return time.perf_counter() - start


def final_checkpoint(run_dir: Path) -> Path:
    """The last checkpoint of a finished run."""
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        raise RuntimeError(f"no checkpoint in {run_dir / 'checkpoints'}")
    return found[-1]
