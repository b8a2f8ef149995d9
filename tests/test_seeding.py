"""Every random stream comes from one function, and each keeps the derivation runs were made
with (changing one would change every curve and make old run directories resume elsewhere)."""

from __future__ import annotations

import numpy as np
import torch

from cluster_pipeline.training.seeding import Stream, seed_step, stream_seed


def test_each_stream_keeps_its_derivation() -> None:
    seed, epoch, rank, step = 3, 5, 1, 7
    assert stream_seed(seed, Stream.MODEL) == seed
    assert stream_seed(seed, Stream.HEAD, epoch) == seed * 7919 + epoch
    assert stream_seed(seed, Stream.HEAD, epoch=-1) == seed  # a head made once for the run
    assert stream_seed(seed, Stream.EPOCH, epoch) == seed * 1_000_003 + epoch
    a, b = np.random.SeedSequence([seed, epoch, rank, step]).generate_state(2, np.uint64)
    assert stream_seed(seed, Stream.AUGMENT, epoch, rank, step) == int(a) >> 1
    assert stream_seed(seed, Stream.DROPOUT, epoch, rank, step) == int(b) >> 1


def test_step_streams_differ_by_rank_and_step_and_reproduce() -> None:
    seeds = {stream_seed(0, Stream.AUGMENT, 1, r, s) for r in range(3) for s in range(50)}
    assert len(seeds) == 150
    gen = torch.Generator()
    seed_step(gen, 0, 1, 1, 4)
    first = torch.rand(3, generator=gen), torch.rand(3)
    seed_step(gen, 0, 1, 1, 4)
    again = torch.rand(3, generator=gen), torch.rand(3)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
