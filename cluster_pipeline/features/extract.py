"""Feature extraction: every sample read exactly once across ranks x workers, model in eval mode.

With data.on_error=skip a sample that cannot be read is reported instead (rank log: shard, key,
reason) and every rank stops when more than data.max_skip_fraction of the samples were lost.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cluster_pipeline import dist
from cluster_pipeline.config import Config
from cluster_pipeline.data.augment import center_crop, to_float
from cluster_pipeline.data.loader import batch_loader, rank_partition
from cluster_pipeline.data.reader import SampleReader, ShardError
from cluster_pipeline.features.gather import Gathered, gather_features
from cluster_pipeline.models.layers import LayerTaps
from cluster_pipeline.models.nets import ClusterNet
from cluster_pipeline.models.weights import check_weights_file, load_weights, model_state
from cluster_pipeline.run.logs import progress
from cluster_pipeline.run.rundir import prepare_run_dir, run_dir_removed_on_early_error
from cluster_pipeline.run.setup import open_data_and_model

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    model: ClusterNet,
    reader: SampleReader,
    cfg: Config,
    ctx: dist.DistContext,
    taps: LayerTaps | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample indices, features, skipped sample indices) of this rank's share of the shards.

    The features are the model's embedding, or with `taps` the pooled outputs of its tapped
    layers side by side (`taps.split` separates them). Collective: call on every rank.
    """
    n = len(rank_partition(reader.index.num_samples, ctx.rank, ctx.world))
    dim = taps.measure(cfg.data.channels, cfg.data.image_size, ctx.device) if taps else 0
    feats = np.empty((n, dim or model.feature_dim), dtype=np.float32)
    embed = taps.forward if taps else model.features
    seen = np.empty(n, dtype=np.int64)
    sink = FeatureSink(feats, batches=8 if ctx.device.type == "cuda" else 1)

    def keep(pos: int, idx: np.ndarray, x: torch.Tensor) -> None:
        sink.add(pos, embed(x))
        seen[pos : pos + len(idx)] = idx

    read, lost = for_each_batch(model, reader, cfg, ctx, "extract", keep, sink.flush)
    return seen[:read], feats[:read], lost


@torch.no_grad()
def for_each_batch(
    model: ClusterNet,
    reader: SampleReader,
    cfg: Config,
    ctx: dist.DistContext,
    desc: str,
    consume: Callable[[int, np.ndarray, torch.Tensor], None],
    finish: Callable[[], None] = lambda: None,
) -> tuple[int, np.ndarray]:
    """One pass over this rank's exactly-once share of the shards, the model in eval mode:
    `consume(position, sample ids, batch)` gets every readable batch, normalized and center
    cropped on the device, under extraction precision; `finish()` runs after the last.

    Returns (samples read, skipped sample ids). Samples are skipped only with
    data.on_error=skip. A failure on any rank (a bad shard, say) is raised on every rank rather
    than leaving the others waiting in the next collective. Collective: call on every rank.
    """
    dist.broadcast_buffers(ctx, model)  # every rank uses rank 0's BatchNorm statistics
    indices = rank_partition(reader.index.num_samples, ctx.rank, ctx.world)
    skipped: list[np.ndarray] = []
    error: BaseException | None = None
    pos = 0
    was_training = model.training
    model.eval()
    try:
        skip = cfg.data.on_error == "skip"
        loader = batch_loader(reader, indices, cfg.data.extract_batch_size, cfg.data.num_workers,
                              cfg.dist.timeout_s, skip_errors=skip)  # fmt: skip
        for idx, images, bad, reasons in progress(loader, desc, ctx.is_main and cfg.run.progress):
            if len(bad):
                skipped.append(bad.numpy())
                for reason in reasons:
                    log.warning("skipped (data.on_error=skip) %s", reason)
            if not len(idx):
                continue
            x = to_float(images.to(ctx.device, non_blocking=True), cfg.data.mean, cfg.data.std)
            x = as_layout(center_crop(x, cfg.data.image_size), cfg, ctx)
            with extraction_precision(cfg, ctx):
                consume(pos, idx.numpy(), x)
            pos += len(idx)
        finish()
        done = pos + sum(map(len, skipped))
        if done != len(indices):
            shards = reader.index.shards_of(indices[done:])
            raise RuntimeError(
                f"rank {ctx.rank} read {pos} and skipped {done - pos} of {len(indices)} samples; "
                f"unread samples are in shards {shards}"
            )
    except Exception as exc:  # reported on every rank below
        log.exception("%s failed on rank %d", desc, ctx.rank)
        error = exc
    finally:
        model.train(was_training)
    dist.raise_if_any_rank_failed(ctx, error)
    lost = np.concatenate(skipped) if skipped else np.zeros(0, dtype=np.int64)
    if cfg.data.on_error == "skip":
        check_skip_fraction(ctx, cfg, len(lost), reader.index.num_samples)
    return pos, lost


