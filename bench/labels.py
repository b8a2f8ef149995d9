"""The label path at large N: broadcast, NMI, sampler, checkpoint; each rank's peak memory.

Two gloo ranks walk one epoch's label path as `DeepClusterTargets` and `train_one_epoch` do,
with k = 10,000 pseudo-labels of N samples (default N = 100M):

1. every rank holds the previous epoch's labels; rank 0 holds the new ones (as k-means left
   them) and `broadcast_labels` sends them in chunks (gather mode);
2. rank 0 computes NMI(t-1, t) and the cluster statistics; the previous labels are dropped;
3. every rank draws the epoch with `uniform_cluster_sampler` and keeps its `rank_slice`;
4. rank 0 writes the labels in a checkpoint (`save_atomic`) and every rank loads it back;
5. sharded mode's `all_gather_labels` of each rank's half, for comparison.

Memory is read from the kernel: /proc/self/clear_refs ("5") resets VmHWM before each step,
VmHWM after it; the figure is the most a rank held above its RSS before the first label
vector existed (imports, the process group), so the target 3 x 4N bytes is for the labels
and their temporaries alone. Sampler version 1 (int64, before this issue) runs at N / 10.

    .venv/bin/python -m bench.labels                      # make bench-labels
    .venv/bin/python -m bench.labels --n 10000000 --no-write
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import provenance, publish, table
from bench.gather import _status_kib, reset_peak
from cluster_pipeline import dist
from cluster_pipeline.clustering import metrics
from cluster_pipeline.clustering.labels import LABEL_DTYPE
from cluster_pipeline.data.loader import rank_partition
from cluster_pipeline.data.sampler import (
    rank_draws,
    uniform_cluster_sampler,
    uniform_cluster_sampler_v1,
)
from cluster_pipeline.features.gather import all_gather_labels, broadcast_labels
from cluster_pipeline.run import checkpoint
from cluster_pipeline.testing.multiproc import run_ranks

SECTION = "## Label path at large N (broadcast, NMI, sampler, checkpoint; memory per rank)"
K = 10_000
BATCH = 256


def fake_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two consecutive epochs' labels: 80% of the samples keep their cluster (NMI near 0.8,
    DeepCluster's plateau), written in chunks so making them costs no N-sized temporary."""
    rng = np.random.default_rng(seed)
    prev, cur = np.empty(n, LABEL_DTYPE), np.empty(n, LABEL_DTYPE)
    for s in range(0, n, 1 << 18):  # small chunks: what the allocator keeps of them is small
        m = min(1 << 18, n - s)
        prev[s : s + m] = rng.integers(0, K, m, dtype=LABEL_DTYPE)
        moved = rng.random(m) < 0.2
        cur[s : s + m] = np.where(moved, rng.integers(0, K, m, dtype=LABEL_DTYPE), prev[s : s + m])
    return prev, cur


class Steps:
    """Time and peak memory (above `base`) of each step on this rank."""

    def __init__(self, ctx: dist.DistContext) -> None:
        self.ctx, self.base = ctx, _status_kib("VmRSS")
        self.rows: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn, *args):
        dist.barrier(self.ctx)
        reset_peak()
        start = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - start
        self.rows[name] = {"seconds": seconds, "peak_kib": _status_kib("VmHWM") - self.base}
        return out


