"""The training recipe: SGD's parameter groups and the learning rate at each step.

The rate is a pure function of the config and the position (epoch, step within it), set before
every step; no scheduler object holds state, so a resumed run sets the very rates the
uninterrupted one did. What a checkpoint must agree on to resume exactly is `recipe_of`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cluster_pipeline.config import Config, ConfigError, LrSchedule, OptimConfig, Optimizer
from cluster_pipeline.models.nets import ClusterNet


def make_optimizer(model: ClusterNet, cfg: Config, global_batch: int) -> torch.optim.Optimizer:
    """SGD over the body and the head, each at its base rate (`base_lrs`); with
    optim.no_decay_bn_bias, their one-dimensional parameters (BatchNorm, biases) in groups of
    their own without weight decay."""
    o = cfg.optim
    lr, head_lr = base_lrs(o, global_batch)
    head = list(model.head.parameters())
    ids = set(map(id, head))
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    head_momentum = o.momentum if o.head_momentum is None else o.head_momentum
    groups = []
    for params, rate, momentum in ((body, lr, o.momentum), (head, head_lr, head_momentum)):
        if o.no_decay_bn_bias:
            groups.append({"params": [p for p in params if p.ndim > 1], "lr": rate,
                           "momentum": momentum})  # fmt: skip
            groups.append({"params": [p for p in params if p.ndim <= 1], "lr": rate,
                           "momentum": momentum, "weight_decay": 0.0})  # fmt: skip
        else:
            groups.append({"params": params, "lr": rate, "momentum": momentum})
    for g in groups:
        g["base_lr"] = g["lr"]
    if o.optimizer == Optimizer.lars:
        return LARS(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                    eta=o.lars_eta)  # fmt: skip
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)


class LARS(torch.optim.SGD):
    """SGD whose update of each parameter is its gradient plus weight decay, scaled by the
    trust ratio eta * ||w|| / (||grad|| + weight_decay * ||w||) (You et al., 2017; apex's LARC
    with clip=False, the optimizer swav's DeepCluster-v2 uses), then SGD's momentum step.
    Its state is SGD's: a checkpoint resumes it alike."""

    def __init__(self, params: Any, lr: float, momentum: float, weight_decay: float,
                 eta: float) -> None:  # fmt: skip
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.eta = eta

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        decays = [g["weight_decay"] for g in self.param_groups]
        for g, wd in zip(self.param_groups, decays, strict=True):
            for p in g["params"]:
                if p.grad is None:
                    continue
                w, d = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                ok = (w > 0) & (d > 0)
                trust = torch.where(ok, self.eta * w / (d + wd * w).clamp_min(1e-30), 1.0)
                p.grad.add_(p, alpha=wd).mul_(trust)
            g["weight_decay"] = 0.0  # applied above, inside the trust ratio
        try:
            return super().step(closure)
        finally:
            for g, wd in zip(self.param_groups, decays, strict=True):
                g["weight_decay"] = wd


def base_lrs(o: OptimConfig, global_batch: int) -> tuple[float, float]:
    """optim.lr and optim.head_lr, times global batch / base_batch_size when scaled."""
    scale = global_batch / o.base_batch_size if o.scale_lr_with_batch else 1.0
    return o.lr * scale, o.head_lr * scale


def lr_factor(o: OptimConfig, epochs: int, epoch: int, step: int, steps: int) -> float:
    """The rate at `step` of `steps` in `epoch`, as a fraction of the base rate: linear warmup
    over optim.warmup_epochs, then optim.schedule."""
    t = epoch + step / max(steps, 1)  # epochs done before this step
    warm = o.warmup_epochs
    if t < warm:
        return (t + 1 / max(steps, 1)) / warm  # reaches 1 at the warmup's last step
    if o.schedule == LrSchedule.step:
        return float(o.gamma ** sum(epoch >= m for m in o.milestones))
    if o.schedule == LrSchedule.cosine:
        span = max(epochs - warm, 1e-12)
        cos = 0.5 * (1 + math.cos(math.pi * min((t - warm) / span, 1.0)))
        return o.final_lr_factor + (1 - o.final_lr_factor) * cos
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Every group at its base rate times `factor`; returns the first group's rate."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return float(optimizer.param_groups[0]["lr"])


def clip_gradients(model: nn.Module, max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


# The fields a resumed run must share with its checkpoint to take the same steps.
RECIPE_FIELDS = (
    "optim.optimizer", "optim.lars_eta", "optim.lr", "optim.momentum", "optim.weight_decay",
    "optim.head_lr", "optim.head_momentum",
    "optim.schedule", "optim.warmup_epochs", "optim.milestones", "optim.gamma",
    "optim.final_lr_factor", "optim.scale_lr_with_batch", "optim.base_batch_size",
    "optim.no_decay_bn_bias", "optim.clip_grad_norm", "train.bf16",
)  # fmt: skip
# What the code before the recipe part did (a checkpoint without one): none of the options.
LEGACY_RECIPE: dict[str, Any] = {
    "optim.optimizer": "sgd",
    "optim.head_momentum": None, "optim.schedule": "constant", "optim.warmup_epochs": 0.0,
    "optim.milestones": [], "optim.no_decay_bn_bias": False, "optim.clip_grad_norm": 0.0,
    "optim.scale_lr_with_batch": False, "train.bf16": False,
}  # fmt: skip


def recipe_of(cfg: Config, on_cuda: bool) -> dict[str, Any]:
    """The checkpoint part that pins the recipe: RECIPE_FIELDS' values as plain data, with
    train.bf16 as it acts (only on CUDA)."""
    out: dict[str, Any] = {}
    for key in RECIPE_FIELDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        out[key] = str(value) if isinstance(value, str) else value
        if isinstance(value, list | tuple):
            out[key] = list(value)
    out["train.bf16"] = bool(cfg.train.bf16 and on_cuda)
    return out


def check_recipe(saved: dict[str, Any] | None, now: dict[str, Any], run_dir: object) -> None:
    """Refuse to resume a checkpoint under another recipe (`now`, recipe_of this run): its
    steps would not be the ones the uninterrupted run takes. A checkpoint from before the
    recipe part (None) was trained without any of the options (LEGACY_RECIPE)."""
    saved = LEGACY_RECIPE if saved is None else saved
    differ = [k for k in RECIPE_FIELDS if k in saved and saved[k] != now[k]]
    if differ:
        said = ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in differ)
        raise ConfigError(
            f"the checkpoint of {run_dir} was trained with {said}; resume it with those values "
            "(a changed recipe is not the same run), or choose another run.dir"
        )
