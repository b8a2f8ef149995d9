"""Targets strategies: what a method trains on in an epoch, and when that is recomputed.

Every method runs the one epoch loop (`loop.train_loop`) and differs only here:
- `DeepClusterTargets`: every epoch, k-means on the network's own features, and a new head;
- `FixedTargets`: targets made once for the run and kept in its checkpoints, so a resume never
  recomputes them: the shards' true classes (train-supervised), a pretrained network's clusters
  (ClusterFit), or one label per sample plus a batch transform (RotNet).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cluster_pipeline import dist
from cluster_pipeline.clustering import metrics
from cluster_pipeline.clustering.labels import as_labels
from cluster_pipeline.config import Config, ConfigError
from cluster_pipeline.data.reader import ShardIndex
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.models.nets import ClusterNet, reset_head
from cluster_pipeline.training.checkpoints import to_array, to_tensor
from cluster_pipeline.training.pseudo_labels import pseudo_labels
from cluster_pipeline.training.seeding import Stream, stream_seed
from cluster_pipeline.training.step import BatchTransform, epoch_draws, labelled_step

if TYPE_CHECKING:
    from cluster_pipeline.training.session import Session


# (metrics key, column title, decimals) of the table printed on rank 0, one row per epoch.
Columns = tuple[tuple[str, str, int], ...]


class Targets:
    """The interface of the loop's targets. `labels` are the epoch's, one per sample (-1: never
    drawn), once `for_epoch` made them."""

    kind: str  # names the strategy in checkpoints
    head: str  # what the head outputs: clusters, classes or rotations
    columns: Columns
    transform: BatchTransform | None = None
    clusters_features: bool = False  # the cluster.* settings apply to the model's features
    labels: np.ndarray | None = None

    def outputs(self, index: ShardIndex) -> int | None:
        """The head's size, for a head made once for the run (None: the model's own)."""
        return None

    def begin(self, s: Session) -> bool:
        """Once, before the loop; True when it made targets that should be saved at once."""
        return False

    def for_epoch(self, s: Session) -> None:
        """Make the targets of epoch `s.pos.epoch`. Collective: call on every rank."""
        raise NotImplementedError

    def epoch_labels(self) -> np.ndarray:
        assert self.labels is not None, "the epoch's targets are not made yet"
        return self.labels

    def report_k(self, cfg: Config) -> int | None:
        """The k that report.png's title names (None: the targets are no clustering)."""
        return cfg.cluster.k if self.clusters_features else None

    def make_head(self, model: ClusterNet, index: ShardIndex, seed: int) -> None:
        """The head a run starts with: one of `outputs` classes made once for the run, or the
        model's own (None)."""
        outputs = self.outputs(index)
        if outputs is not None:
            fresh_head(model, outputs, seed)

    def draws(self, s: Session, batch_size: int) -> np.ndarray:
        """This rank's draws of the epoch (whole steps, as many on every rank): uniform over
        the epoch's labels."""
        return epoch_draws(s, self.epoch_labels(), batch_size)

    def train_step(
        self, s: Session, idx: torch.Tensor, images: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """One step on the batch of samples `idx` (uint8 images on the device): (loss,
        accuracy) on the device. Here: augmentation, the batch transform, cross-entropy on
        each sample's label."""
        y = torch.from_numpy(self.epoch_labels())[idx]
        return labelled_step(s, images, y, gen, self.transform)

    def collect(self, ctx: dist.DistContext) -> None:
        """Before a checkpoint, on every rank: bring to rank 0 what `state_dict` needs that
        lives on other ranks (nothing here). Collective: call on every rank."""

    def epoch_row(self, truth: np.ndarray | None) -> dict[str, Any]:
        """Metrics of the epoch's targets beyond the training's (rank 0)."""
        return {}

    def end_epoch(self) -> np.ndarray | None:
        """The finished epoch's assignments to save, if any."""
        return None

    @property
    def final_labels(self) -> np.ndarray | None:
        """The labels the run's report describes."""
        return self.labels

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "head": self.head, "labels": to_tensor(self.labels)}

    def load_state_dict(self, state: dict[str, Any], run_dir: Path) -> None:
        if state["kind"] != self.kind:
            raise ConfigError(
                f"{run_dir} holds a run trained on {state['kind']} targets ({state['head']}), "
                f"not {self.kind} ones; continue it with its own command or choose another run.dir"
            )
        labels = to_array(state["labels"])
        self.labels = None if labels is None else as_labels(labels)


DEEPCLUSTER_COLUMNS: Columns = (
    ("epoch", "epoch", 0), ("nmi_prev", "nmi_prev", 3), ("nmi_gt", "nmi_gt", 3),
    ("train_loss", "loss", 3), ("n_empty_before_split", "empty", 0),
    ("cluster_size_min", "min_size", 0), ("cluster_size_max", "max_size", 0),
    ("time_extract_s", "extract_s", 1), ("time_cluster_s", "cluster_s", 1),
    ("time_train_s", "train_s", 1), ("images_per_s", "img/s", 0),
)  # fmt: skip


