"""Smoke test of the local SLURM cluster fixture: two nodes, srun across them, sacct, sinfo."""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_cluster import DAEMONS, SlurmCluster, alive_daemons

pytestmark = pytest.mark.slurm


def test_every_daemon_alive(slurm_cluster: SlurmCluster) -> None:
    assert sorted(alive_daemons()) == sorted(DAEMONS)
    assert not set(slurm_cluster.started) & set(slurm_cluster.preexisting)


def test_srun_one_task_on_each_node(slurm_cluster: SlurmCluster) -> None:
    res = slurm_cluster.run(
        "srun", "-p", slurm_cluster.partition, "-N2", "--ntasks-per-node=1", "-t", "1",
        "bash", "-c", "echo $SLURM_JOB_ID $SLURM_PROCID $SLURMD_NODENAME",
    )  # fmt: skip
    rows = sorted(line.split() for line in res.stdout.splitlines())
    assert [node for _, _, node in rows] == ["n1", "n2"], res.stdout
    assert [rank for _, rank, _ in rows] == ["0", "1"], res.stdout
    job_ids = {job for job, _, _ in rows}
    assert len(job_ids) == 1, res.stdout
    assert slurm_cluster.wait_job(job_ids.pop()) == "COMPLETED"


def test_sacct_records_success_and_failure(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    def sbatch(script: str) -> str:
        res = slurm_cluster.run(
            "sbatch", "--parsable", "-p", slurm_cluster.partition, "-t", "1",
            "-o", str(tmp_path / "%j.out"), "--wrap", script,
        )  # fmt: skip
        return res.stdout.strip().split(";")[0]

    ok, bad = sbatch("echo hello"), sbatch("exit 3")
    assert slurm_cluster.wait_job(ok) == "COMPLETED"
    assert (tmp_path / f"{ok}.out").read_text() == "hello\n"
    assert slurm_cluster.wait_job(bad) == "FAILED"
    res = slurm_cluster.run("sacct", "-n", "-P", "-X", "-j", bad, "-o", "ExitCode")
    assert res.stdout.strip() == "3:0"


def test_sinfo_two_idle_nodes(slurm_cluster: SlurmCluster) -> None:
    slurm_cluster.wait_idle()
    res = slurm_cluster.run("sinfo", "-h", "-p", slurm_cluster.partition, "-o", "%D %T %N")
    assert res.stdout.split() == ["2", "idle", "n[1-2]"]
