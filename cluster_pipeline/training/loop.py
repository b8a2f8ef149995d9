"""The DeepCluster epoch loop: extract -> gather -> cluster -> broadcast -> reset head -> train."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cluster_pipeline import dist
from cluster_pipeline.clustering import kmeans, metrics
from cluster_pipeline.clustering.sharded import Shard, cluster_shard
from cluster_pipeline.config import Config, per_rank_batch_size, to_dict
from cluster_pipeline.data.augment import center_crop, random_resized_crop, to_float
from cluster_pipeline.data.reader import SampleReader, batch_loader
from cluster_pipeline.data.sampler import rank_slice, uniform_cluster_sampler
from cluster_pipeline.features.extract import as_layout, extract_features, open_data_and_model
from cluster_pipeline.models.nets import ClusterNet, reset_head
from cluster_pipeline.run.rundir import prepare_run_dir
from cluster_pipeline.run.stop import StopFlag
from cluster_pipeline.run.tracking import Tracker, read_metrics, write_report
from cluster_pipeline.training.state import Checkpointer, EpochState, resume_state

log = logging.getLogger(__name__)


def run_deepcluster(
    cfg: Config, flag: StopFlag | None = None, requeue: Callable[[int], object] | None = None
) -> Path:
    """Train DeepCluster for cfg.train.epochs, continuing the run directory's last checkpoint.

    A signal caught by `flag` stops every rank at the next safe point with a checkpoint (and
    `requeue` on rank 0), raising Stopped. A rank that dies stops the others with an error
    naming it (RankLostError) within dist.heartbeat_timeout_s. Collective: call on every rank.
    """
    ctx = dist.init_distributed(cfg.dist.timeout_s, cfg.dist.heartbeat_timeout_s)
    with dist.naming_lost_ranks(ctx):
        return train_deepcluster(cfg, ctx, flag or StopFlag(), requeue)


def train_deepcluster(
    cfg: Config, ctx: dist.DistContext, flag: StopFlag, requeue: Callable[[int], object] | None
) -> Path:
    """The epoch loop of `run_deepcluster`, in a process group that is already up."""
    run_dir = prepare_run_dir(cfg, ctx)
    index, reader, model = open_data_and_model(cfg, ctx)
    ddp, optimizer, state, tracker, saver = open_training(run_dir, cfg, ctx, model, flag, requeue)
    first, n = state.epoch, index.num_samples
    while state.epoch < cfg.train.epochs:
        t = state.timer
        if not state.clustered:
            with t("extract"):
                idx, feats, skipped = extract_features(model, reader, cfg, ctx)
            with t("gather"):  # cluster.mode=sharded: every rank keeps its own features
                gathered = gather_for_clustering(ctx, cfg, idx, feats, n, skipped)
            saver.stop_if_requested(state)
            with t("cluster"):
                clusters = cluster_epoch(ctx, gathered, cfg, state.epoch)
            with t("broadcast"):
                labels = labels_on_every_rank(ctx, cfg, clusters, gathered, n)
            state.start_training(labels, clusters)
            del feats, gathered  # else the next epoch's N x d arrays arrive while these live
            reset_head_and_state(model, optimizer, seed=cfg.train.seed * 7919 + state.epoch)
        with t("train"):
            totals = train_one_epoch(ddp, optimizer, reader, state, cfg, ctx, saver)
        if ctx.is_main:
            row = epoch_metrics(state, index.labels, totals)
            tracker.log_epoch(row)
            print_epoch_row(row, header=state.epoch == first)
        state = state.next_epoch()
        with state.timer("checkpoint"):
            saver.end_of_epoch(state)
    finish_run(run_dir, ctx, tracker, state.prev_labels)
    return run_dir


class Training(NamedTuple):
    """What a training loop steps: the DDP-wrapped model, its optimizer, the state to continue
    from, the metrics sink and the checkpoint writer."""

    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    state: EpochState
    tracker: Tracker
    saver: Checkpointer


def open_training(
    run_dir: Path,
    cfg: Config,
    ctx: dist.DistContext,
    model: ClusterNet,
    flag: StopFlag,
    requeue: Callable[[int], object] | None,
) -> Training:
    """DDP, the optimizer, and the run directory's last checkpoint loaded into both (a new run
    when it has none), W&B continuing the same run. Collective: call on every rank."""
    ddp = dist.wrap_ddp(ctx, model, cfg.model.sync_bn)
    optimizer = make_optimizer(model, cfg)
    state, wandb_id, loaded = resume_state(run_dir, cfg, model, optimizer, ctx)
    tracker = Tracker(run_dir, ctx.is_main, cfg.wandb, to_dict(cfg), wandb_id)
    saver = Checkpointer(run_dir, cfg, ctx, model, optimizer, tracker, flag, requeue, loaded)
    return Training(ddp, optimizer, state, tracker, saver)


# What clustering starts from: gather mode, all features on rank 0 (None elsewhere); sharded
# mode, this rank's own.
Features = dist.Gathered | Shard | None


def gather_for_clustering(
    ctx: dist.DistContext,
    cfg: Config,
    idx: np.ndarray,
    feats: np.ndarray,
    n: int,
    skipped: np.ndarray,
) -> Features:
    """The extracted features where clustering needs them. Collective: call on every rank."""
    if cfg.cluster.mode == "sharded":
        return Shard(idx, feats, skipped, n)
    return dist.gather_features(ctx, idx, feats, n, skipped)


def cluster_epoch(
    ctx: dist.DistContext, features: Features, cfg: Config, epoch: int
) -> kmeans.Clustering | None:
    """The epoch's k-means; its seed changes every epoch. Collective: call on every rank.

    gather: rank 0 clusters everything (None elsewhere), labels per sample. sharded: every
    rank, with the labels of its own rows.
    """
    c, seed = cfg.cluster, epoch_seed(cfg, epoch)
    if c.mode == "sharded":
        assert isinstance(features, Shard)
        return cluster_shard(
            ctx, features, c.k, c.pca_dim, c.whiten, c.l2_normalize, c.niter, seed,
            c.max_points_per_centroid, c.split_eps, c.use_gpu,
        )  # fmt: skip
    return dist.on_rank0(ctx, cluster_gathered, features, cfg, seed)


def cluster_gathered(gathered: Features, cfg: Config, seed: int) -> kmeans.Clustering:
    """Rank 0's clustering of all features read.

    Samples skipped as unreadable get label -1: the sampler never draws them.
    """
    assert isinstance(gathered, dist.Gathered)
    c = cfg.cluster
    clusters = kmeans.cluster_features(
        gathered.feats, c.k, c.pca_dim, c.whiten, c.l2_normalize, c.niter, seed=seed,
        max_points_per_centroid=c.max_points_per_centroid, split_eps=c.split_eps,
        use_gpu=c.use_gpu, index=gathered.index,
    )  # fmt: skip
    return dataclasses.replace(clusters, labels=gathered.per_sample(clusters.labels))


def labels_on_every_rank(
    ctx: dist.DistContext,
    cfg: Config,
    clusters: kmeans.Clustering | None,
    features: Features,
    n: int,
) -> np.ndarray:
    """Every sample's pseudo-label (-1: skipped) on every rank. Collective: call on every rank."""
    if cfg.cluster.mode == "sharded":
        assert isinstance(features, Shard) and clusters is not None
        return dist.all_gather_labels(ctx, features.index, clusters.labels, features.skipped, n)
    return dist.broadcast_labels(ctx, clusters.labels if clusters else None, n)


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


