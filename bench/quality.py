"""DeepCluster's central claim in miniature: k-means on learned features beats k-means on pixels.

On MNIST-5k, three feature sets are clustered with k=10 and scored against the true digits:

  (a) raw pixels (read from the shards, float in [0, 1], flattened to 784-d);
  (b) a randomly initialized network (the demo architecture, the training run's own init);
  (c) the same network after DeepCluster training on 2 local ranks (`launch.local`).

All three go through the same preprocessing and the same k-means seeds. The primary
preprocessing is the one DeepCluster itself uses in the config (PCA to cluster.pca_dim, whitening,
L2); three other preprocessings are reported as a check that the verdict does not hinge on it.
Prints Markdown and replaces its section of BENCHMARKS.md.

    .venv/bin/python -m bench.quality                 # make bench-quality
    .venv/bin/python -m bench.quality --seeds 0,1,2 cluster.k=20 train.epochs=20
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DIST_VARS, REPO, git_commit, machine, new_bench_dir, replace_section
from cluster_pipeline import dist
from cluster_pipeline.clustering import kmeans, metrics
from cluster_pipeline.config import Config, load_config
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.models.nets import ClusterNet, build_model
from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.metrics_file import read_metrics
from cluster_pipeline.run.setup import open_data_and_model

SECTION = "## Quality: DeepCluster in miniature (MNIST-5k)"
K = 10
FEATURE_SETS = ("raw pixels", "random network", "DeepCluster")
# Overrides the bench sets itself, one value per seed and per run directory.
RESERVED = ("train.seed", "run.dir", "run.resume")


@dataclass(frozen=True)
class Preprocessing:
    name: str
    pca_dim: int  # 0: no PCA
    whiten: bool
    l2: bool


@dataclass
class SeedResult:
    seed: int
    run_dir: Path
    train_s: float
    dims: dict[str, int]
    # feature set -> preprocessing name -> [(nmi, ari) per k-means seed]
    scores: dict[str, dict[str, list[tuple[float, float]]]]
    epochs: list[dict[str, Any]]


def seed_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers like 0,1,2") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/demo_mnist.yaml")
    p.add_argument(
        "--seeds",
        type=seed_list,
        default=[0, 1, 2],
        help="comma-separated training seeds, e.g. 0,1,2; each is one DeepCluster run "
        "(about 1-3 min on 2 cores)",
    )
    p.add_argument(
        "--kmeans-seeds",
        type=int,
        default=5,
        help="k-means restarts per feature set and training seed",
    )
    p.add_argument("--nproc", type=int, default=2, help="local ranks of each training run")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("overrides", nargs="*", help="config key=value overrides for the training runs")
    args = p.parse_args(argv)
    for item in args.overrides:
        if item.split("=", 1)[0] in RESERVED:
            p.error(f"override {item!r} is set by the bench; use --seeds for train.seed")
    return args


def single_process_env() -> None:
    """Drop torchrun's variables so `dist.init_distributed` here is a world of one."""
    for var in DIST_VARS:
        os.environ.pop(var, None)


def raw_pixels(reader: SampleReader) -> np.ndarray:
    """Every sample's pixels as float in [0, 1], flattened: row i is sample i."""
    images = reader.read_batch(np.arange(reader.index.num_samples))
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def network_features(
    model: ClusterNet, reader: SampleReader, cfg: Config, ctx: dist.DistContext
) -> np.ndarray:
    """The embedding DeepCluster clusters, single process: row i is sample i."""
    idx, feats, _ = extract_features(model.to(ctx.device), reader, cfg, ctx)  # none skipped
    out = np.full((reader.index.num_samples, feats.shape[1]), np.nan, dtype=np.float32)
    out[idx] = feats
    if np.isnan(out).any():
        raise RuntimeError("extraction did not cover every sample")
    return out


