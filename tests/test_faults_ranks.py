"""A dead rank ends the run with an error naming it, within a bound, never a hang.

The ranks run as plain processes with torchrun's environment but no torchrun agent, which would
kill the survivors itself: a survivor that exits on its own, with EXIT_RANK_LOST and a message
naming the lost rank, shows that our heartbeat found the loss. Through launch.local, see
test_resume.py's sigkill-of-one-rank.
Every checkpoint left behind must still load.
"""

from __future__ import annotations

import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from cluster_pipeline.dist import EXIT_RANK_LOST
from cluster_pipeline.run import checkpoint
from cluster_pipeline.testing.limits import limit
from cluster_pipeline.testing.multiproc import kill_all, start_cli_ranks

pytestmark = pytest.mark.slow  # every test here starts rank processes or whole runs

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "digits_test.yaml")
HEARTBEAT_S = 10  # dist.heartbeat_timeout_s of the pipeline runs here (default 180)
BOUND_S = 60  # from the kill to the survivor's exit, with room for a loaded machine


def wait_for_text(path: Path, text: str, count: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + limit(timeout)
    while not (path.exists() and path.read_text(errors="replace").count(text) >= count):
        assert time.monotonic() < deadline, f"{path} never showed {text!r} {count} times"
        time.sleep(0.02)


def wait_exit(proc: subprocess.Popen, since: float) -> tuple[int, float]:
    """The exit status of `proc` and seconds from `since`; fails past BOUND_S (a hang)."""
    bound = limit(BOUND_S)
    try:
        rc = proc.wait(timeout=bound - (time.monotonic() - since))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the survivor still runs {bound:.0f} s after the kill: a hang")
    return rc, time.monotonic() - since


def assert_checkpoints_load(run_dir: Path) -> int:
    """Every checkpoint file loads (a kill leaves at most an ignored .tmp file); their count."""
    files = sorted((run_dir / "checkpoints").glob("checkpoint-*.pt"))
    assert set(files) == set(checkpoint.list_checkpoints(run_dir))
    for path in files:
        assert checkpoint.load(path)["model"], path
    return len(files)


# ---------------------------------------------------------------- the heartbeat on its own

SCENARIO = textwrap.dedent("""
    import logging, os, signal, sys, threading, time
    import numpy as np
    import torch.distributed
    from cluster_pipeline import dist
    from cluster_pipeline.features.gather import broadcast_labels

    logging.basicConfig(level=logging.INFO)
    scenario, timeout = sys.argv[1], float(sys.argv[2])

    def cluster_for_a_while(seconds):  # stands in for rank 0's k-means: numpy, no collective
        end, a = time.monotonic() + seconds, np.random.default_rng(0).standard_normal((150, 150))
        while time.monotonic() < end:
            np.linalg.eigh(a @ a.T)
        return np.arange(10)

    if scenario == "busy":
        with dist.process_group(600, timeout) as ctx:
            labels = dist.on_rank0(ctx, cluster_for_a_while, 3 * timeout)
            print("labels", broadcast_labels(ctx, labels, 10).tolist(), flush=True)
    elif scenario == "slow":  # rank 0 works alone for longer than dist.timeout_s
        with dist.process_group(timeout, 60) as ctx:
            labels = dist.on_rank0(ctx, cluster_for_a_while, 3 * timeout)
            print("labels", broadcast_labels(ctx, labels, 10).tolist(), flush=True)
    elif scenario == "in_collective":  # rank 0 waits in a barrier for rank 1, which is killed
        try:
            with dist.process_group(600, timeout) as ctx:
                if ctx.rank == 1:
                    print("victim ready", flush=True)
                    time.sleep(60)
                dist.barrier(ctx)
        except dist.RankLostError:
            beating = [t.name for t in threading.enumerate() if t.name == "heartbeat"]
            print("left the group:", torch.distributed.is_initialized(), beating, flush=True)
            sys.exit(dist.EXIT_RANK_LOST)
    else:
        ctx = dist.init_distributed(600, timeout)
        if ctx.rank == int(scenario):
            print("victim ready", flush=True)
            time.sleep(60)
        cluster_for_a_while(120)
        print("survivor finished its work: the loss was never noticed", flush=True)
""")


def test_a_busy_rank_is_not_declared_dead(tmp_path: Path) -> None:
    """Rank 0 computes for 3 heartbeat timeouts while rank 1 waits in a collective: no error."""
    procs = start_cli_ranks(["-c", SCENARIO, "busy", "2"], tmp_path)
    try:
        for p in procs:
            assert p.wait(timeout=limit(120)) == 0, (tmp_path / "out0.txt").read_text()[-3000:]
    finally:
        kill_all(procs)
    for rank in range(2):
        out = (tmp_path / f"out{rank}.txt").read_text()
        assert "labels [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in out and "lost" not in out, out


def test_a_wait_past_dist_timeout_says_which_setting_to_raise(tmp_path: Path) -> None:
    """Rank 0 works alone for 3 x dist.timeout_s while rank 1 waits for its labels, as in
    gather mode at ImageNet's size on CPU: rank 1 fails with what to raise, not gloo's "Timed
    out waiting 2000ms for recv operation", and neither rank hangs."""
    procs = start_cli_ranks(["-c", SCENARIO, "slow", "2"], tmp_path)
    try:
        codes = [p.wait(timeout=limit(120)) for p in procs]
    finally:
        kill_all(procs)
    out0, out1 = ((tmp_path / f"out{r}.txt").read_text() for r in range(2))
    assert codes[0] != 0 and codes[1] != 0, (out0[-2000:], out1[-2000:])
    said = "a collective waited dist.timeout_s=2 s for another rank that is alive and busy"
    assert said in out1 and "raise dist.timeout_s" in out1, out1[-3000:]


def test_teardown_after_a_lost_rank_does_not_wait_for_it(tmp_path: Path) -> None:
    """Rank 0 in a collective when rank 1 is killed: `process_group` raises the error naming
    rank 1 and leaves the group (no barrier with the dead rank), heartbeat stopped, at once.
    The timeout leaves the heartbeat thread time to let the collective's failure be explained
    (2.5 beats) before it would end the process itself."""
    timeout = 10
    procs = start_cli_ranks(["-c", SCENARIO, "in_collective", str(timeout)], tmp_path)
    try:
        wait_for_text(tmp_path / "out1.txt", "victim ready")
        time.sleep(1.0)  # rank 0 is in the barrier
        procs[1].send_signal(signal.SIGKILL)
        rc, seconds = wait_exit(procs[0], time.monotonic())
    finally:
        kill_all(procs)
    out = (tmp_path / "out0.txt").read_text()
    assert rc == EXIT_RANK_LOST, out[-3000:]
    assert "rank 1 is lost" in out and "left the group: False []" in out, out[-3000:]
    assert seconds < limit(timeout + 10), seconds


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1-killed", "rank0-store-host-killed"])
def test_busy_survivor_names_the_lost_rank(tmp_path: Path, victim: int) -> None:
    """The survivor is in a long computation, in no collective: only the heartbeat can tell."""
    timeout = 3
    procs = start_cli_ranks(["-c", SCENARIO, str(victim), str(timeout)], tmp_path)
    survivor = procs[1 - victim]
    try:
        wait_for_text(tmp_path / f"out{victim}.txt", "victim ready")
        time.sleep(1.0)  # the survivor is inside cluster_for_a_while
        procs[victim].send_signal(signal.SIGKILL)
        rc, seconds = wait_exit(survivor, time.monotonic())
    finally:
        kill_all(procs)
    out = (tmp_path / f"out{1 - victim}.txt").read_text()
    assert rc == EXIT_RANK_LOST, out[-3000:]
    assert f"rank {victim} is lost" in out, out[-3000:]
    if victim == 0:
        assert "rendezvous store it hosts" in out, out[-3000:]
    assert f"rank {1 - victim} was in cluster_for_a_while" in out, out[-3000:]
    assert seconds < limit(timeout + 10), seconds  # T + one interval, and the exit
    print(f"time to error: {seconds:.1f} s (heartbeat timeout {timeout} s)")


# ---------------------------------------------------------------- the real pipeline


def train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "cluster_pipeline", "train", "--config", CONFIG, f"data.shards={shards}",
            f"run.dir={run_dir}", "train.epochs=3", "train.samples_per_epoch=12800",
            "train.checkpoint_every_steps=20", "train.keep_checkpoints=50",
            f"dist.heartbeat_timeout_s={HEARTBEAT_S}", *extra]  # fmt: skip


