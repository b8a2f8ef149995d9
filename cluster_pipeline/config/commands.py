"""The sections of the commands built on the pipeline: clusterfit, evaluate, activations.

Each checks its own fields in `validate()`; every pool field goes through `parse_pool_rule`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster_pipeline.config.choices import POOL_RULES, is_pool_rule, parse_pool_rule
from cluster_pipeline.config.errors import ConfigError, raise_first_failed
from cluster_pipeline.config.sections import ModelConfig


def check_pool_field(key: str, rule: str) -> None:
    """`rule` parses as a pool rule, else an error that starts with its key."""
    try:
        parse_pool_rule(rule)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


@dataclass
class ClusterFitConfig:
    """`cluster-pipeline clusterfit`: cluster a pretrained network's features once (cluster.*),
    then train this config's `model` from scratch on those labels for train.epochs."""

    # The pretrained weights: a run checkpoint or a plain state_dict (--pretrained sets it).
    pretrained: str = ""
    # Module whose pooled output is clustered (e.g. block2, conv5, layer4); empty: the
    # embedding (model.features), as DeepCluster clusters.
    layer: str = ""
    # Pooling of a spatial layer's output: avg, max, grid:S or dims:D (see config/choices.py).
    pool: str = "avg"
    # The pretrained network's architecture. Unset: the model section saved in its run
    # checkpoint, else (a plain state_dict) this config's own `model` section.
    pretrained_model: ModelConfig | None = None

    def validate(self) -> None:
        if self.pretrained_model is not None:
            self.pretrained_model.validate("clusterfit.pretrained_model")
        check_pool_field("clusterfit.pool", self.pool)


@dataclass
class EvaluateConfig:
    """`cluster-pipeline evaluate`: linear probes per layer, kNN and NMI on frozen features."""

    # Named modules that get a linear probe; empty means the model's blocks (model.layer_names:
    # block1..block3, conv1..conv5, stem and layer1..layer4). "embedding" is model.features.
    layers: list[str] = field(default_factory=list)
    # Pooling of spatial activations before the probe: avg, max, grid:S or dims:D (DeepCluster
    # pools every conv layer to about 9600 values: dims:9600). Rank 0 holds no probe features;
    # each rank holds its share, N/ranks x (sum of the layers' widths) float32 values.
    pool: str = "dims:9600"
    # L-BFGS iterations of each probe: full-batch multinomial logistic regression on
    # standardized features, loss and gradient summed over every rank's rows.
    probe_iters: int = 100
    # L-BFGS step size (its strong-Wolfe line search scales the step from here).
    lr: float = 1.0
    # L2 penalty on the probe's weights: mean cross-entropy + weight_decay / 2 * ||W||^2.
    weight_decay: float = 1e-3
    # Rows per matrix product when scoring probes and kNN (bounds the memory of one product).
    batch_size: int = 1024
    # Neighbours of the kNN classifier (cosine similarity, DINO's vote weighted by exp(s / T)).
    knn_k: int = 20
    knn_temperature: float = 0.07
    # The layer kNN and the k-means NMI use; "embedding" is model.features (what is clustered).
    knn_layer: str = "embedding"

    def validate(self) -> None:
        checks = [
            (self.probe_iters >= 1, f"evaluate.probe_iters={self.probe_iters} must be >= 1"),
            (self.lr > 0, f"evaluate.lr={self.lr} must be > 0"),
            (self.weight_decay >= 0, f"evaluate.weight_decay={self.weight_decay} must be >= 0"),
            (self.batch_size >= 1, f"evaluate.batch_size={self.batch_size} must be >= 1"),
            (self.knn_k >= 1, f"evaluate.knn_k={self.knn_k} must be >= 1"),
            (
                self.knn_temperature > 0,
                f"evaluate.knn_temperature={self.knn_temperature} must be > 0",
            ),
            (bool(self.knn_layer), "evaluate.knn_layer is empty; use embedding or a module name"),
            (all(self.layers), f"evaluate.layers={self.layers} holds an empty name"),
        ]
        raise_first_failed(checks)
        check_pool_field("evaluate.pool", self.pool)


@dataclass
class ActivationsConfig:
    """`cluster-pipeline activations`: cluster a layer's activations and show what each holds."""

    # Named modules to tap (any name from model.named_modules(): block2, conv3, layer4, fc,
    # block1.0, head). Several layers are extracted in one pass and compared in one table.
    # --layer / --layers set this; the clustering settings (k, PCA, whitening) are cluster.*,
    # with cluster.pca_dim capped at each layer's width.
    layers: list[str] = field(default_factory=list)
    # Spatial pooling of each tapped activation: avg, max, grid:S or dims:D (config/choices.py).
    pool: str = "avg"
    # Each cluster's picture is a grid x grid mosaic of its samples nearest to the centroid.
    grid: int = 8

    def validate(self) -> None:
        checks = [
            (
                is_pool_rule(self.pool),
                f"activations.pool={self.pool!r} is unknown; use {POOL_RULES}",
            ),
            (
                all(name.strip() for name in self.layers),
                f"activations.layers={self.layers} holds an empty name",
            ),
            (
                1 <= self.grid <= 32,
                f"activations.grid={self.grid} must be in 1..32 (grid x grid samples)",
            ),
        ]
        raise_first_failed(checks)
