"""Typed configuration: nested dataclasses loaded from YAML with OmegaConf.

Unknown keys and ill-typed values are errors that name the key, so a typo in an 8-node job
fails in the first second rather than silently running the default.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ARCHS = ("small_cnn", "alexnet_bn", "resnet18", "resnet50")
# Pool rules for tapped activations (layers.py): "avg", "max", "grid:S", "dims:D".
POOL_RULE = re.compile(r"^(avg|max|grid:[1-9]\d*|dims:[1-9]\d*)$")


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the key and what would work."""

    exit_status = 2  # bad input, on every rank (dist.exit_status_of)


@dataclass
class DataConfig:
    # Directory written by `cluster-pipeline make-shards` (holds index.json).
    shards: str = MISSING
    # Images are decoded to this square size (resize shorter side, then center crop).
    load_size: int = 28
    # The network sees crops of this size (center crop for extraction, random for training).
    image_size: int = 28
    # 1 for grayscale sources (MNIST, digits), 3 for RGB.
    channels: int = 1
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    # DataLoader worker processes per rank.
    num_workers: int = 2
    # Images per forward pass during feature extraction, per rank.
    extract_batch_size: int = 256
    # A sample that cannot be read (shard cut short, no image member, image does not decode):
    # fail stops the run naming shard and key; skip leaves it out of clustering and training
    # (pseudo-label -1), logs it and counts it in metrics.jsonl (skipped_samples).
    on_error: str = "fail"
    # With on_error=skip, stop anyway when more than this fraction of the samples is unreadable.
    max_skip_fraction: float = 0.01
    # Which samples a command sees: all, or the train / test side of a fixed split (a hash of
    # the sample id and split_seed puts round(test_fraction * N) samples in test; MNIST-5k:
    # 4000 / 1000). Training on train and evaluating on test never mixes the two.
    split: str = "all"
    test_fraction: float = 0.2
    split_seed: int = 0


@dataclass
class ModelConfig:
    # One of small_cnn, alexnet_bn, resnet18, resnet50.
    arch: str = "small_cnn"
    # DeepCluster's fixed grayscale + Sobel input layer.
    sobel: bool = False
    # Width multiplier of the small CNN (channels of its first block).
    width: int = 32
    # Replace BatchNorm by SyncBatchNorm under DDP so statistics cover the global batch.
    sync_bn: bool = False
    # On CUDA: extract features under bf16 autocast (fp32 elsewhere, and always fp32 on CPU).
    extract_bf16: bool = True
    # On CUDA: NHWC memory layout, which cuDNN's convolutions prefer with tensor cores.
    channels_last: bool = True


@dataclass
class ClusterConfig:
    # Number of clusters (DeepCluster: 10000 on ImageNet).
    k: int = 100
    # PCA output dimension; 0 disables PCA (DeepCluster: 256).
    pca_dim: int = 256
    whiten: bool = True
    l2_normalize: bool = True
    # Lloyd iterations of faiss k-means.
    niter: int = 20
    # faiss subsamples the training set to k * this many points; assignment covers all points.
    max_points_per_centroid: int = 256
    # Relative perturbation when an empty cluster takes a copy of a non-empty centroid.
    split_eps: float = 1e-4
    # Use faiss on every GPU of rank 0's node when there are GPUs (sharded: each rank's own GPU).
    use_gpu: bool = True
    # gather: rank 0 gathers every feature and clusters them (holds N x d). sharded: features
    # stay on their rank; PCA is fitted on a sample, Lloyd's sums are all-reduced (k x d per
    # iteration). Use sharded when N x d no longer fits rank 0 (docs/scaling.md).
    mode: str = "gather"


@dataclass
class AugmentConfig:
    random_resized_crop: bool = True
    # Smallest crop area as a fraction of the image (torchvision's default is 0.08).
    min_scale: float = 0.08
    flip: bool = True


@dataclass
class OptimConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    head_lr: float = 0.05


