"""What SLURM says about itself: scontrol's records of partitions, nodes and jobs, and the
check of a job's request against the partition before it is submitted.

A request that cannot run (GPUs on a CPU partition, more CPUs than a node has) is refused by
sbatch with a traceback, or worse accepted and left pending forever (Reason=PartitionConfig);
`fit_request` names each mismatch in one line instead, and fills the slurm fields the config
leaves unset with what the partition's nodes have.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from cluster_pipeline.config import SlurmConfig

# Job states (squeue) of a job that still runs or will run again: its run directory is in use.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "SUSPENDED",
        "COMPLETING",
        "CONFIGURING",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
        "PREEMPTED",
    }
)


class ClusterError(RuntimeError):
    """SLURM could not be asked (scontrol missing or failing): the message says what it said."""


def scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as key -> value; a word without "=" belongs to the
    value before it (OS=Linux 6.1 #1 SMP, Reason=test [root@...])."""
    fields: dict[str, str] = {}
    key = ""
    for word in line.split():
        name, eq, value = word.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9_:/.]*", name):
            key = name
            fields[key] = value
        elif key:
            fields[key] += f" {word}"
    return fields


def scontrol_show(kind: str, name: str = "") -> list[dict[str, str]]:
    """`scontrol show KIND [NAME] -o` as records. Raises ClusterError when scontrol fails."""
    cmd = ["scontrol", "show", kind, *([name] if name else []), "-o"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ClusterError(f"{' '.join(cmd)}: {exc}") from None
    if res.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)}: {(res.stderr or res.stdout).strip()}")
    return [scontrol_record(line) for line in res.stdout.splitlines() if line.strip()]


