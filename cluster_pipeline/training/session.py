"""What one training run holds, opened the same way for every method, resumed when it can be."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cluster_pipeline import dist
from cluster_pipeline.config import Config, ConfigError, per_rank_batch_size, to_dict, to_yaml
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.models.nets import ClusterNet
from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.metrics_file import truncate_metrics
from cluster_pipeline.run.stop import StopFlag
from cluster_pipeline.run.tracking import Tracker
from cluster_pipeline.training.checkpoints import upgrade
from cluster_pipeline.training.position import Position
from cluster_pipeline.training.recipe import check_recipe, make_optimizer, recipe_of
from cluster_pipeline.training.saving import Checkpointer, SavePolicy, StopCoordinator

if TYPE_CHECKING:
    from cluster_pipeline.training.targets import Targets

log = logging.getLogger(__name__)


@dataclass
class Session:
    """The pieces an epoch loop steps: data, the network (DDP-wrapped as `ddp`), its optimizer,
    the position, the metrics sink, and the save and stop pieces."""

    cfg: Config
    ctx: dist.DistContext
    run_dir: Path
    index: ShardIndex
    reader: SampleReader
    model: ClusterNet
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    pos: Position
    tracker: Tracker
    writer: Checkpointer
    policy: SavePolicy
    stop: StopCoordinator


def open_session(
    cfg: Config,
    ctx: dist.DistContext,
    run_dir: Path,
    data: tuple[ShardIndex, SampleReader, ClusterNet],
    targets: Targets,
    flag: StopFlag,
) -> Session:
    """DDP, the optimizer, and the run directory's newest checkpoint loaded into them and into
    `targets` (a new run when it has none), W&B continuing the same run.

    Collective: call on every rank.
    """
    index, reader, model = data
    ddp = dist.wrap_ddp(ctx, model, cfg.model.sync_bn)
    optimizer = make_optimizer(model, cfg, per_rank_batch_size(cfg, ctx.world) * ctx.world)
    saved = load_latest(run_dir, cfg, ctx)
    pos, wandb_id = Position(world=ctx.world, sampler=cfg.train.sampler), None
    if saved is not None:
        pos, wandb_id = Position.from_state_dict(saved["position"]), saved["tracker"]["wandb_id"]
        model.load_state_dict(saved["model"])
        base = [g["base_lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(saved["optimizer"])
        for g, rate in zip(optimizer.param_groups, base, strict=True):  # older ones lack it
            g["base_lr"] = rate
        targets.load_state_dict(saved["targets"], run_dir)
        if ctx.is_main:
            truncate_metrics(run_dir, pos.epoch)
        where = f"step {pos.step} of epoch {pos.epoch}" if pos.started else "its start"
        log.info("resumed %s at epoch %d, %s", run_dir, pos.epoch, where)
    tracker = Tracker(run_dir, ctx.is_main, cfg.wandb, to_dict(cfg), wandb_id or None)

    writer = Checkpointer(run_dir, ctx, to_yaml(cfg), cfg.train.keep_checkpoints,
                          pos.key if saved is not None else None)  # fmt: skip
    if cfg.train.compile:  # the uncompiled `model` is what checkpoints and extraction use
        t = cfg.train
        ddp = torch.compile(ddp, mode=t.compile_mode, backend=t.compile_backend)  # type: ignore[assignment]
        log.info("training through torch.compile (mode %s, backend %s)", t.compile_mode,
                 t.compile_backend)  # fmt: skip
    session = Session(cfg, ctx, run_dir, index, reader, model, ddp, optimizer, pos, tracker,
                      writer, SavePolicy(cfg.train, writer),
                      StopCoordinator(flag, writer, cfg.train.stop_check_every))  # fmt: skip
    writer.parts = functools.partial(checkpoint_parts, session, targets)
    writer.collect = functools.partial(targets.collect, ctx)
    return session


def checkpoint_parts(s: Session, targets: Targets) -> dict[str, Any]:
    """Each part's state dict, as the run stands now."""
    return {"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "targets": targets.state_dict(), "position": s.pos.state_dict(),
            "tracker": {"wandb_id": s.tracker.run_id or ""},
            "recipe": recipe_of(s.cfg, s.ctx.device.type == "cuda")}  # fmt: skip


def load_latest(run_dir: Path, cfg: Config, ctx: dist.DistContext) -> dict[str, Any] | None:
    """The run directory's newest readable checkpoint in the current schema, None if it has
    none; refused when run.resume=false or when it was written mid-epoch by another world."""
    if not checkpoint.list_checkpoints(run_dir):
        return None
    if not cfg.run.resume:
        raise ConfigError(
            f"run directory {run_dir} already has checkpoints and run.resume=false; "
            "choose another run.dir or set run.resume=true to continue it"
        )
    ckpt = checkpoint.load_latest(run_dir)
    if ckpt is None:
        raise RuntimeError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
    saved = upgrade(ckpt, run_dir / "checkpoints")
    pos = saved["position"]
    if pos["started"] and pos["world"] != ctx.world:
        raise ConfigError(
            f"the checkpoint of {run_dir} was written within epoch {pos['epoch']} by "
            f"{pos['world']} ranks; resume it with {pos['world']} ranks (this run has "
            f"{ctx.world}): each rank's share of the epoch depends on the world size"
        )
    check_recipe(saved.get("recipe"), recipe_of(cfg, ctx.device.type == "cuda"), run_dir)
    return saved
