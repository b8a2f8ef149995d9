"""Submit a run to SLURM through submitit: one rank per GPU, requeued on preemption.

    make launch NODES=8 GPUS_PER_NODE=8 CONFIG=configs/deepcluster_alexnet_imagenet.yaml \\
        PARTITION=learnlab ACCOUNT=myteam
    python -m launch.slurm --config configs/demo_mnist.yaml slurm.nodes=2 slurm.gpus_per_node=0
    python -m launch.slurm --resume runs/demo_mnist-20261124-101500

Every SLURM option is a key of the config's `slurm:` section (see cluster_pipeline/config.py);
`key=value` overrides and the Make variables set them. On SLURM's USR2 (preemption, or the
walltime minus slurm.signal_delay_s) every rank stops at the next step boundary, rank 0 writes
the checkpoint, and submitit requeues the job, which continues in the same run directory and
W&B run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import submitit
import torch

from cluster_pipeline.config import Config, ConfigError, SlurmConfig, load_config
from cluster_pipeline.run.stop import StopFlag, Stopped
from cluster_pipeline.training.methods import run_deepcluster

log = logging.getLogger("cluster_pipeline.launch")

# The rendezvous port is a function of the job id: two jobs sharing a node whose ids differ by
# less than PORT_SPAN / 2 never collide, and a requeued attempt moves to the neighbouring port
# so it cannot meet a socket of its previous attempt still in TIME_WAIT.
PORT_BASE, PORT_SPAN = 20000, 40000
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}  # fmt: skip


def rendezvous_port(job_id: int, restart_count: int) -> int:
    return PORT_BASE + (2 * job_id + restart_count % 2) % PORT_SPAN


def ranks_per_node(s: SlurmConfig) -> int:
    return s.gpus_per_node or s.tasks_per_node


def slurm_parameters(cfg: Config) -> dict[str, Any]:
    """submitit's AutoExecutor parameters for the config's slurm section."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "name": s.job_name or cfg.name,
        "nodes": s.nodes,
        "tasks_per_node": ranks_per_node(s),
        "cpus_per_task": s.cpus_per_task,
        "timeout_min": s.timeout_min,
        "slurm_signal_delay_s": s.signal_delay_s,
        # One rank that exits with an error ends the job step at once, instead of leaving
        # the others to wait for it in a collective.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.additional_parameters:
        params["slurm_additional_parameters"] = dict(s.additional_parameters)
    return params


def check_job_shape(cfg: Config, env: submitit.JobEnvironment) -> None:
    """The job SLURM gave us must be the one the config asked for; say which key differs."""
    s = cfg.slurm
    want = s.nodes * ranks_per_node(s)
    if env.num_nodes != s.nodes or env.num_tasks != want:
        raise ConfigError(
            f"slurm.nodes={s.nodes} x {ranks_per_node(s)} ranks per node asks for {want} tasks "
            f"on {s.nodes} nodes, but the job has {env.num_tasks} tasks on {env.num_nodes} nodes"
        )
    if s.gpus_per_node and torch.cuda.device_count() < s.gpus_per_node:
        raise ConfigError(
            f"slurm.gpus_per_node={s.gpus_per_node} but node {env.hostname} shows "
            f"{torch.cuda.device_count()} GPUs to rank {env.global_rank}"
        )