# Turns a training batch and its targets into what the network trains on (RotNet: each image
# in four rotations, the rotation as target). Runs on the device, after augmentation.
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class EpochTotals(NamedTuple):
    """An epoch's training, summed over all ranks."""

    loss: float  # mean per step
    accuracy: float  # of the network's predictions on its targets
    images: int  # drawn by the sampler (before a BatchTransform)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    reader: SampleReader,
    state: EpochState,
    cfg: Config,
    ctx: dist.DistContext,
    saver: Checkpointer,
    transform: BatchTransform | None = None,
) -> EpochTotals:
    """The epoch's draws, uniform over clusters, from `state.step` on; equal steps on all ranks.

    `transform` maps each augmented batch and its labels to the network's batch and targets.
    Collective: call on every rank.
    """
    assert state.labels is not None
    b = per_rank_batch_size(cfg, ctx.world)
    num_draws = cfg.train.samples_per_epoch or reader.index.num_samples
    draws = uniform_cluster_sampler(state.labels, num_draws, seed=epoch_seed(cfg, state.epoch))
    mine = rank_slice(draws, ctx.rank, ctx.world, b)
    targets = torch.from_numpy(state.labels)
    gen = torch.Generator()
    total = torch.tensor(state.rank_sums(ctx.rank), dtype=torch.float32, device=ctx.device)
    model.train()
    # Strict reads: a sample skipped at extraction has label -1 and is never drawn.
    loader = batch_loader(reader, mine[state.step * b :], b, cfg.data.num_workers,
                          cfg.dist.timeout_s)  # fmt: skip
    for idx, images, *_ in tqdm(loader, desc=f"train {state.epoch}", leave=False,
                            disable=not (ctx.is_main and cfg.run.progress)):  # fmt: skip
        saver.at_step(state, total)
        seed_step(gen, cfg, state.epoch, ctx.rank, state.step)
        x = to_float(images.to(ctx.device, non_blocking=True), cfg.data.mean, cfg.data.std)
        x, y = augment(x, cfg, gen), targets[idx].to(ctx.device)
        if transform is not None:
            x, y = transform(x, y)
        total += train_step(model, optimizer, as_layout(x, cfg, ctx), y)
        state.step += 1
    loss, accuracy = map(float, total)  # sums over this rank's steps; every step's batch is full
    summed = dist.all_reduce_sum(ctx, np.array([loss, state.step, accuracy], dtype=np.float64))
    steps = max(1.0, summed[1])
    return EpochTotals(float(summed[0] / steps), float(summed[2] / steps), int(summed[1]) * b)


