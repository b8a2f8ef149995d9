"""Clustering each layer's activations: what k-means finds at every depth, trained or not.

On MNIST-5k, `cluster-pipeline activations --layers block1,block2,block3,embedding --k 10` runs
on a randomly initialised network and on the same architecture after DeepCluster
(`configs/demo_mnist.yaml`, trained here on 2 local ranks), and its per-layer table (NMI, ARI,
purity against the true digits) is written to BENCHMARKS.md, once with global average pooling and
once with a 4 x 4 grid, which keeps the spatial layout.

    .venv/bin/python -m bench.activations                 # make bench-activations
    .venv/bin/python -m bench.activations --checkpoint runs/<run>/checkpoints/<last>.pt --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import (
    final_checkpoint,
    local_command,
    new_bench_dir,
    provenance,
    publish,
    table,
)

SECTION = "## Activations: clustering each layer (MNIST-5k)"
CONFIG = "configs/demo_mnist.yaml"
LAYERS = "block1,block2,block3,embedding"
POOLS = ("avg", "grid:4")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="a DeepCluster run checkpoint (default: train one)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def layer_table(args: argparse.Namespace, out: Path, weights: list[str], pool: str) -> list[dict]:
    """`activations` over every layer in one pass; its layers.json rows."""
    cmd = ["activations", *weights, "--layers", LAYERS, "--k", str(args.k), "--pool", pool,
           f"run.dir={out}", "run.progress=false", "wandb.mode=disabled"]  # fmt: skip
    local_command(args.nproc, cmd, out.parent / f"{out.name}.log")
    return json.loads((out / "activations" / "layers.json").read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    bench_dir = new_bench_dir("activations")
    ckpt = args.checkpoint
    if ckpt is None:
        run = bench_dir / "deepcluster"
        cmd = ["train", "--config", CONFIG, f"run.dir={run}", "run.progress=false",
               "wandb.mode=disabled"]  # fmt: skip
        local_command(args.nproc, cmd, bench_dir / "deepcluster.log")
        ckpt = str(final_checkpoint(run))
    networks = {
        "random init": ["--random-init", "--config", CONFIG],
        "DeepCluster": ["--checkpoint", ckpt],
    }
    rows = []
    for pool in POOLS:
        for name, weights in networks.items():
            slug = f"{name.replace(' ', '-').lower()}-{pool.replace(':', '')}"
            for r in layer_table(args, bench_dir / slug, weights, pool):
                rows.append([name, pool, r["layer"], str(r["dim"]), f"{r['nmi']:.3f}",
                             f"{r['ari']:.3f}", f"{r['purity']:.3f}"])  # fmt: skip
                print(f"  {name:12s} {pool:7s} {rows[-1][2]:10s} NMI {rows[-1][4]}", flush=True)
    out = [SECTION, "", f"k-means with k={args.k} on each layer's pooled activations, against "
           "the true digits (NMI, ARI, mean purity of the clusters):", ""]  # fmt: skip
    out += table(["network", "pooling", "layer", "width", "NMI", "ARI", "purity"], rows)
    out += [
        "",
        "### How it was measured",
        "",
        *provenance("bench.activations", time.perf_counter() - t0),
    ]
    out += [
        f"- `cluster-pipeline activations --layers {LAYERS} --k {args.k} --pool RULE` on "
        f"{args.nproc} local ranks, all 5000 images; DeepCluster: `{ckpt}` "
        f"(`{CONFIG}`), random init: the same architecture as initialised with train.seed=0.",
        "- Each layer: PCA to min(cluster.pca_dim, width), whitening, L2, faiss k-means with "
        "the empty-cluster split, as a DeepCluster epoch clusters its embedding.",
        "",
    ]
    publish(SECTION, "\n".join(out), not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