class DeepClusterTargets(Targets):
    """Each epoch: the network's features clustered with k-means, and a new head for them."""

    kind, head, columns, clusters_features = "deepcluster", "clusters", DEEPCLUSTER_COLUMNS, True

    def __init__(self) -> None:
        self.prev_labels: np.ndarray | None = None
        self.kmeans: dict[str, Any] = {}

    def for_epoch(self, s: Session) -> None:
        cfg, epoch = s.cfg, s.pos.epoch
        labels, clusters = pseudo_labels(
            s.ctx, cfg.cluster, lambda: extract_features(s.model, s.reader, cfg, s.ctx),
            s.index.num_samples, stream_seed(cfg.train.seed, Stream.EPOCH, epoch), s.pos.timer,
            before_clustering=lambda: s.stop.stop_if_requested(s.pos),
        )  # fmt: skip
        self.labels = as_labels(labels)
        if clusters is not None:
            self.kmeans = {
                "loss": clusters.loss, "n_empty_before_split": clusters.n_empty_before_split,
                "k": len(clusters.centroids), "centroids": torch.from_numpy(clusters.centroids),
            }  # fmt: skip
        if s.ctx.is_main:
            self.kmeans["nmi_prev"] = metrics.nmi(self.prev_labels, self.labels)
        self.prev_labels = None  # held only until NMI(t-1, t): one N-vector in the epoch, not two
        reset_head(
            s.model, torch.Generator().manual_seed(stream_seed(cfg.train.seed, Stream.HEAD, epoch))
        )
        for p in s.model.head.parameters():  # no momentum left over from the old pseudo-labels
            s.optimizer.state.pop(p, None)

    def epoch_row(self, truth: np.ndarray | None) -> dict[str, Any]:
        """NMI to the last epoch and to the truth, k-means loss, empty clusters before the
        split, cluster sizes, unreadable samples."""
        assert self.labels is not None
        km = self.kmeans
        row: dict[str, Any] = {
            "nmi_prev": km.get("nmi_prev"),
            "nmi_gt": metrics.nmi(truth, self.labels),
            "ari_gt": metrics.ari(truth, self.labels),
            "kmeans_loss": km.get("loss"),
            "n_empty_before_split": km.get("n_empty_before_split"),
            "k": km.get("k"),
            "skipped_samples": int((self.labels < 0).sum()),  # unreadable, data.on_error=skip
        }
        return row | metrics.cluster_stats(self.labels, row["k"] or int(self.labels.max()) + 1)

    def end_epoch(self) -> np.ndarray | None:
        self.prev_labels, self.labels, self.kmeans = self.labels, None, {}
        return self.prev_labels

    @property
    def final_labels(self) -> np.ndarray | None:
        return self.prev_labels

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"prev_labels": to_tensor(self.prev_labels),
                                       "kmeans": self.kmeans}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], run_dir: Path) -> None:
        super().load_state_dict(state, run_dir)
        prev = to_array(state["prev_labels"])
        self.prev_labels, self.kmeans = None if prev is None else as_labels(prev), state["kmeans"]
        if self.labels is not None and "nmi_prev" not in self.kmeans:  # written before 2026-12
            self.kmeans["nmi_prev"] = metrics.nmi(self.prev_labels, self.labels)
            self.prev_labels = None


FIXED_COLUMNS: Columns = (
    ("epoch", "epoch", 0), ("train_loss", "loss", 4), ("train_acc", "acc", 4),
    ("images_per_s", "img/s", 0), ("time_train_s", "train_s", 1),
)  # fmt: skip

# Makes a run's fixed targets once (on every rank) and rank 0's summary of how.
MakeTargets = Callable[["Session"], tuple[np.ndarray, dict[str, Any] | None]]


class FixedTargets(Targets):
    """The same targets every epoch, made once by `make` and kept in every checkpoint; a head
    of `num_outputs` initialised once for the run (DeepCluster's N(0, 0.01))."""

    kind, columns = "fixed", FIXED_COLUMNS

    def __init__(
        self,
        head: str,
        num_outputs: Callable[[ShardIndex], int],
        make: MakeTargets,
        transform: BatchTransform | None = None,
    ) -> None:
        self.head, self.num_outputs, self.make, self.transform = head, num_outputs, make, transform

    def outputs(self, index: ShardIndex) -> int | None:
        return self.num_outputs(index)

    def begin(self, s: Session) -> bool:
        if self.labels is not None:  # resumed: the targets its checkpoint holds
            return False
        labels, summary = self.make(s)
        if summary:
            s.tracker.log_summary(summary)
        self.labels = as_labels(labels)
        return True

    def for_epoch(self, s: Session) -> None:
        assert self.labels is not None, "begin() makes the targets"


def fresh_head(model: ClusterNet, outputs: int, seed: int) -> None:
    """A head of `outputs` classes, initialised once for the run (DeepCluster's N(0, 0.01))."""
    model.set_head(outputs)
    model.head.to(next(model.parameters()).device)
    reset_head(model, torch.Generator().manual_seed(seed))


def true_classes(index: ShardIndex, cfg: Config) -> tuple[np.ndarray, int]:
    """The shards' classes and their number (len(index.classes), else the largest + 1)."""
    labels = index.labels
    if labels is None:
        raise ConfigError(
            f"the shards in data.shards={cfg.data.shards} have no class label for some samples "
            "(samples.npy column 3 is -1): train-supervised needs labelled shards; write them "
            "with make-shards from a labelled source (mnist5k, digits, imagefolder:PATH)"
        )
    return labels, max(len(index.classes), int(labels.max()) + 1)