def epoch_seed(cfg: Config, epoch: int) -> int:
    return cfg.train.seed * 1_000_003 + epoch


def seed_step(gen: torch.Generator, cfg: Config, epoch: int, rank: int, step: int) -> None:
    """Seed this step's augmentation (`gen`) and dropout (torch's global RNG) from its position.

    Keying every random draw by (seed, epoch, rank, step) makes a resumed run draw exactly
    what the uninterrupted one drew, with no RNG state to save.
    """
    a, b = np.random.SeedSequence([cfg.train.seed, epoch, rank, step]).generate_state(2, np.uint64)
    gen.manual_seed(int(a) >> 1)
    torch.manual_seed(int(b) >> 1)


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    a = cfg.augment
    if a.random_resized_crop:
        return random_resized_crop(x, cfg.data.image_size, a.min_scale, a.flip, gen)
    x = center_crop(x, cfg.data.image_size)
    if a.flip:
        flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def training_row(state: EpochState, totals: EpochTotals) -> dict[str, Any]:
    """The metrics every training loop logs per epoch: loss, accuracy of the head on its
    targets, throughput and the time of each phase."""
    seconds = state.timer.snapshot()
    row: dict[str, Any] = {
        "epoch": state.epoch,
        "train_loss": totals.loss,
        "train_acc": totals.accuracy,
        "images_per_s": totals.images / max(seconds.get("train", 0.0), 1e-9),
    }
    return row | {f"time_{name}_s": round(s, 4) for name, s in seconds.items()}


def epoch_metrics(
    state: EpochState, truth: np.ndarray | None, totals: EpochTotals
) -> dict[str, Any]:
    """`training_row` plus the clustering's: NMI to the last epoch and to the truth, k-means
    loss, empty clusters before the split, cluster sizes, unreadable samples."""
    assert state.labels is not None
    km = state.kmeans
    row = training_row(state, totals) | {
        "nmi_prev": metrics.nmi(state.prev_labels, state.labels),
        "nmi_gt": metrics.nmi(truth, state.labels),
        "ari_gt": metrics.ari(truth, state.labels),
        "kmeans_loss": km.get("loss"),
        "n_empty_before_split": km.get("n_empty_before_split"),
        "k": km.get("k"),
        "skipped_samples": int((state.labels < 0).sum()),  # unreadable, data.on_error=skip
    }
    return row | metrics.cluster_stats(state.labels, row["k"] or int(state.labels.max()) + 1)


# (metrics key, column title, decimals) of the table printed on rank 0, one row per epoch.
COLUMNS = (
    ("epoch", "epoch", 0), ("nmi_prev", "nmi_prev", 3), ("nmi_gt", "nmi_gt", 3),
    ("train_loss", "loss", 3), ("n_empty_before_split", "empty", 0),
    ("cluster_size_min", "min_size", 0), ("cluster_size_max", "max_size", 0),
    ("time_extract_s", "extract_s", 1), ("time_cluster_s", "cluster_s", 1),
    ("time_train_s", "train_s", 1), ("images_per_s", "img/s", 0),
)  # fmt: skip


def print_epoch_row(
    row: dict[str, Any], header: bool, columns: tuple[tuple[str, str, int], ...] = COLUMNS
) -> None:
    if header:
        print(" ".join(f"{title:>9}" for _, title, _ in columns), flush=True)
    cells = ["-" if row.get(k) is None else f"{row[k]:.{d}f}" for k, _, d in columns]
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