@dataclass
class TrainConfig:
    epochs: int = 10
    # Images per step per rank; the global batch is batch_size * world size.
    batch_size: int = 256
    # Images per step over all ranks; 0 means batch_size per rank. When set it replaces
    # batch_size and must divide evenly over the ranks (256 on 8 GPUs: 32 per rank).
    global_batch_size: int = 0
    # Samples drawn per epoch by the uniform-over-clusters sampler; 0 means N.
    samples_per_epoch: int = 0
    seed: int = 0
    # Save a checkpoint every this many epochs (the last epoch is always saved).
    checkpoint_every: int = 1
    # Also save within an epoch every this many training steps; 0: only at epoch ends.
    checkpoint_every_steps: int = 0
    # Number of checkpoints to keep (epoch and within-epoch ones together).
    keep_checkpoints: int = 2
    # Training steps between checks whether a rank caught a stop signal (one tiny all-reduce).
    stop_check_every: int = 5
    # Save the assignments of every epoch in the run directory.
    save_assignments: bool = True


@dataclass
class ClusterFitConfig:
    """`cluster-pipeline clusterfit`: cluster a pretrained network's features once (cluster.*),
    then train this config's `model` from scratch on those labels for train.epochs."""

    # The pretrained weights: a run checkpoint or a plain state_dict (--pretrained sets it).
    pretrained: str = ""
    # Module whose pooled output is clustered (e.g. block2, conv5, layer4); empty: the
    # embedding (model.features), as DeepCluster clusters.
    layer: str = ""
    # Pooling of a spatial layer's output: avg, max, grid:S or dims:D (see layers.py).
    pool: str = "avg"
    # The pretrained network's architecture. Unset: the model section saved in its run
    # checkpoint, else (a plain state_dict) this config's own `model` section.
    pretrained_model: ModelConfig | None = None


@dataclass
class WandbConfig:
    # auto: online if WANDB_API_KEY is set, else offline. Also online, offline, disabled.
    mode: str = "auto"
    project: str = "cluster_pipeline"
    entity: str | None = None
    name: str | None = None


@dataclass
class RunConfig:
    # Run directory; empty means runs/<config name>-<timestamp>, chosen by rank 0.
    dir: str = ""
    # Continue the run found in `dir` (its last checkpoint); false refuses to touch it.
    resume: bool = True
    # Show tqdm progress bars on rank 0.
    progress: bool = True


@dataclass
class DistConfig:
    # Seconds a collective may wait for a live peer before the run fails (a hang). Keep it above
    # the longest wait of a healthy run: the other ranks wait in broadcast_labels while rank 0
    # clusters. Also the longest a DataLoader batch may take.
    timeout_s: int = 600
    # A rank whose heartbeat (a thread beating into the rendezvous store) has not moved for this
    # many seconds is lost (killed, or its node failed): every other rank stops with an error
    # naming it, however long its collectives may wait. 0 turns the heartbeat off (debuggers).
    heartbeat_timeout_s: float = 180.0


@dataclass
class SlurmConfig:
    """The SLURM job of `make launch` (launch/slurm.py); Make variables override these."""

    nodes: int = 1
    # One rank per GPU. 0 means a CPU job with `tasks_per_node` ranks per node.
    gpus_per_node: int = 8
    # Ranks per node of a CPU job (gpus_per_node=0); ignored when there are GPUs.
    tasks_per_node: int = 1
    cpus_per_task: int = 10
    # Memory per node in GB; 0 leaves the partition's default.
    mem_gb: int = 0
    # Walltime of one attempt; on timeout the job checkpoints and requeues itself.
    timeout_min: int = 4320
    # Empty means the cluster's default partition; account and qos are passed when given.
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    # SLURM sends USR2 this long before the walltime: time to finish a step and checkpoint.
    signal_delay_s: int = 120
    # Requeues after timeouts before the job gives up (preemptions do not count).
    max_num_timeout: int = 20
    # Extra sbatch options, e.g. {exclusive: "", reservation: my_resa}.
    additional_parameters: dict[str, str] = field(default_factory=dict)
    # Job name; empty means the config name.
    job_name: str = ""


