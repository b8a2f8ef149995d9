"""`make launch` against a real SLURM: two slurmd nodes, submitit, requeue on every stop.

The demo config runs on the digits shards (8x8 images): `make launch NODES=2 TASKS_PER_NODE=1`
as a user types it on a CPU cluster (the request fitted to the partition), 1 node x 2 tasks
requeued by `scontrol requeue` (SIGTERM), a real preemption by a job of a higher partition, a
rank that raises, `RESUME=<run dir>` and a second submission on a run directory in use, and
requests that do not fit the partition. Other commands go through the same launcher:
`COMMAND=train-supervised` makes the pretrained network of a ClusterFit run that is stopped by
`scancel --signal=USR2 --batch`, requeued and resumed, then resubmitted with `--resume` as the
clusterfit it was launched as, under USR2 until it ends.
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
from slurm_cluster import GRACE_S, PREEMPTIBLE, PREEMPTING, SlurmCluster

from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.wandb_file import read_wandb_file
from cluster_pipeline.testing.limits import limit

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
# configs/demo_mnist.yaml made to fit 8x8 digits on CPU nodes.
DIGITS = [
    "data.load_size=8", "data.image_size=8", "data.mean=[0.3]", "data.std=[0.35]",
    "data.num_workers=0", "data.extract_batch_size=256", "model.width=8", "cluster.pca_dim=16",
    "cluster.niter=10", "augment.min_scale=0.6", "wandb.mode=offline", "run.progress=false",
]  # fmt: skip
# DeepCluster-v2 at the digits' scale (8 x 8 images: small crops of 4).
DCV2 = ("train.method=deepcluster_v2", "dcv2.prototypes=[10,12]", "dcv2.small_crops=2",
        "dcv2.small_size=4", "dcv2.proj_hidden=64", "dcv2.proj_dim=16")  # fmt: skip


def slurm_args(nodes: int, tasks: int, partition: str = "debug") -> list[str]:
    return [f"slurm.nodes={nodes}", "slurm.gpus_per_node=0", f"slurm.tasks_per_node={tasks}",
            "slurm.cpus_per_task=1", "slurm.timeout_min=20",
            f"slurm.partition={partition}"]  # fmt: skip


def launch(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """python -m launch.slurm ARGS."""
    return subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=REPO,
                          env=cluster.env(), capture_output=True, text=True,
                          timeout=limit(60))  # fmt: skip


def submit(cluster: SlurmCluster, *args: str) -> str:
    """python -m launch.slurm ARGS; returns the job id it printed."""
    res = launch(cluster, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    return job_id_of(res.stdout)


def wait_first_row(run_dir: Path, job: str, rows: int = 1) -> None:
    deadline = time.monotonic() + limit(180)
    while not ((run_dir / "metrics.jsonl").is_file() and len(rows_of(run_dir)) >= rows):
        assert time.monotonic() < deadline, job_logs(run_dir, job)[-3000:]
        time.sleep(0.2)


def restarts(cluster: SlurmCluster, job: str) -> int:
    shown = cluster.run("scontrol", "show", "job", job).stdout
    m = re.search(r"Restarts=(\d+)", shown)
    assert m, shown
    return int(m[1])


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
    """`make launch NODES=2 TASKS_PER_NODE=1 CONFIG=...` on the CPU nodes, as a user types it:
    the config asks for no GPUs and no CPU count, the launcher fits them to the partition."""
    run_dir = tmp_path_factory.mktemp("slurm") / "two-nodes"
    make_launch(slurm_cluster, digits_shards, run_dir, 2, "CONFIG=configs/demo_mnist.yaml",
                "NODES=2")  # fmt: skip
    return run_dir


def make_launch(
    slurm_cluster: SlurmCluster, shards: Path, run_dir: Path, epochs: int, *variables: str
) -> str:
    """`make launch` on the digits, waited for: its output. GPUs and CPUs per task are left to
    the launcher, which fits them to the partition (no GPUs, 2 CPUs a node here)."""
    overrides = " ".join([f"data.shards={shards}", f"train.epochs={epochs}", *DIGITS])
    res = subprocess.run(
        ["make", "-s", "launch", *variables, "TASKS_PER_NODE=1", "TIME=20",
         f"RUN_DIR={run_dir}", f"OVERRIDES={overrides}"],
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
    saved = (two_node_run / "config.yaml").read_text()
    assert "gpus_per_node: 0" in saved and "cpus_per_task: 2" in saved, saved  # fitted


def make_launch_refused(cluster: SlurmCluster, run_dir: Path, *variables: str) -> str:
    """`make launch` of a request that cannot run: exit 2, one line, nothing left behind."""
    res = subprocess.run(
        ["make", "-s", "launch", "NODES=2", "TASKS_PER_NODE=1", "CONFIG=configs/demo_mnist.yaml",
         f"RUN_DIR={run_dir}", *variables],
        cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=limit(60),
    )  # fmt: skip
    said = [x for x in res.stderr.splitlines() if not x.startswith("make")]
    assert res.returncode != 0 and res.stdout == "" and len(said) == 1, res.stdout + res.stderr
    assert said[0].startswith("launch: error: ") and not run_dir.exists(), res.stderr
    return said[0]


def test_requests_are_checked_against_the_partition_before_submitting(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """GPUs on CPU nodes, more CPUs than a node has, a signal delay longer than half the time
    limit, and an option sbatch refuses: one line each, no job and no run directory. DRY_RUN=1
    prints the checks and the sbatch script of the request that fits."""
    run_dir = tmp_path / "run"
    queued = set(slurm_cluster.queued_jobs())
    line = make_launch_refused(slurm_cluster, run_dir, "GPUS_PER_NODE=1")
    assert line.startswith("launch: error: slurm.gpus_per_node=1: the partition debug has no GPUs")
    line = make_launch_refused(slurm_cluster, run_dir, "CPUS_PER_TASK=3")
    assert line.startswith("launch: error: slurm.cpus_per_task=3: 1 task(s) per node need 3 CPUs, "
                           "but the partition debug has at most 2 CPUs per node"), line  # fmt: skip
    line = make_launch_refused(slurm_cluster, run_dir, "TIME=1")
    assert line.startswith("launch: error: slurm.signal_delay_s=120: the time limit "
                           "slurm.timeout_min=1 is 60 s"), line  # fmt: skip
    line = make_launch_refused(slurm_cluster, run_dir,
                               "OVERRIDES=slurm.additional_parameters.gres=gpu:1")  # fmt: skip
    assert line.startswith("launch: error: sbatch refused the job: sbatch: error: "), line
    assert "gres" in line, line
    res = subprocess.run(
        ["make", "-s", "launch", "DRY_RUN=1", "NODES=2", "TASKS_PER_NODE=1",
         "CONFIG=configs/demo_mnist.yaml", f"RUN_DIR={run_dir}"],
        cwd=REPO, env=slurm_cluster.env(), capture_output=True, text=True, timeout=limit(60),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    for what in ("partition debug: 2 node(s): n1 (2 CPUs, 0 GPUs", "checks: the request fits",
                 "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --signal=USR2@120", "trap 'forward_to_steps USR2' USR2",
                 "dry run: nothing submitted"):  # fmt: skip
        assert what in res.stdout, res.stdout
    assert "--gpus-per-node" not in res.stdout and not run_dir.exists()
    assert set(slurm_cluster.queued_jobs()) == queued  # nothing was submitted


def test_one_node_two_tasks_requeued_by_scontrol(
    slurm_cluster: SlurmCluster, digits_shards: Path, tmp_path: Path
) -> None:
    """`scontrol requeue` sends SIGTERM and requeues the job itself: the ranks checkpoint on
    the SIGTERM and the requeued job continues from it, every epoch once, one W&B run. The job
    trains DeepCluster-v2 (train.method=deepcluster_v2), as `make launch COMMAND=train
    CONFIG=<a deepcluster_v2 config>` submits it: its memory bank resumes from the checkpoint."""
    run_dir = tmp_path / "run"
    epochs = 4
    job = submit(slurm_cluster, "--config", "configs/demo_mnist.yaml",
                 f"data.shards={digits_shards}", f"run.dir={run_dir}", f"train.epochs={epochs}",
                 "train.stop_check_every=1", *DIGITS, *DCV2, *slurm_args(1, 2))  # fmt: skip
    wait_first_row(run_dir, job)
    ids_before = wandb_ids(run_dir)
    slurm_cluster.run("scontrol", "requeue", job)
    assert wait_done(slurm_cluster, job, run_dir, timeout=240) == "COMPLETED"
    assert [r["epoch"] for r in rows_of(run_dir)] == list(range(epochs))
    assert all(r["nmi_heads"] is not None for r in rows_of(run_dir)[1:])  # DeepCluster-v2's
    assert restarts(slurm_cluster, job) == 1  # SLURM's requeue, and no second one of ours
    logs = job_logs(run_dir, job)
    assert "rank 0/2 on node n1" in logs and "rank 1/2 on node n1" in logs, logs[-3000:]
    assert re.search(r"rank 0: stopped on SIGTERM; checkpoint \S+\.pt; the job is requeued",
                     logs), logs[-3000:]  # fmt: skip
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert f"job {job} attempt 0: COMPLETING; SLURM has requeued it" in rank0, rank0[-3000:]
    assert len(ids_before) == 1 and wandb_ids(run_dir) == ids_before


def test_resume_submits_from_the_last_checkpoint(
    slurm_cluster: SlurmCluster, two_node_run: Path
) -> None:
    before = wandb_ids(two_node_run)
    job = submit(slurm_cluster, "--resume", str(two_node_run), "train.epochs=3")
    # One writer per run directory: a second RESUME while the job is queued or running.
    again = launch(slurm_cluster, "--resume", str(two_node_run), "train.epochs=3")
    assert again.returncode == 2 and again.stdout == "", again.stdout + again.stderr
    in_use = rf"launch: error: run directory {two_node_run} is in use: job {job} is "
    in_use += "(PENDING|RUNNING)"
    assert re.fullmatch(in_use + r"; .*\n", again.stderr), again.stderr
    jobs = sorted(int(p.name) for p in (two_node_run / "slurm").iterdir() if p.name.isdigit())
    assert str(jobs[-1]) == job  # nothing else submitted
    assert wait_done(slurm_cluster, job, two_node_run, timeout=240) == "COMPLETED"
    assert [r["epoch"] for r in rows_of(two_node_run)] == [0, 1, 2]
    assert "resumed" in (two_node_run / "logs" / "rank0.log").read_text()
    assert wandb_ids(two_node_run) == before and len(before) == 1


def test_preemption_requeues_and_resumes(
    slurm_cluster: SlurmCluster, digits_shards: Path, tmp_path: Path
) -> None:
    """A real preemption: a job of the higher partition needs every node of the training job's
    partition (PreemptMode=REQUEUE, GraceTime). The training job gets SIGTERM, checkpoints,
    is requeued, and completes after the other job with every epoch once and one W&B run."""
    run_dir = tmp_path / "run"
    epochs = 8
    job = submit(slurm_cluster, "--config", "configs/demo_mnist.yaml",
                 f"data.shards={digits_shards}", f"run.dir={run_dir}", f"train.epochs={epochs}",
                 "train.stop_check_every=1", *DIGITS, *slurm_args(2, 1, PREEMPTIBLE))  # fmt: skip
    wait_first_row(run_dir, job)
    ids_before = wandb_ids(run_dir)
    start = time.monotonic()
    urgent = slurm_cluster.run("sbatch", "--parsable", f"--partition={PREEMPTING}", "--nodes=2",
                               "--exclusive", "--output=/dev/null", "--wrap",
                               "sleep 5").stdout  # fmt: skip
    assert wait_done(slurm_cluster, urgent.strip(), run_dir, timeout=120) == "COMPLETED"
    assert time.monotonic() - start < limit(GRACE_S + 30)  # the stop did not wait for SIGKILL
    assert wait_done(slurm_cluster, job, run_dir, timeout=300) == "COMPLETED"
    assert restarts(slurm_cluster, job) >= 1
    logs = job_logs(run_dir, job)
    assert "SLURM_RESTART_COUNT=1" in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-5000:]  # every rank stopped cleanly
    assert "rank 0: stopped on SIGTERM" in logs, logs[-3000:]
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "stopping at epoch" in rank0 and "resumed" in rank0, rank0[-3000:]
    # still in its GraceTime: SLURM has not requeued it yet, so the job requeues itself
    assert re.search(rf"job {job} attempt 0: RUNNING, preempted at \S+; SLURM has not requeued "
                     rf"it\n.*job {job}: requeueing it", rank0), rank0[-3000:]  # fmt: skip
    assert [r["epoch"] for r in rows_of(run_dir)] == list(range(epochs))
    assert len(ids_before) == 1 and wandb_ids(run_dir) == ids_before
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # before and after
    # The preemption's SIGTERM kills W&B's service with rows in flight: the resumed attempt
    # logs every row W&B did not confirm, so the run's history misses no epoch.
    history = {h["epoch"]: h for f in sorted((run_dir / "wandb").glob("offline-run-*/*.wandb"))
               for h in read_wandb_file(f).epoch_rows}  # fmt: skip
    assert sorted(history) == list(range(epochs))
    for row in rows_of(run_dir):
        assert history[row["epoch"]]["train_loss"] == pytest.approx(row["train_loss"])


def test_a_node_failure_is_requeued_and_said(
    slurm_cluster: SlurmCluster, digits_shards: Path, tmp_path: Path
) -> None:
    """Node n2 goes DOWN under a 2-node training job: SLURM ends it NODE_FAIL and requeues it.
    Rank 0's log names the failed node and says SLURM requeued the job; `launch --wait` says
    so too and waits for the requeued job, which completes with every epoch once."""
    run_dir = tmp_path / "run"
    epochs = 5
    waiting = subprocess.Popen(
        [sys.executable, "-m", "launch.slurm", "--wait", "--config", "configs/demo_mnist.yaml",
         f"data.shards={digits_shards}", f"run.dir={run_dir}", f"train.epochs={epochs}",
         "train.stop_check_every=1", *DIGITS, *slurm_args(2, 1)],
        cwd=REPO, env=slurm_cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        job = ""
        while not (job := next(iter(p.name for p in (run_dir / "slurm").glob("[0-9]*")), "")):
            time.sleep(0.2)
        wait_first_row(run_dir, job)
        slurm_cluster.run("scontrol", "update", "NodeName=n2", "State=DOWN", "Reason=test")
        deadline = time.monotonic() + limit(60)
        rank0 = run_dir / "logs" / "rank0.log"
        while f"job {job} attempt 0:" not in rank0.read_text():  # rank 0 has looked at n2
            assert time.monotonic() < deadline, job_logs(run_dir, job)[-3000:]
            time.sleep(0.5)
    finally:
        slurm_cluster.run("scontrol", "update", "NodeName=n2", "State=RESUME", check=False)
    out, _ = waiting.communicate(timeout=limit(300))
    assert waiting.returncode == 0, out
    assert f"job {job}: NODE_FAIL: a node of the job failed; SLURM requeued it" in out, out
    assert f"job {job} ended: COMPLETED" in out, out
    assert [r["epoch"] for r in rows_of(run_dir)] == list(range(epochs))
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert re.search(rf"job {job} attempt 0: .*; SLURM has requeued it; failed node\(s\): n2 "
                     r"\(DOWN", rank0), rank0[-3000:]  # fmt: skip


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
    """ClusterFit through the launcher, with the config its pretrained run saved: after its
    first epoch `scancel --signal=USR2 --batch` signals the batch shell, which survives and
    forwards it to the ranks; the job checkpoints, is requeued and resumes without clustering
    again. `--resume` then continues it as clusterfit (the command the run was launched with),
    under USR2 to every process of the job from its last row on: it ends COMPLETED."""
    run_dir = tmp_path / "run"
    epochs = 12
    job = submit(slurm_cluster, "clusterfit", "--pretrained", str(pretrained),
                 f"run.dir={run_dir}", f"train.epochs={epochs}", "train.stop_check_every=1",
                 *slurm_args(2, 1))  # fmt: skip
    wait_first_row(run_dir, job)
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job)
    assert wait_done(slurm_cluster, job, run_dir, timeout=300) == "COMPLETED"
    assert restarts(slurm_cluster, job) >= 1
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
    wait_first_row(run_dir, again, epochs + 1)
    signalled = 0
    while slurm_cluster.sacct_state(again) in (None, "PENDING", "RUNNING"):
        res = slurm_cluster.run("scancel", "--signal=USR2", "--full", again, check=False)
        signalled += res.returncode == 0
        time.sleep(0.3)
    assert signalled >= 1
    assert wait_done(slurm_cluster, again, run_dir, timeout=240) == "COMPLETED"
    assert [r["epoch"] for r in rows_of(run_dir)] == list(range(epochs + 1))
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert rank0.count("ClusterFit: clustering") == 1, rank0[-3000:]
    assert "clusterfit, rank 0/2" in job_logs(run_dir, again)
