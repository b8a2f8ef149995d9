"""What rank 0 shows on W&B each epoch beyond numbers: the cluster sizes as a histogram, and
for clustering targets a grid of a few clusters' images, one row per cluster."""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster_pipeline.data.reader import SampleReader
from cluster_pipeline.run.images import tile_grid


def epoch_media(
    labels: np.ndarray, reader: SampleReader | None, clusters: int, per_cluster: int, seed: int
) -> dict[str, Any]:
    """`cluster_sizes` (a wandb.Histogram of the labels' counts; -1, unreadable, left out)
    and, given a reader and clusters > 0, `cluster_images`: `clusters` random non-empty
    clusters, each a row of up to `per_cluster` of its images drawn at random (`seed`)."""
    import wandb

    kept = labels[labels >= 0]
    sizes = np.bincount(kept)
    out: dict[str, Any] = {"cluster_sizes": wandb.Histogram(sizes.tolist(), num_bins=64)}
    if reader is None or clusters <= 0 or not len(kept):
        return out
    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(np.flatnonzero(sizes), min(clusters, int((sizes > 0).sum())),
                               replace=False))  # fmt: skip
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], shown)
    rows = []
    for c, start in zip(shown, starts, strict=True):
        members = order[start : start + sizes[c]]
        picked = np.sort(rng.choice(members, min(per_cluster, len(members)), replace=False))
        images = reader.read_batch(picked)
        pad = np.full((per_cluster - len(picked), *images.shape[1:]), 255, np.uint8)
        rows.append(np.concatenate([images, pad]))
    grid = tile_grid(np.concatenate(rows), per_cluster)
    caption = "clusters " + ", ".join(f"{c} ({sizes[c]})" for c in shown) + ", one per row"
    out["cluster_images"] = wandb.Image(grid, caption=caption)
    return out
