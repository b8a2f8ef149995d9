"""Epoch breakdown of the demo: how much of a DeepCluster epoch is not the model.

Runs `configs/demo_mnist.yaml` on 2 local ranks (`launch.local`, as `make demo`) and reads the
phase times every epoch records in metrics.jsonl (rank 0's wall clock). Extraction includes the
model's forward pass; to split it, the forward alone (to_float, center crop, `model.features`,
eval mode, batches of data.extract_batch_size) is timed afterwards on 2 concurrent processes,
one thread each like the ranks, on the same images already in memory, with the final weights.
What extraction took beyond that is its I/O: reading and decoding the shards, starting the
loader's workers, waiting on them. The training phase is counted as model compute, as a
whole; its own share of data loading is estimated the same way (DDP steps on batches already
in memory) and reported beside.

    .venv/bin/python -m bench.epoch                    # make bench-epoch
    .venv/bin/python -m bench.epoch train.epochs=4 --no-write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, new_bench_dir, provenance, publish, table
from bench.quality import train_deepcluster
from cluster_pipeline import dist
from cluster_pipeline.config import Config, load_config, per_rank_batch_size
from cluster_pipeline.data.augment import center_crop, to_float
from cluster_pipeline.data.loader import rank_partition
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.data.sampler import rank_slice, uniform_cluster_sampler
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.models.nets import ClusterNet, build_model
from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.metrics_file import read_metrics
from cluster_pipeline.testing.multiproc import run_ranks
from cluster_pipeline.training.recipe import make_optimizer
from cluster_pipeline.training.step import augment, train_step

SECTION = "## Epoch breakdown (demo: MNIST-5k, 2 local ranks)"
PHASES = ("extract", "gather", "cluster", "broadcast", "train", "checkpoint")
TARGET = 0.15


def load_model(cfg: Config, run_dir: Path) -> ClusterNet:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.channels, cfg.cluster.k)
    state = checkpoint.load_latest(run_dir)
    if state is not None:
        model.load_state_dict(state["model"])
    return model


def model_only(rank: int, world: int, cfg: Config, run_dir: str, repeats: int) -> dict:
    """This rank's extraction forward and training steps on images already in memory.

    Collective: run on every rank (the training steps go through DDP, as in the run).
    """
    ctx = dist.init_distributed(timeout_s=600, heartbeat_timeout_s=0)
    index = ShardIndex.load(REPO / cfg.data.shards)
    reader = SampleReader(index, cfg.data.load_size, cfg.data.channels)
    mine = rank_partition(index.num_samples, rank, world)
    images = torch.from_numpy(reader.read_batch(mine))
    model = load_model(cfg, Path(run_dir))
    b = cfg.data.extract_batch_size
    extract_features(model, reader, cfg, ctx)  # starts the forkserver, as epoch 0 of a run does
    forward, extract = [], []
    for _ in range(repeats):
        dist.barrier(ctx)
        start = time.perf_counter()
        extract_features(model, reader, cfg, ctx)
        extract.append(time.perf_counter() - start)
        model.eval()
        dist.barrier(ctx)
        start = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(images), b):
                x = to_float(images[s : s + b], cfg.data.mean, cfg.data.std)
                model.features(center_crop(x, cfg.data.image_size))
        forward.append(time.perf_counter() - start)
    # Training: the epoch's number of DDP steps on batches drawn from memory.
    every = reader.read_batch(np.arange(index.num_samples))
    labels = np.random.default_rng(0).integers(0, cfg.cluster.k, index.num_samples)
    bs = per_rank_batch_size(cfg, world)
    draws = uniform_cluster_sampler(labels, cfg.train.samples_per_epoch or len(labels), seed=0)
    steps = rank_slice(draws, rank, world, bs).reshape(-1, bs)
    ddp = dist.wrap_ddp(ctx, model, cfg.model.sync_bn)
    optimizer = make_optimizer(model, cfg, bs * world)
    targets = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(rank)
    model.train()
    train = []
    for _ in range(repeats):
        dist.barrier(ctx)
        start = time.perf_counter()
        for idx in steps:
            x = to_float(torch.from_numpy(every[idx]), cfg.data.mean, cfg.data.std)
            train_step(ddp, optimizer, augment(x, cfg, gen), targets[idx])
        train.append(time.perf_counter() - start)
    dist.barrier(ctx)
    return {
        "forward": forward,
        "extract": extract,
        "train": train,
        "images": len(mine),
        "steps": len(steps),
    }


def mean_phase(rows: list[dict], name: str) -> float:
    return float(np.mean([r.get(f"time_{name}_s") or 0.0 for r in rows]))


def report(
    rows: list[dict], model: list[dict], cfg: Config, args: argparse.Namespace, info: dict
) -> str:
    steady = rows[1:] if len(rows) > 1 else rows
    t = {p: mean_phase(steady, p) for p in PHASES}
    first = {p: mean_phase(rows[:1], p) for p in PHASES}
    # Both ranks run concurrently; a phase ends with the slower one: take the slower rank.
    # Side by side in the same processes: the real extraction, then the forward alone.
    ef = max(min(r["extract"]) for r in model)
    fw = max(min(r["forward"]) for r in model)
    train_compute = max(min(r["train"]) for r in model)
    forward = t["extract"] * min(1.0, fw / ef)  # the run's extract phase, split in that ratio
    extract_io = t["extract"] - forward
    non_model = extract_io + t["gather"] + t["cluster"] + t["broadcast"]
    model_s = forward + t["train"]
    share = non_model / (non_model + model_s)
    total = sum(t.values())
    out = [SECTION, ""]
    out += [
        f"**Non-model share of an epoch (extraction I/O + gather + clustering + broadcast, "
        f"against model compute = extraction forward + training): {share:.1%}** (target ≤ "
        f"{TARGET:.0%}: {'met' if share <= TARGET else 'MISSED'}). Mean of epochs 1..."
        f"{len(rows) - 1} of one run, {cfg.train.epochs} epochs, {info['n']} images, "
        f"k={cfg.cluster.k}.",
        "",
    ]
    phase_rows = []
    for p in PHASES:
        phase_rows.append([p, f"{t[p]:.3f}", f"{t[p] / total:.1%}", f"{first[p]:.3f}"])
    phase_rows.insert(
        1, ["  of which model forward", f"{forward:.3f}", f"{forward / total:.1%}", "-"]
    )
    phase_rows.insert(
        2, ["  of which I/O (the rest)", f"{extract_io:.3f}", f"{extract_io / total:.1%}", "-"]
    )
    phase_rows.append(
        ["epoch (sum of phases)", f"{total:.3f}", "100%", f"{sum(first.values()):.3f}"]
    )
    out += table(
        ["phase (rank 0, s per epoch)", "mean, epochs ≥ 1", "share", "epoch 0"], phase_rows
    )
    train_io = max(0.0, t["train"] - train_compute)
    with_ckpt = (non_model + t["checkpoint"]) / total
    out += [
        "",
        f"Split of extraction, measured side by side after the run (same 2 processes, "
        f"alternating, best of {args.repeats}, slower rank): `extract_features` {ef:.3f} s, "
        f"the forward alone on the same images in memory {fw:.3f} s, so "
        f"{1 - min(1.0, fw / ef):.0%} of extraction is I/O; the run's extract phase is split "
        "in that ratio.",
        "",
        f"Counting the checkpoint as overhead too: {with_ckpt:.1%} of the epoch. Inside the "
        f"training phase, the same {info['steps']} DDP steps per rank on batches already in "
        f"memory take {train_compute:.3f} s, so about {train_io:.3f} s "
        f"({train_io / max(t['train'], 1e-9):.0%} of the phase) is its own data loading "
        f"(loader start-up, read, decode): with that counted as overhead as well, "
        f"{(non_model + train_io) / (non_model + model_s):.1%} is not model compute.",
        "",
        "### How it was measured",
        "",
    ]
    out += provenance("bench.epoch", info["runtime"])
    overrides = " ".join(args.overrides) or "none"
    out += [
        f"- Run: `python -m launch.local --nproc 2 train --config {args.config} run.dir=... "
        f"run.progress=false wandb.mode=disabled train.seed={args.seed}` (overrides: "
        f"{overrides}), {info['train_s']:.0f} s wall; run directory "
        f"`{info['run_dir'].relative_to(REPO)}`. Phase times are rank 0's `time_*_s` from "
        "metrics.jsonl; epoch 0 (forkserver start, first touch of memory) is shown apart.",
        f"- Extraction split: 2 spawned gloo ranks, one thread each (as `launch.local` gives 2 "
        f"ranks on 2 cores), the final checkpoint's weights and the run's config. After one "
        f"warm-up call (it starts the forkserver, as epoch 0 does), they alternate: "
        f"`extract_features` (the real one: {cfg.data.num_workers} loader workers, batches of "
        f"{cfg.data.extract_batch_size}, its collectives) and the forward alone (to_float, "
        f"center_crop, `model.features`, eval mode, same batches) on the rank's "
        f"{info['images']} images decoded into memory beforehand. The I/O fraction "
        "1 − forward ÷ extract_features, measured under the same conditions, splits the run's "
        "extract phase.",
        f"- Training compute: the same processes, DDP (gloo), {info['steps']} steps of "
        f"{per_rank_batch_size(cfg, 2)} images per rank (an epoch's worth), augmentation and "
        f"SGD as `train_step`, batches indexed from memory; best of {args.repeats}.",
        "- The non-model share is (extract − forward + gather + cluster + broadcast) ÷ "
        "(that + forward + train); the checkpoint is left out of both, as the target is stated.",
        "",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/demo_mnist.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="passes of the model-only timing")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("overrides", nargs="*", help="config key=value overrides for the run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    cfg = load_config(
        args.config, [*args.overrides, f"train.seed={args.seed}", "run.progress=false"]
    )
    bench_dir = new_bench_dir("epoch", announce=False)
    run_dir = bench_dir / "run"
    train_s = train_deepcluster(
        args.config, run_dir, args.seed, args.overrides, 2, bench_dir / "train.log"
    )
    rows = read_metrics(run_dir)
    print(f"  {len(rows)} epochs in {train_s:.0f} s; timing the model alone", flush=True)
    model = run_ranks(2, model_only, cfg, str(run_dir), args.repeats, timeout=600, threads=None)
    n = ShardIndex.load(REPO / cfg.data.shards).num_samples
    info = {
        "runtime": time.perf_counter() - t0,
        "train_s": train_s,
        "run_dir": run_dir,
        "n": n,
        "images": model[0]["images"],
        "steps": model[0]["steps"],
    }
    section = report(rows, model, cfg, args, info)
    publish(SECTION, section, not args.no_write)
    print(f"runtime {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