def train_deepcluster(
    cfg_path: str, run_dir: Path, seed: int, overrides: list[str], nproc: int, log_path: Path
) -> float:
    """One DeepCluster run on `nproc` local ranks in a subprocess; returns its wall time."""
    cmd = [
        sys.executable, "-m", "launch.local", "--nproc", str(nproc), "train", "--config", cfg_path,
        f"run.dir={run_dir}", "run.progress=false", "wandb.mode=disabled", f"train.seed={seed}",
        *overrides,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    print(f"  training: {' '.join(cmd[1:])}\n  log: {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"training exited with status {rc}; last lines of {log_path}:\n{tail}")
    return seconds


def trained_model(run_dir: Path, cfg: Config) -> ClusterNet:
    state = checkpoint.load_latest(run_dir)
    if state is None:
        raise RuntimeError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
    if state["position"]["epoch"] != cfg.train.epochs:
        raise RuntimeError(
            f"{run_dir}: latest checkpoint is after epoch {state['epoch']}, expected "
            f"{cfg.train.epochs} (train.epochs); the run did not finish"
        )
    model = build_model(cfg.model, cfg.data.channels, cfg.cluster.k)
    model.load_state_dict(state["model"])
    return model


def score(
    feats: np.ndarray, truth: np.ndarray, prep: Preprocessing, seeds: list[int], cfg: Config
) -> list[tuple[float, float]]:
    """(NMI, ARI) against the true digits of k=10 k-means, one per k-means seed."""
    out = []
    section = replace(
        cfg.cluster, k=K, pca_dim=prep.pca_dim, whiten=prep.whiten, l2_normalize=prep.l2
    )
    for s in seeds:
        c = kmeans.cluster_features(feats, section, s)
        out.append((metrics.nmi(truth, c.labels) or 0.0, metrics.ari(truth, c.labels) or 0.0))
    return out


def preprocessings(cfg: Config) -> list[Preprocessing]:
    """The config's own preprocessing first (primary), then the checks."""
    c = cfg.cluster
    primary = Preprocessing(
        f"PCA-{c.pca_dim}{' + whiten' if c.whiten else ''}{' + L2' if c.l2_normalize else ''}"
        ", as in training",
        c.pca_dim, c.whiten, c.l2_normalize,
    )  # fmt: skip
    checks = [
        Preprocessing(f"PCA-{c.pca_dim} + L2", c.pca_dim, False, True),
        Preprocessing("L2 only", 0, False, True),
        Preprocessing("none", 0, False, False),
    ]
    same = {(primary.pca_dim, primary.whiten, primary.l2)}
    return [primary, *(p for p in checks if (p.pca_dim, p.whiten, p.l2) not in same)]


def run_seed(
    args: argparse.Namespace, bench_dir: Path, seed: int, raw: np.ndarray, ctx: dist.DistContext
) -> SeedResult:
    cfg = load_config(args.config, [*args.overrides, f"train.seed={seed}", "run.progress=false"])
    run_dir = bench_dir / f"seed-{seed}"
    train_s = train_deepcluster(
        args.config, run_dir, seed, args.overrides, args.nproc, bench_dir / f"train-seed-{seed}.log"
    )
    # The same set-up as run_deepcluster: `init` is exactly the training run's initialization.
    index, reader, init = open_data_and_model(cfg, ctx)
    truth = index.labels
    assert truth is not None
    feats = {
        "raw pixels": raw,
        "random network": network_features(init, reader, cfg, ctx),
        "DeepCluster": network_features(trained_model(run_dir, cfg), reader, cfg, ctx),
    }
    kseeds = [1000 * seed + j for j in range(args.kmeans_seeds)]
    scores = {
        name: {p.name: score(f, truth, p, kseeds, cfg) for p in preprocessings(cfg)}
        for name, f in feats.items()
    }
    dims = {name: int(f.shape[1]) for name, f in feats.items()}
    return SeedResult(seed, run_dir, train_s, dims, scores, read_metrics(run_dir))


def mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def pooled(results: list[SeedResult], feature_set: str, prep: str, col: int) -> list[float]:
    return [s[col] for r in results for s in r.scores[feature_set][prep]]


def fmt(v: float | None, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def verdict(results: list[SeedResult], preps: list[Preprocessing]) -> list[str]:
    """Plain sentences on whether the trained features beat both baselines."""
    primary = preps[0].name
    m = {f: float(np.mean(pooled(results, f, primary, 0))) for f in FEATURE_SETS}
    wins = sum(
        np.mean([s[0] for s in r.scores["DeepCluster"][primary]])
        > max(np.mean([s[0] for s in r.scores[f][primary]]) for f in FEATURE_SETS[:2])
        for r in results
    )
    beats = m["DeepCluster"] > m["raw pixels"] and m["DeepCluster"] > m["random network"]
    lines = [
        f"**Verdict ({primary}):** DeepCluster features "
        + ("beat both baselines" if beats else "do NOT beat both baselines")
        + f": NMI {m['DeepCluster']:.3f} vs {m['raw pixels']:.3f} (raw pixels) and "
        f"{m['random network']:.3f} (random network), mean over all runs; better than both "
        f"in {wins} of {len(results)} training seeds."
    ]
    best = {
        f: max((float(np.mean(pooled(results, f, p.name, 0))), p.name) for p in preps)
        for f in FEATURE_SETS
    }
    margin = best["DeepCluster"][0] - max(best["raw pixels"][0], best["random network"][0])
    best_beats = margin > 0
    lines.append(
        "**Best preprocessing for each feature set:** "
        + ", ".join(f"{f} {v:.3f} ({p})" for f, (v, p) in best.items())
        + (
            f". Trained features still win, by {margin:+.3f} NMI over the best baseline."
            if best_beats
            else ". With each feature set given its own best preprocessing, the trained "
            "features do NOT win."
        )
    )
    per_prep = []
    for p in preps:
        trained = pooled(results, "DeepCluster", p.name, 0)
        base = max(FEATURE_SETS[:2], key=lambda f: np.mean(pooled(results, f, p.name, 0)))
        gap = float(np.mean(trained) - np.mean(pooled(results, base, p.name, 0)))
        per_prep.append((gap, p.name, base, float(np.std(trained))))
    won = sum(gap > 0 for gap, *_ in per_prep)
    gap, name, base, sd = min(per_prep)
    lines.append(
        f"**Preprocessing by preprocessing:** DeepCluster beats the better baseline under {won} "
        f"of {len(per_prep)}; the smallest gap is {gap:+.3f} NMI ({name}, vs {base})"
        + (", within one sd of the trained runs: no real win there." if abs(gap) < sd else ".")
    )
    return lines


def report(
    args: argparse.Namespace,
    results: list[SeedResult],
    preps: list[Preprocessing],
    timings: dict[str, float],
    num_samples: int,
) -> str:
    """The Markdown section: verdict, tables, epoch curves, and how it was measured."""
    primary = preps[0].name
    n_runs = len(results) * args.kmeans_seeds
    cfg = load_config(args.config, args.overrides)
    dims = results[0].dims
    out = [SECTION, ""]
    out += [
        f"Tests DeepCluster's central claim in miniature: that k-means (k={K}) on features "
        "learned by DeepCluster recovers the MNIST digits better than k-means on raw pixels or on "
        f"a randomly initialized network. N={num_samples} digits; NMI/ARI against the true "
        f"labels; mean ± sd over {len(results)} training seeds × "
        f"{args.kmeans_seeds} k-means seeds = {n_runs} runs per cell.",
        "",
    ]
    for line in verdict(results, preps):
        out += [line, ""]
    out += [f"### k-means k={K}, preprocessing {primary}", ""]
    out += ["| features | dim | NMI | ARI |", "|---|---:|---:|---:|"]
    for f in FEATURE_SETS:
        nmi, ari = pooled(results, f, primary, 0), pooled(results, f, primary, 1)
        out.append(f"| {f} | {dims[f]} | {mean_sd(nmi)} | {mean_sd(ari)} |")
    out += ["", "Per training seed (NMI, mean over k-means seeds):", ""]
    out += ["| seed | " + " | ".join(FEATURE_SETS) + " | train wall s |",
            "|---:|" + "---:|" * (len(FEATURE_SETS) + 1)]  # fmt: skip
    for r in results:
        cells = [f"{np.mean([s[0] for s in r.scores[f][primary]]):.3f}" for f in FEATURE_SETS]
        out.append(f"| {r.seed} | " + " | ".join(cells) + f" | {r.train_s:.0f} |")
    out += ["", "### Same features, other preprocessings (NMI)", ""]
    out += ["| preprocessing | " + " | ".join(FEATURE_SETS) + " |",
            "|---|" + "---:|" * len(FEATURE_SETS)]  # fmt: skip
    for p in preps:
        cells = [mean_sd(pooled(results, f, p.name, 0)) for f in FEATURE_SETS]
        out.append(f"| {p.name} | " + " | ".join(cells) + " |")
    out += ["", "### Training curves (from each run's metrics.jsonl)", ""]
    out += [
        f"NMI(t-1,t) is the agreement of consecutive epochs' assignments; NMI vs truth is that "
        f"of the training clustering itself, with k={cfg.cluster.k} (cluster.k), so it is not "
        f"comparable to the k={K} numbers above.",
        "",
    ]
    seeds = [r.seed for r in results]
    out += ["| epoch | " + " | ".join(f"NMI(t-1,t) s{s}" for s in seeds) + " | "
            + " | ".join(f"NMI vs truth s{s}" for s in seeds) + " | "
            + " | ".join(f"loss s{s}" for s in seeds) + " |",
            "|---:|" + "---:|" * (3 * len(seeds))]  # fmt: skip
    for e in range(max(len(r.epochs) for r in results)):
        rows = [r.epochs[e] if e < len(r.epochs) else {} for r in results]
        cells = [fmt(row.get("nmi_prev")) for row in rows]
        cells += [fmt(row.get("nmi_gt")) for row in rows]
        cells += [fmt(row.get("train_loss")) for row in rows]
        out.append(f"| {e} | " + " | ".join(cells) + " |")
    out += ["", "### How it was measured", ""]
    overrides = " ".join(args.overrides) or "none"
    out += [
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; commit: {git_commit()}",
        f"- Machine: {machine()}",
        f"- Command: `{' '.join(['.venv/bin/python -m bench.quality', *sys.argv[1:]])}`",
        f"- Training: `python -m launch.local --nproc {args.nproc} train --config {args.config} "
        f"run.dir=... run.progress=false wandb.mode=disabled train.seed=S` with overrides: "
        f"{overrides}; {cfg.train.epochs} epochs, cluster.k={cfg.cluster.k}, "
        f"model {cfg.model.arch} width {cfg.model.width}. Run directories: "
        f"{', '.join(f'`{r.run_dir.relative_to(REPO)}`' for r in results)}",
        f"- (a) pixels read through ShardIndex/SampleReader, /255, flattened; (b) "
        f"`open_data_and_model` (seed S, then `build_model`), i.e. the training run's own init; "
        f"(c) the final checkpoint. (b) and (c) are extracted single-process in eval mode "
        f"(`extract_features`, center crop, config normalization), {dims['DeepCluster']}-d.",
        f"- Clustering: `kmeans.cluster_features(k={K}, niter={cfg.cluster.niter})` with k-means "
        f"seeds 1000·S + 0..{args.kmeans_seeds - 1}, the same seeds for all three feature sets.",
        f"- Wall time: {timings['total']:.0f} s in all, of which training "
        f"{timings['train']:.0f} s, extraction and k-means {timings['eval']:.0f} s.",
        "",
        "<details><summary>Config file</summary>",
        "",
        "```yaml",
        (REPO / args.config).read_text().rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    single_process_env()
    ctx = dist.init_distributed(timeout_s=600, heartbeat_timeout_s=0)  # a world of one
    if ctx.distributed:
        raise SystemExit("bench.quality must run as one process; RANK/WORLD_SIZE are still set")
    t0 = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    index = ShardIndex.load(REPO / cfg.data.shards)
    if index.labels is None:
        raise SystemExit(f"{cfg.data.shards} has samples without a class; the bench needs them")
    reader = SampleReader(index, cfg.data.load_size, cfg.data.channels)
    raw = raw_pixels(reader)
    bench_dir = new_bench_dir("quality")
    results = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        results.append(run_seed(args, bench_dir, seed, raw, ctx))
        r = results[-1]
        nmis = {f: np.mean([s[0] for s in r.scores[f][preprocessings(cfg)[0].name]])
                for f in FEATURE_SETS}  # fmt: skip
        print("  NMI " + ", ".join(f"{f} {v:.3f}" for f, v in nmis.items()), flush=True)
    total = time.perf_counter() - t0
    train = sum(r.train_s for r in results)
    timings = {"total": total, "train": train, "eval": total - train}
    section = report(args, results, preprocessings(cfg), timings, index.num_samples)
    print("\n" + section)
    (bench_dir / "results.json").write_text(json.dumps({
        "args": vars(args), "timings": timings,
        "results": [{"seed": r.seed, "run_dir": str(r.run_dir), "train_s": r.train_s,
                     "dims": r.dims, "scores": r.scores} for r in results],
    }, indent=1))  # fmt: skip
    if not args.no_write:
        replace_section(REPO / "BENCHMARKS.md", SECTION, section)
        print(f"wrote section {SECTION!r} of {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
