"""The SLURM launcher without a cluster: parameters, rendezvous ports, and no-SLURM errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_pipeline.config import load_config
from cluster_pipeline.testing.limits import limit
from launch.slurm import rendezvous_port, slurm_parameters

REPO = Path(__file__).resolve().parent.parent


def test_slurm_parameters_follow_the_config() -> None:
    cfg = load_config(REPO / "configs" / "deepcluster_alexnet_imagenet.yaml",
                      ["slurm.partition=learnlab", "slurm.account=team", "slurm.nodes=4",
                       "slurm.additional_parameters.reservation=resa"])  # fmt: skip
    p = slurm_parameters(cfg)
    assert p["nodes"] == 4 and p["tasks_per_node"] == 8 and p["gpus_per_node"] == 8
    assert p["slurm_partition"] == "learnlab" and p["slurm_account"] == "team"
    assert "slurm_qos" not in p and "slurm_constraint" not in p  # only when given
    assert p["cpus_per_task"] == 10 and p["mem_gb"] == 480 and p["timeout_min"] == 4320
    assert p["slurm_signal_delay_s"] == 180
    assert p["slurm_additional_parameters"] == {"reservation": "resa"}
    assert "--kill-on-bad-exit=1" in p["slurm_srun_args"]
    demo = REPO / "configs" / "demo_mnist.yaml"
    cpu = slurm_parameters(load_config(demo, ["slurm.gpus_per_node=0", "slurm.tasks_per_node=3"]))
    assert cpu["tasks_per_node"] == 3 and "gpus_per_node" not in cpu and "mem_gb" not in cpu


def test_rendezvous_ports_differ_between_jobs_and_attempts() -> None:
    ports = {rendezvous_port(job, 0) for job in range(100_000, 120_000)}
    assert len(ports) == 20_000 and min(ports) >= 20000 and max(ports) < 60000
    assert rendezvous_port(4242, 1) != rendezvous_port(4242, 0)


@pytest.mark.slow
def test_launch_without_slurm_fails_at_once() -> None:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # python, but no sbatch
    res = subprocess.run([sys.executable, "-m", "launch.slurm", "--config",
                          "configs/demo_mnist.yaml"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=limit(60))  # fmt: skip
    assert res.returncode == 2
    assert "no SLURM here (sbatch is not on PATH)" in res.stderr
    assert "launch.local" in res.stderr
