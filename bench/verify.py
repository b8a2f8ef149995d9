"""make-shards --verify: what decoding every image before writing costs, in images per second.

A tree of synthetic ImageNet-size JPEGs (500x375, quality 90, smooth colour fields with finer
texture: sizes and decode costs close to photos', not noise) in class folders is written as
shards the way `cluster-pipeline make-shards --source imagefolder:TREE` does it, with --verify
(each file decoded once by `decode.verify` over W processes before anything is written) and
with --no-verify (size and magic bytes only), passes of the two alternating.

    .venv/bin/python -m bench.verify                 # make bench-verify: 10k JPEGs, 2 workers
    .venv/bin/python -m bench.verify --n 200 --no-write
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import provenance, publish, table
from cluster_pipeline.data.shards import load_source, write_shards

SECTION = "## make-shards --verify (every image decoded before writing)"
MODES = {"--verify": True, "--no-verify": False}


def smooth_fields(rng: np.random.Generator, count: int, width: int, height: int) -> np.ndarray:
    """`count` (height, width, 3) float32 colour fields: coarse to fine random grids, upsampled."""
    out = np.zeros((count, height, width, 3), np.float32)
    for k in range(count):
        for cells, amp in ((4, 90.0), (16, 40.0), (64, 15.0)):
            small = rng.standard_normal((cells, cells, 3)).astype(np.float32) * amp
            for c in range(3):
                chan = Image.fromarray(small[..., c]).resize(
                    (width, height), Image.Resampling.BICUBIC
                )
                out[k, ..., c] += np.asarray(chan)
    return out


def _write_chunk(job: tuple[Path, int, int, int, int, int, int]) -> int:
    """Images lo..hi-1 of the tree: two fields of a small pool, shifted and blended, plus grain,
    so every file differs; returns their bytes in all."""
    root, lo, hi, classes, width, height, seed = job
    rng = np.random.default_rng([seed, lo])
    pool = smooth_fields(rng, 8, width, height)
    total = 0
    for i in range(lo, hi):
        a, b = rng.integers(0, len(pool), 2)
        shift = (int(rng.integers(0, height)), int(rng.integers(0, width)))
        img = 0.6 * pool[a] + 0.4 * np.roll(pool[b], shift, axis=(0, 1))
        img += rng.integers(-6, 7, size=img.shape).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img + 128.0, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        path = root / f"class{i % classes:03d}" / f"img_{i:06d}.JPEG"
        path.write_bytes(buf.getvalue())
        total += buf.tell()
    return total


def write_tree(root: Path, n: int, classes: int, width: int, height: int, seed: int,
               workers: int) -> float:  # fmt: skip
    """The ImageNet-layout tree root/class<k>/img_<i>.JPEG; returns the mean JPEG size in KiB."""
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True)
    step = max(1, -(-n // (4 * max(1, workers))))
    jobs = [(root, lo, min(n, lo + step), classes, width, height, seed) for lo in range(0, n, step)]
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        total = sum(pool.map(_write_chunk, jobs, chunksize=1))
    return total / n / 1024


def read_all(root: Path) -> None:
    """Every file read once, so that both modes read from the page cache, not from disk."""
    for path in root.rglob("*.JPEG"):
        path.read_bytes()


def one_pass(tree: Path, out: Path, verify: bool, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds to walk and check the tree, seconds to write the shards): `cmd_make_shards`."""
    t0 = time.perf_counter()
    source = load_source(f"imagefolder:{tree}", verify=verify, workers=args.workers)
    t1 = time.perf_counter()
    write_shards(source, out, args.samples_per_shard, workers=args.workers)
    t2 = time.perf_counter()
    left = [e for e in source.files or [] if e.reason]
    if len(source.ext) != args.n or left:
        raise RuntimeError(
            f"{len(source.ext)} of {args.n} images written; first left out: {left[:3]}"
        )
    shutil.rmtree(out)
    return t1 - t0, t2 - t1


