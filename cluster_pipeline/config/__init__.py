"""Typed configuration: nested dataclasses loaded from YAML with OmegaConf.

Each section checks its own fields (`validate()`, next to them); `Config.validate` composes
them and `load_config` runs it. Checks against the data, the model and the world size are the
functions of `sections`. This package imports nothing else from cluster_pipeline.
"""

from cluster_pipeline.config.choices import (
    ARCHS,
    POOL_RULES,
    Arch,
    ClusterBackend,
    ClusterMode,
    LrSchedule,
    Method,
    OnError,
    Optimizer,
    PoolRule,
    Split,
    TorchMatmul,
    WandbMode,
    is_pool_rule,
    parse_pool_rule,
)
from cluster_pipeline.config.commands import ActivationsConfig, ClusterFitConfig, EvaluateConfig
from cluster_pipeline.config.errors import ConfigError
from cluster_pipeline.config.loading import load_config, to_dict, to_yaml
from cluster_pipeline.config.root import Config
from cluster_pipeline.config.runtime import DistConfig, RunConfig, SlurmConfig, WandbConfig
from cluster_pipeline.config.sections import (
    AugmentConfig,
    ClusterConfig,
    DataConfig,
    DeepClusterV2Config,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    per_rank_batch_size,
    validate_against_data,
    validate_clustering,
    validate_k,
    validate_training,
)

__all__ = [
    "ARCHS",
    "POOL_RULES",
    "ActivationsConfig",
    "Arch",
    "AugmentConfig",
    "ClusterBackend",
    "ClusterConfig",
    "ClusterFitConfig",
    "ClusterMode",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepClusterV2Config",
    "DistConfig",
    "EvaluateConfig",
    "LrSchedule",
    "Method",
    "ModelConfig",
    "OnError",
    "OptimConfig",
    "Optimizer",
    "PoolRule",
    "RunConfig",
    "SlurmConfig",
    "Split",
    "TorchMatmul",
    "TrainConfig",
    "WandbConfig",
    "WandbMode",
    "is_pool_rule",
    "load_config",
    "parse_pool_rule",
    "per_rank_batch_size",
    "to_dict",
    "to_yaml",
    "validate_against_data",
    "validate_clustering",
    "validate_k",
    "validate_training",
]
