"""An attempt's start-up: from the launcher's start to the first training step, this tree
against an earlier commit, in turns.

    .venv/bin/python -m bench.startup --base 9bf54a2 [--pairs 3] [--no-write]

Each run is `launch.local --nproc 2 train` on the digits shards for one epoch, with 2 DataLoader
workers per rank and W&B offline, as a requeued attempt starts: imports, process group, shard
index, model, W&B, DataLoader start, extraction and the first clustering before the first step.
The times come from rank 0's log lines (its pid line, the W&B line, each phase's start), read
back after the run. The earlier commit runs from its own `git archive` of the whole tree.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.common import REPO, provenance, publish, table
from cluster_pipeline.data.shards import write_shards
from cluster_pipeline.data.sources import digits_source

SECTION = "## Start-up of an attempt: launcher start to the first training step"
MARKS = (  # (column, text of rank 0's first log line that marks it)
    ("logging up", "is pid"),
    ("W&B up", "W&B run"),
    ("extraction starts", "phase extract started"),
    ("clustering starts", "phase cluster started"),
    ("first step", "phase train started"),
)


def base_tree(rev: str, into: Path) -> Path:
    """The whole tree at `rev` (package and launchers), unpacked under `into`."""
    blob = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True,
                          check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        tf.extractall(into, filter="data")
    return into


def one_run(tree: Path, shards: Path, run_dir: Path) -> dict[str, float]:
    """Seconds from the launcher's start to each mark of MARKS, and to the launcher's end."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONPATH=str(tree))  # fmt: skip
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_SERVICE"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "launch.local", "--nproc", "2", "train", "--config",
           str(tree / "configs" / "digits_test.yaml"), f"data.shards={shards}",
           f"run.dir={run_dir}", "train.epochs=1", "data.num_workers=2"]  # fmt: skip
    start = time.time()
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    out = {"launcher exits": time.time() - start}
    debug = run_dir / "logs" / "rank0.debug.log"  # the earlier tree logs DEBUG in rank0.log
    lines = (debug if debug.is_file() else run_dir / "logs" / "rank0.log").read_text()
    for column, text in MARKS:
        line = next(x for x in lines.splitlines() if text in x)
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out[column] = stamp - start
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print; leave BENCHMARKS.md")
    args = parser.parse_args(argv)
    began = time.monotonic()
    runs: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = root / "digits"
        write_shards(digits_source(), shards, samples_per_shard=500)
        trees = {"base": base_tree(args.base, root / "base"), "this": REPO}
        for pair in range(args.pairs):
            order = ("base", "this") if pair % 2 == 0 else ("this", "base")
            for name in order:
                runs[name].append(one_run(trees[name], shards, root / f"{name}-{pair}"))
                print(name, {k: round(v, 2) for k, v in runs[name][-1].items()}, flush=True)
    columns = [c for c, _ in MARKS] + ["launcher exits"]
    rows = []
    for name, label in (("base", f"{args.base}"), ("this", "this tree")):
        rows.append([label, *(f"{statistics.median(r[c] for r in runs[name]):.2f}"
                              for c in columns)])  # fmt: skip
    ratios = [b["first step"] / t["first step"] for b, t in zip(runs["base"], runs["this"],
                                                                strict=True)]  # fmt: skip
    section = "\n".join([
        SECTION, "",
        *provenance("bench.startup", time.monotonic() - began),
        f"- {args.pairs} pairs, in turns; medians, in seconds since the launcher started.", "",
        *table(["tree", *columns], rows, "l" + "r" * len(columns)), "",
        f"Time to the first step, {args.base} ÷ this tree: median {statistics.median(ratios):.2f}"
        f" (min {min(ratios):.2f}, max {max(ratios):.2f}).",
    ])  # fmt: skip
    publish(SECTION, section, not args.no_write)


if __name__ == "__main__":
    main()
