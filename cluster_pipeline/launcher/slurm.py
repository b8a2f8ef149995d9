"""Submit any cluster-pipeline command to SLURM through submitit: one rank per GPU (or per task
on CPU nodes), and a training command requeued on preemption.

    python -m launch.slurm [--wait] COMMAND ARGS...    the command line of `cluster-pipeline`
    python -m launch.slurm [--wait] --resume RUN_DIR [COMMAND] [key=value ...]

    python -m launch.slurm train --config configs/demo_mnist.yaml slurm.nodes=2
    python -m launch.slurm clusterfit --pretrained runs/r/checkpoints/epoch-0030.pt cluster.k=1000
    python -m launch.slurm evaluate --checkpoint runs/x/checkpoints/epoch-0100.pt slurm.nodes=1
    python -m launch.slurm --resume runs/demo_mnist-20261124-101500 train.epochs=200
    make launch COMMAND=clusterfit ARGS="--pretrained CKPT" NODES=8 PARTITION=learnlab

The command's arguments are checked and its config resolved here, before anything is
submitted; every SLURM option is a key of that config's `slurm:` section (key=value overrides
and the Make variables set them). Without a command name the arguments are train's (as before
this launcher ran other commands). make-shards and index have no config and are not launched.
--resume resubmits a training run from its last checkpoint with the config saved in its run
directory, as COMMAND, else as the command it was launched with (<run dir>/slurm/command.json),
else as train. On SIGTERM or USR2 a training command checkpoints and the job is requeued (by
SLURM, or through submitit); it continues in the same run directory and W&B run (see job.py).

Before it submits, the launcher reads the partition and checks the request against its nodes
(cluster.py): each mismatch is one line naming the key, and nothing is submitted (exit 2); the
slurm fields the config leaves unset get what fits. --dry-run prints the checks and the sbatch
script and submits nothing. A run directory whose job is still queued or running is refused
(one writer per run directory).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from cluster_pipeline import cli
from cluster_pipeline.config import Config, ConfigError, load_config
from cluster_pipeline.launcher.cluster import (
    ClusterError,
    Partition,
    fit_request,
    queued_states,
    read_partition,
    request_lines,
    sacct_state,
)
from cluster_pipeline.launcher.job import BATCH_SHELL_SETUP, CommandJob, ranks_per_node
from cluster_pipeline.run import lock
from cluster_pipeline.run.checkpoint import CheckpointError

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}  # fmt: skip
# States (sacct) of an attempt that SLURM may requeue: final only once the job left the queue.
REQUEUED_AFTER = {
    "NODE_FAIL": "a node of the job failed",
    "PREEMPTED": "the job was preempted",
    "REQUEUED": "the job was requeued",
}
# What a launch leaves in <run dir>/slurm: the command line it submitted, which --resume reads.
COMMAND_FILE = "command.json"


def slurm_parameters(cfg: Config) -> dict[str, Any]:
    """submitit's AutoExecutor parameters for the config's slurm section."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "name": s.job_name or cfg.name,
        "nodes": s.nodes,
        "tasks_per_node": ranks_per_node(s),
        # The batch shell survives stop signals sent to it and forwards them to the ranks.
        "slurm_setup": list(BATCH_SHELL_SETUP),
        "timeout_min": s.timeout_min,
        "slurm_signal_delay_s": s.signal_delay_s,
        # One rank that exits with an error ends the job step at once, instead of leaving
        # the others to wait for it in a collective.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
    }
    if s.cpus_per_task:  # unset only before check_request has fitted it to the partition
        params["cpus_per_task"] = s.cpus_per_task
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


def command_line(args: list[str], resume: str | None = None) -> list[str]:
    """The cluster-pipeline command line to submit: `args` as given, with `train` in front when
    they name no command; with `resume`, the run's training command on its saved config."""
    named = bool(args) and not args[0].startswith("-") and "=" not in args[0]
    if resume:
        name, overrides = (args[0], args[1:]) if named else (None, args)
        return resume_command_line(Path(resume), name, overrides)
    if named:
        cli.configured_command(args[0])  # an unknown name fails here, with the known ones
        return args
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        raise ConfigError("give --config FILE (make launch CONFIG=...) or --resume RUN_DIR")
    return ["train", *args]


