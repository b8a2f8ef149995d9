"""Cluster a layer's activations and show what each cluster holds (interpretability).

A thin composition of the pipeline: forward hooks on named modules (`layers.LayerTaps`), the
exactly-once extraction over the shards, the gather to rank 0, PCA/whitening/L2 + faiss k-means
with the empty-cluster split, and NMI/ARI against the true classes. For every cluster rank 0
writes its size, purity and majority class, and a grid of the images nearest to its centroid in
the clustered (PCA/L2) space, read back from the shards by sample index; then an overview
(index.html, index.png, activations.json) per layer and, for several layers tapped in the same
pass, a comparison table (layers.json, layers.md).

    <run.dir>/activations/<layer>/{activations.json, assignments.npy, index.html, index.png,
                                   cluster-000.png, ...}
    <run.dir>/activations/{layers.json, layers.md, config.yaml, logs/}
"""

from __future__ import annotations

import html
import itertools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cluster_pipeline import dist
from cluster_pipeline.clustering import kmeans, metrics
from cluster_pipeline.clustering.exact import squared_distances
from cluster_pipeline.clustering.pca import project
from cluster_pipeline.config import Config, ConfigError, validate_k
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.features.gather import Gathered, gather_features
from cluster_pipeline.models.layers import LayerTaps
from cluster_pipeline.models.weights import check_weights_file, load_weights, model_state
from cluster_pipeline.run.images import PAD_PX, tile_grid, tile_size
from cluster_pipeline.run.rundir import prepare_run_dir, run_dir_removed_on_early_error
from cluster_pipeline.run.setup import open_data_and_model

log = logging.getLogger(__name__)

SUBDIR = "activations"
# index.png shows at most this many clusters (one line each); index.html shows them all.
INDEX_PNG_MAX_CLUSTERS = 256


@dataclass(frozen=True)
class LayerClusters:
    """k-means of one layer's activations; arrays are per gathered row (sample `rows[j]`)."""

    layer: str
    dim: int  # width of the pooled activation
    pca_dim: int  # cluster.pca_dim capped at the width (0: no PCA)
    rows: np.ndarray  # (n,) sample rows of the shard index
    labels: np.ndarray  # (n,) cluster of each row
    sq_dist: np.ndarray  # (n,) squared distance to its centroid in the clustered space
    loss: float


def cluster_layer(layer: str, feats: np.ndarray, rows: np.ndarray, cfg: Config) -> LayerClusters:
    """k-means of one layer exactly as a DeepCluster epoch clusters its embedding.

    cluster.pca_dim is capped at the layer's width (early layers can be narrower than the
    embedding). The points are projected again, with the clustering's own PCA, to measure
    distances to the centroids: the projection is exact row by row, so these are the points
    k-means clustered.
    """
    c = cfg.cluster
    pca_dim = min(c.pca_dim, feats.shape[1], len(feats))
    seed = cfg.train.seed
    clusters = kmeans.cluster_features(feats, replace(c, pca_dim=pca_dim), seed, index=rows)
    x = project(feats, clusters.pca, c.l2_normalize)
    sq = squared_distances(x, clusters.centroids, clusters.labels).astype(np.float32)
    return LayerClusters(layer, feats.shape[1], pca_dim, rows, clusters.labels, sq, clusters.loss)


def nearest_to_centroid(
    labels: np.ndarray, sq_dist: np.ndarray, rows: np.ndarray, k: int, m: int
) -> list[np.ndarray]:
    """For each cluster, the positions of its (up to) m members nearest to the centroid, nearest
    first; equal distances in order of sample row, so the choice is deterministic."""
    order = np.lexsort((rows, sq_dist, labels))
    starts = np.searchsorted(labels[order], np.arange(k + 1))
    return [order[a : min(b, a + m)] for a, b in itertools.pairwise(starts)]


