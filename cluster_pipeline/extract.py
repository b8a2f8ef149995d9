"""Feature extraction: every sample read exactly once across ranks x workers, model in eval mode."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import dist
from .config import Config, validate_against_data
from .data.augment import center_crop, to_float
from .data.reader import SampleReader, ShardIndex, batch_loader, rank_partition
from .models import ClusterNet, build_model
from .rundir import prepare_run_dir

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    model: ClusterNet, reader: SampleReader, cfg: Config, ctx: dist.DistContext
) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, features) of this rank's share of the shards.

    A failure on any rank (a bad shard, say) is raised on every rank rather than leaving the
    others waiting in the gather. Collective: call on every rank.
    """
    dist.broadcast_buffers(ctx, model)  # every rank extracts with rank 0's BatchNorm statistics
    indices = rank_partition(reader.index.num_samples, ctx.rank, ctx.world)
    feats = np.empty((len(indices), model.feature_dim), dtype=np.float32)
    seen = np.empty(len(indices), dtype=np.int64)
    error: BaseException | None = None
    was_training = model.training
    model.eval()
    try:
        loader = batch_loader(
            reader, indices, cfg.data.extract_batch_size, cfg.data.num_workers, cfg.dist.timeout_s
        )
        pos = 0
        bar = tqdm(
            loader, desc="extract", disable=not (ctx.is_main and cfg.run.progress), leave=False
        )
        for idx, images in bar:
            x = to_float(images.to(ctx.device, non_blocking=True), cfg.data.mean, cfg.data.std)
            out = model.features(center_crop(x, cfg.data.image_size))
            feats[pos : pos + len(idx)] = out.float().cpu().numpy()
            seen[pos : pos + len(idx)] = idx.numpy()
            pos += len(idx)
        if pos != len(indices):
            shards = reader.index.shards_of(indices[pos:])
            raise RuntimeError(
                f"rank {ctx.rank} read {pos} of {len(indices)} samples; "
                f"unread samples are in shards {shards}"
            )
    except Exception as exc:  # reported on every rank below
        log.exception("extraction failed on rank %d", ctx.rank)
        error = exc
    finally:
        model.train(was_training)
    dist.raise_if_any_rank_failed(ctx, error)
    return seen, feats


def save_features(out: Path, feats: np.ndarray, labels: np.ndarray | None) -> None:
    """features.npy (row i = sample i), index.npy, and labels.npy when the classes are known."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "features.npy", feats)
    np.save(out / "index.npy", np.arange(len(feats), dtype=np.int64))
    if labels is not None:
        np.save(out / "labels.npy", labels)


def open_data_and_model(
    cfg: Config, ctx: dist.DistContext
) -> tuple[ShardIndex, SampleReader, ClusterNet]:
    """The shard index (checked against the files), a sample reader, and the seeded model.

    Every config check that needs N or the feature dimension runs here, before any real work.
    """
    index = ShardIndex.load(cfg.data.shards)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.channels, cfg.cluster.k).to(ctx.device)
    validate_against_data(cfg, index.num_samples, model.feature_dim, ctx.world)
    return index, SampleReader(index, cfg.data.load_size, cfg.data.channels), model


def run_extract(cfg: Config, weights: str | None, out: str | None) -> Path | None:
    """`cluster-pipeline extract`: features of every sample, gathered and saved by rank 0."""
    ctx = dist.init_distributed(cfg.dist.timeout_s)
    run_dir = prepare_run_dir(cfg, ctx)
    index, reader, model = open_data_and_model(cfg, ctx)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
    idx, feats = extract_features(model, reader, cfg, ctx)
    all_feats = dist.gather_features(ctx, idx, feats, index.num_samples)
    folder = Path(out) if out else run_dir / "features"
    dist.on_rank0(ctx, save_features, folder, all_feats, index.labels)
    dist.shutdown(ctx)
    return folder if ctx.is_main else None
