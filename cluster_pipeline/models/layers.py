"""The activations of any named module of a project model, pooled to a fixed size.

Linear probes per layer (`evaluate`), ClusterFit's choice of layer and the activation analyses all
need the same thing: during one forward pass, keep the output of a few named modules, pool the
spatial ones to a fixed size, and hand back one row per image. `LayerTaps` does that with forward
hooks; `extract_features(..., taps=...)` runs it over the shards exactly once, like the pipeline.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cluster_pipeline.config import ConfigError, parse_pool_rule
from cluster_pipeline.models.nets import ClusterNet

# Pool rules for spatial (N, C, H, W) activations (parsed by config.parse_pool_rule):
#   "avg" / "max": global average / max pooling, C values;
#   "grid:S": adaptive average pooling to S x S, C * S * S values;
#   "dims:D": adaptive average pooling to the largest S x S grid with C * S * S <= D (at least
#             1 x 1), DeepCluster's evaluation rule of pooling every conv layer to ~9600 values.
# The name that taps the embedding `model.features(x)` (what is clustered), not a module.
EMBEDDING = "embedding"


def pooled_grid(rule: str, channels: int, height: int) -> int:
    """The side S of the S x S grid `rule` pools a (C, H, H) activation to (0: global max)."""
    parsed = parse_pool_rule(rule)
    if parsed.kind == "max":
        return 0
    if parsed.kind == "avg":
        return 1
    size = parsed.size
    side = size if parsed.kind == "grid" else math.isqrt(max(1, size // channels))
    return max(1, min(side, height))


def pool_activation(x: torch.Tensor, rule: str) -> torch.Tensor:
    """(N, ...) activation -> (N, D) float rows; (N, C) and (N, D) activations pass unpooled."""
    if x.dim() <= 2:
        return x.reshape(len(x), -1).float()
    if x.dim() != 4:
        x = x.reshape(*x.shape[:2], -1, 1)  # (N, C, L): a 1-D map, pooled along L
    side = pooled_grid(rule, x.shape[1], x.shape[2])
    if side == 0:
        return torch.amax(x, dim=(2, 3)).float()
    return torch.flatten(F.adaptive_avg_pool2d(x.float(), side), 1)


def module_names(model: nn.Module) -> list[str]:
    """Every named module, outermost first ("conv1", "conv1.0", ...)."""
    return [name for name, _ in model.named_modules() if name]


def find_module(model: ClusterNet, name: str) -> nn.Module:
    """The module called `name`, or an error that lists the model's named blocks."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        blocks = ", ".join((*model.layer_names, "fc", "classifier", "head", EMBEDDING))
        raise ConfigError(
            f"layer {name!r} is not a module of {type(model).__name__}; its blocks are "
            f"{blocks} (any name from model.named_modules() works, e.g. {model.layer_names[0]}.0)"
        ) from None


class LayerTaps:
    """Forward hooks on named modules that keep their pooled outputs during one forward pass.

    `forward(x)` runs the whole model (features and head, so "head" can be tapped too; the
    name "embedding" taps `model.features`, which is a method, not a module) and returns the
    tapped outputs side by side, one row per image; `split` cuts such rows back into one array
    per layer. Use as a context manager so the hooks are removed afterwards.
    """

    def __init__(self, model: ClusterNet, names: list[str], pool: str = "avg") -> None:
        if not names:
            raise ConfigError("no layer to tap; name at least one module")
        parse_pool_rule(pool)
        self.model, self.names, self.pool = model, list(names), pool
        self.modules = [None if n == EMBEDDING else find_module(model, n) for n in self.names]
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.widths: list[int] = []

    def __enter__(self) -> LayerTaps:
        for name, module in zip(self.names, self.modules, strict=True):
            if module is not None:
                self.handles.append(module.register_forward_hook(self._keep(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _keep(self, name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            self.outputs[name] = pool_activation(out, self.pool)

        return hook

    @torch.no_grad()
    def measure(self, channels: int, image_size: int, device: torch.device) -> int:
        """The row width, from one forward pass of a blank image (the model is put in eval)."""
        was_training = self.model.training
        self.model.eval()
        try:
            self.forward(torch.zeros(1, channels, image_size, image_size, device=device))
        finally:
            self.model.train(was_training)
        return self.dim

    @property
    def dim(self) -> int:
        if not self.widths:
            raise RuntimeError("LayerTaps.measure() has not run: the row width is unknown")
        return sum(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.outputs = {}
        feats = self.model.features(x)  # model(x), with the embedding kept on the way
        if EMBEDDING in self.names:
            self.outputs[EMBEDDING] = pool_activation(feats, self.pool)
        self.model.head(self.model.head_act(feats))
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in {type(self.model).__name__}")
        rows = [self.outputs[n] for n in self.names]
        self.widths = [r.shape[1] for r in rows]
        self.outputs = {}
        return torch.cat(rows, dim=1)

    def split(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """(N, dim) rows from `forward` -> {layer name: (N, width) view}."""
        edges = np.cumsum([0, *self.widths])
        return {n: rows[:, a:b] for n, a, b in zip(self.names, edges[:-1], edges[1:], strict=True)}
