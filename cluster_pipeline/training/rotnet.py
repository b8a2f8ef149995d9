"""RotNet pretext training (Gidaris et al., ICLR 2018): predict which of four rotations was applied.

Each augmented training batch is shown at 0, 90, 180 and 270 degrees (four times the images per
step), the rotation index as the target, a head of 4 outputs. Every sample carries the same
sampling label, so the uniform-over-labels sampler is a plain shuffle of the data.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cluster_pipeline.config import Config
from cluster_pipeline.data.reader import ShardIndex
from cluster_pipeline.training.targets import FixedTargets

log = logging.getLogger(__name__)

ROTATIONS = 4


def rotate_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (4B, C, H, W): the batch rotated by r * 90 degrees counter-clockwise
    (torch.rot90 on H, W) for r = 0..3, block after block; targets r. `y` is unused."""
    del y
    rotated = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(ROTATIONS)])
    targets = torch.arange(ROTATIONS, device=x.device).repeat_interleave(len(x))
    return rotated, targets


def rotnet_targets(cfg: Config) -> FixedTargets:
    """One sampling label for every sample; the rotations are the targets."""

    def outputs(index: ShardIndex) -> int:
        log.info("RotNet: %d samples, each seen in %d rotations per draw (data.split=%s)",
                 index.num_samples, ROTATIONS, cfg.data.split)  # fmt: skip
        return ROTATIONS

    return FixedTargets(
        "rotations", outputs, lambda s: (np.zeros(s.index.num_samples, dtype=np.int32), None),
        transform=rotate_batch,
    )  # fmt: skip