@dataclass
class EvaluateConfig:
    """`cluster-pipeline evaluate`: linear probes per layer, kNN and NMI on frozen features."""

    # Named modules that get a linear probe; empty means the model's blocks (model.layer_names:
    # block1..block3, conv1..conv5, stem and layer1..layer4). "embedding" is model.features.
    layers: list[str] = field(default_factory=list)
    # Pooling of spatial activations before the probe: avg, max, grid:S or dims:D (DeepCluster
    # pools every conv layer to about 9600 values: dims:9600). Rank 0 holds no probe features;
    # each rank holds its share, N/ranks x (sum of the layers' widths) float32 values.
    pool: str = "dims:9600"
    # L-BFGS iterations of each probe: full-batch multinomial logistic regression on
    # standardized features, loss and gradient summed over every rank's rows.
    probe_iters: int = 100
    # L-BFGS step size (its strong-Wolfe line search scales the step from here).
    lr: float = 1.0
    # L2 penalty on the probe's weights: mean cross-entropy + weight_decay / 2 * ||W||^2.
    weight_decay: float = 1e-3
    # Rows per matrix product when scoring probes and kNN (bounds the memory of one product).
    batch_size: int = 1024
    # Neighbours of the kNN classifier (cosine similarity, DINO's vote weighted by exp(s / T)).
    knn_k: int = 20
    knn_temperature: float = 0.07
    # The layer kNN and the k-means NMI use; "embedding" is model.features (what is clustered).
    knn_layer: str = "embedding"