def check_skip_fraction(ctx: dist.DistContext, cfg: Config, lost: int, num_samples: int) -> None:
    """Stop every rank when more samples were unreadable than data.max_skip_fraction allows.

    Collective: call on every rank.
    """
    total = sum(dist.all_gather_counts(ctx, lost))
    if total > cfg.data.max_skip_fraction * num_samples:
        raise ShardError(
            f"{total} of {num_samples} samples ({total / num_samples:.2%}) in {cfg.data.shards} "
            f"could not be read, more than data.max_skip_fraction={cfg.data.max_skip_fraction}; "
            "logs/rank<N>.log name each shard, sample and reason: restore those shards or re-run "
            "make-shards, or raise data.max_skip_fraction"
        )


class FeatureSink:
    """Device features copied to the host array `batches` forward passes at a time.

    Copying every batch at once (`.cpu()`) makes the host wait for each forward pass, so the
    GPU idles while the next batch is staged; holding a few outputs keeps its queue full, at
    the cost of that many batches of device memory. On CPU there is nothing to overlap.
    """

    def __init__(self, out: np.ndarray, batches: int) -> None:
        self.out, self.batches = out, batches
        self.parts: list[tuple[int, torch.Tensor]] = []

    def add(self, pos: int, feats: torch.Tensor) -> None:
        """Rows pos.. of `out` are `feats`; calls come in order of pos."""
        self.parts.append((pos, feats.detach()))
        if len(self.parts) >= self.batches:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        start = self.parts[0][0]
        block = torch.cat([f.float() for _, f in self.parts]).cpu().numpy()
        self.out[start : start + len(block)] = block
        self.parts = []


def extraction_precision(cfg: Config, ctx: dist.DistContext) -> contextlib.AbstractContextManager:
    """bf16 autocast for extraction on CUDA (features go back to fp32); fp32 on CPU."""
    on = ctx.device.type == "cuda" and cfg.model.extract_bf16
    return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def as_layout(x: torch.Tensor, cfg: Config, ctx: dist.DistContext) -> torch.Tensor:
    """The batch in the model's memory layout (channels_last on CUDA when configured)."""
    if ctx.device.type == "cuda" and cfg.model.channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def save_features(
    out: Path,
    gathered: Gathered | None,
    labels: np.ndarray | None,
    taps: LayerTaps | None = None,
) -> None:
    """features.npy (row j = sample index.npy[j]: every sample but the skipped ones, listed in
    skipped.npy when there are any), and labels.npy of the rows when the classes are known.

    With `taps`, one features-<layer>.npy per tapped layer instead of features.npy.
    """
    assert gathered is not None
    out.mkdir(parents=True, exist_ok=True)
    if taps is None:
        np.save(out / "features.npy", gathered.feats)
    else:
        for name, rows in taps.split(gathered.feats).items():
            np.save(out / f"features-{name}.npy", np.ascontiguousarray(rows))
    np.save(out / "index.npy", gathered.index)
    if len(gathered.skipped):
        np.save(out / "skipped.npy", gathered.skipped)
    if labels is not None:
        np.save(out / "labels.npy", labels[gathered.index])


def run_extract(
    cfg: Config, weights: str | None, out: str | None, layers: list[str] | None = None,
    pool: str = "avg",
) -> Path | None:  # fmt: skip
    """`cluster-pipeline extract`: features of every sample, gathered and saved by rank 0.

    With `layers`, the pooled activations of those named modules instead of the embedding.
    """
    if weights:
        check_weights_file(weights)  # loaded once the data is open: a wrong path fails first
    with (
        run_dir_removed_on_early_error(cfg),
        dist.process_group(cfg.dist.timeout_s, cfg.dist.heartbeat_timeout_s) as ctx,
    ):
        return _extract_and_save(cfg, ctx, weights, out, layers, pool)


def _extract_and_save(
    cfg: Config,
    ctx: dist.DistContext,
    weights: str | None,
    out: str | None,
    layers: list[str] | None,
    pool: str,
) -> Path | None:
    run_dir = prepare_run_dir(cfg, ctx)
    index, reader, model = open_data_and_model(cfg, ctx)
    if weights:
        load_weights(model, model_state(weights), weights)
    taps = LayerTaps(model, layers, pool) if layers else None
    with taps or contextlib.nullcontext():
        idx, feats, skipped = extract_features(model, reader, cfg, ctx, taps)
    gathered = gather_features(ctx, idx, feats, index.num_samples, skipped)
    folder = Path(out) if out else run_dir / "features"
    dist.on_rank0(ctx, save_features, folder, gathered, index.labels, taps)
    return folder if ctx.is_main else None