def purity_by_cluster(
    labels: np.ndarray, truth: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sizes, majority class, purity = majority share) per cluster, from the contingency table."""
    classes = int(truth.max()) + 1
    table = np.bincount(labels * classes + truth, minlength=k * classes).reshape(k, classes)
    sizes = table.sum(axis=1)
    majority = table.argmax(axis=1)
    purity = table.max(axis=1) / np.maximum(sizes, 1)
    return sizes, majority, purity


def layer_report(
    result: LayerClusters, index: ShardIndex, cfg: Config, weights: str | None, pool: str
) -> dict[str, Any]:
    """activations.json of one layer: its NMI/ARI/purity and each cluster's statistics."""
    k, m = cfg.cluster.k, cfg.activations.grid**2
    truth = None if index.labels is None else index.labels[result.rows]
    sizes = np.bincount(result.labels, minlength=k)
    majority = purity = None
    if truth is not None:
        sizes, majority, purity = purity_by_cluster(result.labels, truth, k)
    nearest = nearest_to_centroid(result.labels, result.sq_dist, result.rows, k, m)
    clusters = []
    for c in range(k):
        entry: dict[str, Any] = {"cluster": c, "size": int(sizes[c])}
        if majority is not None and purity is not None:
            cls = int(majority[c])
            name = index.classes[cls] if cls < len(index.classes) else str(cls)
            entry.update(purity=float(purity[c]), majority=cls, majority_class=name)
        entry["grid"] = f"cluster-{c:03d}.png"
        entry["nearest_samples"] = [index.sample_id(int(r)) for r in result.rows[nearest[c]]]
        entry["nearest_rows"] = [int(r) for r in result.rows[nearest[c]]]
        entry["nearest_sq_dist"] = [round(float(d), 6) for d in result.sq_dist[nearest[c]]]
        clusters.append(entry)
    n = len(result.labels)
    overall = None if purity is None else float((purity * sizes).sum() / n)
    return {
        "layer": result.layer,
        "pool": pool,
        "k": k,
        "dim": result.dim,
        "pca_dim": result.pca_dim,
        "num_samples": n,
        "checkpoint": weights or "random init",
        "nmi": metrics.nmi(result.labels, truth),
        "ari": metrics.ari(result.labels, truth),
        "purity": overall,
        "kmeans_loss": result.loss,
        "clusters": clusters,
    }


def write_layer(
    out: Path, result: LayerClusters, report: dict[str, Any], reader: SampleReader, grid: int
) -> None:
    """The layer's folder: per-cluster grids, index.png, index.html, activations.json, and
    assignments.npy (cluster of every sample row, -1 for rows not extracted)."""
    out.mkdir(parents=True, exist_ok=True)
    strips: list[tuple[str, np.ndarray]] = []
    for entry in report["clusters"]:
        images = reader.read_batch(np.asarray(entry["nearest_rows"], dtype=np.int64))
        tile_grid(images, grid).save(out / entry["grid"])
        if len(strips) < INDEX_PNG_MAX_CLUSTERS:
            strips.append((caption(entry), images[:grid]))
    overview_png(strips, grid).save(out / "index.png")
    (out / "index.html").write_text(overview_html(report))
    (out / "activations.json").write_text(json.dumps(report, indent=1))
    assignments = np.full(reader.index.num_samples, -1, dtype=np.int64)
    assignments[result.rows] = result.labels
    np.save(out / "assignments.npy", assignments)


def caption(entry: dict[str, Any]) -> str:
    text = f"cluster {entry['cluster']}  n={entry['size']}"
    if "purity" in entry:
        text += f"  {entry['majority_class']}: {entry['purity']:.0%}"
    return text