# (victim, line of the victim's log to strike at, its occurrence, seconds after it, where the
# survivor may report being). Clustering digits takes milliseconds, so rank 0 killed once it
# starts clustering leaves rank 1 waiting for the labels or already training; rank 0 busy in a
# long clustering is test_busy_survivor_names_the_lost_rank.
CASES = {
    "rank1-in-training": (1, "phase train started", 2, 0.5, ("train_one_epoch",)),
    "rank1-in-extraction": (1, "phase extract started", 2, 0.0, ("extract_features",)),
    "rank0-once-clustering-starts": (0, "phase cluster started", 2, 0.0,
                                     ("on_rank0", "broadcast_labels", "train_one_epoch")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_killed_rank_is_named_by_the_survivor(
    digits_shards: Path, tmp_path: Path, case: str
) -> None:
    victim, line, nth, delay, where = CASES[case]
    run_dir = tmp_path / "run"
    extra = ["data.extract_batch_size=8"] if "extraction" in case else []
    procs = start_cli_ranks(train_args(digits_shards, run_dir, *extra), tmp_path / "out")
    survivor = 1 - victim
    try:
        wait_for_text(run_dir / "logs" / f"rank{victim}.debug.log", line, nth)
        time.sleep(delay)
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rc, seconds = wait_exit(procs[survivor], killed)
    finally:
        kill_all(procs)
    log = (run_dir / "logs" / f"rank{survivor}.log").read_text()
    out = (tmp_path / "out" / f"out{survivor}.txt").read_text()
    assert rc == EXIT_RANK_LOST, out[-3000:]
    found = re.search(rf"rank {victim} is lost: .*; rank {survivor} was in (.*)", log)
    assert found, log[-3000:]
    assert any(w in found[1] for w in where), found[0]
    assert f"cluster-pipeline train: error: rank {victim} is lost" in out, out[-3000:]
    assert assert_checkpoints_load(run_dir) >= 1
    print(f"{case}: time to error {seconds:.1f} s; survivor was in {found[1]}")
