"""Checkpoint schema: named parts, a version, schema-1 checkpoints upgraded, newer ones refused."""

from __future__ import annotations

import pytest
import torch

from cluster_pipeline.run.checkpoint import CheckpointError
from cluster_pipeline.training.checkpoints import PARTS, SCHEMA_VERSION, compose, head_of, upgrade


def schema1(**extra: object) -> dict:
    """A flat checkpoint as the code before schema 2 wrote it (training/state.py at cc1a587)."""
    labels = torch.arange(6) % 3
    return {
        "epoch": 2, "step": 4, "labels": labels, "prev_labels": labels.flip(0),
        "kmeans": {"loss": 0.5, "k": 3}, "loss_sums": torch.ones(2, dtype=torch.float64),
        "acc_sums": torch.zeros(2, dtype=torch.float64), "seconds": {"train": 1.0},
        "fixed_labels": None, "head": "clusters", "model": {"w": torch.ones(2)},
        "optimizer": {"state": {}}, "world": 2, "wandb_id": "abc", "config": "name: x\n",
    } | extra  # fmt: skip


def test_schema1_deepcluster_maps_to_the_parts() -> None:
    new = upgrade(schema1(), "old.pt")
    assert new["schema_version"] == SCHEMA_VERSION and set(PARTS) <= new.keys()
    assert new["position"] | {"loss_sums": None, "acc_sums": None} == {
        "epoch": 2, "started": True, "step": 4, "loss_sums": None, "acc_sums": None,
        "seconds": {"train": 1.0}, "world": 2,
    }  # fmt: skip
    t = new["targets"]
    assert (t["kind"], t["head"], t["kmeans"]["k"]) == ("deepcluster", "clusters", 3)
    assert torch.equal(t["labels"], torch.arange(6) % 3)
    assert new["tracker"] == {"wandb_id": "abc"} and new["config"] == "name: x\n"


def test_schema1_fixed_targets_and_an_unstarted_epoch() -> None:
    fixed = torch.tensor([1, 0, 1])
    new = upgrade(schema1(labels=None, fixed_labels=fixed, head="classes"), "old.pt")
    assert new["position"]["started"] is False
    assert (new["targets"]["kind"], new["targets"]["head"]) == ("fixed", "classes")
    assert torch.equal(new["targets"]["labels"], fixed)
    assert head_of(new) == head_of(schema1(head="classes")) == "classes"


def test_current_schema_passes_through_and_newer_is_refused_by_number() -> None:
    parts = {name: {} for name in PARTS}
    current = compose(parts, "name: x\n")
    assert upgrade(current, "x.pt") is current
    with pytest.raises(CheckpointError, match=r"run/ckpt.pt has checkpoint schema version 7"):
        upgrade(current | {"schema_version": 7}, "run/ckpt.pt")


def test_targets_hold_one_label_vector_and_take_old_ones_as_int32() -> None:
    """A mid-epoch state written before NMI(t-1, t) was kept in it (both labelings, int64)
    loads as int32 labels with that NMI computed, the previous labels dropped: an epoch holds
    one N-vector of labels, whatever wrote its checkpoint."""
    from pathlib import Path

    import numpy as np

    from cluster_pipeline.clustering import metrics
    from cluster_pipeline.training.targets import DeepClusterTargets

    labels, prev = torch.arange(12) % 3, torch.arange(12) % 4
    t = DeepClusterTargets()
    state = {"kind": "deepcluster", "head": "clusters", "labels": labels, "prev_labels": prev,
             "kmeans": {"loss": 0.5, "k": 3}}  # fmt: skip
    t.load_state_dict(state, Path("run"))
    assert t.labels is not None and t.labels.dtype == np.int32 and t.prev_labels is None
    assert t.kmeans["nmi_prev"] == metrics.nmi(prev.numpy(), labels.numpy())
    assert t.epoch_row(None)["nmi_prev"] == t.kmeans["nmi_prev"]
    saved = t.state_dict()
    assert saved["labels"].dtype == torch.int32 and saved["prev_labels"] is None
