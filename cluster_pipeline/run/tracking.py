"""Rank 0's sink for per-epoch metrics: metrics.jsonl and W&B (offline without an API key)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from cluster_pipeline.run.metrics_file import append_metrics, read_metrics

log = logging.getLogger(__name__)

# The last epoch W&B confirmed (its run finished cleanly): rows after it are logged again on
# resume, because a SLURM preemption's SIGTERM kills W&B's service process with rows in flight.
WANDB_DELIVERED_FILE = "logs/wandb_delivered.json"


def wandb_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Tracker:
    """Rank 0's sink for per-epoch metrics. Other ranks get a Tracker that does nothing."""

    def __init__(
        self, run_dir: Path, enabled: bool, wandb_cfg: Any, config: dict, run_id: str | None
    ) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.run: Any = None
        self.run_id = run_id
        self.last_logged = -1
        if not enabled or wandb_cfg.mode == "disabled":
            return
        import wandb

        mode = wandb_mode(wandb_cfg.mode)
        self.run = wandb.init(
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            name=wandb_cfg.name or run_dir.name,
            dir=str(run_dir),
            id=run_id or uuid.uuid4().hex[:8],
            resume="allow",
            mode=mode,  # type: ignore[arg-type]
            config=config,
        )
        self.run_id = self.run.id
        log.info("W&B run %s (%s) in %s", self.run.id, mode, self.run.dir)
        delivered = self._delivered()
        for row in read_metrics(run_dir):
            if row["epoch"] > delivered:
                self._to_wandb(row)

    def _delivered(self) -> int:
        path = self.run_dir / WANDB_DELIVERED_FILE
        return int(json.loads(path.read_text())["epoch"]) if path.is_file() else -1

    def _to_wandb(self, row: dict[str, Any]) -> None:
        """Log to W&B; if its service died (SIGTERM of a preemption), go on without it."""
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in row.items() if v is not None}, step=row["epoch"])
            self.last_logged = row["epoch"]
        except Exception as exc:
            self._lost(exc)

    def _lost(self, exc: Exception) -> None:
        log.warning("W&B stopped responding (%s); metrics.jsonl keeps every row, and they go "
                    "to W&B when the run resumes", exc)  # fmt: skip
        self.run = None
        with contextlib.suppress(Exception):
            import wandb

            wandb.teardown()

    def log_epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_metrics(self.run_dir, row)
        self._to_wandb(row)

    def log_summary(self, values: dict[str, Any]) -> None:
        """Once-per-run values (e.g. ClusterFit's clustering) in the W&B run's summary."""
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in values.items() if v is not None})
        except Exception as exc:
            self._lost(exc)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as exc:
            self._lost(exc)
            return
        self.run = None
        if self.last_logged >= 0:
            (self.run_dir / WANDB_DELIVERED_FILE).write_text(
                json.dumps({"epoch": self.last_logged})
            )
