"""The whole config: one field per section, and the check that composes the sections' own."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster_pipeline.config.commands import ActivationsConfig, ClusterFitConfig, EvaluateConfig
from cluster_pipeline.config.runtime import DistConfig, RunConfig, SlurmConfig, WandbConfig
from cluster_pipeline.config.sections import (
    AugmentConfig,
    ClusterConfig,
    DataConfig,
    DeepClusterV2Config,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dcv2: DeepClusterV2Config = field(default_factory=DeepClusterV2Config)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    clusterfit: ClusterFitConfig = field(default_factory=ClusterFitConfig)
    # The config file's stem, used to name run directories.
    name: str = "run"

    def validate(self) -> None:
        """Every section's own checks, the first failure raised (load_config runs this; run it
        again after changing fields in code, as the CLI does for its flags)."""
        self.model.validate()
        self.clusterfit.validate()
        self.cluster.validate()
        self.data.validate()
        self.train.validate()
        self.augment.validate()
        self.optim.validate()
        self.dcv2.validate()
        self.wandb.validate()
        self.dist.validate()
        self.slurm.validate()
        self.activations.validate()
        self.evaluate.validate()
