"""One writer per run directory: the lock, its take-over rules, and a second run refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_pipeline.run import lock
from cluster_pipeline.testing.limits import limit
from cluster_pipeline.testing.multiproc import REPO, launcher_env

CONFIG = str(REPO / "configs" / "digits_test.yaml")


def write_holder(run_dir: Path, **fields: object) -> None:
    record = lock.this_holder() | fields
    (run_dir / lock.LOCK_NAME).write_text(json.dumps(record))


def test_a_live_holder_on_this_host_is_refused_and_named(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_holder(tmp_path, pid=sleeper.pid, start=lock._start_time(sleeper.pid))
        with pytest.raises(lock.RunDirInUse) as err:
            lock.acquire(tmp_path)
        assert f"in use by pid {sleeper.pid} on {socket.gethostname()}" in str(err.value)
        assert "\n" not in str(err.value)
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.acquire(tmp_path)  # its holder is gone now: taken over
    assert lock.read_holder(tmp_path)["pid"] == os.getpid()  # type: ignore[index]
    lock.release(tmp_path)
    assert lock.read_holder(tmp_path) is None


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path: Path) -> None:
    """The PID is alive (this process) but its start time is not the holder's."""
    write_holder(tmp_path, start="1")
    lock.acquire(tmp_path)
    assert lock.read_holder(tmp_path)["start"] == lock._start_time(os.getpid())  # type: ignore[index]


def test_a_holder_on_another_host_is_not_provably_gone(tmp_path: Path) -> None:
    write_holder(tmp_path, host="elsewhere", pid=1, job_id=None)
    with pytest.raises(lock.RunDirInUse, match=r"pid 1 on elsewhere.*delete .*\.lock"):
        lock.acquire(tmp_path)


def test_a_requeued_attempt_of_the_same_slurm_job_takes_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_holder(tmp_path, host="n2", pid=1, job_id="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setattr(lock, "_slurm_job_listed", lambda job: True)  # 4242 still queued
    with pytest.raises(lock.RunDirInUse, match="SLURM job 4242"):
        lock.acquire(tmp_path)
    monkeypatch.setattr(lock, "_slurm_job_listed", lambda job: False)  # 4242 has ended
    lock.acquire(tmp_path)
    write_holder(tmp_path, host="n2", pid=1, job_id="4243")
    monkeypatch.setattr(lock, "_slurm_job_listed", lambda job: True)
    lock.acquire(tmp_path)  # this job's own earlier attempt
    assert lock.read_holder(tmp_path)["job_id"] == "4243"  # type: ignore[index]


def test_a_second_run_on_a_running_directory_refuses_at_once(
    digits_shards: Path, tmp_path: Path
) -> None:
    """A run in progress on 2 ranks; the same command again on its directory exits 2 at once
    with one line naming the holder, and leaves the first run's files as they were."""
    run_dir = tmp_path / "run"
    args = ["train", "--config", CONFIG, f"data.shards={digits_shards}", f"run.dir={run_dir}",
            "train.epochs=30"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "launch.local", "--nproc", "2", *args],
                             cwd=REPO, env=launcher_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + limit(120)
        while not (run_dir / "metrics.jsonl").is_file():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        config = (run_dir / "config.yaml").read_text()
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "cluster_pipeline", *args,
                                 "train.batch_size=32"], cwd=REPO, env=launcher_env(),
                                capture_output=True, text=True, timeout=limit(60))  # fmt: skip
        assert second.returncode == 2, second.stdout + second.stderr
        error = second.stderr.strip().splitlines()[-1]
        holder = lock.read_holder(run_dir)
        assert holder is not None
        assert f"is in use by pid {holder['pid']} on {socket.gethostname()}" in error, error
        assert "Traceback" not in second.stderr, second.stderr
        assert time.monotonic() - start < limit(20)
        assert (run_dir / "config.yaml").read_text() == config
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
