"""The process group: joined from the SLURM/submitit or torchrun environment, else one process;
and `process_group`, which owns set-up, naming a lost rank and teardown on every exit path.

With a world of one process no process group exists and each collective degenerates to a local
copy.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

# torch.distributed.nn's functions take `group=group.WORLD` as a default argument, bound when the
# module is first imported, and torch imports it lazily (an optimizer's first step pulls it in
# through torch._dynamo). Imported after the group exists, it would hold the group for good:
# destroy_process_group would not free it, gloo's worker threads would outlive `shutdown`, and one
# of them releasing a finished collective's tensor while the interpreter exits aborted ranks
# ("terminate called without an active exception"). Imported here, before any group exists.
import torch.distributed.nn

from cluster_pipeline.dist.heartbeat import Heartbeat, naming_lost_ranks, start_heartbeat

log = logging.getLogger(__name__)

# Seconds `shutdown` leaves the GIL to gloo's worker threads before the group is freed.
QUIESCE_S = 0.25


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    heartbeat: Heartbeat | None = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(*names: str) -> int | None:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def init_distributed(timeout_s: float, heartbeat_timeout_s: float) -> DistContext:
    """Join the process group described by the environment (torchrun or submitit), else run alone.

    torchrun and submitit's TorchDistributedEnvironment both export RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT; a plain `python -m cluster_pipeline` has none and is one process.
    `timeout_s` bounds a collective's wait for a live peer; a dead one is found by the heartbeat
    within `heartbeat_timeout_s` (0: no heartbeat); both come from the config's `dist` section.
    Prefer `process_group`, which also leaves the group. Collective: call on every rank.
    """
    heartbeat = None
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        log.info("rank %d/%d joined the %s process group", rank, world, backend)
        try:
            heartbeat = start_heartbeat(rank, world, heartbeat_timeout_s)
        except BaseException:
            leave_group(barrier=False)
            raise
    return DistContext(rank, world, local_rank, device, heartbeat)


def shutdown(ctx: DistContext) -> None:
    """Stop the heartbeat, then leave the process group. Collective: call on every rank.

    The barrier between the two keeps rank 0, which may host the rendezvous store, from leaving
    before every rank has said in the store that it is leaving, not lost, and every rank from
    tearing gloo down while a peer is still in a collective. Leaving frees the group and joins
    its worker threads (see the import of torch.distributed.nn above for what once kept it).

    Before leaving, this thread lets go of the GIL for QUIESCE_S: a gloo worker thread drops its
    reference to a finished collective's tensors only after the caller saw it finish, and that
    drop takes the GIL. Whoever frees the group (destroy_process_group, or DDP's reducer when
    the wrapper is freed later) joins the worker threads while holding the GIL, so a worker
    still dropping a tensor then waits on a thread that waits on it: a finished run that never
    exited, seen on a loaded machine. After the barrier no collective is issued; once the
    workers had a moment to take the GIL they are idle, and freeing the group is safe whenever
    it happens.
    """
    if ctx.heartbeat is not None:
        ctx.heartbeat.stop()
    if ctx.distributed:
        leave_group(barrier=True)


def abandon(ctx: DistContext) -> None:
    """Leave the process group without waiting for the other ranks: the exit on an error.

    No barrier, since a peer may be dead or still at work and would never reach one; this rank
    is marked as failed in the store (unless `shutdown` or `naming_lost_ranks` already said how
    it left), and the group is freed after the same pause as in `shutdown`. Not a collective.
    """
    if ctx.heartbeat is not None:
        ctx.heartbeat.stop(failed=True)
    if ctx.distributed:
        leave_group(barrier=False)


def in_group() -> bool:
    """Whether this process has joined a process group (its backend runs threads of its own)."""
    return tdist.is_initialized()


def leave_group(barrier: bool) -> None:
    """Leave this process's group, if it is in one, pausing QUIESCE_S first (see `shutdown`).

    `barrier`: first wait for every rank (the normal end; then a collective). Takes no context,
    for a harness that ran code which joined a group and did not leave it (tests' run_ranks).
    """
    if not tdist.is_initialized():
        return
    if barrier:
        tdist.barrier()
    time.sleep(QUIESCE_S)
    tdist.destroy_process_group()


@contextlib.contextmanager
def process_group(
    timeout_s: float,
    heartbeat_timeout_s: float,
    together: tuple[type[BaseException], ...] = (),
) -> Iterator[DistContext]:
    """The process group of a command, from `init_distributed` to teardown on every exit path.

    A normal end leaves through `shutdown` (a barrier: rank 0 hosts the store the others still
    talk to), as do the `together` exceptions, those every rank raises at the same point (a stop
    agreed over the ranks). Any other error is first explained by the heartbeat
    (`naming_lost_ranks`: RankLostError or RankFailedError when a peer is gone), then this rank
    leaves at once (`abandon`): a barrier could wait for a dead peer. Collective: enter on every
    rank.
    """
    ctx = init_distributed(timeout_s, heartbeat_timeout_s)
    try:
        with naming_lost_ranks(ctx.heartbeat, timeout_s):
            try:
                yield ctx
            except together:
                shutdown(ctx)
                raise
            shutdown(ctx)
    finally:
        abandon(ctx)  # nothing left to do after `shutdown`
