"""What submitit runs on every task of a SLURM job: one cluster-pipeline command, as one rank.

The job holds the command line and the config resolved when it was submitted (absolute run
directory and data path), so every task and every requeued attempt runs the same command in
the same run directory.

A training command takes both of SLURM's stop signals as a stop: SIGTERM (`scontrol requeue`,
preemption, a node failure, `scancel`) and USR2 (slurm.signal_delay_s before the walltime,
preemption with PreemptParameters=send_user_signal, `scancel --signal=USR2`). Every rank stops
at the next step boundary and rank 0 writes the checkpoint; then rank 0 asks SLURM what is
happening to the job (`requeue_on_stop`): a job SLURM requeues already is left to it, a
cancelled one stays cancelled, any other is requeued through submitit's handler. The other
commands keep submitit's own USR2 handler: rank 0 requeues the job, which runs the command
again from its start. A command that has done its work ignores every stop signal from then on,
so that a signal arriving while it exits cannot turn a finished job into a failed one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import submitit
import torch

from cluster_pipeline import cli
from cluster_pipeline.config import Config, ConfigError, SlurmConfig, load_config, to_yaml
from cluster_pipeline.dist.errors import RankLostError
from cluster_pipeline.launcher.cluster import ClusterError, sacct_state, scontrol_show
from cluster_pipeline.run.lock import RunDirInUse
from cluster_pipeline.run.stop import SLURM_SIGNALS, StopFlag, Stopped, ignore_stop_signals
from cluster_pipeline.training.methods import Requeue

log = logging.getLogger(__name__)

# The rendezvous port is a function of the job id: two jobs sharing a node whose ids differ by
# less than PORT_SPAN / 2 never collide, and a requeued attempt moves to the neighbouring port
# so it cannot meet a socket of its previous attempt still in TIME_WAIT.
PORT_BASE, PORT_SPAN = 20000, 40000
# Node states (scontrol show node) in which a node has failed the jobs it ran.
FAILED_NODE_STATES = ("DOWN", "FAIL", "NOT_RESPONDING", "POWER_DOWN", "POWERED_DOWN")
# What a job submitted by launch.slurm runs in its batch shell before its srun line. By default
# a stop signal sent to the batch shell (scancel --signal=USR2 --batch or --full, or
# `#SBATCH --signal=B:USR2@N`) kills it, and the job ends FAILED without a checkpoint; here the
# shell traps USR2 and TERM and forwards them to the job's steps, where the ranks take them as
# a stop. bash runs a trap only once its foreground child has ended, so srun runs in the
# background and the shell waits for it; `wait` returns early on a trapped signal, hence the
# loop, and one last `wait` collects srun's status if it ended in the meantime. The forward
# gives up after 3 s: when SLURM requeues the job itself (scontrol requeue, a node failure)
# scancel answers "Job can not be altered now, try again later" and retries, and the trap held
# the batch shell until KillWait (30 s by default) ran out; SLURM signals the steps then itself.
BATCH_SHELL_SETUP = [
    'forward_to_steps() { timeout 3 scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || true; }',
    "trap 'forward_to_steps USR2' USR2",
    "trap 'forward_to_steps TERM' TERM",
    "srun() {",
    '  command srun "$@" &',
    "  local pid=$! rc last",
    "  while :; do",
    '    wait "$pid"; rc=$?',
    '    [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null || break',
    "  done",
    '  wait "$pid" 2>/dev/null; last=$?',
    '  [ "$last" -eq 127 ] || rc=$last',
    '  return "$rc"',
    "}",
]


def rendezvous_port(job_id: int, restart_count: int) -> int:
    return PORT_BASE + (2 * job_id + restart_count % 2) % PORT_SPAN


def ranks_per_node(s: SlurmConfig) -> int:
    """One rank per task: slurm.tasks_per_node when given, else one per GPU, else one."""
    return s.tasks_per_node or s.gpus_per_node or 1


def check_job_shape(cfg: Config, env: submitit.JobEnvironment) -> None:
    """The job SLURM gave us must be the one the config asked for; say which key differs."""
    s = cfg.slurm
    nodes, per_node = s.nodes, ranks_per_node(s)
    want = nodes * per_node
    if env.num_nodes != nodes or env.num_tasks != want:
        raise ConfigError(
            f"slurm.nodes={nodes} x {per_node} ranks per node asks for {want} tasks "
            f"on {nodes} nodes, but the job has {env.num_tasks} tasks on {env.num_nodes} nodes"
        )
    if s.gpus_per_node and torch.cuda.device_count() < s.gpus_per_node:
        raise ConfigError(
            f"slurm.gpus_per_node={s.gpus_per_node} but node {env.hostname} shows "
            f"{torch.cuda.device_count()} GPUs to rank {env.global_rank}"
        )


def shown(kind: str, name: str) -> list[dict[str, str]]:
    """`scontrol show KIND NAME` as records; [] when scontrol cannot answer (a failed node)."""
    try:
        return scontrol_show(kind, name)
    except ClusterError:
        return []


def failed_nodes(nodes: list[dict[str, str]]) -> list[str]:
    """'n2 (DOWN, Reason=test)' for each node of `nodes` that is down or failing."""
    out = []
    for node in nodes:
        state = node.get("State", "")
        if any(s in state.replace("*", "").split("+") for s in FAILED_NODE_STATES):
            reason = node.get("Reason", "")
            out.append(
                f"{node.get('NodeName', '?')} ({state}" + (f", Reason={reason})" if reason else ")")
            )
        elif state.endswith("*"):  # not responding
            out.append(f"{node.get('NodeName', '?')} ({state}, not responding)")
    return out


def slurm_requeues(job: dict[str, str], attempt: int) -> bool:
    """Whether SLURM has requeued this attempt's job already (scontrol requeue, a preemption
    past its GraceTime, a node failure): its restart count moved past this attempt's."""
    restarts = job.get("Restarts", "0")
    return restarts.isdigit() and int(restarts) > attempt