class TrainJob(submitit.helpers.Checkpointable):
    """The callable submitit runs on every task; its checkpoint() resubmits it unchanged.

    Resubmitting the same config is enough: the run directory holds the checkpoint, and
    `run_deepcluster` continues from it.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        os.environ["MASTER_PORT"] = str(rendezvous_port(int(os.environ["SLURM_JOB_ID"]), restart))
        # All of the node's GPUs stay visible: rank 0's k-means uses every one of them.
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        flag = StopFlag()
        # USR2 means preemption or timeout: stop at a step boundary, then submitit's handler
        # (checkpoint() + scontrol requeue) on rank 0. SIGTERM stays submitit's: ignored.
        submitit_handler = flag.install([signal.SIGUSR2])[signal.SIGUSR2]

        def requeue(signum: int) -> bool:
            try:
                submitit_handler(signum, None)  # requeues, then sys.exit; raises if it cannot
            except SystemExit:
                return True
            return False

        node = os.environ.get("SLURMD_NODENAME", env.hostname)
        print(
            f"job {env.job_id} attempt {restart} (SLURM_RESTART_COUNT={restart}): rank "
            f"{env.global_rank}/{env.num_tasks} on node {node}, rendezvous "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            flush=True,
        )
        try:
            check_job_shape(self.cfg, env)
            return str(run_deepcluster(self.cfg, flag, requeue))
        except Stopped as stop:
            print(f"rank {env.global_rank}: {stop}", flush=True)
            sys.exit(-1)  # as submitit does after a requeue: SLURM restarts the job
        except Exception:
            log.exception("rank %d failed", env.global_rank)
            raise


def resolve_run(cfg: Config) -> Path:
    """Fix the run directory and the data path as absolute paths on the shared filesystem."""
    run_dir = Path(cfg.run.dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    cfg.run.dir = str(run_dir)
    cfg.data.shards = str(Path(cfg.data.shards).resolve())
    return run_dir


def submit(cfg: Config) -> tuple[submitit.Job, Path]:
    """Submit the run; returns the job and its run directory."""
    run_dir = resolve_run(cfg)
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(
        folder=run_dir / "slurm" / "%j",
        cluster="slurm",
        slurm_max_num_timeout=cfg.slurm.max_num_timeout,
    )
    executor.update_parameters(**slurm_parameters(cfg))
    return executor.submit(TrainJob(cfg)), run_dir


def describe(job: submitit.Job, run_dir: Path, cfg: Config) -> str:
    n = cfg.slurm.nodes * ranks_per_node(cfg.slurm)
    return "\n".join([
        f"submitted job {job.job_id}: {cfg.slurm.nodes} node(s) x "
        f"{ranks_per_node(cfg.slurm)} rank(s), config {cfg.name}",
        f"run directory: {run_dir}",
        f"rank logs:     {run_dir}/logs/rank0.log .. rank{n - 1}.log",
        f"slurm logs:    {run_dir}/slurm/{job.job_id}/{job.job_id}_<rank>_log.out|err",
        f"metrics:       {run_dir}/metrics.jsonl (W&B run id in {run_dir}/wandb)",
        f"follow:        squeue -j {job.job_id}; tail -f {run_dir}/logs/rank0.log",
        f"resume:        make launch RESUME={run_dir}",
    ])  # fmt: skip


def launch_config(config: str | None, resume: str | None, overrides: list[str]) -> Config:
    """The config to submit: a file and overrides, or a run directory's own config to resume."""
    if resume:
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; is it a run directory?")
        here = [f"run.dir={Path(resume).resolve()}", "run.resume=true"]
        return load_config(saved, [*overrides, *here])
    if not config:
        raise ConfigError("give --config FILE (make launch CONFIG=...) or --resume RUN_DIR")
    return load_config(config, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML config, e.g. configs/demo_mnist.yaml")
    parser.add_argument("--resume", help="run directory to continue from its last checkpoint")
    parser.add_argument("--wait", action="store_true", help="block until the job ends")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. slurm.nodes=8 cluster.k=100")
    args = parser.parse_args(argv)
    if shutil.which("sbatch") is None:
        print(
            "launch: no SLURM here (sbatch is not on PATH). make launch submits to a SLURM "
            "cluster; for a run on this machine use `make demo` or "
            "`python -m launch.local --nproc 2 train --config CONFIG`.",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = launch_config(args.config, args.resume, args.overrides)
    except ConfigError as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return 2
    job, run_dir = submit(cfg)
    print(describe(job, run_dir, cfg), flush=True)
    if args.wait:
        state = wait_for_end(job)
        print(f"job {job.job_id} ended: {state}")
        return 0 if state == "COMPLETED" else 1
    return 0


def wait_for_end(job: submitit.Job, poll_s: float = 5.0) -> str:
    """Poll SLURM's accounting until the job (requeues included) reaches a final state."""
    while True:
        state = job.watcher.get_state(job.job_id, mode="force").split()[0]
        if state in FINAL_STATES:
            return state
        time.sleep(poll_s)


if __name__ == "__main__":
    sys.exit(main())
