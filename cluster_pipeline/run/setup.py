"""A command's set-up: the shard index checked against its files, a reader, and the model.

Every config check that needs N or the feature dimension runs here, before any real work.
"""

from __future__ import annotations

import torch

from cluster_pipeline import dist
from cluster_pipeline.config import Config, validate_against_data, validate_training
from cluster_pipeline.data.loader import start_worker_server
from cluster_pipeline.data.reader import SampleReader, ShardError, ShardIndex
from cluster_pipeline.models.nets import ClusterNet, build_model
from cluster_pipeline.training.seeding import Stream, stream_seed


def open_data_and_model(
    cfg: Config, ctx: dist.DistContext, clusters: bool = True
) -> tuple[ShardIndex, SampleReader, ClusterNet]:
    """The shard index (checked against the files), a sample reader, and the seeded model.

    Every config check that needs N or the feature dimension runs here, before any real work
    (the cluster.* ones only for a command that `clusters` its model's features), and so does
    the check of the shards against their index: on every rank (a node may hold its own copy),
    failing every rank if one fails. Collective: call on every rank.
    """
    if cfg.data.num_workers > 0:
        start_worker_server()  # its start-up overlaps ours
    loaded, error = None, None
    try:
        loaded = ShardIndex.load(cfg.data.shards, allow_truncated=cfg.data.on_error == "skip")
    except ShardError as exc:
        error = exc
    dist.raise_if_any_rank_failed(ctx, error)
    assert loaded is not None
    index = loaded.split(cfg.data.split, cfg.data.test_fraction, cfg.data.split_seed)
    torch.manual_seed(stream_seed(cfg.train.seed, Stream.MODEL))
    model = model_on_device(build_model(cfg.model, cfg.data.channels, cfg.cluster.k), cfg, ctx)
    if clusters:
        validate_against_data(cfg, index.num_samples, model.feature_dim, ctx.world)
    else:
        validate_training(cfg, index.num_samples, ctx.world)
    return index, SampleReader(index, cfg.data.load_size, cfg.data.channels), model


def model_on_device(model: ClusterNet, cfg: Config, ctx: dist.DistContext) -> ClusterNet:
    """`model` on the rank's device, channels_last on CUDA when model.channels_last is set."""
    model = model.to(ctx.device)
    if ctx.device.type == "cuda" and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model
