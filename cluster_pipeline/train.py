"""The DeepCluster epoch loop: extract -> gather -> cluster -> broadcast -> reset head -> train."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import checkpoint, dist, kmeans, metrics
from .config import Config, ConfigError, to_dict, to_yaml
from .data.augment import center_crop, random_resized_crop, to_float
from .data.reader import SampleReader, batch_loader
from .data.sampler import rank_slice, uniform_cluster_sampler
from .extract import extract_features, open_data_and_model
from .models import ClusterNet, reset_head
from .rundir import prepare_run_dir
from .tracking import Tracker, read_metrics, truncate_metrics, write_report

log = logging.getLogger(__name__)


def run_deepcluster(cfg: Config) -> Path:
    """Train DeepCluster for cfg.train.epochs, resuming from the run directory's last checkpoint."""
    ctx = dist.init_distributed(cfg.dist.timeout_s)
    run_dir = prepare_run_dir(cfg, ctx)
    index, reader, model = open_data_and_model(cfg, ctx)
    ddp = dist.wrap_ddp(ctx, model, cfg.model.sync_bn)
    optimizer = make_optimizer(model, cfg)
    start = resume(run_dir, cfg, model, optimizer, ctx)
    tracker = Tracker(run_dir, ctx.is_main, cfg.wandb, to_dict(cfg), start.wandb_id)
    prev_labels, n = start.labels, index.num_samples
    for epoch in range(start.epoch, cfg.train.epochs):
        t = PhaseTimer()
        with t("extract"):
            idx, feats = extract_features(model, reader, cfg, ctx)
        with t("gather"):
            all_feats = dist.gather_features(ctx, idx, feats, n)
        with t("cluster"):
            clusters = dist.on_rank0(ctx, cluster_epoch, all_feats, cfg, epoch)
        with t("broadcast"):
            labels = dist.broadcast_labels(ctx, clusters.labels if clusters else None, n)
        reset_head_and_state(model, optimizer, seed=cfg.train.seed * 7919 + epoch)
        with t("train"):
            loss, images = train_one_epoch(ddp, optimizer, reader, labels, cfg, ctx, epoch)
        with t("checkpoint"):
            dist.on_rank0(ctx, save_epoch, run_dir, cfg, epoch, model, optimizer, labels, tracker)
        if ctx.is_main:
            row = epoch_metrics(epoch, clusters, labels, prev_labels, index.labels, loss, images, t)
            tracker.log_epoch(row)
            print_epoch_row(row, header=epoch == start.epoch)
        prev_labels = labels
    finish_run(run_dir, ctx, tracker, prev_labels)
    return run_dir


class PhaseTimer:
    """Wall time per named phase of an epoch (synchronizing CUDA so GPU work is counted)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] = time.perf_counter() - start


def cluster_epoch(feats: np.ndarray | None, cfg: Config, epoch: int) -> kmeans.Clustering:
    """Rank 0's clustering of all features; the k-means seed changes every epoch."""
    assert feats is not None
    c = cfg.cluster
    return kmeans.cluster_features(
        feats, c.k, c.pca_dim, c.whiten, c.l2_normalize, c.niter,
        seed=cfg.train.seed * 1_000_003 + epoch, max_points_per_centroid=c.max_points_per_centroid,
        split_eps=c.split_eps, use_gpu=c.use_gpu,
    )  # fmt: skip


def make_optimizer(model: ClusterNet, cfg: Config) -> torch.optim.Optimizer:
    head = set(map(id, model.head.parameters()))
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    o = cfg.optim
    return torch.optim.SGD(
        [{"params": body, "lr": o.lr}, {"params": list(model.head.parameters()), "lr": o.head_lr}],
        lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
    )  # fmt: skip


def reset_head_and_state(model: ClusterNet, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """A new head for the new pseudo-labels, with no momentum left over from the old ones."""
    reset_head(model, torch.Generator().manual_seed(seed))
    for p in model.head.parameters():
        optimizer.state.pop(p, None)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One SGD step on a batch; under DDP the gradients are averaged over ranks in backward."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    reader: SampleReader,
    labels: np.ndarray,
    cfg: Config,
    ctx: dist.DistContext,
    epoch: int,
) -> tuple[float, int]:
    """One pass over draws uniform over clusters; every rank takes the same number of steps.

    Returns the mean loss over all ranks and the number of images trained on, all ranks.
    Collective: call on every rank.
    """
    num_draws = cfg.train.samples_per_epoch or reader.index.num_samples
    draws = uniform_cluster_sampler(labels, num_draws, seed=cfg.train.seed * 1_000_003 + epoch)
    mine = rank_slice(draws, ctx.rank, ctx.world, cfg.train.batch_size)
    gen = torch.Generator().manual_seed((cfg.train.seed * 1_000_003 + epoch) * 1024 + ctx.rank)
    targets = torch.from_numpy(labels)
    model.train()
    total = torch.zeros((), device=ctx.device)
    steps = 0
    loader = batch_loader(
        reader, mine, cfg.train.batch_size, cfg.data.num_workers, cfg.dist.timeout_s
    )
    for idx, images in tqdm(loader, desc=f"train {epoch}", leave=False,
                            disable=not (ctx.is_main and cfg.run.progress)):  # fmt: skip
        x = to_float(images.to(ctx.device, non_blocking=True), cfg.data.mean, cfg.data.std)
        x = augment(x, cfg, gen)
        total += train_step(model, optimizer, x, targets[idx].to(ctx.device))
        steps += 1
    summed = dist.all_reduce_sum(ctx, np.array([float(total), steps], dtype=np.float64))
    return float(summed[0] / max(1.0, summed[1])), int(summed[1]) * cfg.train.batch_size


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    a = cfg.augment
    if a.random_resized_crop:
        return random_resized_crop(x, cfg.data.image_size, a.min_scale, a.flip, gen)
    x = center_crop(x, cfg.data.image_size)
    if a.flip:
        flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


