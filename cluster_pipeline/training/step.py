"""One training epoch on an epoch's targets: uniform over labels, equal steps on every rank."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

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
from cluster_pipeline.training.recipe import clip_gradients, lr_factor, set_lr
from cluster_pipeline.training.seeding import Stream, seed_step, stream_seed
from cluster_pipeline.training.session import Session

if TYPE_CHECKING:
    from cluster_pipeline.training.targets import Targets

# Turns a training batch and its targets into what the network trains on (RotNet: each image
# in four rotations, the rotation as target). Runs on the device, after augmentation.
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class EpochTotals(NamedTuple):
    """An epoch's training, summed over all ranks."""

    loss: float  # mean per step
    accuracy: float  # of the network's predictions on its targets
    images: int  # drawn by the sampler (before a BatchTransform)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    clip_grad_norm: float = 0.0,
    bf16: bool = False,
) -> torch.Tensor:
    """One SGD step on a batch; under DDP the gradients are averaged over ranks in backward.

    `bf16`: the forward under CUDA bf16 autocast (weights, gradients and SGD stay fp32).
    Returns (loss, accuracy) on the batch, float32 on the device: no host sync per step.
    """
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(model, clip_grad_norm)
    optimizer.step()
    accuracy = (logits.detach().argmax(1) == y).to(loss.dtype).mean()
    return torch.stack([loss.detach(), accuracy])


def train_one_epoch(s: Session, targets: Targets) -> EpochTotals:
    """The epoch's draws (`targets.draws`), from `s.pos.step` on, each batch one step of
    `targets.train_step` at the scheduled rate.

    Collective: call on every rank.
    """
    cfg, ctx, pos = s.cfg, s.ctx, s.pos
    b = per_rank_batch_size(cfg, ctx.world)
    mine = targets.draws(s, b)
    steps = len(mine) // b  # the same on every rank
    gen = torch.Generator()
    total = torch.tensor(pos.rank_sums(ctx.rank), dtype=torch.float32, device=ctx.device)
    meter = StepMeter(s, steps, b * ctx.world)
    s.ddp.train()
    # Strict reads: a sample skipped at extraction has label -1 and is never drawn.
    loader = batch_loader(s.reader, mine[pos.step * b :], b, cfg.data.num_workers,
                          cfg.dist.timeout_s)  # fmt: skip
    for idx, images, *_ in progress(loader, f"train {pos.epoch}", ctx.is_main and cfg.run.progress):
        meter.batch_arrived()
        s.stop.at_step(pos, total)
        s.policy.at_step(pos, total)
        seed_step(gen, cfg.train.seed, pos.epoch, ctx.rank, pos.step)
        lr = set_lr(s.optimizer, lr_factor(cfg.optim, cfg.train.epochs, pos.epoch, pos.step, steps))
        out = targets.train_step(s, idx, images.to(ctx.device, non_blocking=True), gen)
        total += out
        pos.step += 1
        meter.step_done(out, lr)
    loss, accuracy = map(float, total)  # sums over this rank's steps; every step's batch is full
    summed = dist.all_reduce(ctx, np.array([loss, pos.step, accuracy], dtype=np.float64))
    steps_done = max(1.0, summed[1])
    return EpochTotals(float(summed[0] / steps_done), float(summed[2] / steps_done),
                       int(summed[1]) * b)  # fmt: skip


def epoch_draws(s: Session, labels: np.ndarray, b: int) -> np.ndarray:
    """This rank's draws of the epoch, uniform over `labels` (-1: never drawn)."""
    cfg, ctx, pos = s.cfg, s.ctx, s.pos
    num_draws = cfg.train.samples_per_epoch or s.reader.index.num_samples
    seed = stream_seed(cfg.train.seed, Stream.EPOCH, pos.epoch)
    return rank_draws(pos.sampler, labels, num_draws, seed, ctx.rank, ctx.world, b)


def labelled_step(
    s: Session,
    images: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    transform: BatchTransform | None = None,
) -> torch.Tensor:
    """One step on a batch of uint8 images (on the device) and their targets: augmentation,
    `transform` (RotNet's rotations), `train_step`; (loss, accuracy) on the device."""
    cfg, ctx = s.cfg, s.ctx
    x = augment(to_float(images, cfg.data.mean, cfg.data.std), cfg, gen)
    y = y.to(ctx.device).long()
    if transform is not None:
        x, y = transform(x, y)
    bf16 = cfg.train.bf16 and ctx.device.type == "cuda"
    return train_step(s.ddp, s.optimizer, as_layout(x, cfg, ctx), y, cfg.optim.clip_grad_norm,
                      bf16)  # fmt: skip


class StepMeter:
    """Rank 0's W&B row every wandb.log_every_steps steps: the step's loss and accuracy on its
    targets, the rate, img/s over all ranks and the time spent waiting for batches since the
    last row. Only a logged step syncs with the device."""

    def __init__(self, s: Session, steps: int, global_batch: int) -> None:
        self.s, self.steps, self.global_batch = s, steps, global_batch
        self.every = s.cfg.wandb.log_every_steps if s.tracker.shows_media else 0  # rank 0
        self.since = self.last = time.perf_counter()
        self.wait, self.count = 0.0, 0

    def batch_arrived(self) -> None:
        now = time.perf_counter()
        self.wait += now - self.last

    def step_done(self, out: torch.Tensor, lr: float) -> None:
        self.count += 1
        pos = self.s.pos
        if self.every and pos.step % self.every == 0:
            loss, acc = out.tolist()
            now = time.perf_counter()
            row: dict[str, Any] = {
                "train/global_step": pos.epoch * self.steps + pos.step,
                "train/epoch": pos.epoch + pos.step / max(self.steps, 1),
                "train/loss": loss, "train/acc": acc, "train/lr": lr,
                "train/images_per_s": self.count * self.global_batch / max(now - self.since, 1e-9),
                "train/data_wait_s": self.wait,
            }  # fmt: skip
            if torch.cuda.is_available() and self.s.ctx.device.type == "cuda":
                row["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.s.ctx.device) / 2**30
            self.s.tracker.log_step(row)
            self.since, self.wait, self.count = time.perf_counter(), 0.0, 0
        self.last = time.perf_counter()


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    a = cfg.augment
    if a.random_resized_crop:
        return random_resized_crop(x, cfg.data.image_size, a.min_scale, a.flip, gen)
    x = center_crop(x, cfg.data.image_size)
    if a.flip:
        flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x