def resume_command_line(run_dir: Path, name: str | None, overrides: list[str]) -> list[str]:
    """`name` (else the one the run was launched with, else train) on the run's config.yaml."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
    launched = run_dir / "slurm" / COMMAND_FILE
    if name is None:
        name = json.loads(launched.read_text())["command"] if launched.is_file() else "train"
    if not cli.configured_command(name).trains:
        trains = [n for n, c in cli.COMMANDS.items() if c.trains]
        raise ConfigError(
            f"--resume continues a training run, but {name} is not a training command; "
            f"give one of {', '.join(trains)}, or launch {name} again"
        )
    argv = [name, "--config", str(saved)]
    if name == "clusterfit":  # its weights are an argument; the saved config names them
        pretrained = load_config(saved).clusterfit.pretrained
        if not pretrained:
            raise ConfigError(f"--resume {run_dir}: {saved} has no clusterfit.pretrained")
        argv += ["--pretrained", pretrained]
    return [*argv, *overrides, f"run.dir={run_dir.resolve()}", "run.resume=true"]


def resolve_run(cfg: Config) -> Path:
    """Fix the run directory and the data path as absolute paths on the shared filesystem."""
    run_dir = Path(cfg.run.dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    cfg.run.dir = str(run_dir)
    cfg.data.shards = str(Path(cfg.data.shards).resolve())
    return run_dir


class SubmitError(RuntimeError):
    """The submission cannot go ahead; the message is the one line the user reads."""


def executor_for(run_dir: Path, cfg: Config) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(
        folder=run_dir / "slurm" / "%j",
        cluster="slurm",
        slurm_max_num_timeout=cfg.slurm.max_num_timeout,
    )
    executor.update_parameters(**slurm_parameters(cfg))
    return executor


def sbatch_script(run_dir: Path, cfg: Config) -> str:
    """The sbatch script `submit` would submit (submitit's own rendering of it)."""
    inner = executor_for(run_dir, cfg)._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")  # type: ignore[attr-defined]


def check_request(cfg: Config) -> Partition:
    """Fit cfg.slurm to its partition: fills the unset fields, raises SubmitError with one line
    per mismatch."""
    try:
        partition = read_partition(cfg.slurm.partition)
    except ClusterError as exc:
        raise SubmitError(str(exc)) from None
    errors = fit_request(cfg.slurm, partition)
    if errors:
        raise SubmitError("\n".join(errors))
    return partition


def check_one_writer(run_dir: Path) -> None:
    """Refuse a run directory that a job still queued or running writes to (its jobs are the
    folders of <run dir>/slurm and the lock's holder), or a live process on this host holds.
    A job that is only completing is given a few seconds to end."""
    folder = run_dir / "slurm"
    jobs = sorted(p.name for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    holder = lock.read_holder(run_dir)  # the run that writes it now, if any
    if holder is not None and not holder.get("job_id") and not lock.gone(holder):
        raise SubmitError(
            f"run directory {run_dir} is in use by {lock.describe(holder)}; it continues the "
            f"run itself: stop it first to submit a job on it"
        )
    if holder and holder.get("job_id") and str(holder["job_id"]) not in jobs:
        jobs.append(str(holder["job_id"]))
    deadline = time.monotonic() + 30
    while True:
        try:
            active = queued_states(jobs)
        except ClusterError as exc:
            raise SubmitError(f"cannot tell whether a job still writes {run_dir}: {exc}") from None
        if not active or any(st != "COMPLETING" for st in active.values()):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    if active:
        job, state = max(active.items(), key=lambda kv: int(kv[0]))
        raise SubmitError(
            f"run directory {run_dir} is in use: job {job} is {state}; it continues the run "
            f"itself (squeue -j {job}); scancel {job} first to submit another"
        )


def submit(argv: list[str], cfg: Config) -> tuple[submitit.Job, Path]:
    """Submit the command line `argv` with its resolved config; returns the job and the run
    directory, whose slurm/ folder gets submitit's files and the command line. A failed
    submission raises SubmitError and removes the run directory if it made it."""
    run_dir = resolve_run(cfg)
    check_one_writer(run_dir)
    made = not run_dir.exists()
    try:
        (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
        (run_dir / "slurm" / COMMAND_FILE).write_text(
            json.dumps({"command": argv[0], "argv": argv}, indent=1) + "\n"
        )
        # submitit prints sbatch's stderr before it raises; the error says it in one line
        with contextlib.redirect_stderr(io.StringIO()):
            return executor_for(run_dir, cfg).submit(CommandJob(argv, cfg)), run_dir
    except (
        submitit.core.utils.FailedJobError,
        submitit.core.utils.FailedSubmissionError,
        subprocess.SubprocessError,
        OSError,
    ) as exc:
        if made:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise SubmitError(f"sbatch refused the job: {sbatch_error(str(exc))}") from None


def sbatch_error(message: str) -> str:
    """The line of sbatch's output that says what is wrong."""
    lines = [x.strip() for x in message.splitlines() if x.strip()]
    said = [x for x in lines if "error:" in x]
    return "; ".join(dict.fromkeys(said)) if said else (lines[-1] if lines else "no output")


def describe(job: submitit.Job, run_dir: Path, cfg: Config, command: str) -> str:
    n = cfg.slurm.nodes * ranks_per_node(cfg.slurm)
    slurm_logs = f"{run_dir}/slurm/{job.job_id}"
    lines = [
        f"submitted job {job.job_id}: {command}, {cfg.slurm.nodes} node(s) x "
        f"{ranks_per_node(cfg.slurm)} rank(s), config {cfg.name}",
        f"run directory: {run_dir}",
        f"slurm logs:    {slurm_logs}/{job.job_id}_<rank>_log.out|err",
    ]
    if not cli.configured_command(command).trains:
        return "\n".join([*lines, f"follow:        squeue -j {job.job_id}; "
                          f"tail -f {slurm_logs}/{job.job_id}_0_log.out"])  # fmt: skip
    return "\n".join([
        *lines[:2],
        f"rank logs:     {run_dir}/logs/rank0.log .. rank{n - 1}.log",
        lines[2],
        f"metrics:       {run_dir}/metrics.jsonl (W&B run id in {run_dir}/wandb)",
        f"follow:        squeue -j {job.job_id}; tail -f {run_dir}/logs/rank0.log",
        f"resume:        make launch RESUME={run_dir}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage="python -m launch.slurm [--wait] [--resume RUN_DIR] [COMMAND] [ARGS ...]",
    )  # fmt: skip
    parser.add_argument("--resume", help="run directory to continue from its last checkpoint")
    parser.add_argument("--wait", action="store_true", help="block until the job ends")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the request, print the sbatch script; submit nothing",
    )
    # Everything else is the command line of cluster-pipeline, parsed by its own parser.
    opts, rest = parser.parse_known_args(argv)
    if shutil.which("sbatch") is None:
        print(
            "launch: no SLURM here (sbatch is not on PATH). make launch submits to a SLURM "
            "cluster; for a run on this machine use `make demo` or "
            "`python -m launch.local --nproc 2 train --config CONFIG`.",
            file=sys.stderr,
        )
        return 2
    try:
        command = command_line(rest, opts.resume)
        args = cli.build_parser().parse_args(command)  # a usage error exits 2 here
        cfg = cli.configured_command(args.command).config(args)
    except (ConfigError, FileNotFoundError, CheckpointError) as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return 2
    try:
        partition = check_request(cfg)
        if opts.dry_run:
            run_dir = Path(cfg.run.dir or f"runs/{cfg.name}-<timestamp>").resolve()
            if cfg.run.dir:
                check_one_writer(run_dir)
            lines = request_lines(cfg.slurm, partition)
            print(
                "\n".join(
                    [
                        *lines,
                        "checks: the request fits the partition",
                        f"run directory: {run_dir} (not created)",
                        "",
                        sbatch_script(run_dir, cfg),
                    ]
                )
            )
            print("dry run: nothing submitted")
            return 0
        job, run_dir = submit(command, cfg)
    except SubmitError as exc:
        for line in str(exc).splitlines():
            print(f"launch: error: {line}", file=sys.stderr)
        return 2
    print(describe(job, run_dir, cfg, args.command), flush=True)
    if opts.wait:
        state = wait_for_end(job.job_id)
        print(f"job {job.job_id} ended: {state}")
        return 0 if state == "COMPLETED" else 1
    return 0


def wait_for_end(job_id: str, poll_s: float = 5.0) -> str:
    """Poll SLURM until the job (requeues included) reaches a final state. A state that SLURM
    may requeue (NODE_FAIL, PREEMPTED) is final only once the job has left the queue."""
    said = ""
    while True:
        try:
            queued = queued_states([job_id]).get(job_id)
        except ClusterError:  # SLURM does not answer for now: ask again
            time.sleep(poll_s)
            continue
        state = sacct_state(job_id)
        final, line = judge_state(job_id, queued, state)
        if line and line != said:
            print(line, flush=True)
            said = line
        if final:
            return state
        time.sleep(poll_s)


def judge_state(job_id: str, queued: str | None, accounted: str) -> tuple[bool, str]:
    """Whether the job has ended, given its squeue state (None: not queued) and its sacct
    state; and a line to print about a failure SLURM may have requeued."""
    if queued is not None:
        if accounted in REQUEUED_AFTER:
            return False, (
                f"job {job_id}: {accounted}: {REQUEUED_AFTER[accounted]}; SLURM "
                f"requeued it ({queued}), waiting"
            )
        return False, ""
    if accounted in REQUEUED_AFTER and accounted != "REQUEUED":
        return True, f"job {job_id}: {accounted}: {REQUEUED_AFTER[accounted]}; not requeued"
    return accounted in FINAL_STATES, ""
