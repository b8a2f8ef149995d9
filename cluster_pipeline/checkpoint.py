"""Checkpoints: atomic writes (temp file, fsync, rename), safe loads, latest-or-previous lookup."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# checkpoint-EEEEEE.pt: before epoch E starts; checkpoint-EEEEEE-SSSSSSS.pt: epoch E clustered
# and S training steps taken.
PATTERN = re.compile(r"^checkpoint-(\d{6})(?:-(\d{7}))?\.pt$")


def checkpoint_path(run_dir: Path, epoch: int, step: int | None = None) -> Path:
    """Where the state before `epoch` (step None), or within it after `step` steps, is saved."""
    name = f"checkpoint-{epoch:06d}" + ("" if step is None else f"-{step:07d}")
    return run_dir / "checkpoints" / f"{name}.pt"


def _position(path: Path) -> tuple[int, int]:
    m = PATTERN.match(path.name)
    assert m is not None
    return int(m[1]), -1 if m[2] is None else int(m[2])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
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


def save_atomic(state: dict[str, Any], path: Path, keep: int = 2) -> None:
    """Write `state` so that `path` is either the old file or the complete new one, never half.

    A failure (full disk, unwritable directory) raises with the path and leaves every previous
    checkpoint intact. Then keeps the newest `keep` checkpoints of the folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(
            exc.errno,
            f"could not write checkpoint {path} ({exc.strerror}); earlier checkpoints are intact",
        ) from exc
    for old in list_checkpoints(path.parent.parent)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


def load(path: Path) -> dict[str, Any]:
    """Load with weights_only=True: tensors, numbers, strings and containers, never code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of the run; an unreadable one is reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load(path)
        except Exception as exc:  # truncated, corrupt or foreign file: fall back to the previous
            log.error("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
    return None