def gpus_of(gres: str) -> int:
    """GPUs in a node's Gres field: 'gpu:8', 'gpu:a100:4(S:0-1),gpu:v100:2' or '(null)'."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def minutes_of(limit: str) -> int | None:
    """A time limit as scontrol prints it ([days-]hours:minutes:seconds, or minutes) in
    minutes; None when UNLIMITED/INFINITE."""
    if not limit or limit.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 1:
        return int(days or 0) * 1440 + parts[0]
    h, m, sec = ([0] * (3 - len(parts)) + parts)[-3:]
    return int(days or 0) * 1440 + h * 60 + m + (sec > 0)


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: tuple[Node, ...]
    max_time_min: int | None  # None: no limit
    names: tuple[str, ...] = ()  # every partition of the cluster


def read_partition(name: str = "") -> Partition:
    """The partition `name` (empty: the cluster's default one) and its nodes, from scontrol.
    Raises ClusterError if there is no such partition."""
    parts = scontrol_show("partition")
    names = tuple(p.get("PartitionName", "") for p in parts)
    chosen = [
        p for p in parts if (p.get("PartitionName") == name if name else p.get("Default") == "YES")
    ]
    if not chosen:
        raise ClusterError(
            f"slurm.partition={name}: no such partition; the cluster has {', '.join(names)}"
            if name
            else f"the cluster has no default partition; set slurm.partition (PARTITION=) to one "
            f"of {', '.join(names)}"
        )
    part = chosen[0]
    pname = part["PartitionName"]
    nodes = tuple(
        Node(
            name=n.get("NodeName", "?"),
            cpus=int(n.get("CPUTot", "0") or 0),
            mem_mb=int(n.get("RealMemory", "0") or 0),
            gpus=gpus_of(n.get("Gres", "")),
        )
        for n in scontrol_show("node")
        if pname in n.get("Partitions", "").split(",")
    )
    return Partition(pname, nodes, minutes_of(part.get("MaxTime", "")), names)


def fit_request(s: SlurmConfig, p: Partition) -> list[str]:
    """Fill the unset fields of `s` with what the partition's nodes have, then check the
    request against them: one line per mismatch, naming the key and what the partition has."""
    if not p.nodes:
        return [f"slurm.partition={p.name}: the partition has no nodes"]
    fewest_gpus = min(n.gpus for n in p.nodes)
    if s.gpus_per_node is None:  # one GPU per rank, as many as the nodes have
        s.gpus_per_node = (
            fewest_gpus if s.tasks_per_node is None else min(s.tasks_per_node, fewest_gpus)
        )
    if s.tasks_per_node is None:
        s.tasks_per_node = s.gpus_per_node or 1
    ranks = s.tasks_per_node
    if s.cpus_per_task is None:
        s.cpus_per_task = max(1, min(n.cpus for n in p.nodes) // ranks)
    part = f"the partition {p.name} has"
    errors = []
    most_gpus = max(n.gpus for n in p.nodes)
    if s.gpus_per_node and not most_gpus:
        errors.append(
            f"slurm.gpus_per_node={s.gpus_per_node}: {part} no GPUs (no gpu in its "
            f"nodes' Gres); GPUS_PER_NODE=0 runs a CPU job"
        )
    elif s.gpus_per_node > most_gpus:
        errors.append(
            f"slurm.gpus_per_node={s.gpus_per_node}: {part} at most {most_gpus} GPUs per node"
        )
    cpus = s.cpus_per_task * ranks
    most_cpus = max(n.cpus for n in p.nodes)
    if cpus > most_cpus:
        errors.append(
            f"slurm.cpus_per_task={s.cpus_per_task}: {ranks} task(s) per node need "
            f"{cpus} CPUs, but {part} at most {most_cpus} CPUs per node; lower "
            f"CPUS_PER_TASK to {max(1, most_cpus // ranks)}"
        )
    most_mem = max(n.mem_mb for n in p.nodes)
    if s.mem_gb and s.mem_gb * 1024 > most_mem:
        errors.append(
            f"slurm.mem_gb={s.mem_gb}: {part} at most {most_mem // 1024} GB "
            f"({most_mem} MB) per node"
        )
    fitting = [
        n
        for n in p.nodes
        if n.gpus >= s.gpus_per_node and n.cpus >= cpus and n.mem_mb >= s.mem_gb * 1024
    ]
    if not errors and len(fitting) < s.nodes:
        errors.append(
            f"slurm.nodes={s.nodes}: {part} {len(fitting)} node(s) with "
            f"{s.gpus_per_node} GPUs and {cpus} CPUs ({len(p.nodes)} in all)"
        )
    if p.max_time_min is not None and s.timeout_min > p.max_time_min:
        errors.append(
            f"slurm.timeout_min={s.timeout_min}: {part} MaxTime={p.max_time_min} "
            f"minutes; TIME={p.max_time_min} fits"
        )
    if 2 * s.signal_delay_s >= 60 * s.timeout_min:
        errors.append(
            f"slurm.signal_delay_s={s.signal_delay_s}: the time limit "
            f"slurm.timeout_min={s.timeout_min} is {60 * s.timeout_min} s; keep the "
            f"signal delay under half of it (raise TIME or lower SIGNAL_DELAY_S)"
        )
    return errors


def request_lines(s: SlurmConfig, p: Partition) -> list[str]:
    """What the dry run prints of the request and the partition it was checked against."""
    nodes = ", ".join(
        f"{n.name} ({n.cpus} CPUs, {n.gpus} GPUs, {n.mem_mb // 1024} GB)" for n in p.nodes
    )
    limit = "no limit" if p.max_time_min is None else f"MaxTime {p.max_time_min} min"
    return [
        f"partition {p.name}: {len(p.nodes)} node(s): {nodes}; {limit}",
        f"request: {s.nodes} node(s) x {s.tasks_per_node} task(s), {s.gpus_per_node} GPU(s) "
        f"and {s.cpus_per_task} CPU(s) per task, "
        + (f"{s.mem_gb} GB" if s.mem_gb else "the partition's default memory")
        + f" per node, {s.timeout_min} min, USR2 {s.signal_delay_s} s before the limit",
    ]


def sacct_state(job_id: str) -> str:
    """The job's accounting state ("COMPLETED", "CANCELLED", "NODE_FAIL"...; "CANCELLED by 0"
    as "CANCELLED"), "" when sacct cannot say (yet)."""
    cmd = ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    words = res.stdout.split()
    return words[0] if res.returncode == 0 and words else ""


def queued_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> state of those of `job_ids` that SLURM still has queued or running (squeue;
    sacct when squeue cannot answer)."""
    if not job_ids:
        return {}
    wanted = set(job_ids)
    try:
        res = subprocess.run(
            ["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        res = None
    if res is not None and res.returncode == 0:
        rows = [line.split() for line in res.stdout.splitlines()]
        return {r[0]: r[1] for r in rows if len(r) == 2 and r[0] in wanted}
    try:
        res = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ClusterError(f"neither squeue nor sacct answers: {exc}") from None
    if res.returncode != 0:
        raise ClusterError(f"neither squeue nor sacct answers: {res.stderr.strip()}")
    out = {}
    for line in res.stdout.splitlines():
        job, _, state = line.partition("|")
        state = state.split()[0] if state.split() else ""
        if job in wanted and state in ACTIVE_STATES:
            out[job] = state
    return out
