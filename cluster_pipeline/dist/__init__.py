"""The only package that imports torch.distributed (a ruff banned-api rule sees to it).

    group        the process group: joined from SLURM/submitit or torchrun, else one process;
                 `process_group` owns set-up, naming a lost rank and teardown on every exit
    heartbeat    the failure detector that names a rank that is gone
    collectives  one core per operation (all_reduce, all_gather, gather, broadcast, ...),
                 whatever the dtype
    ddp          DistributedDataParallel, and BatchNorm buffers from rank 0
    errors       RankLostError, RankFailedError and the exit statuses they stand for

A function that is a collective says "Collective: call on every rank" in its docstring. The
protocols of a domain live beside it and call only these: the exactly-once feature gather
(features/gather.py), the sharded k-means reductions (clustering/ranks.py). Callers write
`dist.X`.
"""

from cluster_pipeline.dist.collectives import (
    REDUCE_CHUNK,
    all_gather,
    all_gather_counts,
    all_reduce,
    barrier,
    broadcast,
    broadcast_string,
    gather,
    on_rank0,
    raise_if_any_rank_failed,
    recv,
    send,
)
from cluster_pipeline.dist.ddp import broadcast_buffers, wrap_ddp
from cluster_pipeline.dist.errors import (
    EXIT_RANK_LOST,
    RankFailedError,
    RankLostError,
    error_line,
    exit_status_of,
)
from cluster_pipeline.dist.group import (
    QUIESCE_S,
    DistContext,
    abandon,
    in_group,
    init_distributed,
    leave_group,
    process_group,
    shutdown,
)
from cluster_pipeline.dist.heartbeat import Heartbeat

__all__ = [
    "EXIT_RANK_LOST",
    "QUIESCE_S",
    "REDUCE_CHUNK",
    "DistContext",
    "Heartbeat",
    "RankFailedError",
    "RankLostError",
    "abandon",
    "in_group",
    "all_gather",
    "all_gather_counts",
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_buffers",
    "broadcast_string",
    "error_line",
    "exit_status_of",
    "gather",
    "init_distributed",
    "leave_group",
    "on_rank0",
    "process_group",
    "raise_if_any_rank_failed",
    "recv",
    "send",
    "shutdown",
    "wrap_ddp",
]
