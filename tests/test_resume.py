"""Exact resume: a run stopped and continued ends bit-identical to the uninterrupted run.

Stops land at exact positions through a StopFlag that fires at its Nth poll (the loop polls once
before clustering each epoch and before every training step), then real signals: SIGTERM to
every torchrun rank, and SIGKILL of one rank followed by a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks

from cluster_pipeline import checkpoint
from cluster_pipeline.config import load_config
from cluster_pipeline.stop import StopFlag, Stopped
from cluster_pipeline.train import run_deepcluster

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "digits_test.yaml")
EPOCHS = 3
# digits: 1797 samples, 2 ranks x batch 64 -> 14 steps per epoch; one poll before clustering
# and one per step, so epoch e's polls are 15e+1 (before clustering) and 15e+2+s (step s).
POLLS_PER_EPOCH = 15


class StopAtPoll(StopFlag):
    """Acts as if SIGTERM arrived just before the `at`-th safe point."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.polls = at, 0

    def poll(self) -> int:
        self.polls += 1
        return int(signal.SIGTERM) if self.polls >= self.at else 0


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run.dir={run_dir}", f"train.epochs={EPOCHS}",
            "train.stop_check_every=1", "train.checkpoint_every_steps=4",
            "train.keep_checkpoints=50", *extra]  # fmt: skip


def train_rank(rank: int, world: int, args: list[str], stop_at: int) -> str:
    cfg = load_config(CONFIG, args)
    try:
        run_deepcluster(cfg, StopAtPoll(stop_at) if stop_at else StopFlag())
    except Stopped as stop:
        return f"stopped:{stop.checkpoint}"
    return "done"


def weights_hash(run_dir: Path) -> str:
    state = checkpoint.load(checkpoint.checkpoint_path(run_dir, EPOCHS))
    h = hashlib.sha256()
    for name, t in sorted(state["model"].items()):
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def metric_values(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "images_per_s"}
            for r in rows]  # fmt: skip


@pytest.fixture(scope="module")
def reference(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    assert run_ranks(2, train_rank, overrides(digits_shards, run_dir), 0) == ["done"] * 2
    return run_dir


@pytest.mark.parametrize(
    "stop_at",
    [POLLS_PER_EPOCH + 1, POLLS_PER_EPOCH + 2 + 5, 2 * POLLS_PER_EPOCH + 2],
    ids=["epoch-boundary", "mid-epoch", "right-after-clustering"],
)
def test_stop_and_resume_is_bit_identical(
    reference: Path, digits_shards: Path, tmp_path: Path, stop_at: int
) -> None:
    run_dir = tmp_path / "run"
    args = overrides(digits_shards, run_dir)
    first = run_ranks(2, train_rank, args, stop_at)
    assert all(r.startswith("stopped:") for r in first), first
    epoch, step = divmod(stop_at - 1, POLLS_PER_EPOCH)
    expected = checkpoint.checkpoint_path(run_dir, epoch, None if step == 0 else step - 1)
    assert first[0] == f"stopped:{expected}"
    assert len(metric_values(run_dir)) == epoch
    assert run_ranks(2, train_rank, args, 0) == ["done"] * 2
    assert weights_hash(run_dir) == weights_hash(reference)
    assert metric_values(run_dir) == metric_values(reference)


def torchrun(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "launch.local", "--nproc", "2", "train", "--config", CONFIG, *args]
    out = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    """The torchrun worker processes (grandchildren of the launcher), once both are up."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", ",".join(
        subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
        .stdout.split())], capture_output=True, text=True).stdout  # fmt: skip
    return [int(line.split()[0]) for line in out.splitlines() if "cluster_pipeline" in line]


def wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["sigterm-every-rank", "sigkill-one-rank"])
def test_real_signal_then_restart_is_bit_identical(
    reference: Path, digits_shards: Path, tmp_path: Path, how: str
) -> None:
    run_dir = tmp_path / "run"
    args = overrides(digits_shards, run_dir)
    proc = torchrun(args)
    # Strike once training is under way: a within-epoch checkpoint of epoch 1 exists.
    wait_for(lambda: any(p.name.startswith("checkpoint-000001-")
                         for p in checkpoint.list_checkpoints(run_dir)))  # fmt: skip
    pids = rank_pids(proc)
    assert len(pids) == 2, pids
    if how == "sigterm-every-rank":
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    else:
        os.kill(pids[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    if how == "sigterm-every-rank":
        assert "stopped on SIGTERM" in out, out[-3000:]
    assert len(metric_values(run_dir)) < EPOCHS
    again = torchrun(args)
    out, _ = again.communicate(timeout=240)
    assert again.returncode == 0, out[-3000:]
    assert weights_hash(run_dir) == weights_hash(reference)
    assert metric_values(run_dir) == metric_values(reference)


def test_resume_refuses_a_different_world_size_mid_epoch(
    digits_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = overrides(digits_shards, run_dir)
    run_ranks(2, train_rank, args, POLLS_PER_EPOCH + 4)
    with pytest.raises(AssertionError, match="written within epoch 1 by 2 ranks"):
        run_ranks(1, train_rank, args, 0)
    assert torch.load(checkpoint.list_checkpoints(run_dir)[-1], weights_only=True)["step"] == 2
