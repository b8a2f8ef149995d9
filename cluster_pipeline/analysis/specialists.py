"""Specialist class groups from the covariance of a generalist's predictions (Hinton, Vinyals and
Dean, "Distilling the knowledge in a neural network", section 5.3).

The generalist's softmax p(x) in R^C is a random vector over the dataset. Classes that are often
predicted together have similar columns of its C x C covariance, so k-means on those columns
gives the target sets of the specialists. The data flow:

  shards ──read exactly once per rank──▶ softmax(model(x)) per batch ──▶ float64 sums Σp, Σppᵀ
     ──all-reduce──▶ covariance (rank 0) ──k-means (faiss) or mini-batch k-means on its columns──▶
     groups ──▶ specialists.json, covariance.npy, covariance.png

No N x C matrix of predictions is ever held: each rank keeps C + C² float64 sums (at C = 10000
pseudo-classes that is 800 MB, on the device), updated by one float64 matmul per batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster_pipeline import dist
from cluster_pipeline.clustering.exact import squared_distance_sum
from cluster_pipeline.clustering.search import assign, faiss_kmeans
from cluster_pipeline.clustering.split import split_empty_clusters
from cluster_pipeline.config import Config, ConfigError
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.features.extract import for_each_batch
from cluster_pipeline.models.nets import ClusterNet
from cluster_pipeline.models.weights import load_weights, model_state
from cluster_pipeline.run.rundir import prepare_run_dir, run_dir_removed_on_early_error
from cluster_pipeline.run.setup import open_data_and_model
from cluster_pipeline.training.checkpoints import head_of

log = logging.getLogger(__name__)

METHODS = ("kmeans", "online")
# What k-means clusters: columns of the correlation (each class's covariances divided by the
# standard deviations), or of the covariance itself, as the paper states. Raw covariance columns
# are dominated by each class's own variance at the diagonal, so confidently predicted classes
# become singletons; on MNIST-5k the correlation's groups follow the confusions and the
# covariance's do not (BENCHMARKS.md, "Specialists").
COLUMNS = ("correlation", "covariance")
# The heatmap shows at most this many rows and columns (block means of the ordered matrix).
HEATMAP_MAX_CELLS = 1024


@dataclass(frozen=True)
class PredictionMoments:
    """Sums over samples of the shifted predictions q = p - shift: Σq (C,) and Σqqᵀ (C, C).

    Shifting by a constant leaves the covariance unchanged; with shift = 1/C, the mean of a
    balanced classifier's predictions, Σqqᵀ/n and the outer product of the means are both
    small, so their difference does not cancel most of float64's digits.
    """

    count: int
    sums: np.ndarray  # (C,) float64
    outer: np.ndarray  # (C, C) float64
    shift: float

    @property
    def mean(self) -> np.ndarray:
        return self.sums / self.count + self.shift

    def covariance(self) -> np.ndarray:
        """The unbiased (n - 1) covariance, as np.cov(predictions, rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        cov = (self.outer - np.outer(self.sums, self.sums) / self.count) / (self.count - 1)
        return (cov + cov.T) / 2  # exact symmetry: a matmul's blocking differs across i, j


class MomentSums:
    """Running float64 sums of shifted predictions on the model's device."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.shift = 1.0 / num_classes
        self.count = 0
        self.sums = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)

    def add(self, probs: torch.Tensor) -> None:
        q = probs.to(torch.float64) - self.shift
        self.sums += q.sum(dim=0)
        self.outer.addmm_(q.T, q)
        self.count += len(q)

    def all_reduced(self, ctx: dist.DistContext, count: int) -> PredictionMoments:
        """The sums of every rank, `count` samples in all. Collective: call on every rank."""
        dist.all_reduce(ctx, self.sums)
        dist.all_reduce(ctx, self.outer)
        return PredictionMoments(
            count, self.sums.cpu().numpy(), self.outer.cpu().numpy(), self.shift
        )


@torch.no_grad()
def stream_prediction_moments(
    model: ClusterNet, reader: SampleReader, cfg: Config, ctx: dist.DistContext
) -> tuple[PredictionMoments, int]:
    """Σp and Σppᵀ of the model's softmax over every sample, each read exactly once across
    ranks x workers (as `extract_features` reads them), and the number of samples skipped as
    unreadable (data.on_error=skip). Collective: call on every rank.
    """
    moments = MomentSums(model.head.out_features, ctx.device)

    def accumulate(_pos: int, _idx: np.ndarray, x: torch.Tensor) -> None:
        moments.add(torch.softmax(model(x).float(), dim=1))

    _, skipped = for_each_batch(model, reader, cfg, ctx, "predict", accumulate)
    count, lost = dist.all_reduce(ctx, np.array([moments.count, len(skipped)], np.int64)).tolist()
    if count + lost != reader.index.num_samples:
        raise RuntimeError(
            f"the ranks read {count} and skipped {lost} samples of {reader.index.num_samples}"
        )
    total = moments.all_reduced(ctx, count)
    return total, lost


def column_matrix(cov: np.ndarray, columns: str) -> np.ndarray:
    """The matrix whose columns are clustered (see COLUMNS); a class never predicted (zero
    variance) gets a zero column."""
    if columns == "covariance":
        return cov
    if columns != "correlation":
        raise ConfigError(f"--columns {columns!r} is unknown; use one of {COLUMNS}")
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    inv = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    return cov * inv[:, None] * inv[None, :]


def cluster_columns(
    matrix: np.ndarray,
    groups: int,
    method: str = "kmeans",
    seed: int = 0,
    restarts: int = 10,
    niter: int = 50,
    batch_size: int = 256,
) -> np.ndarray:
    """Group id (0..groups-1) of every class: k-means on the columns of the symmetric C x C
    `matrix` (`column_matrix`: the covariance or the correlation), the best of
    `restarts` seeded runs, no group empty. Groups are numbered by their smallest class.

    kmeans: faiss Lloyd iterations on all columns. online: scikit-learn's mini-batch k-means,
    which updates the centroids from `batch_size` columns at a time, as the paper's online
    k-means does one at a time; for C up to a few thousand it rarely differs from kmeans.
    """
    num_classes = len(matrix)
    if not 1 <= groups <= num_classes:
        raise ConfigError(f"--groups {groups} must be in 1..{num_classes} (the classes)")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is unknown; use one of {METHODS}")
    # k-means is scale-free; unit scale keeps faiss's float32 distances far from underflow.
    scale = float(np.abs(matrix).max()) or 1.0
    x = np.ascontiguousarray(matrix / scale, dtype=np.float32)
    best: tuple[float, np.ndarray] | None = None
    for r in range(restarts):
        labels, centroids = _one_run(x, groups, method, seed + r, niter, batch_size)
        labels, centroids, _ = split_empty_clusters(
            x, labels, centroids, np.random.default_rng(seed + r)
        )
        objective = squared_distance_sum(x, centroids, labels)
        if best is None or objective < best[0]:
            best = (objective, labels)
    assert best is not None
    return numbered_by_smallest_class(best[1])


def _one_run(
    x: np.ndarray, groups: int, method: str, seed: int, niter: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    if method == "kmeans":
        centroids, _ = faiss_kmeans(x, groups, niter, seed, max_points_per_centroid=len(x))
        labels = assign(x, centroids)
        return labels, centroids
    from sklearn.cluster import MiniBatchKMeans

    # Random initial columns and no reassignment of rarely-hit centroids (empty groups are
    # split afterwards): on a few columns with batches much smaller than C, k-means++ seeding
    # and reassignment landed in a local optimum far more often (measured on 10 paired classes,
    # 4-column batches: 7 of 20 seeds right vs 0 of 20); the restarts pick the best run.
    mbk = MiniBatchKMeans(
        groups, init="random", batch_size=min(batch_size, len(x)), n_init=1, max_iter=niter,
        reassignment_ratio=0.0, random_state=seed,
    ).fit(x)  # fmt: skip
    return mbk.predict(x).astype(np.int64), mbk.cluster_centers_.astype(np.float32)


def numbered_by_smallest_class(labels: np.ndarray) -> np.ndarray:
    """The same partition with groups numbered in order of their smallest class id."""
    firsts = np.unique(labels, return_index=True)[1]
    order = labels[np.sort(firsts)]
    renumber = np.empty(labels.max() + 1, dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return renumber[labels]


def class_names(num_classes: int, index: ShardIndex, pseudo: bool) -> list[str]:
    """Names of the head's outputs: the shards' class names when the head is over exactly
    those classes, else 'pseudo-class j' (a DeepCluster head's clusters have no names)."""
    if not pseudo and len(index.classes) == num_classes:
        return list(index.classes)
    return [f"pseudo-class {j}" for j in range(num_classes)]


def head_over_clusters(path: str) -> bool:
    """Whether a checkpoint's head is over clusters (a DeepCluster or ClusterFit run) rather
    than the shards' classes (train-supervised, or a plain state_dict of a classifier)."""
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(saved, dict) or not ({"epoch", "schema_version"} & set(saved)):
        return False  # a plain state_dict
    return head_of(saved) != "classes"


def summary(
    labels: np.ndarray, names: list[str], method: str, num_samples: int, checkpoint: str,
    split: str, skipped: int, columns: str = "correlation",
) -> dict[str, Any]:  # fmt: skip
    """The content of specialists.json."""
    groups = []
    for g in range(int(labels.max()) + 1):
        ids = np.flatnonzero(labels == g)
        groups.append({"group": g, "size": len(ids), "class_ids": ids.tolist(),
                       "classes": [names[i] for i in ids]})  # fmt: skip
    return {
        "method": method,
        "columns": columns,
        "num_groups": len(groups),
        "num_classes": len(labels),
        "num_samples": num_samples,
        "skipped_samples": skipped,
        "split": split,
        "checkpoint": checkpoint,
        "covariance": "unbiased (n - 1), as np.cov; covariance.npy, classes in id order",
        "groups": groups,
    }


def write_heatmap(cov: np.ndarray, labels: np.ndarray, names: list[str], path: Path) -> None:
    """The covariance with classes ordered by group, group boundaries drawn as lines.

    Past HEATMAP_MAX_CELLS classes the ordered matrix is shown as block means.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(labels, kind="stable")
    m = cov[np.ix_(order, order)]
    c = len(m)
    step = -(-c // HEATMAP_MAX_CELLS)
    if step > 1:
        cells = -(-c // step)
        padded = np.full((cells * step, cells * step), np.nan)
        padded[:c, :c] = m
        m = np.nanmean(padded.reshape(cells, step, cells, step), axis=(1, 3))
    off = m[~np.eye(len(m), dtype=bool)] if len(m) > 1 else m.ravel()
    vmax = float(np.nanpercentile(np.abs(off), 99)) or float(np.nanmax(np.abs(m))) or 1.0
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="covariance of predicted probabilities (clipped)")
    for edge in np.cumsum(np.bincount(labels))[:-1]:
        pos = edge / step - 0.5
        ax.axhline(pos, color="black", lw=0.8)
        ax.axvline(pos, color="black", lw=0.8)
    if c <= 40:
        ticks = [names[i] for i in order]
        ax.set_xticks(range(c), ticks, rotation=90, fontsize=7)
        ax.set_yticks(range(c), ticks, fontsize=7)
    ax.set_title(f"{c} classes in {labels.max() + 1} groups (ordered by group)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_specialists(
    run_dir: Path, moments: PredictionMoments, labels: np.ndarray, cov: np.ndarray,
    info: dict[str, Any], names: list[str],
) -> None:  # fmt: skip
    np.save(run_dir / "covariance.npy", cov)
    (run_dir / "specialists.json").write_text(json.dumps(info, indent=1) + "\n")
    write_heatmap(cov, labels, names, run_dir / "covariance.png")


def run_specialists(
    cfg: Config, weights: str, groups: int, method: str, seed: int, restarts: int,
    batch_size: int, columns: str,
) -> Path | None:  # fmt: skip
    """`cluster-pipeline specialists`: the groups of classes for specialist models, written by
    rank 0 into the run directory (returned there; None on other ranks)."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is unknown; use one of {METHODS}")
    if columns not in COLUMNS:
        raise ConfigError(f"--columns {columns!r} is unknown; use one of {COLUMNS}")
    state = model_state(weights)  # a missing or unreadable checkpoint fails before any rank waits
    head = state.get("head.weight")
    if head is not None and not 1 <= groups <= head.shape[0]:
        raise ConfigError(
            f"--groups {groups} must be in 1..{head.shape[0]}, the classes of {weights}'s head"
        )
    with (
        run_dir_removed_on_early_error(cfg),
        dist.process_group(cfg.dist.timeout_s, cfg.dist.heartbeat_timeout_s) as ctx,
    ):
        run_dir = prepare_run_dir(cfg, ctx)
        index, reader, model = open_data_and_model(cfg, ctx, clusters=False)
        load_weights(model, state, weights)
        num_classes = model.head.out_features
        if not 1 <= groups <= num_classes:
            raise ConfigError(f"--groups {groups} must be in 1..{num_classes} (head classes)")
        moments, skipped = stream_prediction_moments(model, reader, cfg, ctx)
        log.info("covariance of %d x %d predictions from %d samples", num_classes, num_classes,
                 moments.count)  # fmt: skip
        dist.on_rank0(
            ctx, _cluster_and_save, run_dir, moments, groups, method, seed, restarts, batch_size,
            class_names(num_classes, index, head_over_clusters(weights)),
            dict(checkpoint=weights, split=cfg.data.split, skipped=skipped, columns=columns),
        )  # fmt: skip
    return run_dir if ctx.is_main else None


def _cluster_and_save(
    run_dir: Path, moments: PredictionMoments, groups: int, method: str, seed: int,
    restarts: int, batch_size: int, names: list[str], meta: dict[str, Any],
) -> None:  # fmt: skip
    cov = moments.covariance()
    x = column_matrix(cov, meta["columns"])
    labels = cluster_columns(x, groups, method, seed, restarts, batch_size=batch_size)
    info = summary(labels, names, method, moments.count, meta["checkpoint"], meta["split"],
                   meta["skipped"], meta["columns"])  # fmt: skip
    save_specialists(run_dir, moments, labels, cov, info, names)
    for g in info["groups"]:
        log.info("group %d (%d): %s", g["group"], g["size"], ", ".join(g["classes"][:20]))