def report(runs: dict[str, list[tuple[float, float]]], args: argparse.Namespace, kib: float,
           runtime: float) -> str:  # fmt: skip
    n, w = args.n, args.workers
    rate = {m: [n / (check + wr) for check, wr in r] for m, r in runs.items()}
    ratio = float(np.median(np.asarray(rate["--verify"]) / np.asarray(rate["--no-verify"])))
    check = {m: float(np.median([c for c, _ in r])) for m, r in runs.items()}
    write = {m: float(np.median([wr for _, wr in r])) for m, r in runs.items()}
    per_image_ms = (check["--verify"] - check["--no-verify"]) * w / n * 1000
    out = [
        SECTION,
        "",
        f"**make-shards --verify ÷ --no-verify, {n} ImageNet-size JPEGs, {w} workers: "
        f"{ratio:.3f} of the throughput** ({max(rate['--verify']):.0f} "
        f"against {max(rate['--no-verify']):.0f} images/s). Decoding each file once before "
        f"writing costs ~{per_image_ms:.2f} ms of CPU per image (500x375); in exchange a "
        "damaged file is left out, with its reason in manifest.jsonl, before any training "
        "instead of failing a read epochs later. The ratio is the median over "
        f"{args.repeats} passes of each pass's own ratio; images/s are each mode's best pass.",
        "",
    ]
    rows = [
        [
            f"`{m}`",
            f"{max(rate[m]):.0f}",
            f"{check[m]:.2f}",
            f"{write[m]:.2f}",
            f"{check[m] + write[m]:.2f}",
        ]
        for m in MODES
    ]
    out += table(
        ["make-shards", "images/s (best pass)", "walk + check s", "write shards s", "total s"], rows
    )
    out += ["", "### How it was measured", ""]
    out += provenance("bench.verify", runtime)
    out += [
        f"- Tree: {n} synthetic JPEGs of 500x375 (quality 90, mean {kib:.1f} KiB) in "
        f"{args.classes} class folders: blends of shifted smooth colour fields (random grids of "
        "4, 16 and 64 cells, bicubic) plus grain, every file different. Each file was read once "
        "before timing: both modes read from the page cache, so this is CPU cost, not disk speed.",
        f"- Each pass runs what `cluster-pipeline make-shards --source imagefolder:TREE --out OUT "
        f"--samples-per-shard {args.samples_per_shard} --workers {w} [--no-verify]` runs: "
        "`load_source` (the sorted walk, then per file stat, size and magic bytes, and with "
        f"--verify `decode.verify` of the whole file, over {w} processes) and `write_shards` "
        f"({w} processes writing shards side by side, manifest.jsonl, sources.npy, index.json), "
        "timed apart; the seconds are medians over passes. OUT is new each pass. The CPU per "
        "image is (walk + check with --verify - without) x workers ÷ images.",
        "- With --verify every file is read twice (once to decode it, once to copy it into its "
        "shard); on a tree that does not fit in the page cache the second read comes from disk.",
        f"- The modes alternate pass by pass ({args.repeats} passes each, the first mode "
        "changing every pass), so a slower stretch of a shared machine falls on both.",
        "",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="JPEGs in the tree")
    p.add_argument("--classes", type=int, default=10, help="class folders")
    p.add_argument("--workers", type=int, default=2, help="make-shards --workers")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="passes of each mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        tree = Path(tmp) / "tree"
        print(f"writing {args.n} JPEGs 500x375 to {tree}", flush=True)
        kib = write_tree(tree, args.n, args.classes, 500, 375, args.seed, args.workers)
        read_all(tree)
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        for r in range(args.repeats):
            for mode in list(MODES)[:: 1 if r % 2 == 0 else -1]:
                check, write = one_pass(tree, Path(tmp) / "shards", MODES[mode], args)
                runs[mode].append((check, write))
                print(f"  pass {r} {mode}: walk + check {check:.2f} s, write {write:.2f} s, "
                      f"{args.n / (check + write):.0f} images/s", flush=True)  # fmt: skip
    section = report(runs, args, kib, time.perf_counter() - t0)
    publish(SECTION, section, not args.no_write)
    print(f"runtime {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
