"""ClusterFit (Yan et al., CVPR 2020): cluster a pretrained network's features once, then train a
freshly initialised network on those cluster labels.

    pretrained weights ──extract (a layer, pooled)──▶ features ──gather──▶ PCA + whiten + L2
    ──faiss k-means (k = cluster.k, empty clusters split)──▶ labels ──broadcast──▶ new network
    trained on them for train.epochs (uniform over clusters; targets.FixedTargets)

Every arrow is the DeepCluster pipeline's own function, run once. The pretrained network may be
another architecture than the new one (`model`): its settings are clusterfit.pretrained_model,
else the model section its run checkpoint saved, else this config's `model`. The labels go to
<run dir>/assignments/clusterfit_labels.npy and into every checkpoint, so a resumed run never
clusters again; clusterfit.json holds the clustering's NMI/ARI against the true classes (when
known), cluster sizes and the time of each phase.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cluster_pipeline import dist
from cluster_pipeline.clustering import metrics
from cluster_pipeline.clustering.kmeans import Clustering
from cluster_pipeline.config import (
    Config,
    ConfigError,
    ModelConfig,
    load_config,
    validate_clustering,
    validate_k,
)
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.models.layers import LayerTaps
from cluster_pipeline.models.nets import ClusterNet, build_model
from cluster_pipeline.models.weights import (
    check_weights_file,
    load_weights,
    model_state,
    saved_config_text,
)
from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.setup import model_on_device
from cluster_pipeline.training.position import PhaseTimer
from cluster_pipeline.training.pseudo_labels import Extracted, pseudo_labels
from cluster_pipeline.training.seeding import Stream, stream_seed
from cluster_pipeline.training.targets import FixedTargets

if TYPE_CHECKING:
    from cluster_pipeline.training.session import Session

log = logging.getLogger(__name__)

LABELS_FILE = "assignments/clusterfit_labels.npy"
SUMMARY_FILE = "clusterfit.json"


def clusterfit_config(
    config: str | None, pretrained: str, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """The run's config: `config`, else the one the pretrained run checkpoint saved (same data,
    same architecture for the new network) in a new run directory; then `overrides`."""
    if config is not None:
        cfg = load_config(config, overrides)
    else:
        text = saved_config_text(pretrained)
        if text is None:
            raise ConfigError(
                f"{pretrained} is a plain state_dict with no saved config: pass --config with "
                "the data, model and cluster settings of the ClusterFit run"
            )
        saved = OmegaConf.create(text)
        assert isinstance(saved, DictConfig)
        saved.run.dir, saved.name = "", f"clusterfit-{saved.get('name', 'run')}"
        saved.clusterfit = {"pretrained_model": None}  # its own model section describes it
        origin = f"the config saved in {pretrained}"
        cfg = load_config(None, overrides, text=OmegaConf.to_yaml(saved), origin=origin)
    cfg.clusterfit.pretrained = pretrained
    return cfg


def clusterfit_targets(cfg: Config) -> FixedTargets:
    """The pretrained network's clusters, made once: a head of cluster.k outputs."""
    cfg.clusterfit.validate()  # the CLI's --layer / --pool are set after loading

    def num_clusters(index: ShardIndex) -> int:
        # Checked before the session starts W&B (cluster.pca_dim: once the features are measured).
        validate_k(cfg, index.num_samples)
        new_run = not checkpoint.list_checkpoints(Path(cfg.run.dir))  # a resumed one has labels
        if new_run and cfg.clusterfit.pretrained:
            check_weights_file(cfg.clusterfit.pretrained)
        return cfg.cluster.k

    def make(s: Session) -> tuple[np.ndarray, dict[str, Any] | None]:
        return cluster_pretrained(s.cfg, s.ctx, s.index, s.reader, s.run_dir)

    return FixedTargets("clusters", num_clusters, make)


