"""`cluster-pipeline evaluate`: linear probes per layer, kNN and k-means NMI on frozen features.

```
train split ──extract once, every tapped layer──▶ rows per rank ──┬─▶ linear_probe per layer
test split  ──extract once, every tapped layer──▶ rows per rank ──┘   (all ranks, all-reduced)
      embedding rows ──gather_features to rank 0──▶ knn_top1 (test vs train), k-means NMI (test)
      ──▶ evaluation.json, evaluation.md
```

The shards are opened twice, as data.split=train (fitting) and data.split=test (scoring),
whatever the config's data.split says: the fixed hash split of `split_ids`.

Output folder: `--out`; else <run>/eval/<checkpoint stem> for a run's checkpoint; else
runs/<config name>-eval-<time>. It holds config.yaml, logs/, evaluation.md, samples-train.npy and
samples-test.npy (the sample ids fitted on and scored on) and evaluation.json (schema 1):
  schema, checkpoint (path or null), random_init, arch, shards, pool,
  probe: {layer: {top1 (test), train_top1, dim, loss (final objective), iters, seconds}},
  knn: {k, top1, layer, dim, vote: "weighted", temperature, seconds},
  nmi, ari (k-means on the test split's knn layer vs the true classes),
  kmeans: {k (= number of classes), pca_dim, layer},
  split: {train, test, test_fraction, seed}, num_classes, world_size,
  settings: {probe_iters, lr, weight_decay, knn_k, knn_temperature}, seconds (whole command).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cluster_pipeline import dist
from cluster_pipeline.analysis.probe import knn_top1, linear_probe
from cluster_pipeline.clustering.kmeans import cluster_features
from cluster_pipeline.clustering.metrics import ari, nmi
from cluster_pipeline.config import Config, ConfigError, Split
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.features.gather import Gathered, gather_features
from cluster_pipeline.models.layers import LayerTaps
from cluster_pipeline.models.nets import ClusterNet
from cluster_pipeline.models.weights import check_weights_file, load_weights, model_state
from cluster_pipeline.run.rundir import prepare_run_dir, run_dir_removed_on_early_error
from cluster_pipeline.run.setup import open_data_and_model

log = logging.getLogger(__name__)

# Version of evaluation.json's layout; raised when a key changes meaning or goes away.
SCHEMA_VERSION = 1


@dataclass
class SplitFeatures:
    """One split's extraction: this rank's rows of every tapped layer, and rank 0's gathered
    embedding (the knn layer) with the sample ids of its rows."""

    layers: dict[str, np.ndarray]  # this rank's rows, per tapped layer
    labels: np.ndarray  # true class of each of this rank's rows
    classes: np.ndarray  # true class of every sample of the split (row i: sample i)
    num_samples: int
    gathered: Gathered | None  # rank 0: the knn layer of every sample
    ids: np.ndarray | None  # rank 0: the sample id (shard key) of each gathered row


def split_config(cfg: Config, name: str) -> Config:
    out = copy.deepcopy(cfg)
    out.data.split = Split(name)
    return out


def run_evaluate(
    cfg: Config,
    weights: str | None,
    layers: list[str] | None = None,
    out: str | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Evaluate `weights` (None: the config's architecture, randomly initialised with
    train.seed); rank 0 returns (output folder, the report written to evaluation.json)."""
    if weights is not None:
        check_weights_file(weights)
    cfg = copy.deepcopy(cfg)
    cfg.run.dir, cfg.name = output_dir(cfg, weights, out)
    with (
        run_dir_removed_on_early_error(cfg),
        dist.process_group(cfg.dist.timeout_s, cfg.dist.heartbeat_timeout_s) as ctx,
    ):
        return _evaluate(cfg, ctx, weights, layers)


def output_dir(cfg: Config, weights: str | None, out: str | None) -> tuple[str, str]:
    """(run.dir, name) of the evaluation's own directory: `out`; else next to a run's checkpoint,
    <run>/eval/<checkpoint stem>; else empty, so rank 0 picks runs/<name>-eval-<time>.

    Never the training run directory itself: that would overwrite its config.yaml and logs.
    """
    if out:
        return out, cfg.name
    if weights is not None and Path(weights).parent.name == "checkpoints":
        return str(Path(weights).parent.parent / "eval" / Path(weights).stem), cfg.name
    return "", f"{cfg.name}-eval"


