"""Every random stream of a training run, derived from one function of its position.

A stream is named by its purpose and keyed by (train.seed, epoch, rank, step), so a resumed run
draws exactly what the uninterrupted one drew with no RNG state to save, and two streams never
share a seed by accident. The derivation of each purpose is frozen: it is what runs of earlier
versions used, so their curves and checkpoints continue bit for bit (README, "Design").
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch


class Stream(Enum):
    MODEL = "model"  # the network's initial weights (every rank alike)
    HEAD = "head"  # a head initialised for a run, or reset for an epoch's new pseudo-labels
    EPOCH = "epoch"  # the epoch's k-means and its uniform-over-clusters draws
    AUGMENT = "augment"  # a training step's crops and flips (per rank)
    DROPOUT = "dropout"  # a training step's dropout masks: torch's global RNG (per rank)
    MEDIA = "media"  # which clusters and images rank 0 shows W&B (touches no training draw)
    BANK_FILL = "bank_fill"  # DeepCluster-v2's crops for the bank's first fill (per rank)


def stream_seed(seed: int, stream: Stream, epoch: int = 0, rank: int = 0, step: int = 0) -> int:
    """The seed of `stream` at (epoch, rank, step) of a run with train.seed=`seed`."""
    if stream is Stream.MODEL:
        return seed
    if stream is Stream.HEAD:  # epoch -1: the head made once for a run on fixed targets
        return seed if epoch < 0 else seed * 7919 + epoch
    if stream is Stream.EPOCH:
        return seed * 1_000_003 + epoch
    if stream is Stream.MEDIA:
        return int(np.random.SeedSequence([seed, epoch, 0x6D656469]).generate_state(1)[0])
    if stream is Stream.BANK_FILL:  # five words: never a step's four
        entropy = [seed, rank, step, 0, 0x62616E6B]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1
    augment, dropout = _step_seeds(seed, epoch, rank, step)
    return augment if stream is Stream.AUGMENT else dropout


def _step_seeds(seed: int, epoch: int, rank: int, step: int) -> tuple[int, int]:
    a, b = np.random.SeedSequence([seed, epoch, rank, step]).generate_state(2, np.uint64)
    return int(a) >> 1, int(b) >> 1


def seed_step(gen: torch.Generator, seed: int, epoch: int, rank: int, step: int) -> None:
    """Seed a training step's augmentation (`gen`) and dropout (torch's global RNG)."""
    augment, dropout = _step_seeds(seed, epoch, rank, step)  # one derivation for both
    gen.manual_seed(augment)
    torch.manual_seed(dropout)
