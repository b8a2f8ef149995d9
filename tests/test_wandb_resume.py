"""W&B without network or API key: offline, no hang; a resumed run continues the same W&B run.

A run stopped mid-epoch and resumed logs into the same run id (stored in the checkpoint, resumed
with resume="allow"), and its offline files hold every epoch exactly once, with the values of
metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from multiproc import run_ranks
from test_resume import POLLS_PER_EPOCH, overrides, train_rank

from cluster_pipeline import checkpoint
from cluster_pipeline.tracking import read_metrics, read_wandb_history

KEYS = ("nmi_gt", "nmi_prev", "train_loss", "kmeans_loss", "cluster_size_max")


def test_stopped_run_continues_the_same_wandb_run(
    digits_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE")  # wandb.mode=auto with no WANDB_API_KEY: offline
    run_dir = tmp_path / "run"
    args = overrides(digits_shards, run_dir, "wandb.mode=auto")
    # Stop at step 5 of epoch 1: epoch 0 is logged, epoch 1 is not.
    first = run_ranks(2, train_rank, args, POLLS_PER_EPOCH + 2 + 5, timeout=180)
    assert all(r.startswith("stopped:") for r in first), first
    stored_id = checkpoint.load_latest(run_dir)["wandb_id"]  # type: ignore[index]
    assert run_ranks(2, train_rank, args, 0, timeout=180) == ["done"] * 2

    runs = sorted((run_dir / "wandb").glob("*run-*"))
    assert [p.name.split("-")[0] for p in runs] == ["offline", "offline"], runs
    assert {p.name.rsplit("-", 1)[-1] for p in runs} == {stored_id}, runs
    histories = [read_wandb_history(p / f"run-{stored_id}.wandb") for p in runs]
    assert [[h["epoch"] for h in part] for part in histories] == [[0], [1, 2]]
    rows = read_metrics(run_dir)
    logged = [h for part in histories for h in part]
    assert [h["epoch"] for h in logged] == [r["epoch"] for r in rows] == [0, 1, 2]
    for h, r in zip(logged, rows, strict=True):
        for key in KEYS:
            if r[key] is None:
                assert key not in h, (key, h)
            else:
                assert h[key] == pytest.approx(r[key]), (key, h, r)
