"""The shared harness (cluster_pipeline.testing.multiproc) and the test markers.

Every test is exactly one of `unit` and `integration` (tests/conftest.py); run_ranks calls a
test module's function on real rank processes, reports a rank's error with its traceback, and
stops at once when a rank dies without a result instead of waiting out the time limit.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import SLOW_FIXTURES

from cluster_pipeline.testing.limits import limit
from cluster_pipeline.testing.multiproc import RANK_THREADS, launcher_env, run_ranks


def test_every_test_is_exactly_one_of_unit_and_integration(request: pytest.FixtureRequest):
    for item in request.session.items:
        kinds = [m for m in ("unit", "integration") if item.get_closest_marker(m)]
        assert len(kinds) == 1, f"{item.nodeid} is marked {kinds or 'neither'}"
        starts_ranks = SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
        if starts_ranks or item.get_closest_marker("slow") or item.get_closest_marker("slurm"):
            assert kinds == ["integration"], f"{item.nodeid} starts ranks or runs: {kinds}"


def _whoami(rank: int, world: int, tag: str) -> tuple[int, int, str, str, int]:
    return rank, world, tag, os.environ["LOCAL_RANK"], torch.get_num_threads()


def _raise_on_rank1(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank one is bad")
    return rank


def _die_on_rank1(rank: int, world: int) -> int:
    if rank == 1:
        os._exit(3)
    time.sleep(300)  # a peer waiting for the dead rank
    return rank


@pytest.mark.slow
def test_run_ranks_returns_each_rank_in_order():
    got = run_ranks(2, _whoami, "x", timeout=60)
    assert got == [(0, 2, "x", "0", RANK_THREADS), (1, 2, "x", "1", RANK_THREADS)]


@pytest.mark.slow
def test_a_raising_rank_fails_the_call_with_its_traceback():
    with pytest.raises(AssertionError, match=r"rank 1: ValueError: rank one is bad\n.*Traceback"):
        run_ranks(2, _raise_on_rank1, timeout=60)


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_at_once():
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 exited with status 3 and no result"):
        run_ranks(2, _die_on_rank1, timeout=240)
    assert time.monotonic() - start < limit(60)


def test_launched_commands_get_their_own_wandb_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb sets WANDB_SERVICE in a process that started a service; a command the tests launch
    must not join it (a killed run's stream stays registered there: "run ID … is in use")."""
    monkeypatch.setenv("WANDB_SERVICE", "2-1234-tcp-localhost-5678")
    monkeypatch.setenv("RANK", "3")
    env = launcher_env()
    assert "WANDB_SERVICE" not in env and "RANK" not in env
