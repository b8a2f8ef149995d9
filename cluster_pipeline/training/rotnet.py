"""RotNet pretext training (Gidaris et al., ICLR 2018): predict which of four rotations was applied.

Each augmented training batch is shown at 0, 90, 180 and 270 degrees (four times the images per
step), the rotation index as the target, a head of 4 outputs. Every sample carries the same
sampling label, so the uniform-over-labels sampler is a plain shuffle of the data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cluster_pipeline import dist
from cluster_pipeline.config import Config
from cluster_pipeline.features.extract import open_data_and_model
from cluster_pipeline.run.rundir import prepare_run_dir
from cluster_pipeline.run.stop import StopFlag
from cluster_pipeline.training.fixed_targets import fresh_head, train_on_targets

log = logging.getLogger(__name__)

ROTATIONS = 4


def rotate_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (4B, C, H, W): the batch rotated by r * 90 degrees counter-clockwise
    (torch.rot90 on H, W) for r = 0..3, block after block; targets r. `y` is unused."""
    del y
    rotated = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(ROTATIONS)])
    targets = torch.arange(ROTATIONS, device=x.device).repeat_interleave(len(x))
    return rotated, targets


def run_rotnet(
    cfg: Config, flag: StopFlag | None = None, requeue: Callable[[int], object] | None = None
) -> Path:
    """`cluster-pipeline pretrain-rotnet`. Collective: call on every rank."""
    ctx = dist.init_distributed(cfg.dist.timeout_s, cfg.dist.heartbeat_timeout_s)
    with dist.naming_lost_ranks(ctx):
        run_dir = prepare_run_dir(cfg, ctx)
        index, reader, model = open_data_and_model(cfg, ctx, clusters=False)
        fresh_head(model, ROTATIONS, cfg.train.seed)
        log.info("RotNet: %d samples, each seen in %d rotations per draw (data.split=%s)",
                 index.num_samples, ROTATIONS, cfg.data.split)  # fmt: skip
        one_label = np.zeros(index.num_samples, dtype=np.int64)
        return train_on_targets(cfg, ctx, run_dir, reader, model, one_label, flag or StopFlag(),
                                requeue, transform=rotate_batch, head="rotations")  # fmt: skip
