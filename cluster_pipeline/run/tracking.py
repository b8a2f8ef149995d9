"""Where metrics go: metrics.jsonl, W&B (rank 0 only; offline without an API key), report.png."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# The last epoch W&B confirmed (its run finished cleanly): rows after it are logged again on
# resume, because a SLURM preemption's SIGTERM kills W&B's service process with rows in flight.
WANDB_DELIVERED_FILE = "logs/wandb_delivered.json"


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs to stdout; every rank logs to run_dir/logs/rank<N>.log, which also gets this
    package's debug lines (the phases of each epoch)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    logging.getLogger("cluster_pipeline").setLevel(logging.DEBUG)
    for h in list(root.handlers):
        if getattr(h, "_cluster_pipeline", False):
            root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
        handlers[-1].setLevel(logging.INFO)
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / f"rank{rank}.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._cluster_pipeline = True  # type: ignore[attr-defined]
        root.addHandler(h)
    log.debug("rank %d is pid %d on %s", rank, os.getpid(), socket.gethostname())


def log_error_to_files(message: str) -> None:
    """An error line in this rank's log file only, for an error the CLI prints to stderr
    itself: rank 0's stdout handler would print it a second time."""
    record = log.makeRecord("cluster_pipeline", logging.ERROR, __file__, 0, message, (), None)
    for h in logging.getLogger().handlers:
        if getattr(h, "_cluster_pipeline", False) and isinstance(h, logging.FileHandler):
            h.handle(record)


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
        with open(self.run_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
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


def read_wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The history rows of a W&B `run-<id>.wandb` file, read without network or API key.

    The file is a 7-byte header followed by a LevelDB-style log of 32 KiB blocks whose records
    are protobuf `Record` messages; history records hold the logged values as JSON.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file} is not a W&B run file")
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            payload = pending + chunk
        rec = pb.Record()  # type: ignore[attr-defined]
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in rec.history.item
                }
            )
    return rows


def write_report(run_dir: Path, rows: list[dict[str, Any]], labels: np.ndarray | None) -> Path:
    """report.png: NMI(t-1,t) and NMI vs truth per epoch, and the last cluster-size distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    epochs = [r["epoch"] for r in rows]
    for key, name in (("nmi_prev", "NMI(t-1, t)"), ("nmi_gt", "NMI vs truth")):
        pts = [(e, r[key]) for e, r in zip(epochs, rows, strict=True) if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="NMI", ylim=(0, 1), title="Cluster stability and quality")
    if axes[0].lines:  # runs on fixed targets have no clustering to plot
        axes[0].legend()
    axes[1].plot(epochs, [r["train_loss"] for r in rows], marker="o")
    axes[1].set(xlabel="epoch", ylabel="loss", title="Training loss on pseudo-labels")
    if labels is not None:
        sizes = np.sort(np.bincount(labels[labels >= 0]))[::-1]  # -1: skipped as unreadable
        axes[2].bar(np.arange(len(sizes)), sizes, width=1.0)
        axes[2].set(xlabel="cluster (sorted by size)", ylabel="images", title="Cluster sizes")
    fig.tight_layout()
    out = run_dir / "report.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