def overview_png(strips: list[tuple[str, np.ndarray]], grid: int) -> Image.Image:
    """One line per cluster: its caption, then its `grid` samples nearest to the centroid."""
    side = strips[0][1].shape[1]
    t = tile_size(side)
    label_w, row_h = 190, t + PAD_PX
    mode = "L" if strips[0][1].shape[3] == 1 else "RGB"
    sheet = Image.new(mode, (label_w + grid * (t + PAD_PX) + PAD_PX, row_h * len(strips)), 255)
    draw = ImageDraw.Draw(sheet)
    for i, (text, images) in enumerate(strips):
        draw.text((4, i * row_h + t // 2 - 6), text, fill=0)
        sheet.paste(tile_grid(images, grid), (label_w, i * row_h))
    return sheet


def overview_html(report: dict[str, Any]) -> str:
    """A self-contained page: the layer's scores, then every cluster's grid and statistics."""

    def score(key: str) -> str:
        value = report[key]
        return "unknown (no true classes)" if value is None else f"{value:.4f}"

    cards = []
    for entry in report["clusters"]:
        stats = f"size {entry['size']}"
        if "purity" in entry:
            stats += (
                f", majority <b>{html.escape(str(entry['majority_class']))}</b>"
                f" ({entry['purity']:.1%} pure)"
            )
        cards.append(
            f'<div class="c"><h3>cluster {entry["cluster"]}</h3><p>{stats}</p>'
            f'<img src="{html.escape(entry["grid"])}" loading="lazy" '
            f'alt="cluster {entry["cluster"]}"></div>'
        )
    title = f"Activations of {html.escape(report['layer'])}: k={report['k']}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;margin:1em}.c{display:inline-block;vertical-align:top;"
        "margin:6px;padding:6px;border:1px solid #ccc}.c img{image-rendering:pixelated}"
        "h3{margin:0}</style></head><body>"
        f"<h1>{title}</h1><p>checkpoint {html.escape(str(report['checkpoint']))}; pool "
        f"{html.escape(report['pool'])}; width {report['dim']}, PCA {report['pca_dim']}; "
        f"{report['num_samples']} samples</p>"
        f"<p>NMI {score('nmi')} &middot; ARI {score('ari')} &middot; purity {score('purity')} "
        "(against the true classes). Each grid shows the cluster's samples nearest to its "
        "centroid in the clustered (PCA/L2) space, nearest first, row by row.</p>"
        + "\n".join(cards)
        + "</body></html>\n"
    )


TABLE_KEYS = ("layer", "dim", "pca_dim", "k", "nmi", "ari", "purity")


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per layer."""

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(TABLE_KEYS) + " |", "|" + "---|" * len(TABLE_KEYS)]
    lines += ["| " + " | ".join(cell(r[key]) for key in TABLE_KEYS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(
    home: Path,
    gathered: Gathered | None,
    taps: LayerTaps,
    reader: SampleReader,
    cfg: Config,
    weights: str | None,
) -> list[dict[str, Any]]:
    """Rank 0: cluster each tapped layer and write its folder; several layers also get
    layers.json and layers.md. Returns one summary row per layer."""
    assert gathered is not None
    summaries = []
    for layer, feats in taps.split(gathered.feats).items():
        result = cluster_layer(layer, np.ascontiguousarray(feats), gathered.index, cfg)
        report = layer_report(result, reader.index, cfg, weights, taps.pool)
        out = home / layer
        write_layer(out, result, report, reader, cfg.activations.grid)
        summary = {key: report[key] for key in TABLE_KEYS} | {"html": str(out / "index.html")}
        log.info("%s: NMI %s, ARI %s, purity %s, k=%d, width %d (PCA %d) -> %s", layer,
                 report["nmi"], report["ari"], report["purity"], report["k"], report["dim"],
                 report["pca_dim"], out / "index.html")  # fmt: skip
        summaries.append(summary)
    if len(summaries) > 1:
        (home / "layers.json").write_text(json.dumps(summaries, indent=1))
        (home / "layers.md").write_text(comparison_table(summaries))
    return summaries


def run_activations(cfg: Config, weights: str | None) -> list[dict[str, Any]] | None:
    """`cluster-pipeline activations`: rank 0 returns one summary row per layer.

    `weights` None means the seeded random initialization (a baseline: what k-means finds in
    an untrained network). Collective: call on every rank.
    """
    if not cfg.activations.layers:
        raise ConfigError("no layer to cluster: pass --layer NAME or --layers a,b,c")
    if weights:
        check_weights_file(weights)  # loaded once the data is open: a wrong path fails first
    with (
        run_dir_removed_on_early_error(cfg, sub=SUBDIR),
        dist.process_group(cfg.dist.timeout_s, cfg.dist.heartbeat_timeout_s) as ctx,
    ):
        run_dir = prepare_run_dir(cfg, ctx, sub=SUBDIR)
        # Each layer's PCA is capped at its width: only k is checked against the data.
        index, reader, model = open_data_and_model(cfg, ctx, clusters=False)
        validate_k(cfg, index.num_samples)
        if weights:
            load_weights(model, model_state(weights), weights)
        taps = LayerTaps(model, cfg.activations.layers, cfg.activations.pool)
        with taps:
            idx, feats, skipped = extract_features(model, reader, cfg, ctx, taps)
        gathered = gather_features(ctx, idx, feats, index.num_samples, skipped)
        del feats
        summaries = dist.on_rank0(
            ctx, write_outputs, run_dir / SUBDIR, gathered, taps, reader, cfg, weights
        )
        return summaries
