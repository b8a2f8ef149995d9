"""Reading a W&B run file offline: the rows an offline run logged, without network or API key."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def read_wandb_history(run_file: str | Path) -> list[dict[str, Any]]:
    """The history rows of a W&B `run-<id>.wandb` file, read without network or API key.

    The file is a 7-byte header followed by a LevelDB-style log of 32 KiB blocks whose records
    are protobuf `Record` messages; history records hold the logged values as JSON.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
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
