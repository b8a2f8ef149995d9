"""One training epoch on an epoch's targets: uniform over labels, equal steps on every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cluster_pipeline import dist
from cluster_pipeline.config import Config, per_rank_batch_size
from cluster_pipeline.data.augment import center_crop, random_resized_crop, to_float
from cluster_pipeline.data.loader import batch_loader
from cluster_pipeline.data.sampler import rank_draws
from cluster_pipeline.features.extract import as_layout
from cluster_pipeline.run.logs import progress
from cluster_pipeline.training.seeding import Stream, seed_step, stream_seed
from cluster_pipeline.training.session import Session

# Turns a training batch and its targets into what the network trains on (RotNet: each image
# in four rotations, the rotation as target). Runs on the device, after augmentation.
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class EpochTotals(NamedTuple):
    """An epoch's training, summed over all ranks."""

    loss: float  # mean per step
    accuracy: float  # of the network's predictions on its targets
    images: int  # drawn by the sampler (before a BatchTransform)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One SGD step on a batch; under DDP the gradients are averaged over ranks in backward.

    Returns (loss, accuracy) on the batch, float32 on the device: no host sync per step.
    """
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    accuracy = (logits.detach().argmax(1) == y).to(loss.dtype).mean()
    return torch.stack([loss.detach(), accuracy])


def train_one_epoch(
    s: Session, labels: np.ndarray, transform: BatchTransform | None = None
) -> EpochTotals:
    """The epoch's draws, uniform over `labels` (-1: never drawn), from `s.pos.step` on.

    `transform` maps each augmented batch and its labels to the network's batch and targets.
    Collective: call on every rank.
    """
    cfg, ctx, pos = s.cfg, s.ctx, s.pos
    b = per_rank_batch_size(cfg, ctx.world)
    num_draws = cfg.train.samples_per_epoch or s.reader.index.num_samples
    seed = stream_seed(cfg.train.seed, Stream.EPOCH, pos.epoch)
    mine = rank_draws(pos.sampler, labels, num_draws, seed, ctx.rank, ctx.world, b)
    targets = torch.from_numpy(labels)
    gen = torch.Generator()
    total = torch.tensor(pos.rank_sums(ctx.rank), dtype=torch.float32, device=ctx.device)
    s.ddp.train()
    # Strict reads: a sample skipped at extraction has label -1 and is never drawn.
    loader = batch_loader(s.reader, mine[pos.step * b :], b, cfg.data.num_workers,
                          cfg.dist.timeout_s)  # fmt: skip
    for idx, images, *_ in progress(loader, f"train {pos.epoch}", ctx.is_main and cfg.run.progress):
        s.stop.at_step(pos, total)
        s.policy.at_step(pos, total)
        seed_step(gen, cfg.train.seed, pos.epoch, ctx.rank, pos.step)
        x = to_float(images.to(ctx.device, non_blocking=True), cfg.data.mean, cfg.data.std)
        x, y = augment(x, cfg, gen), targets[idx].to(ctx.device).long()
        if transform is not None:
            x, y = transform(x, y)
        total += train_step(s.ddp, s.optimizer, as_layout(x, cfg, ctx), y)
        pos.step += 1
    loss, accuracy = map(float, total)  # sums over this rank's steps; every step's batch is full
    summed = dist.all_reduce(ctx, np.array([loss, pos.step, accuracy], dtype=np.float64))
    steps = max(1.0, summed[1])
    return EpochTotals(float(summed[0] / steps), float(summed[2] / steps), int(summed[1]) * b)


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    a = cfg.augment
    if a.random_resized_crop:
        return random_resized_crop(x, cfg.data.image_size, a.min_scale, a.flip, gen)
    x = center_crop(x, cfg.data.image_size)
    if a.flip:
        flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x