@dataclass
class ResumeState:
    epoch: int = 0
    labels: np.ndarray | None = None
    wandb_id: str | None = None


def resume(
    run_dir: Path,
    cfg: Config,
    model: ClusterNet,
    optimizer: torch.optim.Optimizer,
    ctx: dist.DistContext,
) -> ResumeState:
    """Continue from the run directory's newest readable checkpoint, if there is one."""
    if not checkpoint.list_checkpoints(run_dir):
        return ResumeState()
    if not cfg.run.resume:
        raise ConfigError(
            f"run directory {run_dir} already has checkpoints and run.resume=false; "
            "choose another run.dir or set run.resume=true to continue it"
        )
    state = checkpoint.load_latest(run_dir)
    if state is None:
        raise RuntimeError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ctx.is_main:
        truncate_metrics(run_dir, state["epoch"])
    log.info("resumed %s after epoch %d", run_dir, state["epoch"] - 1)
    return ResumeState(state["epoch"], state["labels"].numpy(), state.get("wandb_id") or None)


def save_epoch(
    run_dir: Path,
    cfg: Config,
    epoch: int,
    model: ClusterNet,
    optimizer: torch.optim.Optimizer,
    labels: np.ndarray,
    tracker: Tracker,
) -> None:
    if cfg.train.save_assignments:
        (run_dir / "assignments").mkdir(exist_ok=True)
        np.save(run_dir / "assignments" / f"epoch-{epoch:04d}.npy", labels.astype(np.int32))
    last = epoch == cfg.train.epochs - 1
    if last or (epoch + 1) % cfg.train.checkpoint_every == 0:
        state: dict[str, Any] = {
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "labels": torch.from_numpy(labels),
            "wandb_id": tracker.run_id or "",
            "config": to_yaml(cfg),
        }
        path = checkpoint.checkpoint_path(run_dir, epoch)
        checkpoint.save_atomic(state, path, cfg.train.keep_checkpoints)


def epoch_metrics(
    epoch: int,
    clusters: kmeans.Clustering | None,
    labels: np.ndarray,
    prev: np.ndarray | None,
    truth: np.ndarray | None,
    loss: float,
    images: int,
    t: PhaseTimer,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "epoch": epoch,
        "nmi_prev": metrics.nmi(prev, labels),
        "nmi_gt": metrics.nmi(truth, labels),
        "ari_gt": metrics.ari(truth, labels),
        "kmeans_loss": clusters.loss if clusters else None,
        "n_empty_before_split": clusters.n_empty_before_split if clusters else None,
        "k": len(clusters.centroids) if clusters else None,
        "train_loss": loss,
        "images_per_s": images / max(t.seconds["train"], 1e-9),
    }
    row |= metrics.cluster_stats(labels, row["k"] or int(labels.max()) + 1)
    row |= {f"time_{name}_s": round(s, 4) for name, s in t.seconds.items()}
    return row


# (metrics key, column title, decimals) of the table printed on rank 0, one row per epoch.
COLUMNS = (
    ("epoch", "epoch", 0), ("nmi_prev", "nmi_prev", 3), ("nmi_gt", "nmi_gt", 3),
    ("train_loss", "loss", 3), ("n_empty_before_split", "empty", 0),
    ("cluster_size_min", "min_size", 0), ("cluster_size_max", "max_size", 0),
    ("time_extract_s", "extract_s", 1), ("time_cluster_s", "cluster_s", 1),
    ("time_train_s", "train_s", 1), ("images_per_s", "img/s", 0),
)  # fmt: skip


def print_epoch_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print(" ".join(f"{title:>9}" for _, title, _ in COLUMNS), flush=True)
    cells = ["-" if row.get(k) is None else f"{row[k]:.{d}f}" for k, _, d in COLUMNS]
    print(" ".join(f"{c:>9}" for c in cells), flush=True)


def finish_run(
    run_dir: Path, ctx: dist.DistContext, tracker: Tracker, labels: np.ndarray | None
) -> None:
    """Report, close W&B, leave the process group. Collective: call on every rank."""
    if ctx.is_main:
        rows = read_metrics(run_dir)
        if rows:
            report = write_report(run_dir, rows, labels)
            log.info("run directory: %s  report: %s", run_dir, report)
        tracker.finish()
    dist.barrier(ctx)
    dist.shutdown(ctx)
