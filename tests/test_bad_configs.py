"""A bad config fails before any work with ONE line that names the key, and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cluster_pipeline.config import ConfigError, load_config, per_rank_batch_size
from cluster_pipeline.launcher.job import check_job_shape
from cluster_pipeline.testing.limits import limit
from cluster_pipeline.testing.multiproc import kill_all, start_cli_ranks

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "digits_test.yaml")

# (override, text the single error line must hold: the key and the value or what is wrong)
CASES = {
    "k-above-n": ("cluster.k=5000", ["cluster.k=5000", "1797 samples"]),
    "pca-above-feature-dim": ("cluster.pca_dim=500", ["cluster.pca_dim=500", "dimension 128"]),
    "unknown-model": ("model.arch=vgg16", ["model.arch='vgg16' is unknown"]),
    "unknown-mode": (
        "cluster.mode=shared",
        ["cluster.mode='shared' is unknown; use one of ('gather', 'sharded')"],
    ),
    "bad-pool": ("evaluate.pool=grid:0", ["evaluate.pool: pool rule 'grid:0' is unknown"]),
    "unknown-key": ("cluster.kk=5", ["cluster.kk"]),
    "bad-value-type": ("train.global_batch_size=lots", ["train.global_batch_size", "lots"]),
}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.slow
def test_each_bad_config_is_one_line_naming_the_key(digits_shards: Path, tmp_path: Path) -> None:
    """The single-process CLI, all cases at once (each is a Python start-up, 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}

    def start(name: str, override: str) -> subprocess.Popen:
        argv = ["-m", "cluster_pipeline", "train", "--config", CONFIG,
                f"data.shards={digits_shards}", f"run.dir={tmp_path / name}", override]  # fmt: skip
        return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    procs = {name: start(name, override) for name, (override, _) in CASES.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=limit(240))
        assert proc.returncode == 2, (name, out[-2000:], err[-2000:])
        lines = error_lines(err)
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("cluster-pipeline train: error: "), lines[0]
        for text in CASES[name][1]:
            assert text in lines[0], (name, lines[0])
        # Before any work: no checkpoint, no metrics, no W&B run.
        assert not (tmp_path / name / "checkpoints").exists()
        assert not (tmp_path / name / "metrics.jsonl").exists()
        assert not (tmp_path / name / "wandb").exists()


@pytest.mark.slow
def test_global_batch_that_does_not_divide_stops_every_rank(
    digits_shards: Path, tmp_path: Path
) -> None:
    """2 ranks, global batch 63: each rank exits 2 with one line naming the key and world size."""
    run_dir = tmp_path / "run"
    argv = ["-m", "cluster_pipeline", "train", "--config", CONFIG, f"data.shards={digits_shards}",
            f"run.dir={run_dir}", "train.global_batch_size=63"]  # fmt: skip
    procs = start_cli_ranks(argv, tmp_path / "out")
    try:
        codes = [p.wait(timeout=limit(240)) for p in procs]
    finally:
        kill_all(procs)
    for rank, code in enumerate(codes):
        out = (tmp_path / "out" / f"out{rank}.txt").read_text()
        assert code == 2, out[-2000:]
        errors = [line for line in error_lines(out) if "error" in line.lower()]
        assert errors == [
            "cluster-pipeline train: error: train.global_batch_size=63 does not divide over the "
            "2 ranks of this job (world size 2); use a multiple of 2, e.g. 62"
        ], out[-2000:]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "wandb").exists()


def test_per_rank_batch_size() -> None:
    cfg = load_config(CONFIG, ["train.batch_size=48"])
    assert per_rank_batch_size(cfg, 4) == 48  # global_batch_size=0: batch_size per rank
    cfg = load_config(CONFIG, ["train.batch_size=48", "train.global_batch_size=256"])
    assert per_rank_batch_size(cfg, 8) == 32 and per_rank_batch_size(cfg, 1) == 256
    with pytest.raises(ConfigError) as info:
        per_rank_batch_size(cfg, 3)
    assert "train.global_batch_size=256" in str(info.value) and "world size 3" in str(info.value)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=-1"):
        load_config(CONFIG, ["train.global_batch_size=-1"])


def job_env(nodes: int, tasks: int) -> SimpleNamespace:
    """What submitit.JobEnvironment tells a task about its job."""
    return SimpleNamespace(num_nodes=nodes, num_tasks=tasks, hostname="node-a", global_rank=0)


def test_job_shape_must_match_the_config() -> None:
    cfg = load_config(CONFIG, ["slurm.nodes=2", "slurm.gpus_per_node=0", "slurm.tasks_per_node=2"])
    check_job_shape(cfg, job_env(2, 4))  # type: ignore[arg-type]  # the job asked for
    for nodes, tasks in ((1, 2), (2, 2), (4, 8)):
        with pytest.raises(ConfigError) as info:
            check_job_shape(cfg, job_env(nodes, tasks))  # type: ignore[arg-type]
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith("slurm.nodes=2 x 2 ranks per node"), msg
        assert f"the job has {tasks} tasks on {nodes} nodes" in msg, msg


def test_job_shape_names_missing_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the node shows 2 GPUs
    cfg = load_config(CONFIG, ["slurm.nodes=1", "slurm.gpus_per_node=8"])
    with pytest.raises(ConfigError) as info:
        check_job_shape(cfg, job_env(1, 8))  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg == "slurm.gpus_per_node=8 but node node-a shows 2 GPUs to rank 0", msg