def cluster_pretrained(
    cfg: Config, ctx: dist.DistContext, index: ShardIndex, reader: SampleReader, run_dir: Path
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Every sample's cluster label (-1: unreadable) on every rank, and rank 0's summary.

    Collective: call on every rank.
    """
    t, n, c = PhaseTimer(), index.num_samples, cfg.clusterfit
    with t("load"):
        pre_cfg, pretrained = load_pretrained(cfg, ctx)
    taps = LayerTaps(pretrained, [c.layer], c.pool) if c.layer else None
    dim = taps.measure(cfg.data.channels, cfg.data.image_size, ctx.device) if taps else 0
    validate_clustering(cfg, n, dim or pretrained.feature_dim)

    def extract() -> Extracted:
        with taps or contextlib.nullcontext():
            return extract_features(pretrained, reader, pre_cfg, ctx, taps)

    seed = stream_seed(cfg.train.seed, Stream.EPOCH, epoch=0)
    labels, clusters = pseudo_labels(ctx, cfg.cluster, extract, n, seed, t)
    summary = dist.on_rank0(ctx, save_clustering, run_dir, cfg, labels, clusters, index.labels,
                            t.seconds, dim or pretrained.feature_dim)  # fmt: skip
    return labels, summary


def load_pretrained(cfg: Config, ctx: dist.DistContext) -> tuple[Config, ClusterNet]:
    """The pretrained network on the device, and the config it extracts with (this run's data
    settings, its own model settings)."""
    path = cfg.clusterfit.pretrained
    if not path:
        raise ConfigError("clusterfit.pretrained is empty: pass --pretrained CKPT")
    arch = pretrained_model_config(cfg, path)
    model = build_model(arch, cfg.data.channels, 2)  # the head is sized from the weights
    load_weights(model, model_state(path), path)
    log.info("ClusterFit: clustering %s (%s) features of %s", cfg.clusterfit.layer or "embedding",
             arch.arch, path)  # fmt: skip
    pre_cfg = dataclasses.replace(cfg, model=arch)
    return pre_cfg, model_on_device(model, pre_cfg, ctx)


def pretrained_model_config(cfg: Config, path: str) -> ModelConfig:
    """clusterfit.pretrained_model, else the model section saved in the run checkpoint, else
    this run's `model` (a plain state_dict)."""
    if cfg.clusterfit.pretrained_model is not None:
        return cfg.clusterfit.pretrained_model
    text = saved_config_text(path)
    if text is None:
        return cfg.model
    saved = load_config(None, text=text, origin=f"the config saved in {path}")
    if saved.data.channels != cfg.data.channels:
        raise ConfigError(
            f"{path} was trained on data.channels={saved.data.channels} but this run has "
            f"data.channels={cfg.data.channels}; cluster data of the same kind"
        )
    return saved.model


def save_clustering(
    run_dir: Path,
    cfg: Config,
    labels: np.ndarray,
    clusters: Clustering | None,
    truth: np.ndarray | None,
    seconds: dict[str, float],
    feature_dim: int,
) -> dict[str, Any]:
    """Rank 0: the labels file and clusterfit.json (the clustering's quality, sizes, times)."""
    (run_dir / LABELS_FILE).parent.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / LABELS_FILE, labels.astype(np.int32))
    c = cfg.clusterfit
    summary: dict[str, Any] = {
        "pretrained": c.pretrained,
        "layer": c.layer or "embedding",
        "pool": c.pool if c.layer else None,
        "feature_dim": feature_dim,
        "k": cfg.cluster.k,
        "kmeans_loss": clusters.loss if clusters else None,
        "n_empty_before_split": clusters.n_empty_before_split if clusters else None,
        "nmi_gt": metrics.nmi(truth, labels),
        "ari_gt": metrics.ari(truth, labels),
        "skipped_samples": int((labels < 0).sum()),
    }
    summary |= metrics.cluster_stats(labels, cfg.cluster.k)
    summary |= {f"time_{name}_s": round(s, 4) for name, s in seconds.items()}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    log.info("ClusterFit clustering: %s", json.dumps(summary))
    return summary