def situation(job: dict[str, str], failed: list[str], attempt: int) -> str:
    """One line for rank 0's log from scontrol's record of the job and its failed nodes: the
    job's state, whether it is preempted, whether SLURM has requeued it, which nodes failed."""
    state = job.get("JobState", "?")
    preempted = job.get("PreemptTime", "None")
    if preempted not in ("", "None", "Unknown"):
        state += f", preempted at {preempted}"
    requeued = (
        "SLURM has requeued it" if slurm_requeues(job, attempt) else "SLURM has not requeued it"
    )
    line = f"job {job.get('JobId', '?')} attempt {attempt}: {state}; {requeued}"
    return line + (f"; failed node(s): {', '.join(failed)}" if failed else "")


def node_events(names: str, since: float) -> list[str]:
    """'n2 (DOWN, Reason=test)' for each node of `names` that went down since `since` (SLURM's
    accounting keeps the event after the node is back: ReturnToService may resume it within
    a second); [] when sacctmgr cannot say."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 1))
    cmd = ["sacctmgr", "-n", "-P", "list", "events", f"nodes={names}", f"start={start}",
           "format=NodeName,State,Reason"]  # fmt: skip
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    events = [line.split("|") for line in res.stdout.splitlines() if line.count("|") == 2]
    said = [f"{n} ({st}, Reason={why})" if why else f"{n} ({st})" for n, st, why in events if n]
    return list(dict.fromkeys(said)) if res.returncode == 0 else []


def failed_nodes_of(job: dict[str, str], since: float, settle_s: float = 0.0) -> list[str]:
    """The nodes of this attempt (SLURM_JOB_NODELIST: a requeued job's record may have lost
    the node that failed) that are down now or went down since `since`. With `settle_s`, asks
    again for that long while none is found: a node can be back (ReturnToService) before
    slurmdbd has the event that it went down."""
    names = os.environ.get("SLURM_JOB_NODELIST") or job.get("NodeList", "")
    if not names or names == "(null)":
        return []
    deadline = time.monotonic() + settle_s
    while True:
        now = failed_nodes(shown("node", names))
        down = {x.split()[0] for x in now}
        found = now + [x for x in node_events(names, since) if x.split()[0] not in down]
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


def job_situation(job_id: str, attempt: int, since: float) -> str:
    """`situation` of the job as SLURM shows it now."""
    jobs = shown("job", job_id)
    if not jobs:
        return f"job {job_id} attempt {attempt}: scontrol cannot show it"
    return situation(jobs[0], failed_nodes_of(jobs[0], since, 3.0), attempt)


Handler = Callable[[int, object], object]


def requeue_on_stop(flag: StopFlag) -> Requeue:
    """SIGTERM and USR2 recorded by `flag` instead of submitit's handlers (SIGTERM's ignored
    it). Returns the requeue callback that the training loop calls on rank 0 once every rank
    has left the process group: it requeues the job through submitit's USR2 handler unless
    SLURM requeues it already or it was cancelled."""
    submitit_handler: Handler = flag.install(SLURM_SIGNALS)[signal.SIGUSR2]
    since = time.time()  # this attempt's start, near enough

    def requeue(signum: int) -> bool:
        job_id = os.environ.get("SLURM_JOB_ID", "")
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        jobs = shown("job", job_id) if job_id else []
        if jobs:
            job = jobs[0]
            if slurm_requeues(job, attempt):  # nothing to do but say why: a failed node?
                log.warning("%s", situation(job, failed_nodes_of(job, since, 3.0), attempt))
                return True  # the requeued job continues from the checkpoint
            log.warning("%s", situation(job, failed_nodes_of(job, since), attempt))
            if job.get("JobState") != "RUNNING" and sacct_state(job_id) == "CANCELLED":
                log.warning("job %s was cancelled: not requeued; make launch RESUME=<run dir> "
                            "continues it", job_id)  # fmt: skip
                return False
            log.warning("job %s: requeueing it", job_id)
        try:
            submitit_handler(signum, None)  # requeues, then sys.exit; raises if it cannot
        except SystemExit:
            return True
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning(
                "job %s: could not requeue it (%s); make launch RESUME=<run dir> continues it",
                job_id,
                exc,
            )
        return False

    return requeue


class CommandJob(submitit.helpers.Checkpointable):
    """The callable submitit runs on every task; its checkpoint() resubmits it unchanged.

    Resubmitting the same command and config is enough: the run directory holds the
    checkpoint, and a training command continues from it.
    """

    def __init__(self, argv: list[str], cfg: Config) -> None:
        # The config travels as its YAML, not as a pickled Config: an attempt requeued after
        # the code gained a config field (a `git pull` on the shared file system while the job
        # waits) reads it with that field's default instead of failing on the missing attribute.
        self.argv, self.cfg_yaml = argv, to_yaml(cfg)

    @property
    def cfg(self) -> Config:
        return load_config(None, text=self.cfg_yaml, origin="the job's config")

    def __call__(self) -> str | None:
        started = time.time()
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
        requeue = requeue_on_stop(flag) if command.trains else None
        node = os.environ.get("SLURMD_NODENAME", env.hostname)
        print(
            f"job {env.job_id} attempt {restart} (SLURM_RESTART_COUNT={restart}): "
            f"{args.command}, rank {env.global_rank}/{env.num_tasks} on node {node}, "
            f"rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            flush=True,
        )
        try:
            cfg = self.cfg
            check_job_shape(cfg, env)
            out = command.run(args, cfg, flag, requeue)
        except Stopped as stop:
            print(f"rank {env.global_rank}: {stop}", flush=True)
            sys.exit(-1)  # as submitit does after a requeue: SLURM restarts the job
        except RunDirInUse as exc:  # another run writes the run directory: one line, no trace
            log.error("rank %d: %s", env.global_rank, exc)
            sys.exit(exc.exit_status)
        except RankLostError:
            log.exception("rank %d failed", env.global_rank)
            log.error("%s", job_situation(str(env.job_id), restart, started))
            raise
        except Exception:
            log.exception("rank %d failed", env.global_rank)
            raise
        ignore_stop_signals()  # done: a signal from now on must not fail the job
        return None if out is None else str(out)
