"""Checkpoints: atomic writes (temp file, fsync, rename), safe loads, latest-or-previous lookup."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import IO, Any, cast

import torch

log = logging.getLogger(__name__)

# checkpoint-EEEEEE.pt: before epoch E starts; checkpoint-EEEEEE-SSSSSSS.pt: epoch E clustered
# and S training steps taken.
PATTERN = re.compile(r"^checkpoint-(\d{6})(?:-(\d{7}))?\.pt$")
# The temporary file of a write in progress, or of one killed mid-write: never a checkpoint.
PARTIAL = ".checkpoint-*.pt.tmp-*"


class CheckpointError(OSError):
    """A checkpoint could not be written; the message names the file and the cause."""


def checkpoint_path(run_dir: Path, epoch: int, step: int | None = None) -> Path:
    """Where the state before `epoch` (step None), or within it after `step` steps, is saved."""
    name = f"checkpoint-{epoch:06d}" + ("" if step is None else f"-{step:07d}")
    return run_dir / "checkpoints" / f"{name}.pt"


def _position(path: Path) -> tuple[int, int]:
    m = PATTERN.match(path.name)
    assert m is not None
    return int(m[1]), -1 if m[2] is None else int(m[2])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first (partial writes, named .checkpoint-*.tmp-PID, are not)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if PATTERN.match(p.name)), key=_position)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_writes(folder: Path) -> None:
    """Delete what writes killed mid-way left behind (only rank 0 writes, one file at a time)."""
    for leftover in folder.glob(PARTIAL):
        log.warning("removing %s, left by a checkpoint write that did not finish", leftover)
        leftover.unlink(missing_ok=True)


class _WriteErrors:
    """A file that remembers why a write failed: torch.save reports a full disk as
    "unexpected pos 704 vs 598"."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_atomic(state: dict[str, Any], path: Path, keep: int = 2) -> None:
    """Write `state` so that `path` is either the old file or the complete new one, never half.

    A failure (full disk, unwritable directory) raises CheckpointError naming the path and the
    cause, and leaves every previous checkpoint intact. Then keeps the newest `keep` checkpoints
    of the folder, and removes the partial files of earlier writes that were killed.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sink: _WriteErrors | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(path.parent)
        with open(tmp, "wb") as fh:
            sink = _WriteErrors(fh)
            torch.save(state, cast(IO[bytes], sink))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError on a failed write
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = sink.error if sink is not None and sink.error is not None else exc
        if path.parent.exists() and not path.parent.is_dir():
            why = f"{path.parent} is a file, not a directory"
        elif isinstance(cause, OSError) and cause.strerror:
            why = cause.strerror
        else:
            why = str(cause)
        error = CheckpointError(
            f"could not write checkpoint {path}: {why}; the earlier checkpoints are intact"
        )
        error.errno = getattr(cause, "errno", None)
        raise error from exc
    for old in list_checkpoints(path.parent.parent)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


# torch.save writes a zip archive (a legacy file: a pickle); a zip archive ends with its end
# record, within the last 22 bytes plus the longest archive comment.
ZIP_START, ZIP_END, PICKLE_START = b"PK\x03\x04", b"PK\x05\x06", b"\x80"
ZIP_END_WITHIN = 22 + 65535


def why_not_a_checkpoint(path: Path) -> str | None:
    """Why the existing `path` cannot be a file that torch.save wrote, from its first and last
    bytes only: torch.load of a text file fails with a bare IndexError or KeyError. None when
    it may be one (then only a load tells)."""
    if path.is_dir():
        return "it is a directory; give a file such as <run dir>/checkpoints/checkpoint-000002.pt"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as fh:
        start = fh.read(len(ZIP_START))
        fh.seek(max(0, size - ZIP_END_WITHIN))
        end = fh.read()
    if start == ZIP_START:
        return None if ZIP_END in end else "it is truncated (its zip archive has no end record)"
    if start.startswith(PICKLE_START):
        return None
    return "it is no file written by torch.save (neither a zip archive nor a pickle)"


def load(path: str | Path) -> Any:
    """Load with weights_only=True: tensors, numbers, strings and containers, never code. The
    one loader of the package: run checkpoints, and any weights file a command is given."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of the run; an unreadable one is reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load(path)
        except Exception as exc:  # truncated, corrupt or foreign file: fall back to the previous
            log.error("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
    return None
