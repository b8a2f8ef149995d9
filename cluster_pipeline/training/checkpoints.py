"""A training checkpoint: named stateful parts and a schema version.

    {"schema_version": 2, "model": ..., "optimizer": ..., "targets": ..., "position": ...,
     "tracker": {"wandb_id": ...}, "recipe": {...}, "config": <resolved YAML>}

Each part is the `state_dict()` of its owner (the network, the optimizer, the targets strategy,
`Position`, the W&B run), so adding state to a piece adds it to its part, not to a hand-kept
field list here. Checkpoints of schema 1 (before the parts, one flat dict) still load: `upgrade`
maps them. A newer schema is refused with its number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster_pipeline.run.checkpoint import CheckpointError

SCHEMA_VERSION = 2
# "recipe" (training/recipe.py) came later in schema 2: a checkpoint without it resumes unchecked.
PARTS = ("model", "optimizer", "targets", "position", "tracker", "recipe")


def to_tensor(a: np.ndarray | None) -> torch.Tensor | None:
    """An array as a part holds it (weights_only loads read tensors, not arrays)."""
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def to_array(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.numpy()


def compose(parts: dict[str, Any], config_yaml: str) -> dict[str, Any]:
    """The payload of a checkpoint from its parts' state dicts."""
    assert set(parts) == set(PARTS), sorted(parts)
    return {"schema_version": SCHEMA_VERSION, **parts, "config": config_yaml}


def upgrade(ckpt: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """`ckpt` in the current schema (a schema-1 checkpoint mapped to the parts)."""
    version = ckpt.get("schema_version", 1)
    if version == SCHEMA_VERSION:
        return ckpt
    if version != 1 or not isinstance(version, int):
        raise CheckpointError(
            f"{path} has checkpoint schema version {version}, but this cluster_pipeline reads "
            f"versions 1 to {SCHEMA_VERSION}; resume it with the version that wrote it"
        )
    fixed = ckpt.get("fixed_labels")
    if fixed is not None:
        targets = {"kind": "fixed", "head": ckpt.get("head", "clusters"), "labels": fixed}
    else:
        targets = {"kind": "deepcluster", "head": "clusters", "labels": ckpt["labels"],
                   "prev_labels": ckpt["prev_labels"], "kmeans": ckpt["kmeans"]}  # fmt: skip
    started = ckpt["labels"] is not None
    position = {
        "epoch": ckpt["epoch"], "started": started, "step": ckpt["step"],
        "loss_sums": ckpt["loss_sums"], "acc_sums": ckpt.get("acc_sums"),
        "seconds": ckpt["seconds"], "world": ckpt["world"],
    }  # fmt: skip
    parts = {"model": ckpt["model"], "optimizer": ckpt["optimizer"], "targets": targets,
             "position": position, "tracker": {"wandb_id": ckpt["wandb_id"]},
             "recipe": None}  # fmt: skip
    return compose(parts, ckpt["config"])


def head_of(ckpt: dict[str, Any]) -> str:
    """What a training checkpoint's head outputs: clusters, classes or rotations."""
    if "schema_version" in ckpt:
        return str(ckpt["targets"]["head"])
    return str(ckpt.get("head", "clusters"))
