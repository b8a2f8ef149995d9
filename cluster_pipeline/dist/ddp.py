"""DDP wrapping, and the one broadcast DDP leaves out: BatchNorm statistics after training."""

from __future__ import annotations

import torch
from torch import nn

from cluster_pipeline.dist.collectives import broadcast
from cluster_pipeline.dist.group import DistContext


def broadcast_buffers(ctx: DistContext, model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    every rank holds the statistics of its own last batch; features extracted with those
    would depend on the rank that read the sample. Collective: call on every rank.
    """
    if not ctx.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in model.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf.data)
    for bufs in by_dtype.values():  # one message per dtype rather than one per buffer
        flat = torch.cat([b.reshape(-1) for b in bufs])
        broadcast(ctx, flat)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


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
