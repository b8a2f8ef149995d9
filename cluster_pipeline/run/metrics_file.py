"""metrics.jsonl: one JSON row per epoch, the run's own record of its metrics (W&B gets a copy)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """One row, on disk before the epoch's checkpoint is: a resumed run truncates to it."""
    with open(run_dir / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, epochs_done: int) -> None:
    """Drop metric rows of epochs after the checkpoint being resumed, so none appears twice."""
    rows = [r for r in read_metrics(run_dir) if r["epoch"] < epochs_done]
    if rows or (run_dir / METRICS_FILE).exists():
        tmp = run_dir / (METRICS_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, run_dir / METRICS_FILE)
