"""The one epoch loop of every method: make the epoch's targets -> train -> metrics -> checkpoint.

What differs between DeepCluster, ClusterFit, RotNet and supervised training is the targets
strategy (`targets.py`): what the targets of an epoch are, and when they are recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster_pipeline import dist
from cluster_pipeline.config import Config
from cluster_pipeline.run.logs import log_to_files
from cluster_pipeline.run.metrics_file import read_metrics
from cluster_pipeline.run.report import write_report
from cluster_pipeline.run.rundir import prepare_run_dir, release_run_dir
from cluster_pipeline.run.setup import open_data_and_model
from cluster_pipeline.run.stop import StopFlag, Stopped
from cluster_pipeline.training.media import epoch_media
from cluster_pipeline.training.seeding import Stream, stream_seed
from cluster_pipeline.training.session import Session, open_session
from cluster_pipeline.training.step import EpochTotals, train_one_epoch
from cluster_pipeline.training.targets import Columns, Targets

log = logging.getLogger(__name__)


def run_training(
    cfg: Config,
    targets: Targets,
    flag: StopFlag | None = None,
    requeue: Callable[[int], object] | None = None,
) -> Path:
    """Train on `targets` for cfg.train.epochs, continuing the run directory's last checkpoint.

    A signal caught by `flag` stops every rank at the next safe point with a checkpoint, and
    raises Stopped; `requeue(signum)` then runs on rank 0 once every rank has left the process
    group (under SLURM it kills the job's processes at once, so nothing may follow it). A rank
    that dies stops the others with an error naming it (RankLostError) within
    dist.heartbeat_timeout_s. Collective: call on every rank.
    """
    is_main = False
    try:
        with dist.process_group(cfg.dist.timeout_s, cfg.dist.heartbeat_timeout_s,
                                together=(Stopped,)) as ctx:  # fmt: skip
            is_main = ctx.is_main
            return train(cfg, ctx, targets, flag or StopFlag())
    except Stopped as stop:
        if requeue is None:
            raise
        if is_main:
            requeue(stop.signum)
        raise Stopped(stop.signum, stop.checkpoint, requeued=True) from None


def train(cfg: Config, ctx: dist.DistContext, targets: Targets, flag: StopFlag) -> Path:
    """`run_training` in a process group that is up. Collective: call on every rank."""
    run_dir = prepare_run_dir(cfg, ctx, lock=True)  # one run writes it at a time
    try:
        index, reader, model = open_data_and_model(cfg, ctx, clusters=targets.clusters_features)
        targets.make_head(model, index, stream_seed(cfg.train.seed, Stream.HEAD, epoch=-1))
        s = open_session(cfg, ctx, run_dir, (index, reader, model), targets, flag)
        try:
            train_loop(s, targets)
        except Stopped:
            if ctx.is_main:
                s.tracker.finish()
            raise
        finish_run(s, targets)
    finally:
        release_run_dir(run_dir, ctx)
    return run_dir


def train_loop(s: Session, targets: Targets) -> None:
    """The epochs from the session's position to cfg.train.epochs. Collective: every rank."""
    first = s.pos.epoch
    if targets.begin(s):
        s.pos.start()
        s.writer.save(s.pos)  # targets made once are in a checkpoint before the first step
    while s.pos.epoch < s.cfg.train.epochs:
        t = s.pos.timer
        if not s.pos.started:
            targets.for_epoch(s)
            s.pos.start()
        with t("train"):
            totals = train_one_epoch(s, targets)
        if s.ctx.is_main:
            row = training_row(s, totals) | targets.epoch_row(s.index.labels)
            s.tracker.log_epoch(row, media_of(s, targets) if s.tracker.shows_media else None)
            print_epoch_row(row, s.pos.epoch == first, targets.columns)
        assignments = targets.end_epoch()
        s.pos = s.pos.next_epoch()
        with s.pos.timer("checkpoint"):
            s.policy.end_of_epoch(s.pos, assignments)


def training_row(s: Session, totals: EpochTotals) -> dict[str, Any]:
    """The metrics every method logs per epoch: loss, accuracy of the head on its targets,
    throughput and the time of each phase."""
    seconds = s.pos.timer.snapshot()
    row: dict[str, Any] = {
        "epoch": s.pos.epoch,
        "train_loss": totals.loss,
        "train_acc": totals.accuracy,
        "images_per_s": totals.images / max(seconds.get("train", 0.0), 1e-9),
    }
    return row | {f"time_{name}_s": round(sec, 4) for name, sec in seconds.items()}


def media_of(s: Session, targets: Targets) -> dict[str, Any]:
    """The epoch's W&B media: cluster sizes, and a grid of cluster images for DeepCluster."""
    w = s.cfg.wandb
    reader = s.reader if targets.kind in ("deepcluster", "deepcluster_v2") else None
    seed = stream_seed(s.cfg.train.seed, Stream.MEDIA, s.pos.epoch)
    return epoch_media(targets.epoch_labels(), reader, w.grid_clusters, w.grid_images, seed)


def print_epoch_row(row: dict[str, Any], header: bool, columns: Columns) -> None:
    """The epoch's row of the table, on stdout and in rank 0's log (what `tail -f` follows)."""
    cells = ["-" if row.get(k) is None else f"{row[k]:.{d}f}" for k, _, d in columns]
    lines = [" ".join(f"{title:>9}" for _, title, _ in columns)] if header else []
    for line in [*lines, " ".join(f"{c:>9}" for c in cells)]:
        print(line, flush=True)
        log_to_files(line)


def finish_run(s: Session, targets: Targets) -> None:
    """The report and the end of the W&B run, on rank 0."""
    if s.ctx.is_main:
        rows = read_metrics(s.run_dir)
        if rows:
            k = targets.report_k(s.cfg)
            report = write_report(
                s.run_dir,
                rows,
                targets.final_labels,
                run_name=s.run_dir.name,
                k=k,
                arch=str(s.cfg.model.arch),
                epochs=s.cfg.train.epochs,
            )
            log.info("run directory: %s  report: %s", s.run_dir, report)
            s.tracker.log_run_end(rows, report)
        s.tracker.finish()
