"""What submitit runs on every task of a SLURM job: one cluster-pipeline command, as one rank.

The job holds the command line and the config resolved when it was submitted (absolute run
directory and data path), so every task and every requeued attempt runs the same command in
the same run directory. A training command gets SLURM's USR2 (preemption, or the walltime
minus slurm.signal_delay_s) as a stop: every rank stops at the next step boundary, rank 0
writes the checkpoint, and then submitit's handler requeues the job, which continues from it.
The other commands keep submitit's own USR2 handler: rank 0 requeues the job, which runs the
command again from its start.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import submitit
import torch

from cluster_pipeline import cli
from cluster_pipeline.config import Config, ConfigError, SlurmConfig
from cluster_pipeline.run.stop import StopFlag, Stopped
from cluster_pipeline.training.methods import Requeue

log = logging.getLogger(__name__)

# The rendezvous port is a function of the job id: two jobs sharing a node whose ids differ by
# less than PORT_SPAN / 2 never collide, and a requeued attempt moves to the neighbouring port
# so it cannot meet a socket of its previous attempt still in TIME_WAIT.
PORT_BASE, PORT_SPAN = 20000, 40000


def rendezvous_port(job_id: int, restart_count: int) -> int:
    return PORT_BASE + (2 * job_id + restart_count % 2) % PORT_SPAN


def ranks_per_node(s: SlurmConfig) -> int:
    return s.gpus_per_node or s.tasks_per_node


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


def requeue_on_usr2(flag: StopFlag) -> Requeue:
    """USR2 recorded by `flag` instead of submitit's handler, which becomes the requeue callback
    that the training loop calls on rank 0 once every rank has left the process group. SIGTERM
    stays submitit's: ignored."""
    submitit_handler = flag.install([signal.SIGUSR2])[signal.SIGUSR2]

    def requeue(signum: int) -> bool:
        try:
            submitit_handler(signum, None)  # requeues, then sys.exit; raises if it cannot
        except SystemExit:
            return True
        return False

    return requeue


class CommandJob(submitit.helpers.Checkpointable):
    """The callable submitit runs on every task; its checkpoint() resubmits it unchanged.

    Resubmitting the same command and config is enough: the run directory holds the
    checkpoint, and a training command continues from it.
    """

    def __init__(self, argv: list[str], cfg: Config) -> None:
        self.argv, self.cfg = argv, cfg

    def __call__(self) -> str | None:
        env = submitit.JobEnvironment()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        os.environ["MASTER_PORT"] = str(rendezvous_port(int(os.environ["SLURM_JOB_ID"]), restart))
        # All of the node's GPUs stay visible: rank 0's k-means uses every one of them.
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        args = cli.build_parser().parse_args(self.argv)
        command = cli.configured_command(args.command)
        flag = StopFlag()
        requeue = requeue_on_usr2(flag) if command.trains else None
        node = os.environ.get("SLURMD_NODENAME", env.hostname)
        print(
            f"job {env.job_id} attempt {restart} (SLURM_RESTART_COUNT={restart}): "
            f"{args.command}, rank {env.global_rank}/{env.num_tasks} on node {node}, "
            f"rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            flush=True,
        )
        try:
            check_job_shape(self.cfg, env)
            out = command.run(args, self.cfg, flag, requeue)
        except Stopped as stop:
            print(f"rank {env.global_rank}: {stop}", flush=True)
            sys.exit(-1)  # as submitit does after a requeue: SLURM restarts the job
        except Exception:
            log.exception("rank %d failed", env.global_rank)
            raise
        return None if out is None else str(out)