def _evaluate(
    cfg: Config, ctx: dist.DistContext, weights: str | None, layers: list[str] | None
) -> tuple[Path, dict[str, Any]] | None:
    start = time.monotonic()
    run_dir = prepare_run_dir(cfg, ctx)
    train_index, train_reader, model = open_data_and_model(
        split_config(cfg, "train"), ctx, clusters=False
    )
    test_index, test_reader, _ = open_data_and_model(split_config(cfg, "test"), ctx, clusters=False)
    num_classes = count_classes(train_index, test_index, cfg)
    if weights is not None:
        load_weights(model, model_state(weights), weights)
    names = list(layers or cfg.evaluate.layers or model.layer_names)
    knn_layer = cfg.evaluate.knn_layer
    taps = LayerTaps(model, list(dict.fromkeys([*names, knn_layer])), cfg.evaluate.pool)
    with taps:
        train = extract_split(model, train_index, train_reader, cfg, ctx, taps)
        test = extract_split(model, test_index, test_reader, cfg, ctx, taps)
    log.info("extracted %d train and %d test samples in %.1f s", train.num_samples,
             test.num_samples, time.monotonic() - start)  # fmt: skip
    e = cfg.evaluate
    probes: dict[str, dict[str, float | int]] = {}
    for name in names:
        t0 = time.monotonic()
        r = linear_probe(ctx, train.layers[name], train.labels, test.layers[name],
                         test.labels, num_classes, e.weight_decay, e.probe_iters, e.lr,
                         e.batch_size)  # fmt: skip
        probes[name] = {"top1": r.top1, "train_top1": r.train_top1, "dim": r.dim,
                        "loss": r.loss, "iters": r.iters,
                        "seconds": round(time.monotonic() - t0, 3)}  # fmt: skip
        log.info("probe %s (%d values): test top-1 %.4f, train top-1 %.4f, %d L-BFGS iterations",
                 name, r.dim, r.top1, r.train_top1, r.iters)  # fmt: skip
    scores = dist.on_rank0(ctx, score_embedding, cfg, ctx, train, test, num_classes)
    if not ctx.is_main:
        return None
    assert scores is not None and train.ids is not None and test.ids is not None
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "checkpoint": str(weights) if weights else None,
        "random_init": weights is None,
        "arch": cfg.model.arch,
        "shards": cfg.data.shards,
        "pool": e.pool,
        "probe": probes,
        **scores,
        "split": {
            "train": len(train.ids),
            "test": len(test.ids),
            "test_fraction": cfg.data.test_fraction,
            "seed": cfg.data.split_seed,
        },
        "num_classes": num_classes,
        "world_size": ctx.world,
        "settings": {
            "probe_iters": e.probe_iters,
            "lr": e.lr,
            "weight_decay": e.weight_decay,
            "knn_k": e.knn_k,
            "knn_temperature": e.knn_temperature,
        },
        "seconds": round(time.monotonic() - start, 3),
    }
    write_report(run_dir, report, train.ids, test.ids)
    return run_dir, report


def count_classes(train: ShardIndex, test: ShardIndex, cfg: Config) -> int:
    if train.labels is None or test.labels is None:
        raise ConfigError(
            f"the shards in {cfg.data.shards} do not record every sample's class; evaluate "
            "needs labelled shards (make-shards from a labelled source)"
        )
    return max(len(train.classes), int(train.labels.max()) + 1, int(test.labels.max()) + 1)


def extract_split(
    model: ClusterNet,
    index: ShardIndex,
    reader: SampleReader,
    cfg: Config,
    ctx: dist.DistContext,
    taps: LayerTaps,
) -> SplitFeatures:
    """Every tapped layer of this split, read exactly once; the knn layer gathered to rank 0.

    Collective: call on every rank.
    """
    idx, rows, skipped = extract_features(model, reader, cfg, ctx, taps)
    layers = taps.split(rows)
    knn = np.ascontiguousarray(layers[cfg.evaluate.knn_layer])
    gathered = gather_features(ctx, idx, knn, index.num_samples, skipped)
    assert index.labels is not None
    ids = None
    if gathered is not None:
        ids = gathered.index if index.ids is None else index.ids[gathered.index]
    return SplitFeatures(layers, index.labels[idx], index.labels, index.num_samples, gathered, ids)


