"""The closed vocabularies of the config: enum-like fields and the pool rule.

The enums are `StrEnum`s whose member names equal their values, so OmegaConf (which looks
members up by name) reads the same YAML as before, dumps the same YAML, and a member compares,
formats and JSON-encodes as its string. Models, layers and analyses import these from here:
config depends on nothing else in the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, StrEnum

from cluster_pipeline.config.errors import ConfigError


class Arch(StrEnum):
    """model.arch: the networks of models/nets.py."""

    small_cnn = "small_cnn"
    alexnet_bn = "alexnet_bn"
    resnet18 = "resnet18"
    resnet50 = "resnet50"


ARCHS = tuple(a.value for a in Arch)


class ClusterMode(StrEnum):
    """cluster.mode: where the features are clustered (docs/scaling.md)."""

    gather = "gather"
    sharded = "sharded"


class ClusterBackend(StrEnum):
    """cluster.backend: what runs Lloyd's iterations (README, "Choosing a k-means backend")."""

    faiss = "faiss"
    torch = "torch"


class TorchMatmul(StrEnum):
    """cluster.torch_matmul: the torch backend's distance products on a GPU."""

    fp32 = "fp32"
    tf32 = "tf32"
    bf16 = "bf16"


class Method(StrEnum):
    """train.method: what `cluster-pipeline train` runs."""

    deepcluster = "deepcluster"
    deepcluster_v2 = "deepcluster_v2"


class Optimizer(StrEnum):
    """optim.optimizer: SGD with momentum, or LARS (SGD with a per-layer trust ratio)."""

    sgd = "sgd"
    lars = "lars"


class LrSchedule(StrEnum):
    """optim.schedule: the learning rate over the run, after optim.warmup_epochs."""

    constant = "constant"
    step = "step"
    cosine = "cosine"


class OnError(StrEnum):
    """data.on_error: what an unreadable sample does to the run."""

    fail = "fail"
    skip = "skip"


class Split(StrEnum):
    """data.split: which side of the fixed hash split a command sees."""

    all = "all"
    train = "train"
    test = "test"


class WandbMode(StrEnum):
    """wandb.mode: auto is online with WANDB_API_KEY set, else offline."""

    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


def unknown_choice(key: str, value: object, choices: type[Enum]) -> str:
    """The one message for a value outside an enum, from YAML, an override or Python code."""
    allowed = tuple(c.value for c in choices)
    return f"{key}={value!r} is unknown; use one of {allowed}"


def is_choice(value: object, choices: type[StrEnum]) -> bool:
    """Also for sections built in Python, where a plain string may stand in for a member."""
    return isinstance(value, str) and value in {c.value for c in choices}


# Pool rules for spatial (N, C, H, W) activations (models/layers.py pools with them):
#   "avg" / "max": global average / max pooling, C values;
#   "grid:S": adaptive average pooling to S x S, C * S * S values;
#   "dims:D": adaptive average pooling to the largest S x S grid with C * S * S <= D (at least
#             1 x 1), DeepCluster's evaluation rule of pooling every conv layer to ~9600 values.
_POOL_RULE = re.compile(r"^(avg|max|grid:[1-9]\d*|dims:[1-9]\d*)$")
POOL_RULES = "avg, max, grid:S or dims:D"


@dataclass(frozen=True)
class PoolRule:
    """A parsed pool rule: `kind` avg, max, grid or dims, and the S or D of the last two."""

    kind: str
    size: int = 0


def is_pool_rule(rule: object) -> bool:
    return isinstance(rule, str) and _POOL_RULE.match(rule) is not None


def parse_pool_rule(rule: str) -> PoolRule:
    """The one parser of pool rules: every pool field and `LayerTaps` go through it."""
    if not is_pool_rule(rule):
        raise ConfigError(f"pool rule {rule!r} is unknown; use {POOL_RULES}")
    kind, _, size = rule.partition(":")
    return PoolRule(kind, int(size) if size else 0)
