"""`make launch` against a real SLURM: two slurmd nodes, submitit, requeue on preemption.

The demo config runs on the digits shards (8x8 images): 2 nodes x 1 task, then 1 node x 2
tasks, a preemption (submitit's `_interrupt`: SIGTERM then USR2) that must requeue and resume,
a rank that raises, and `RESUME=<run dir>`. Other commands go through the same launcher:
`COMMAND=train-supervised` makes the pretrained network of a ClusterFit run that is preempted,
requeued and resumed, then resubmitted with `--resume` as the clusterfit it was launched as.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import submitit
from slurm_cluster import SlurmCluster

from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.wandb_file import read_wandb_history
from cluster_pipeline.testing.limits import limit

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
# configs/demo_mnist.yaml made to fit 8x8 digits on CPU nodes.
DIGITS = [
    "data.load_size=8", "data.image_size=8", "data.mean=[0.3]", "data.std=[0.35]",
    "data.num_workers=0", "data.extract_batch_size=256", "model.width=8", "cluster.pca_dim=16",
    "cluster.niter=10", "augment.min_scale=0.6", "wandb.mode=offline", "run.progress=false",
]  # fmt: skip


def slurm_args(nodes: int, tasks: int) -> list[str]:
    return [f"slurm.nodes={nodes}", "slurm.gpus_per_node=0", f"slurm.tasks_per_node={tasks}",
            "slurm.cpus_per_task=1", "slurm.timeout_min=20", "slurm.partition=debug"]  # fmt: skip


def submit(cluster: SlurmCluster, *args: str) -> str:
    """python -m launch.slurm ARGS; returns the job id it printed."""
    res = subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=REPO, env=cluster.env(),
                         capture_output=True, text=True, timeout=limit(60))  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return job_id_of(res.stdout)


def job_id_of(stdout: str) -> str:
    m = re.search(r"submitted job (\d+)", stdout)
    assert m, stdout
    for what in ("run directory:", "rank logs:", "follow:", "squeue -j"):
        assert what in stdout, stdout
    return m[1]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def job_logs(run_dir: Path, job: str) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm" / job).glob("*_log.*")))


def wait_done(cluster: SlurmCluster, job: str, run_dir: Path, timeout: float) -> str:
    try:
        return cluster.wait_job(job, timeout=timeout)
    except BaseException:
        print(job_logs(run_dir, job)[-5000:])
        raise


def wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


@pytest.fixture(scope="module")
def two_node_run(
    slurm_cluster: SlurmCluster, digits_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """`make launch NODES=2` with one task per node, the way a user types it."""
    run_dir = tmp_path_factory.mktemp("slurm") / "two-nodes"
    make_launch(slurm_cluster, digits_shards, run_dir, 2, "CONFIG=configs/demo_mnist.yaml",
                "NODES=2")  # fmt: skip
    return run_dir


def make_launch(
    slurm_cluster: SlurmCluster, shards: Path, run_dir: Path, epochs: int, *variables: str
) -> str:
    """`make launch` on the digits with one task per node and 1 CPU, waited for: its output."""
    overrides = " ".join([f"data.shards={shards}", f"train.epochs={epochs}", *DIGITS])
    res = subprocess.run(
        ["make", "-s", "launch", *variables, "GPUS_PER_NODE=0", "TASKS_PER_NODE=1",
         "CPUS_PER_TASK=1", "TIME=20", "PARTITION=debug", f"RUN_DIR={run_dir}",
         f"OVERRIDES={overrides}"],
        cwd=REPO, env=slurm_cluster.env(), capture_output=True, text=True, timeout=limit(120),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    job = job_id_of(res.stdout)
    assert wait_done(slurm_cluster, job, run_dir, timeout=240) == "COMPLETED"
    return res.stdout


def test_two_nodes_one_task_each(two_node_run: Path) -> None:
    assert [r["epoch"] for r in rows_of(two_node_run)] == [0, 1]
    job = next(p.name for p in (two_node_run / "slurm").iterdir() if p.name.isdigit())
    logs = job_logs(two_node_run, job)
    assert "rank 0/2 on node n1" in logs and "rank 1/2 on node n2" in logs, logs[-3000:]
    labels = np.load(two_node_run / "assignments" / "epoch-0001.npy")
    assert len(labels) == 1797 and np.bincount(labels).min() >= 1
    assert (two_node_run / "logs" / "rank1.log").is_file()


def test_one_node_two_tasks(
    slurm_cluster: SlurmCluster, digits_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, "--config", "configs/demo_mnist.yaml",
                 f"data.shards={digits_shards}", f"run.dir={run_dir}", "train.epochs=2",
                 *DIGITS, *slurm_args(1, 2))  # fmt: skip
    assert wait_done(slurm_cluster, job, run_dir, timeout=240) == "COMPLETED"
    assert [r["epoch"] for r in rows_of(run_dir)] == [0, 1]
    logs = job_logs(run_dir, job)
    assert "rank 0/2 on node n1" in logs and "rank 1/2 on node n1" in logs, logs[-3000:]


def test_resume_submits_from_the_last_checkpoint(
    slurm_cluster: SlurmCluster, two_node_run: Path
) -> None:
    before = wandb_ids(two_node_run)
    job = submit(slurm_cluster, "--resume", str(two_node_run), "train.epochs=3")
    assert wait_done(slurm_cluster, job, two_node_run, timeout=240) == "COMPLETED"
    assert [r["epoch"] for r in rows_of(two_node_run)] == [0, 1, 2]
    assert "resumed" in (two_node_run / "logs" / "rank0.log").read_text()
    assert wandb_ids(two_node_run) == before and len(before) == 1


def test_preemption_requeues_and_resumes(
    slurm_cluster: SlurmCluster, digits_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    epochs = 8
    job = submit(slurm_cluster, "--config", "configs/demo_mnist.yaml",
                 f"data.shards={digits_shards}", f"run.dir={run_dir}", f"train.epochs={epochs}",
                 "train.stop_check_every=1", *DIGITS, *slurm_args(2, 1))  # fmt: skip
    deadline = time.monotonic() + limit(180)
    while not ((run_dir / "metrics.jsonl").is_file() and rows_of(run_dir)):
        assert time.monotonic() < deadline, job_logs(run_dir, job)[-3000:]
        time.sleep(0.2)
    ids_before = wandb_ids(run_dir)
    submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job)._interrupt()
    assert wait_done(slurm_cluster, job, run_dir, timeout=300) == "COMPLETED"
    shown = slurm_cluster.run("scontrol", "show", "job", job).stdout
    assert int(re.search(r"Restarts=(\d+)", shown)[1]) >= 1, shown  # type: ignore[index]
    logs = job_logs(run_dir, job)
    assert "SLURM_RESTART_COUNT=1" in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-5000:]  # every rank stopped cleanly
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "stopping at epoch" in rank0 and "resumed" in rank0, rank0[-3000:]
    assert [r["epoch"] for r in rows_of(run_dir)] == list(range(epochs))
    assert len(ids_before) == 1 and wandb_ids(run_dir) == ids_before
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # before and after
    # The preemption's SIGTERM kills W&B's service with rows in flight: the resumed attempt
    # logs every row W&B did not confirm, so the run's history misses no epoch.
    history = {h["epoch"]: h for f in sorted((run_dir / "wandb").glob("offline-run-*/*.wandb"))
               for h in read_wandb_history(f)}  # fmt: skip
    assert sorted(history) == list(range(epochs))
    for row in rows_of(run_dir):
        assert history[row["epoch"]]["train_loss"] == pytest.approx(row["train_loss"])


def test_a_rank_that_raises_fails_the_job(
    slurm_cluster: SlurmCluster, digits_shards: Path, tmp_path: Path
) -> None:
    """Garbage in one image in the middle of the last shard: only rank 1 reads it."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for f in digits_shards.iterdir():
        (shards / f.name).write_bytes(f.read_bytes())
    table = np.load(shards / "samples.npy")
    last = table[:, 0].max()
    rows = np.flatnonzero(table[:, 0] == last)
    _, offset, size, _ = table[rows[len(rows) // 2]]
    tar = sorted(shards.glob("*.tar"))[last]
    with open(tar, "r+b") as fh:
        fh.seek(int(offset))
        fh.write(b"\x00" * int(size))
    run_dir = tmp_path / "run"
    start = time.monotonic()
    job = submit(slurm_cluster, "--config", "configs/demo_mnist.yaml", f"data.shards={shards}",
                 f"run.dir={run_dir}", *DIGITS, *slurm_args(2, 1))  # fmt: skip
    assert wait_done(slurm_cluster, job, run_dir, timeout=180) == "FAILED"
    assert time.monotonic() - start < limit(150)
    logs = job_logs(run_dir, job)
    assert tar.name in logs, logs[-3000:]
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert f"rank 1 failed: shard {tar}: sample " in rank0, rank0[-3000:]
    assert not checkpoint.list_checkpoints(run_dir)


@pytest.fixture(scope="module")
def pretrained(
    slurm_cluster: SlurmCluster, digits_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """`make launch COMMAND=train-supervised`: the network ClusterFit clusters the features of."""
    run_dir = tmp_path_factory.mktemp("slurm") / "supervised"
    out = make_launch(slurm_cluster, digits_shards, run_dir, 1, "COMMAND=train-supervised",
                      "NODES=1")  # fmt: skip
    assert "submitted job" in out and "train-supervised" in out, out
    assert [r["epoch"] for r in rows_of(run_dir)] == [0]
    return checkpoint.checkpoint_path(run_dir, 1)


def test_clusterfit_preemption_requeues_and_resumes(
    slurm_cluster: SlurmCluster, pretrained: Path, tmp_path: Path
) -> None:
    """ClusterFit through the launcher, with the config its pretrained run saved: preempted
    after its first epoch, it checkpoints, is requeued and resumes without clustering again;
    `--resume` then continues it as clusterfit (the command the run was launched with)."""
    run_dir = tmp_path / "run"
    epochs = 12
    job = submit(slurm_cluster, "clusterfit", "--pretrained", str(pretrained),
                 f"run.dir={run_dir}", f"train.epochs={epochs}", "train.stop_check_every=1",
                 *slurm_args(2, 1))  # fmt: skip
    deadline = time.monotonic() + limit(180)
    while not ((run_dir / "metrics.jsonl").is_file() and rows_of(run_dir)):
        assert time.monotonic() < deadline, job_logs(run_dir, job)[-3000:]
        time.sleep(0.2)
    submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job)._interrupt()
    assert wait_done(slurm_cluster, job, run_dir, timeout=300) == "COMPLETED"
    shown = slurm_cluster.run("scontrol", "show", "job", job).stdout
    assert int(re.search(r"Restarts=(\d+)", shown)[1]) >= 1, shown  # type: ignore[index]
    logs = job_logs(run_dir, job)
    assert "SLURM_RESTART_COUNT=1" in logs and "clusterfit, rank 1/2 on node n2" in logs
    assert "Traceback" not in logs, logs[-5000:]  # every rank stopped cleanly
    assert re.search(r"rank 0: stopped on SIGUSR2; checkpoint \S+\.pt; the job is requeued",
                     logs), logs[-3000:]  # fmt: skip
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "stopping at epoch" in rank0 and "resumed" in rank0, rank0[-3000:]
    assert rank0.count("ClusterFit: clustering") == 1, rank0[-3000:]  # once, before the stop
    assert [r["epoch"] for r in rows_of(run_dir)] == list(range(epochs))
    launched = json.loads((run_dir / "slurm" / "command.json").read_text())
    assert launched["command"] == "clusterfit"

    again = submit(slurm_cluster, "--resume", str(run_dir), f"train.epochs={epochs + 1}")
    assert wait_done(slurm_cluster, again, run_dir, timeout=240) == "COMPLETED"
    assert [r["epoch"] for r in rows_of(run_dir)] == list(range(epochs + 1))
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert rank0.count("ClusterFit: clustering") == 1, rank0[-3000:]
    assert "clusterfit, rank 0/2" in job_logs(run_dir, again)
