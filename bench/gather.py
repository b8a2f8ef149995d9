"""Gather: rank 0's peak memory during `gather_features`, and its time per GB.

Two gloo ranks (spawned processes with torchrun's environment) each hold their share of an
N x d float32 feature matrix, as `extract_features` leaves it, and call `gather_features`.
Rank 0's peak resident memory during the call is read from the kernel: /proc/self/clear_refs
("5") resets VmHWM just before, VmHWM is read just after; VmRSS before is the base. This
counts every allocation (numpy, torch, gloo's buffers), which tracemalloc would not.
As a floor for the time, the same bytes also go from rank 1 to rank 0 as bare
`send`/`recv` of preallocated tensors.

    .venv/bin/python -m bench.gather                   # make bench-gather
    .venv/bin/python -m bench.gather --n 200000 --no-write
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import provenance, publish, table
from cluster_pipeline import dist
from cluster_pipeline.data.loader import rank_partition
from cluster_pipeline.features import gather
from cluster_pipeline.testing.multiproc import run_ranks

SECTION = "## Gather (dist.gather_features, rank 0's memory and time)"


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert m is not None, field
    return int(m.group(1))


def reset_peak() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def rank_main(rank: int, world: int, n: int, d: int, repeats: int) -> dict:
    ctx = dist.init_distributed(timeout_s=600, heartbeat_timeout_s=0)  # left by run_ranks
    index = rank_partition(n, rank, world)
    feats = np.empty((len(index), d), dtype=np.float32)
    feats[:] = np.arange(d, dtype=np.float32)  # touch every page
    feats[:, 0] = index  # row i says which sample it is: checked on rank 0
    runs = []
    for _ in range(repeats):
        dist.barrier(ctx)
        base = _status_kib("VmRSS")
        reset_peak()
        start = time.perf_counter()
        gathered = gather.gather_features(ctx, index, feats, n)
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
        if gathered is not None:
            assert np.array_equal(gathered.feats[:, 0], np.arange(n, dtype=np.float32))
        del gathered
        runs.append({"seconds": seconds, "base_kib": base, "peak_kib": peak})
    # The floor: rank 1's share as one bare send/recv of the whole array.
    src = 1 % world
    share = len(rank_partition(n, src, world))
    bare = []
    for _ in range(repeats):
        dist.barrier(ctx)
        start = time.perf_counter()
        if world > 1 and rank == src:
            dist.send(ctx, feats, dst=0)
        elif world > 1 and rank == 0:
            dist.recv(ctx, (share, d), np.float32, src)
        bare.append(time.perf_counter() - start)
    dist.barrier(ctx)
    return {"runs": runs, "bare": bare, "share_rows": share, "own_rows": len(index)}


def report(n: int, d: int, ranks: list[dict], args: argparse.Namespace, runtime: float) -> str:
    r0 = ranks[0]
    matrix = n * d * 4
    growth = [(r["peak_kib"] - r["base_kib"]) * 1024 for r in r0["runs"]]
    own = r0["own_rows"] * d * 4
    secs = [r["seconds"] for r in r0["runs"]]
    worst = max(growth) / matrix
    gb = matrix / 1e9
    bare_gb = r0["share_rows"] * d * 4 / 1e9
    out = [SECTION, ""]
    out += [
        f"**Rank 0's peak memory growth during gather_features ÷ feature matrix bytes: "
        f"{worst:.3f}** (target ≤ 1.5: {'met' if worst <= 1.5 else 'MISSED'}); "
        f"{min(secs) / gb:.2f} s per GB of the gathered matrix ({n:,} x {d} float32, "
        f"{matrix / 2**30:.2f} GiB, 2 gloo ranks on this machine). Counting also rank 0's own "
        f"share, which the caller holds before and after the call: {worst + own / matrix:.3f}.",
        "",
    ]
    rows = [
        [
            str(i),
            f"{g / 2**20:.0f}",
            f"{g / matrix:.3f}",
            f"{(g + own) / matrix:.3f}",
            f"{s:.2f}",
            f"{s / gb:.2f}",
        ]
        for i, (g, s) in enumerate(zip(growth, secs, strict=True))
    ]
    out += table(
        [
            "run",
            "peak growth MiB",
            "growth ÷ matrix",
            "(growth + own share) ÷ matrix",
            "seconds",
            "s per GB",
        ],
        rows,
    )
    best_bare = min(r0["bare"])
    out += [
        "",
        f"Floor: rank 1's share ({bare_gb:.2f} GB) as one bare `send`/`recv` of an existing "
        f"tensor takes {best_bare:.2f} s ({best_bare / bare_gb:.2f} s per GB); gather_features "
        f"moves the same bytes (rank 0's own share is a local copy) in {min(secs):.2f} s: "
        f"{min(secs) / best_bare:.2f}x the floor.",
        "",
        "### How it was measured",
        "",
    ]
    out += provenance("bench.gather", runtime)
    out += [
        f"- 2 ranks spawned with torchrun's environment (gloo, localhost TCP), one thread "
        f"each; rank r holds rows `rank_partition(N, r, 2)` of an {n:,} x {d} float32 matrix, "
        f"every page touched, and calls `gather_features(ctx, index, feats, N)` "
        f"{args.repeats} times; rank 0 checks every row landed at its sample.",
        "- Peak: `/proc/self/clear_refs` ← 5 resets VmHWM to the current RSS just before the "
        "call, VmHWM is read right after it, minus VmRSS before: the most rank 0 ever held "
        "beyond what it held on entry (its share included in that base), counting numpy, torch "
        "and gloo allocations alike. The result is freed between runs.",
        f"- Chunk size `GATHER_CHUNK_BYTES` = {gather.GATHER_CHUNK_BYTES >> 20} MiB.",
        "- Time: the headline is the best run. The first run in a fresh process is slower "
        "on this machine (a VM) because writing memory the process has never touched makes "
        "the host back it: a plain `np.empty(2**28, float32)[:] = 1` takes 1.6 s the first "
        "time and 0.11 s after. The memory figure is the worst run.",
        "",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows of the feature matrix")
    p.add_argument("--d", type=int, default=256, help="feature dimension")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    print(f"bench.gather: {args.n:,} x {args.d} float32 over 2 gloo ranks", flush=True)
    ranks = run_ranks(2, rank_main, args.n, args.d, args.repeats, timeout=600, threads=None)
    for i, r in enumerate(ranks[0]["runs"]):
        print(
            f"  run {i}: {r['seconds']:.2f} s, rank 0 peak growth "
            f"{(r['peak_kib'] - r['base_kib']) / 1024:.0f} MiB",
            flush=True,
        )
    section = report(args.n, args.d, ranks, args, time.perf_counter() - t0)
    publish(SECTION, section, not args.no_write)
    print(f"runtime {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
