"""The collectives: one core per operation, whatever the dtype.

Arrays travel as tensors of their own dtype (never pickled); a CUDA run moves them over NCCL on
the rank's GPU, a CPU run over gloo. A function that is a collective says "Collective: call on
every rank" in its docstring; with a world of one each is a local copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

import numpy as np
import torch
import torch.distributed as tdist
from numpy.typing import DTypeLike

from cluster_pipeline.dist.errors import RankFailedError, error_line, exit_status_of
from cluster_pipeline.dist.group import DistContext

log = logging.getLogger(__name__)
T = TypeVar("T")

ReduceOp = Literal["sum", "max", "min"]
_OPS = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
# Elements per message of `all_reduce`: 64 MiB of float64, so a 10k x 10k matrix of sums
# (800 MB) needs no second copy in the backend's buffers.
REDUCE_CHUNK = 8 << 20


def _comm_device(ctx: DistContext) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")


def _torch_dtype(dtype: DTypeLike) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _to_comm(ctx: DistContext, values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values)).to(_comm_device(ctx))


def barrier(ctx: DistContext) -> None:
    """Collective: call on every rank."""
    if ctx.distributed:
        tdist.barrier()


@overload
def all_reduce(ctx: DistContext, values: np.ndarray, op: ReduceOp = "sum") -> np.ndarray: ...
@overload
def all_reduce(ctx: DistContext, values: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor: ...
def all_reduce(
    ctx: DistContext, values: np.ndarray | torch.Tensor, op: ReduceOp = "sum"
) -> np.ndarray | torch.Tensor:
    """Element-wise `op` over ranks of an array of any shape and dtype; int64 sums are exact and
    independent of the reduction order (sharded k-means' fixed-point sums).

    A tensor is reduced in place, where it lies (gloo reduces a CUDA tensor through a CPU
    copy), and returned; an array comes back as a new array of its dtype. Either travels in
    chunks of REDUCE_CHUNK elements, so a large one needs no second copy in the backend.
    Collective: call on every rank.
    """
    if not ctx.distributed:
        return values
    if isinstance(values, np.ndarray):
        return all_reduce(ctx, torch.from_numpy(np.array(values, order="C")), op).numpy()
    if not values.is_contiguous():
        raise ValueError("all_reduce needs a contiguous tensor")
    dev = _comm_device(ctx)
    flat = values.view(-1)
    for s in range(0, flat.numel(), REDUCE_CHUNK):
        part = flat[s : s + REDUCE_CHUNK]
        if part.device == dev:
            tdist.all_reduce(part, op=_OPS[op])
        else:
            staged = part.to(dev)
            tdist.all_reduce(staged, op=_OPS[op])
            part.copy_(staged)
    return values


def _all_gather_same(ctx: DistContext, mine: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor of one shape, in rank order: the one all-gather."""
    out = [torch.empty_like(mine) for _ in range(ctx.world)]
    tdist.all_gather(out, mine)
    return out


def all_gather_counts(ctx: DistContext, count: int) -> list[int]:
    """Each rank's `count`, in rank order (e.g. rows per rank). Collective: call on every rank."""
    if not ctx.distributed:
        return [count]
    mine = torch.tensor([count], dtype=torch.int64, device=_comm_device(ctx))
    return [int(t.item()) for t in _all_gather_same(ctx, mine)]


def all_gather(ctx: DistContext, values: np.ndarray) -> list[np.ndarray]:
    """Every rank's `values`, in rank order, on every rank; the lengths (first axis) may differ,
    the rest of the shape and the dtype may not. Collective: call on every rank."""
    values = np.ascontiguousarray(values)
    if not ctx.distributed:
        return [values]
    counts = all_gather_counts(ctx, len(values))
    mine = torch.from_numpy(values)
    padded = torch.zeros((max(max(counts), 1), *mine.shape[1:]), dtype=mine.dtype,
                         device=_comm_device(ctx))  # fmt: skip
    padded[: len(values)] = mine.to(padded.device)
    out = _all_gather_same(ctx, padded)
    return [t[:n].cpu().numpy() for t, n in zip(out, counts, strict=True)]


def send(ctx: DistContext, values: np.ndarray, dst: int) -> None:
    """Point to point: `values` to rank `dst`, which calls `recv` with their shape and dtype."""
    tdist.send(_to_comm(ctx, values), dst=dst)


def recv(ctx: DistContext, shape: tuple[int, ...], dtype: DTypeLike, src: int) -> np.ndarray:
    """Point to point: the array rank `src` sends with `send`."""
    t = torch.empty(shape, dtype=_torch_dtype(dtype), device=_comm_device(ctx))
    tdist.recv(t, src=src)
    return t.cpu().numpy()


def gather(ctx: DistContext, values: np.ndarray) -> list[np.ndarray] | None:
    """Every rank's `values` on rank 0, in rank order (lengths may differ, as in `all_gather`);
    None elsewhere. Only rank 0 holds them all: for a bounded amount, or in turns. Collective:
    call on every rank.
    """
    values = np.ascontiguousarray(values)
    counts = all_gather_counts(ctx, len(values))
    parts = [values] if ctx.is_main else None
    for src in range(1, ctx.world):
        if ctx.rank == src and counts[src]:
            send(ctx, values, dst=0)
        elif parts is not None:
            shape = (counts[src], *values.shape[1:])
            part = recv(ctx, shape, values.dtype, src) if counts[src] else None
            parts.append(np.empty(shape, values.dtype) if part is None else part)
    return parts


@overload
def broadcast(
    ctx: DistContext, values: np.ndarray | None, shape: tuple[int, ...], dtype: DTypeLike,
    src: int = 0,
) -> np.ndarray: ...  # fmt: skip
@overload
def broadcast(
    ctx: DistContext, values: torch.Tensor, shape: None = None, dtype: None = None, src: int = 0
) -> torch.Tensor: ...
def broadcast(
    ctx: DistContext,
    values: np.ndarray | torch.Tensor | None,
    shape: tuple[int, ...] | None = None,
    dtype: DTypeLike | None = None,
    src: int = 0,
) -> np.ndarray | torch.Tensor:
    """Rank `src`'s values on every rank.

    An array of the `shape` and `dtype` every rank knows comes back as a new array (the other
    ranks pass None); a tensor, which every rank holds, is overwritten in place and returned.
    Collective: call on every rank.
    """
    if isinstance(values, torch.Tensor):
        if ctx.distributed:
            tdist.broadcast(values, src=src)
        return values
    if not ctx.distributed:
        assert values is not None
        return np.ascontiguousarray(values, dtype=dtype)
    assert shape is not None and dtype is not None
    if ctx.rank == src:
        assert values is not None and values.shape == shape
        t = _to_comm(ctx, np.ascontiguousarray(values, dtype=dtype))
    else:
        t = torch.empty(shape, dtype=_torch_dtype(dtype), device=_comm_device(ctx))
    return broadcast(ctx, t, src=src).cpu().numpy()


def broadcast_string(ctx: DistContext, text: str | None, src: int = 0) -> str:
    """Rank `src`'s string on every rank (e.g. the run directory); the others pass None.

    Collective: call on every rank.
    """
    if not ctx.distributed:
        assert text is not None
        return text
    mine = ctx.rank == src
    data = np.frombuffer(bytearray((text or "").encode()), dtype=np.uint8)
    n = broadcast(ctx, np.array([len(data)], np.int64) if mine else None, (1,), np.int64, src)
    return broadcast(ctx, data if mine else None, (int(n[0]),), np.uint8, src).tobytes().decode()


def raise_if_any_rank_failed(ctx: DistContext, error: BaseException | None) -> None:
    """Turn one rank's failure into an error on every rank instead of a hang in the next collective.

    The failing rank re-raises its own exception; the others raise a RankFailedError that names
    it and repeats its error's first line, with its exit status: a damaged sample on rank 1 ends
    rank 0 with status 2 and the sample's name too. Collective: call on every rank.
    """
    status = 0 if error is None else max(1, exit_status_of(error))
    statuses = all_gather_counts(ctx, status)
    failed = [r for r, s in enumerate(statuses) if s]
    if not failed:
        return
    first = failed[0]
    line = broadcast_string(ctx, error_line(error) if error is not None else "", src=first)
    if error is not None:
        raise error
    raise RankFailedError(f"rank {first} failed: {line}", statuses[first])


def on_rank0(ctx: DistContext, fn: Callable[..., T], *args: Any) -> T | None:
    """fn(*args) on rank 0 only; if it raises, every rank raises with rank 0's message (a full
    disk while checkpointing reads the same in every rank's log). Collective: call on every rank.
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args)
        except Exception as exc:
            log.exception("rank 0 failed")
            error = exc
    if not ctx.distributed:
        if error is not None:
            raise error
        return result
    outcome: str | None = None
    if ctx.is_main:
        outcome = "0 ok" if error is None else f"{exit_status_of(error)} {error}"
    status, _, text = broadcast_string(ctx, outcome).partition(" ")
    if error is not None:
        raise error
    if status != "0":
        raise RankFailedError(f"rank 0 failed: {text or 'error'}", int(status))
    return result
