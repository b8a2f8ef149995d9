"""Reading a W&B run file offline: the rows an offline run logged, without network or API key."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class WandbRunFile:
    """What an offline run logged: its history rows, its metric definitions (name or glob ->
    step metric; "" when the metric is an x-axis itself), and its summary as last updated."""

    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def epoch_rows(self) -> list[dict[str, Any]]:
        """The per-epoch rows (the ones metrics.jsonl holds too), without step and end rows."""
        return [row for row in self.history if "epoch" in row]


def read_wandb_history(run_file: str | Path) -> list[dict[str, Any]]:
    """The history rows of a W&B `run-<id>.wandb` file, read without network or API key."""
    return read_wandb_file(run_file).history


def read_wandb_file(run_file: str | Path) -> WandbRunFile:
    """History, metric definitions and summary of a W&B `run-<id>.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = WandbRunFile()
    for payload in _records(run_file):
        rec = pb.Record()  # type: ignore[attr-defined]
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out.history.append(_items(rec.history.item))
        elif kind == "metric":
            out.metrics[rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
        elif kind == "summary":
            out.summary.update(_items(rec.summary.update))
    return out


def _items(items: Any) -> dict[str, Any]:
    """Items as a dict; a nested key (W&B sends media and dicts so) as nested dicts:
    ("cluster_images", "path") -> row["cluster_images"]["path"]."""
    out: dict[str, Any] = {}
    for item in items:
        *parents, leaf = [item.key] if item.key else list(item.nested_key)
        into = out
        for name in parents:
            into = into.setdefault(name, {})
        into[leaf] = json.loads(item.value_json)
    return out


def _records(run_file: str | Path) -> Iterator[bytes]:
    """The record payloads of the file: a 7-byte header followed by a LevelDB-style log of
    32 KiB blocks whose records are protobuf `Record` messages, cut at block ends."""
    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file} is not a W&B run file")
    block, pos, pending = 32768, 7, b""
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
        if kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            yield chunk if kind == 1 else pending + chunk
