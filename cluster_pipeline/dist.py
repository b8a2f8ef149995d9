"""Every call to torch.distributed lives here: every collective of an epoch, in one file.

A function that is a collective says "Collective: call on every rank" in its docstring. With a
world of one process no process group exists and each collective degenerates to a local copy.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")

# Rows per message in `gather_features`: bounds the extra memory on rank 0 to one chunk.
GATHER_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

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


def init_distributed(timeout_s: int = 600) -> DistContext:
    """Join the process group described by the environment (torchrun or submitit), else run alone.

    torchrun and submitit's TorchDistributedEnvironment both export RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT; a plain `python -m cluster_pipeline` has none and is one process.
    """
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
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and tdist.is_initialized():
        tdist.destroy_process_group()


def _comm_device(ctx: DistContext) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    """Collective: call on every rank."""
    if ctx.distributed:
        tdist.barrier()


def all_gather_counts(ctx: DistContext, count: int) -> list[int]:
    """Each rank's `count`, in rank order. Collective: call on every rank."""
    if not ctx.distributed:
        return [count]
    mine = torch.tensor([count], dtype=torch.int64, device=_comm_device(ctx))
    out = [torch.zeros_like(mine) for _ in range(ctx.world)]
    tdist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def raise_if_any_rank_failed(ctx: DistContext, error: BaseException | None) -> None:
    """Turn one rank's failure into an error on every rank instead of a hang in the next collective.

    The failing rank re-raises its own exception; the others raise an error naming it.
    Collective: call on every rank.
    """
    failed = [r for r, bad in enumerate(all_gather_counts(ctx, int(error is not None))) if bad]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed; see their logs (logs/rank<N>.log)")


def on_rank0(ctx: DistContext, fn: Callable[..., T], *args: Any) -> T | None:
    """fn(*args) on rank 0 only; if it raises, every rank raises. Collective: call on every rank."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args)
        except Exception as exc:
            log.exception("rank 0 failed")
            error = exc
    raise_if_any_rank_failed(ctx, error)
    return result


def max_over_ranks(ctx: DistContext, value: int) -> int:
    """The largest of the ranks' `value`s, e.g. whether any rank caught a stop signal.

    Collective: call on every rank.
    """
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(ctx))
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def all_gather_floats(ctx: DistContext, value: float) -> np.ndarray:
    """Each rank's float64 `value`, in rank order. Collective: call on every rank."""
    if not ctx.distributed:
        return np.array([value], dtype=np.float64)
    mine = torch.tensor([value], dtype=torch.float64, device=_comm_device(ctx))
    out = [torch.zeros_like(mine) for _ in range(ctx.world)]
    tdist.all_gather(out, mine)
    return torch.cat(out).cpu().numpy()


