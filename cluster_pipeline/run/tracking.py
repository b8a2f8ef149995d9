"""Rank 0's sink for metrics: metrics.jsonl (epoch rows) and W&B (offline without an API key).

W&B gets the epoch rows against `epoch`, step rows (keys `train/...`) against
`train/global_step`, per-epoch media (cluster-size histogram, image grids), and at the end the
report's panels, a table of the NMI curves and a summary of the best and final values.
"""

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

STEP_AXIS = "train/global_step"
# Epoch metrics whose best value is the largest: the summary holds their best and final values.
BEST_IS_MAX = ("nmi_gt", "nmi_prev", "ari_gt", "train_acc")

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
        self.defined: set[str] = set()
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
        self.run.define_metric("epoch")
        self.run.define_metric(STEP_AXIS)
        self.run.define_metric("train/*", step_metric=STEP_AXIS)
        delivered = self._delivered()
        for row in read_metrics(run_dir):
            if row["epoch"] > delivered:
                self._to_wandb(row)

    def _delivered(self) -> int:
        path = self.run_dir / WANDB_DELIVERED_FILE
        return int(json.loads(path.read_text())["epoch"]) if path.is_file() else -1

    def _to_wandb(self, row: dict[str, Any], media: dict[str, Any] | None = None) -> None:
        """Log to W&B; if its service died (SIGTERM of a preemption), go on without it."""
        if self.run is None:
            return
        try:
            values = {k: v for k, v in row.items() if v is not None} | (media or {})
            for key in values.keys() - self.defined - {"epoch"}:  # x-axis: epoch, not _step
                self.run.define_metric(key, step_metric="epoch")
                self.defined.add(key)
            self.run.log(values)
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

    @property
    def shows_media(self) -> bool:
        """Whether media made for W&B would go anywhere (rank 0 with a live W&B run)."""
        return self.run is not None

    def log_epoch(self, row: dict[str, Any], media: dict[str, Any] | None = None) -> None:
        """An epoch's row to metrics.jsonl and W&B; `media` (wandb.Histogram, wandb.Image)
        to W&B only."""
        if not self.enabled:
            return
        append_metrics(self.run_dir, row)
        self._to_wandb(row, media)

    def log_step(self, row: dict[str, Any]) -> None:
        """A step row (keys train/..., STEP_AXIS among them) to W&B only."""
        if self.run is None:
            return
        try:
            self.run.log(row)
        except Exception as exc:
            self._lost(exc)

    def log_summary(self, values: dict[str, Any]) -> None:
        """Once-per-run values (e.g. ClusterFit's clustering) in the W&B run's summary."""
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in values.items() if v is not None})
        except Exception as exc:
            self._lost(exc)

    def log_run_end(self, rows: list[dict[str, Any]], report: Path | None) -> None:
        """The run's last word to W&B: the report's panels, a table of the NMI curves, and
        the best and final value of every epoch metric in the summary."""
        if self.run is None or not rows:
            return
        import wandb

        keys = ("epoch", "nmi_gt", "nmi_prev", "train_loss", "train_acc")
        table = wandb.Table(columns=list(keys), data=[[r.get(k) for k in keys] for r in rows])
        end: dict[str, Any] = {"epochs": table}
        if report is not None:
            end["report"] = wandb.Image(str(report), caption=report.name)
        try:
            self.run.log(end)
            self.run.summary.update(run_summary(rows))
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


def run_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best values of the epoch metrics: `final/<key>`, and `best/<key>` with
    `best/<key>_epoch` (largest for BEST_IS_MAX, smallest for train_loss)."""
    out: dict[str, Any] = {}
    last = rows[-1]
    for key, value in last.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"final/{key}"] = value
    for key in (*BEST_IS_MAX, "train_loss"):
        seen = [(r[key], r["epoch"]) for r in rows if isinstance(r.get(key), int | float)]
        if seen:
            value, epoch = (max if key in BEST_IS_MAX else min)(seen)
            out[f"best/{key}"], out[f"best/{key}_epoch"] = value, epoch
    return out