def score_embedding(
    cfg: Config,
    ctx: dist.DistContext,
    train: SplitFeatures,
    test: SplitFeatures,
    num_classes: int,
) -> dict[str, Any]:
    """Rank 0: kNN top-1 of the test split against the train split, and NMI / ARI of k-means
    (k = number of classes, the pipeline's PCA + whitening + L2 + faiss) on the test split."""
    assert train.gathered is not None and test.gathered is not None
    e, c = cfg.evaluate, cfg.cluster
    train_y = labels_of(train)
    test_y = labels_of(test)
    x_test = test.gathered.feats
    t0 = time.monotonic()
    top1 = knn_top1(train.gathered.feats, train_y, x_test, test_y, num_classes, e.knn_k,
                    e.knn_temperature, e.batch_size, ctx.device)  # fmt: skip
    knn_s = time.monotonic() - t0
    pca_dim = min(c.pca_dim, x_test.shape[1], len(x_test)) if c.pca_dim else 0
    clustering = cluster_features(x_test, replace(c, k=num_classes, pca_dim=pca_dim),
                                  cfg.train.seed, test.gathered.index)  # fmt: skip
    log.info("knn top-1 %.4f (k=%d); NMI of k-means (k=%d) on the test split %.4f", top1,
             e.knn_k, num_classes, nmi(clustering.labels, test_y))  # fmt: skip
    return {
        "knn": {
            "k": min(e.knn_k, len(train_y)),
            "top1": top1,
            "layer": e.knn_layer,
            "dim": int(x_test.shape[1]),
            "vote": "weighted",
            "temperature": e.knn_temperature,
            "seconds": round(knn_s, 3),
        },
        "nmi": nmi(clustering.labels, test_y),
        "ari": ari(clustering.labels, test_y),
        "kmeans": {"k": num_classes, "pca_dim": pca_dim, "layer": e.knn_layer},
    }


def labels_of(split: SplitFeatures) -> np.ndarray:
    """True classes of rank 0's gathered rows (rank 0 knows every sample's class)."""
    assert split.gathered is not None and split.ids is not None
    return split.classes[split.gathered.index]


def write_report(
    run_dir: Path, report: dict[str, Any], train_ids: np.ndarray, test_ids: np.ndarray
) -> None:
    """evaluation.json, evaluation.md, and the sample ids fitted on and scored on."""
    (run_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "evaluation.md").write_text(markdown_report(report))
    np.save(run_dir / "samples-train.npy", train_ids)
    np.save(run_dir / "samples-test.npy", test_ids)


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(row, metric, dim, test, train) for the table printed and written to evaluation.md."""
    rows = [(name, "top1", str(p["dim"]), f"{p['top1']:.4f}", f"{p['train_top1']:.4f}")
            for name, p in report["probe"].items()]  # fmt: skip
    knn = report["knn"]
    rows.append((f"knn k={knn['k']}", "top1", str(knn["dim"]), f"{knn['top1']:.4f}", "-"))
    km = report["kmeans"]
    rows.append((f"k-means k={km['k']}", "nmi", str(knn["dim"]), f"{report['nmi']:.4f}", "-"))
    rows.append((f"k-means k={km['k']}", "ari", str(knn["dim"]), f"{report['ari']:.4f}", "-"))
    return rows


HEADER = ("row", "metric", "dim", "test", "train")


def format_table(report: dict[str, Any]) -> str:
    rows = [HEADER, *table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    cells = [[c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
              enumerate(zip(r, widths, strict=True))] for r in rows]  # fmt: skip
    return "\n".join("  ".join(r) for r in cells)


def markdown_report(report: dict[str, Any]) -> str:
    what = report["checkpoint"] or f"random init ({report['arch']})"
    s = report["split"]
    lines = [
        f"# Evaluation of {what}",
        "",
        f"Linear probes (pool {report['pool']}), kNN and k-means on the {report['knn']['layer']} "
        f"layer: fitted on the train split ({s['train']} samples), scored on the test split "
        f"({s['test']} samples), {report['world_size']} rank(s), {report['seconds']:.1f} s.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    return "\n".join(lines) + "\n"