def all_reduce_sum(ctx: DistContext, values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks of a small float64 vector. Collective: call on every rank."""
    if not ctx.distributed:
        return values
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(_comm_device(ctx))
    tdist.all_reduce(t)
    return t.cpu().numpy()


def gather_features(
    ctx: DistContext, index: np.ndarray, feats: np.ndarray, num_samples: int
) -> np.ndarray | None:
    """Gather every rank's (index, features) rows into one (num_samples, d) matrix on rank 0.

    Row i of the result is sample i. Ranks may hold different counts, including none. Rows travel
    as tensors in chunks of GATHER_CHUNK_BYTES and are scattered into the preallocated result,
    so rank 0 peaks near one copy of the matrix. Raises on every rank when the indices do not
    cover 0..num_samples-1 exactly once. Returns None on ranks other than 0.
    Collective: call on every rank.
    """
    d = feats.shape[1]
    counts = all_gather_counts(ctx, len(index))
    if sum(counts) != num_samples:
        raise RuntimeError(
            f"extraction produced {sum(counts)} rows (per rank {counts}) for {num_samples} samples"
        )
    out: np.ndarray | None = None
    bad: RuntimeError | None = None
    seen = np.zeros(num_samples if ctx.is_main else 0, dtype=np.int64)
    if ctx.is_main:
        out = np.empty((num_samples, d), dtype=np.float32)
        bad = _count_indices(seen, index, 0)
        if bad is None:
            out[index] = feats
    chunk_rows = max(1, GATHER_CHUNK_BYTES // max(1, 4 * d))
    dev = _comm_device(ctx)
    for src in range(1, ctx.world):
        n = counts[src]
        if n == 0:
            continue
        if ctx.rank == src:
            tdist.send(torch.from_numpy(np.ascontiguousarray(index, np.int64)).to(dev), dst=0)
            for s in range(0, n, chunk_rows):
                part = np.ascontiguousarray(feats[s : s + chunk_rows], dtype=np.float32)
                tdist.send(torch.from_numpy(part).to(dev), dst=0)
        elif ctx.is_main:
            assert out is not None
            idx_t = torch.empty(n, dtype=torch.int64, device=dev)
            tdist.recv(idx_t, src=src)
            idx = idx_t.cpu().numpy()
            bad = bad or _count_indices(seen, idx, src)
            buf = torch.empty((min(chunk_rows, n), d), dtype=torch.float32, device=dev)
            for s in range(0, n, chunk_rows):
                m = min(chunk_rows, n - s)
                view = buf[:m]
                tdist.recv(view, src=src)
                if bad is None:  # after an error the chunks are still received, then dropped
                    out[idx[s : s + m]] = view.cpu().numpy()
    if ctx.is_main and bad is None and not np.all(seen == 1):
        missing, dup = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
        bad = RuntimeError(
            f"extraction did not read every sample exactly once: {len(missing)} missing "
            f"(first {missing[:5].tolist()}), {len(dup)} duplicated (first {dup[:5].tolist()})"
        )
    status = [0]
    if ctx.distributed:
        flag = torch.tensor([int(bad is not None)], device=dev)
        tdist.broadcast(flag, src=0)
        status = [int(flag.item())]
    if bad is not None:
        raise bad
    if status[0]:
        raise RuntimeError(
            "rank 0 found that extraction did not read every sample exactly once, or read "
            "indices outside 0..N-1; see logs/rank0.log"
        )
    return out


def _count_indices(seen: np.ndarray, index: np.ndarray, src: int) -> RuntimeError | None:
    """Add one rank's sample indices to `seen`, once per rank; out of 0..N-1 is an error."""
    if len(index) and (index.min() < 0 or index.max() >= len(seen)):
        return RuntimeError(
            f"rank {src} sent sample indices in [{index.min()}, {index.max()}], outside "
            f"0..{len(seen) - 1}; its shards do not match the index"
        )
    seen += np.bincount(index, minlength=len(seen))
    return None


def broadcast_labels(ctx: DistContext, labels: np.ndarray | None, num_samples: int) -> np.ndarray:
    """Rank 0's per-sample labels (int64, indexed by sample) on every rank.

    Collective: call on every rank.
    """
    if not ctx.distributed:
        assert labels is not None
        return labels
    dev = _comm_device(ctx)
    if ctx.is_main:
        assert labels is not None and len(labels) == num_samples
        t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(dev)
    else:
        t = torch.empty(num_samples, dtype=torch.int64, device=dev)
    tdist.broadcast(t, src=0)
    return t.cpu().numpy()


def broadcast_string(ctx: DistContext, text: str | None) -> str:
    """Rank 0's string on every rank (e.g. the run directory). Collective: call on every rank."""
    if not ctx.distributed:
        assert text is not None
        return text
    dev = _comm_device(ctx)
    data = (text or "").encode()
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    tdist.broadcast(n, src=0)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=dev)
    if ctx.is_main:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    tdist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy()).decode()


def broadcast_buffers(ctx: DistContext, model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    every rank holds the statistics of its own last batch; features extracted with those
    would depend on the rank that read the sample. Collective: call on every rank.
    """
    if not ctx.distributed:
        return
    for buf in model.buffers():
        if ctx.device.type == "cuda" or buf.device.type == "cpu":
            tdist.broadcast(buf.data, src=0)


def wrap_ddp(ctx: DistContext, model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` (rank 0's weights are broadcast on construction).

    Collective: call on every rank.
    """
    if not ctx.distributed:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
