"""A checkpoint that cannot be written stops every rank with an error naming the file and the
cause, and leaves the previous checkpoint intact and loadable.

The disk is full for real: the checkpoints folder is a tmpfs with less room than a checkpoint.
The unwritable folder is a read-only bind mount (permissions do not stop root). Both need root,
as this test machine runs the suite; a failed mount fails the test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cluster_pipeline.run import checkpoint
from cluster_pipeline.testing.limits import limit
from cluster_pipeline.testing.multiproc import kill_all, start_cli_ranks

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "digits_test.yaml")


def train_argv(shards: Path, run_dir: Path, epochs: int) -> list[str]:
    return ["-m", "cluster_pipeline", "train", "--config", CONFIG, f"data.shards={shards}",
            f"run.dir={run_dir}", f"train.epochs={epochs}"]  # fmt: skip


@pytest.fixture(scope="module")
def one_epoch(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding the checkpoint after epoch 0 (one process: it is world-free)."""
    run_dir = tmp_path_factory.mktemp("disk") / "run"
    res = subprocess.run([sys.executable, *train_argv(digits_shards, run_dir, 1)], cwd=REPO,
                         capture_output=True, text=True, timeout=limit(240))  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["checkpoint-000001.pt"]
    return run_dir


def mount(*args: str) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True)
    assert res.returncode == 0, f"mount {' '.join(args)}: {res.stderr}"


@pytest.fixture(params=["disk-full", "read-only"])
def broken_checkpoints(request: pytest.FixtureRequest, one_epoch: Path, tmp_path: Path
                       ) -> Iterator[tuple[Path, str]]:  # fmt: skip
    """A copy of the run whose checkpoints folder holds checkpoint-000001.pt and takes no more."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    folder = run_dir / "checkpoints"
    kept = folder / "checkpoint-000001.pt"
    if request.param == "disk-full":
        data = kept.read_bytes()
        shutil.rmtree(folder)
        folder.mkdir()
        # Room for the checkpoint there and half of another one: the next write runs out.
        kib = (len(data) + len(data) // 2) // 1024 + 1
        mount("-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder))
        kept.write_bytes(data)
        cause = "No space left on device"
    else:
        mount("--bind", str(folder), str(folder))
        mount("-o", "remount,bind,ro", str(folder))
        cause = "Read-only file system"
    try:
        yield run_dir, cause
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_unwritable_checkpoint_stops_every_rank_naming_path_and_cause(
    broken_checkpoints: tuple[Path, str], digits_shards: Path, tmp_path: Path
) -> None:
    run_dir, cause = broken_checkpoints
    before = (run_dir / "checkpoints" / "checkpoint-000001.pt").read_bytes()
    procs = start_cli_ranks(train_argv(digits_shards, run_dir, 2), tmp_path / "out")
    try:
        codes = [p.wait(timeout=limit(240)) for p in procs]
    finally:
        kill_all(procs)
    outs = [(tmp_path / "out" / f"out{r}.txt").read_text() for r in range(2)]
    target = run_dir / "checkpoints" / "checkpoint-000002.pt"
    error = f"could not write checkpoint {target}: {cause}; the earlier checkpoints are intact"
    for rank in range(2):
        assert codes[rank] == 1, outs[rank][-3000:]
        said = f"cluster-pipeline train: error: {'rank 0 failed: ' if rank else ''}{error}\n"
        assert said in outs[rank], outs[rank][-3000:]
        assert error in (run_dir / "logs" / f"rank{rank}.log").read_text()
    # The previous checkpoint is untouched and loads; nothing half-written is left behind.
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-000001.pt"]
    assert (run_dir / "checkpoints" / "checkpoint-000001.pt").read_bytes() == before
    assert checkpoint.load_latest(run_dir)["position"]["epoch"] == 1  # type: ignore[index]


def test_save_atomic_names_the_cause_of_a_full_disk(tmp_path: Path) -> None:
    """torch.save says "unexpected pos ..." on a full disk; the error must say what happened."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder))
    try:
        path = checkpoint.checkpoint_path(tmp_path / "run", 3)
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.save_atomic({"w": torch.zeros(100_000)}, path)
        assert str(info.value) == (
            f"could not write checkpoint {path}: No space left on device; "
            "the earlier checkpoints are intact"
        )
        assert info.value.errno == 28 and list(folder.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_file_in_place_of_the_checkpoints_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("not a folder")
    path = checkpoint.checkpoint_path(tmp_path, 1)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints is a file, not a directory"):
        checkpoint.save_atomic({"w": torch.zeros(3)}, path)


def test_leftover_of_a_killed_write_is_ignored_then_removed(tmp_path: Path) -> None:
    """A write killed mid-way leaves .checkpoint-*.tmp-PID: never listed, removed by the next."""
    first = checkpoint.checkpoint_path(tmp_path, 1)
    checkpoint.save_atomic({"epoch": 1}, first)
    leftover = first.with_name(f".checkpoint-000002.pt.tmp-{99999}")
    leftover.write_bytes(b"half a checkpoint")
    assert checkpoint.list_checkpoints(tmp_path) == [first]
    assert checkpoint.load_latest(tmp_path) == {"epoch": 1}
    checkpoint.save_atomic({"epoch": 2}, checkpoint.checkpoint_path(tmp_path, 2))
    assert not leftover.exists()
    assert checkpoint.load_latest(tmp_path) == {"epoch": 2}


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    """A checkpoint cut short (copied half, disk error) is reported and the one before it used."""
    for epoch in (1, 2):
        checkpoint.save_atomic({"epoch": epoch}, checkpoint.checkpoint_path(tmp_path, epoch))
    newest = checkpoint.checkpoint_path(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[:40])
    assert checkpoint.load_latest(tmp_path) == {"epoch": 1}
    newest.write_bytes(b"")
    assert checkpoint.load_latest(tmp_path) == {"epoch": 1}
