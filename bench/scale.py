"""ImageNet's count end to end on CPU: 1,281,167 samples through one DeepCluster epoch.

`make-shards --source synthetic:1281167:24` writes ImageNet's number of samples as 24 x 24
JPEGs in 1,000 classes; `configs/scale_synthetic.yaml` then runs one full DeepCluster epoch
with k = 10,000 on 2 local ranks (`launch.local`), once with `cluster.mode=gather` and once
with `sharded`. The same runs at 5,000 samples (k scaled to keep N / k) give each phase's time
per sample at small size: a ratio far above 1 at full size points to a step that is not
linear in N, or to a Python loop over samples. Clustering's cost grows with N · k, so its
ratio is also given per sample and cluster.

While a run goes, every 0.25 s each rank's resident memory (VmRSS of the rank process, and of
its DataLoader workers apart) and /dev/shm's use are sampled; the phases' start and end times
come from the ranks' debug logs (`phase ... started/ended`), so each phase has its peaks.

    .venv/bin/python -m bench.scale                     # make bench-scale (about 30 min)
    .venv/bin/python -m bench.scale --n 200000 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import DIST_VARS, REPO, new_bench_dir, provenance, publish, table
from cluster_pipeline.run.metrics_file import read_metrics

SECTION = "## Scale: ImageNet's count through one DeepCluster epoch (CPU, 2 ranks)"
CONFIG = "configs/scale_synthetic.yaml"
PHASES = ("extract", "gather", "cluster", "broadcast", "train", "checkpoint")
SMALL_N = 5000
SIZE = 24
K = 10_000
PHASE_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \[rank (\d+)\] DEBUG \S+: phase (\w+) (started|ended)"
)


def make_shards(n: int, out: Path, log: Path) -> dict:
    """The synthetic shards (written once and kept: the same N reuses them)."""
    if (out / "index.json").exists():
        print(f"  shards: {out} exists, reused", flush=True)
        return {"seconds": None, "bytes": _du(out)}
    cmd = [sys.executable, "-m", "cluster_pipeline", "make-shards", "--source",
           f"synthetic:{n}:{SIZE}", "--out", str(out), "--samples-per-shard", "10000",
           "--workers", str(os.cpu_count() or 1)]  # fmt: skip
    print(f"  {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return {"seconds": time.perf_counter() - start, "bytes": _du(out)}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _status_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _descendants(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


@dataclass
class Monitor:
    """Samples of (time, per rank: (rank RSS, its workers' RSS) in KiB, /dev/shm bytes used)."""

    launcher: int
    samples: list[tuple[float, list[tuple[int, int]], int]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.done.wait(0.25):
            kids = _children()
            ranks = sorted(kids.get(self.launcher, []))
            per = [(_status_kib(r), sum(_status_kib(p) for p in _descendants(r, kids)))
                   for r in ranks]  # fmt: skip
            shm = os.statvfs("/dev/shm")
            used = (shm.f_blocks - shm.f_bfree) * shm.f_frsize
            self.samples.append((time.time(), per, used))


def phase_windows(run_dir: Path) -> dict[int, dict[str, tuple[float, float]]]:
    """Per rank, each phase's (start, end) wall-clock times from its debug log."""
    out: dict[int, dict[str, tuple[float, float]]] = {}
    for log in sorted((run_dir / "logs").glob("rank*.debug.log")):
        opened: dict[str, float] = {}
        for line in log.read_text(errors="replace").splitlines():
            m = PHASE_LINE.match(line)
            if not m:
                continue
            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rank, phase, what = int(m.group(2)), m.group(3), m.group(4)
            if what == "started":
                opened[phase] = stamp
            elif phase in opened:
                out.setdefault(rank, {})[phase] = (opened.pop(phase), stamp)
    return out


def run_epoch(shards: Path, n: int, k: int, mode: str, run_dir: Path, log: Path) -> dict:
    """One DeepCluster epoch on 2 local ranks; its phase times, peaks and /dev/shm."""
    cmd = [sys.executable, "-m", "launch.local", "--nproc", "2", "train", "--config", CONFIG,
           f"data.shards={shards}", f"run.dir={run_dir}", f"cluster.k={k}",
           f"cluster.mode={mode}", "run.progress=false", "wandb.mode=disabled"]  # fmt: skip
    env = {key: v for key, v in os.environ.items() if key not in DIST_VARS}
    print(f"  {mode}, N = {n:,}, k = {k:,}: log {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        monitor = Monitor(proc.pid)
        thread = threading.Thread(target=monitor.run, daemon=True)
        thread.start()
        rc = proc.wait()
        monitor.done.set()
        thread.join()
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"the {mode} run exited with status {rc}; end of {log}:\n{tail}")
    (row,) = read_metrics(run_dir)
    windows = phase_windows(run_dir)
    peaks: dict[int, dict[str, tuple[int, int]]] = {}
    shm: dict[str, int] = {}
    for rank, phases in windows.items():
        for phase, (a, b) in phases.items():
            inside = [s for s in monitor.samples if a <= s[0] <= b and len(s[1]) > rank]
            if inside:
                own = max(s[1][rank][0] for s in inside)
                workers = max(s[1][rank][1] for s in inside)
                peaks.setdefault(rank, {})[phase] = (own, workers)
            if rank == 0:
                shm[phase] = max((s[2] for s in inside), default=0)
    whole = [max((s[1][r][0] for s in monitor.samples if len(s[1]) > r), default=0)
             for r in range(2)]  # fmt: skip
    seconds = {p: float(row.get(f"time_{p}_s") or 0.0) for p in PHASES}
    print(
        "    "
        + ", ".join(f"{p} {s:.1f} s" for p, s in seconds.items())
        + f"; wall {wall:.0f} s; peak RSS {whole[0] >> 10} / {whole[1] >> 10} MiB",
        flush=True,
    )
    return {"n": n, "k": k, "mode": mode, "wall": wall, "seconds": seconds, "peaks": peaks,
            "shm": shm, "whole": whole, "row": row}  # fmt: skip


def report(shards: dict, big: list[dict], small: list[dict], runtime: float, n: int) -> str:
    out = [SECTION, ""]
    rate = f"{n / shards['seconds']:,.0f} img/s" if shards["seconds"] else "reused, not timed"
    out += [
        f"**{n:,} samples, k = {K:,}, one full epoch on 2 CPU ranks.** make-shards "
        f"(synthetic:{n}:{SIZE}, {os.cpu_count()} writer processes): {rate}, "
        f"{shards['bytes'] / 2**30:.2f} GiB of shards. Reference: the same at {SMALL_N:,} "
        f"samples, k = {small[0]['k']} (the same N / k).",
        "",
    ]
    for run, ref in zip(big, small, strict=True):
        mode = run["mode"]
        row = run["row"]
        out += [f"### cluster.mode={mode}", "",
                f"Epoch wall {run['wall']:.0f} s (start-up and exit included); NMI against the "
                f"1,000 synthetic classes {row.get('nmi_gt') or 0:.3f}, empty clusters before "
                f"the split {row.get('n_empty_before_split')}, cluster sizes "
                f"{row.get('cluster_size_min')}–{row.get('cluster_size_max')}; peak RSS of "
                f"the whole run rank 0 {run['whole'][0] / 1024:,.0f} MiB, rank 1 "
                f"{run['whole'][1] / 1024:,.0f} MiB.", ""]  # fmt: skip
        rows = []
        for p in PHASES:
            s, s0 = run["seconds"][p], ref["seconds"][p]
            per, per0 = s / run["n"], s0 / ref["n"]
            ratio = per / per0 if per0 > 0 else float("nan")
            extra = ""
            if p == "cluster" and per0 > 0:
                extra = f" ({ratio * ref['k'] / run['k']:.3f} per sample·k)"
            peaks = [run["peaks"].get(r, {}).get(p, (0, 0)) for r in range(2)]
            rows.append([p, f"{s:.1f}", f"{per * 1e6:.1f}", f"{per0 * 1e6:.1f}",
                         f"{ratio:.2f}{extra}",
                         *(f"{a / 1024:,.0f} (+{w / 1024:,.0f})" for a, w in peaks),
                         f"{run['shm'].get(p, 0) / 2**20:,.0f}"])  # fmt: skip
        out += table(["phase", "s", "µs per sample", f"µs per sample at {SMALL_N:,}",
                       "ratio", "rank 0 peak RSS MiB (+ workers)",
                       "rank 1 peak RSS MiB (+ workers)", "/dev/shm MiB"], rows)  # fmt: skip
        out.append("")
    out += ["### How it was measured", ""]
    out += provenance("bench.scale", runtime)
    out += [
        f"- `python -m launch.local --nproc 2 train --config {CONFIG} data.shards=... "
        "cluster.k=... cluster.mode=gather|sharded run.progress=false wandb.mode=disabled`: one "
        "thread per rank, one DataLoader worker each.",
        "- Phase seconds are rank 0's `time_*_s` of metrics.jsonl. Peaks: VmRSS of each rank "
        "process sampled every 0.25 s within the phase's start and end in that rank's debug "
        "log, its DataLoader workers' VmRSS summed apart (they share pages with each other, so "
        "that sum overstates them); /dev/shm: used bytes of the filesystem, machine-wide.",
        "",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1_281_167, help="samples (ImageNet-1k's train set)")
    p.add_argument("--modes", default="gather,sharded")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    bench = new_bench_dir("scale", announce=False)
    data = REPO / "data"
    big_shards = data / f"synthetic-{args.n}"
    small_shards = data / f"synthetic-{SMALL_N}"
    print(f"bench.scale: {args.n:,} samples, k = {K:,}; work in {bench}", flush=True)
    shards = make_shards(args.n, big_shards, bench / "make-shards.log")
    make_shards(SMALL_N, small_shards, bench / "make-shards-small.log")
    k_small = max(2, round(K * SMALL_N / args.n))
    big, small = [], []
    for mode in args.modes.split(","):
        small.append(run_epoch(small_shards, SMALL_N, k_small, mode, bench / f"small-{mode}",
                               bench / f"small-{mode}.log"))  # fmt: skip
        big.append(run_epoch(big_shards, args.n, min(K, args.n), mode, bench / f"big-{mode}",
                             bench / f"big-{mode}.log"))  # fmt: skip
    section = report(shards, big, small, time.perf_counter() - t0, args.n)
    print(section)
    publish(SECTION, section, not args.no_write)
    print(f"runtime {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