def rank_main(rank: int, world: int, n: int, folder: str) -> dict:
    ctx = dist.init_distributed(timeout_s=1800, heartbeat_timeout_s=0)  # left by run_ranks
    broadcast_labels(ctx, np.zeros(8, LABEL_DTYPE) if ctx.is_main else None, 8)  # warm-up
    steps = Steps(ctx)
    prev, made = fake_labels(n, 0)  # every rank: last epoch's; rank 0 also this epoch's
    cur: np.ndarray | None = made if ctx.is_main else None
    del made
    labels = steps.run("broadcast_labels", broadcast_labels, ctx, cur, n)
    del cur
    nmi = steps.run("NMI(t-1, t) + cluster stats", _metrics, ctx, prev, labels)
    del prev
    mine = steps.run("sampler (rank_draws)", _sample, ctx, labels, n)
    path = Path(folder) / "labels.pt"
    steps.run("checkpoint write (rank 0)", _save, ctx, labels, path)
    del labels
    loaded = steps.run("checkpoint load", _load, path)
    assert len(loaded) == n
    del loaded, mine
    index = rank_partition(n, rank, world)
    own = np.random.default_rng(rank).integers(0, K, len(index), dtype=LABEL_DTYPE)
    steps.run("all_gather_labels (sharded mode)", all_gather_labels, ctx, index, own,
              index[:0], n)  # fmt: skip
    del index, own
    small = max(n // 10, 1)
    v1_labels = fake_labels(small, 1)[1]
    steps.run("sampler version 1 at N / 10", uniform_cluster_sampler_v1, v1_labels, small, 0)
    steps.run("sampler version 2 at N / 10", uniform_cluster_sampler, v1_labels, small, 0)
    dist.barrier(ctx)
    return {"steps": steps.rows, "nmi": nmi, "base_kib": steps.base}


def _metrics(ctx: dist.DistContext, prev: np.ndarray, labels: np.ndarray) -> float | None:
    if not ctx.is_main:
        return None
    stats = metrics.cluster_stats(labels, K)
    assert stats["n_empty_clusters"] == 0
    return metrics.nmi(prev, labels)


def _sample(ctx: dist.DistContext, labels: np.ndarray, n: int) -> np.ndarray:
    return rank_draws(2, labels, n, 1, ctx.rank, ctx.world, BATCH)


def _save(ctx: dist.DistContext, labels: np.ndarray, path: Path) -> None:
    if ctx.is_main:
        checkpoint.save_atomic({"targets": {"labels": torch.from_numpy(labels)}}, path, keep=1)


def _load(path: Path) -> np.ndarray:
    return torch.load(path, weights_only=True)["targets"]["labels"].numpy()


def report(n: int, ranks: list[dict], runtime: float) -> str:
    budget = 3 * 4 * n
    names = list(ranks[0]["steps"])
    main_steps = [s for s in names if "N / 10" not in s and "sharded" not in s]
    worst = max(r["steps"][s]["peak_kib"] * 1024 for r in ranks for s in main_steps)
    out = [SECTION, ""]
    out += [
        f"**N = {n:,}, k = {K:,}, 2 ranks: the most any rank held above its start for the label "
        f"path (broadcast, NMI, sampler, checkpoint) is {worst / 2**20:,.0f} MiB = "
        f"{worst / (4 * n):.2f} x 4N** (target ≤ 3 x 4N = {budget / 2**20:,.0f} MiB: "
        f"{'met' if worst <= budget else 'MISSED'}). NMI(t-1, t) = {ranks[0]['nmi']:.4f}.",
        "",
    ]
    rows = []
    for s in names:
        per = [r["steps"][s] for r in ranks]
        m = n // 10 if "N / 10" in s else n
        rows.append([s, *(f"{p['seconds']:.2f}" for p in per),
                     f"{max(p['seconds'] for p in per) / m * 1e9:.1f}",
                     *(f"{p['peak_kib'] / 1024:,.0f}" for p in per),
                     f"{max(p['peak_kib'] for p in per) * 1024 / (4 * m):.2f}"])  # fmt: skip
    out += table(
        ["step", "rank 0 s", "rank 1 s", "s per 1B", "rank 0 peak MiB", "rank 1 peak MiB",
         "peak ÷ 4N"],
        rows,
    )  # fmt: skip
    out += [
        "",
        "s per 1B: the slower rank's time scaled linearly to 10^9 labels (every step is a pass "
        "over N or chunks of it; the sampler's sort is of 1M-entry chunks). Peak: above the "
        "rank's RSS before its first label vector, so the rank's other state is not counted.",
        "",
        "### How it was measured",
        "",
    ]
    out += provenance("bench.labels", runtime)
    out += [
        "- 2 ranks spawned with torchrun's environment (gloo, localhost TCP), one thread each; "
        "/proc/self/clear_refs ← 5 before each step, VmHWM after it.",
        "- Labels: 80% of samples keep their cluster of the previous epoch, the rest are "
        "uniform over k, so every cluster is non-empty and NMI is near DeepCluster's plateau.",
        "",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=100_000_000, help="number of samples")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    print(f"bench.labels: the label path of {args.n:,} samples on 2 gloo ranks", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        ranks = run_ranks(2, rank_main, args.n, folder, timeout=3600, threads=None)
    for name in ranks[0]["steps"]:
        cells = [f"{r['steps'][name]['seconds']:.2f} s {r['steps'][name]['peak_kib'] / 1024:,.0f}"
                 " MiB" for r in ranks]  # fmt: skip
        print(f"  {name}: " + " | ".join(cells), flush=True)
    section = report(args.n, ranks, time.perf_counter() - t0)
    publish(SECTION, section, not args.no_write)
    print(f"runtime {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
