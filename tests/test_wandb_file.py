"""read_wandb_history on a W&B run file written here, byte for byte in W&B's format: a 7-byte
header, then a LevelDB-style log of 32 KiB blocks whose records are protobuf `Record`s."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from cluster_pipeline.run.wandb_file import read_wandb_history

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def history(row: dict, nested: dict[tuple[str, ...], object] | None = None) -> bytes:
    rec = pb.Record()  # type: ignore[attr-defined]
    for key, value in row.items():
        item = rec.history.item.add()
        item.key, item.value_json = key, json.dumps(value)
    for keys, value in (nested or {}).items():
        item = rec.history.item.add()
        item.nested_key.extend(keys)
        item.value_json = json.dumps(value)
    return rec.SerializeToString()


def run_file(payloads: list[bytes]) -> bytes:
    """W&B's framing: records cut at block ends into FIRST/MIDDLE/LAST pieces, and a block
    tail too short for a record header padded with zeros."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for payload in payloads:
        first = True
        while True:
            room = BLOCK - len(out) % BLOCK
            if room < 7:
                out += b"\0" * room
                continue
            chunk, payload = payload[: room - 7], payload[room - 7 :]
            kind = (FULL if not payload else FIRST) if first else (LAST if not payload else MIDDLE)
            out += struct.pack("<IHB", 0, len(chunk), kind) + chunk
            first = False
            if not payload:
                break
    return bytes(out)


def test_history_rows_from_a_path_or_a_str(tmp_path: Path) -> None:
    other = pb.Record()  # type: ignore[attr-defined]
    other.run.run_id = "abc123"  # not a history record: left out
    big = {"epoch": 1, "text": "x" * (2 * BLOCK)}  # spans three blocks: FIRST, MIDDLE, LAST
    rows = [{"epoch": 0, "nmi_prev": None, "train_loss": 2.5}, big, {"epoch": 2}]
    payloads = [other.SerializeToString(), history(rows[0]), history(big),
                history(rows[2], {("clusters", "sizes"): [3, 4]})]  # fmt: skip
    path = tmp_path / "run-abc123.wandb"
    path.write_bytes(run_file(payloads))
    want = [*rows[:2], {"epoch": 2, "clusters": {"sizes": [3, 4]}}]
    assert read_wandb_history(path) == want
    assert read_wandb_history(str(path)) == want


def test_a_file_that_is_not_a_run_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=f"{path} is not a W&B run file"):
        read_wandb_history(str(path))