@dataclass
class ActivationsConfig:
    """`cluster-pipeline activations`: cluster a layer's activations and show what each holds."""

    # Named modules to tap (any name from model.named_modules(): block2, conv3, layer4, fc,
    # block1.0, head). Several layers are extracted in one pass and compared in one table.
    # --layer / --layers set this; the clustering settings (k, PCA, whitening) are cluster.*,
    # with cluster.pca_dim capped at each layer's width.
    layers: list[str] = field(default_factory=list)
    # Spatial pooling of each tapped activation: avg, max, grid:S or dims:D (see layers.py).
    pool: str = "avg"
    # Each cluster's picture is a grid x grid mosaic of its samples nearest to the centroid.
    grid: int = 8


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    clusterfit: ClusterFitConfig = field(default_factory=ClusterFitConfig)
    # The config file's stem, used to name run directories.
    name: str = "run"


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    text: str | None = None,
    origin: str = "",
) -> Config:
    """Merge defaults, a YAML file (or YAML `text` from `origin`, e.g. a checkpoint's saved
    config) and `key=value` overrides into a validated Config."""
    schema = OmegaConf.structured(Config)
    where = "defaults"
    try:
        merged = schema
        if text is not None:
            where = origin or "YAML text"
            merged = OmegaConf.merge(merged, OmegaConf.create(text))
        elif path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            where = str(path)
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
            if "name" not in OmegaConf.load(path):
                merged.name = path.stem
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        where = "command-line overrides " + " ".join(overrides)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"bad config key {key!r} in {where}: {msg}") from None
    assert isinstance(cfg, Config)
    validate_config(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    """Value checks that need no data; checks against the data are in `validate_against_data`."""
    checks: list[tuple[bool, str]] = [
        (cfg.model.arch in ARCHS, f"model.arch={cfg.model.arch!r} is unknown; use one of {ARCHS}"),
        (
            cfg.clusterfit.pretrained_model is None
            or cfg.clusterfit.pretrained_model.arch in ARCHS,
            f"clusterfit.pretrained_model.arch is unknown; use one of {ARCHS}",
        ),
        (cfg.cluster.k >= 2, f"cluster.k={cfg.cluster.k} must be at least 2"),
        (cfg.cluster.pca_dim >= 0, f"cluster.pca_dim={cfg.cluster.pca_dim} must be >= 0"),
        (cfg.cluster.niter >= 1, f"cluster.niter={cfg.cluster.niter} must be >= 1"),
        (
            cfg.cluster.mode in ("gather", "sharded"),
            f"cluster.mode={cfg.cluster.mode!r} is unknown; use gather or sharded",
        ),
        (cfg.data.channels in (1, 3), f"data.channels={cfg.data.channels} must be 1 or 3"),
        (
            len(cfg.data.mean) == cfg.data.channels and len(cfg.data.std) == cfg.data.channels,
            f"data.mean and data.std need {cfg.data.channels} values (data.channels)",
        ),
        (
            0 < cfg.data.image_size <= cfg.data.load_size,
            f"data.image_size={cfg.data.image_size} must be in 1..data.load_size "
            f"({cfg.data.load_size})",
        ),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.extract_batch_size >= 1, "data.extract_batch_size must be >= 1"),
        (cfg.data.on_error in ("fail", "skip"), f"data.on_error={cfg.data.on_error}: fail or skip"),
        (
            cfg.data.split in ("all", "train", "test"),
            f"data.split={cfg.data.split}: all, train or test",
        ),
        (
            0.0 < cfg.data.test_fraction < 1.0,
            f"data.test_fraction={cfg.data.test_fraction}: between 0 and 1",
        ),
        (0 <= cfg.data.max_skip_fraction < 1, "data.max_skip_fraction must be in [0, 1)"),
        (cfg.train.batch_size >= 1, f"train.batch_size={cfg.train.batch_size} must be >= 1"),
        (
            cfg.train.global_batch_size >= 0,
            f"train.global_batch_size={cfg.train.global_batch_size} must be >= 0 (0: off)",
        ),
        (cfg.train.epochs >= 1, f"train.epochs={cfg.train.epochs} must be >= 1"),
        (cfg.train.samples_per_epoch >= 0, "train.samples_per_epoch must be >= 0"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (cfg.train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (cfg.train.stop_check_every >= 1, "train.stop_check_every must be >= 1"),
        (0 < cfg.augment.min_scale <= 1, "augment.min_scale must be in (0, 1]"),
        (
            cfg.wandb.mode in ("auto", "online", "offline", "disabled"),
            f"wandb.mode={cfg.wandb.mode!r}; use auto, online, offline or disabled",
        ),
        (cfg.dist.timeout_s > 0, "dist.timeout_s must be > 0"),
        (cfg.dist.heartbeat_timeout_s >= 0, "dist.heartbeat_timeout_s must be >= 0 (0: off)"),
        (cfg.slurm.nodes >= 1, f"slurm.nodes={cfg.slurm.nodes} must be >= 1"),
        (cfg.slurm.gpus_per_node >= 0, "slurm.gpus_per_node must be >= 0"),
        (cfg.slurm.tasks_per_node >= 1, "slurm.tasks_per_node must be >= 1"),
        (cfg.slurm.cpus_per_task >= 1, "slurm.cpus_per_task must be >= 1"),
        (cfg.slurm.timeout_min >= 1, "slurm.timeout_min must be >= 1"),
        (cfg.slurm.signal_delay_s >= 0, "slurm.signal_delay_s must be >= 0"),
        (cfg.slurm.max_num_timeout >= 0, "slurm.max_num_timeout must be >= 0"),
        (
            POOL_RULE.match(cfg.activations.pool) is not None,
            f"activations.pool={cfg.activations.pool!r} is unknown; use avg, max, grid:S or dims:D",
        ),
        (
            all(name.strip() for name in cfg.activations.layers),
            f"activations.layers={cfg.activations.layers} holds an empty name",
        ),
        (
            1 <= cfg.activations.grid <= 32,
            f"activations.grid={cfg.activations.grid} must be in 1..32 (grid x grid samples)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    validate_evaluate(cfg.evaluate)


def validate_evaluate(e: EvaluateConfig) -> None:
    from cluster_pipeline.models.layers import check_pool_rule  # layers imports this module

    checks: list[tuple[bool, str]] = [
        (e.probe_iters >= 1, f"evaluate.probe_iters={e.probe_iters} must be >= 1"),
        (e.lr > 0, f"evaluate.lr={e.lr} must be > 0"),
        (e.weight_decay >= 0, f"evaluate.weight_decay={e.weight_decay} must be >= 0"),
        (e.batch_size >= 1, f"evaluate.batch_size={e.batch_size} must be >= 1"),
        (e.knn_k >= 1, f"evaluate.knn_k={e.knn_k} must be >= 1"),
        (e.knn_temperature > 0, f"evaluate.knn_temperature={e.knn_temperature} must be > 0"),
        (bool(e.knn_layer), "evaluate.knn_layer is empty; use embedding or a module name"),
        (all(e.layers), f"evaluate.layers={e.layers} holds an empty name"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        check_pool_rule(e.pool)
    except ConfigError as exc:
        raise ConfigError(f"evaluate.pool: {exc}") from None


def validate_against_data(cfg: Config, num_samples: int, feature_dim: int, world: int) -> None:
    """Checks that need N and the feature dimension; run before any expensive work."""
    validate_clustering(cfg, num_samples, feature_dim)
    validate_training(cfg, num_samples, world)


def validate_clustering(cfg: Config, num_samples: int, feature_dim: int) -> None:
    """cluster.* against the N samples and the dimension of the features clustered."""
    validate_k(cfg, num_samples)
    if cfg.cluster.pca_dim > feature_dim:
        raise ConfigError(
            f"cluster.pca_dim={cfg.cluster.pca_dim} exceeds the feature dimension {feature_dim} "
            f"of model.arch={cfg.model.arch}; lower cluster.pca_dim or set it to 0"
        )
    if cfg.cluster.pca_dim > num_samples:
        raise ConfigError(
            f"cluster.pca_dim={cfg.cluster.pca_dim} exceeds the {num_samples} samples; "
            "lower cluster.pca_dim"
        )


def validate_k(cfg: Config, num_samples: int) -> None:
    if cfg.cluster.k > num_samples:
        raise ConfigError(
            f"cluster.k={cfg.cluster.k} but only {num_samples} samples are in "
            f"{cfg.data.shards}; lower cluster.k"
        )


def validate_training(cfg: Config, num_samples: int, world: int) -> None:
    """model.sync_bn and the batch size against the device, N and the world size."""
    if cfg.model.sync_bn and world > 1 and not torch.cuda.is_available():
        raise ConfigError(
            "model.sync_bn=true needs CUDA (SyncBatchNorm rejects CPU tensors); "
            "set model.sync_bn=false for CPU runs"
        )
    samples = cfg.train.samples_per_epoch or num_samples
    batch = per_rank_batch_size(cfg, world)
    if samples < batch * world:
        t = cfg.train
        setting = (f"train.global_batch_size={t.global_batch_size}" if t.global_batch_size
                   else f"train.batch_size={t.batch_size} x {world} ranks")  # fmt: skip
        raise ConfigError(
            f"{setting} exceeds the {samples} samples of an epoch; lower {setting.split('=')[0]}"
        )


def per_rank_batch_size(cfg: Config, world: int) -> int:
    """Images per training step on each rank: train.global_batch_size split over the `world`
    ranks when it is set, else train.batch_size."""
    total = cfg.train.global_batch_size
    if not total:
        return cfg.train.batch_size
    if total % world:
        fits = max(world, total // world * world)
        raise ConfigError(
            f"train.global_batch_size={total} does not divide over the {world} ranks of this "
            f"job (world size {world}); use a multiple of {world}, e.g. {fits}"
        )
    return total // world


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
