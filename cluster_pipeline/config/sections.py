"""The pipeline's sections (data, model, cluster, augment, optim, train), each with the checks
of its own fields, and the checks that need the data, the world size or the model.

A section's `validate()` needs nothing but its fields; `Config.validate` runs them all when a
config is loaded. The cross-section checks at the end run once N, the feature dimension and the
world size are known, before any expensive work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from omegaconf import MISSING

from cluster_pipeline.config.choices import (
    Arch,
    ClusterBackend,
    ClusterMode,
    LrSchedule,
    Method,
    OnError,
    Optimizer,
    Split,
    TorchMatmul,
    is_choice,
    unknown_choice,
)
from cluster_pipeline.config.errors import ConfigError, raise_first_failed

if TYPE_CHECKING:
    from cluster_pipeline.config.root import Config


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
    on_error: OnError = OnError.fail
    # With on_error=skip, stop anyway when more than this fraction of the samples is unreadable.
    max_skip_fraction: float = 0.01
    # Which samples a command sees: all, or the train / test side of a fixed split (a hash of
    # the sample id and split_seed puts round(test_fraction * N) samples in test; MNIST-5k:
    # 4000 / 1000). Training on train and evaluating on test never mixes the two.
    split: Split = Split.all
    test_fraction: float = 0.2
    split_seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.channels in (1, 3), f"data.channels={self.channels} must be 1 or 3"),
            (
                len(self.mean) == self.channels and len(self.std) == self.channels,
                f"data.mean and data.std need {self.channels} values (data.channels)",
            ),
            (
                0 < self.image_size <= self.load_size,
                f"data.image_size={self.image_size} must be in 1..data.load_size "
                f"({self.load_size})",
            ),
            (self.num_workers >= 0, "data.num_workers must be >= 0"),
            (self.extract_batch_size >= 1, "data.extract_batch_size must be >= 1"),
            (
                is_choice(self.on_error, OnError),
                unknown_choice("data.on_error", self.on_error, OnError),
            ),
            (is_choice(self.split, Split), unknown_choice("data.split", self.split, Split)),
            (
                0.0 < self.test_fraction < 1.0,
                f"data.test_fraction={self.test_fraction}: between 0 and 1",
            ),
            (0 <= self.max_skip_fraction < 1, "data.max_skip_fraction must be in [0, 1)"),
        ]
        raise_first_failed(checks)


@dataclass
class ModelConfig:
    # One of small_cnn, alexnet_bn, resnet18, resnet50.
    arch: Arch = Arch.small_cnn
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

    def validate(self, key: str = "model") -> None:
        """`key` is where the section sits (clusterfit.pretrained_model is one too)."""
        if not is_choice(self.arch, Arch):
            raise ConfigError(unknown_choice(f"{key}.arch", self.arch, Arch))


@dataclass
class ClusterConfig:
    # Number of clusters (DeepCluster: 10000 on ImageNet).
    k: int = 100
    # PCA output dimension; 0 disables PCA (DeepCluster: 256).
    pca_dim: int = 256
    whiten: bool = True
    l2_normalize: bool = True
    # Spherical k-means: centroids scaled to unit length after every update, so a unit point's
    # nearest centroid is the one of largest dot product (DeepCluster-v2's k-means).
    spherical: bool = False
    # Lloyd iterations of faiss k-means.
    niter: int = 20
    # faiss subsamples the training set to k * this many points; assignment covers all points.
    max_points_per_centroid: int = 256
    # Relative perturbation when an empty cluster takes a copy of a non-empty centroid.
    split_eps: float = 1e-4
    # Cluster on GPUs when there are GPUs: faiss on every GPU of rank 0's node, torch on rank
    # 0's GPU (sharded: each rank's own GPU, either backend).
    use_gpu: bool = True
    # faiss: NumPy's certified search on CPU, faiss's on GPUs (faiss-gpu). torch: Lloyd's
    # iterations with torch on the rank's GPU, needing no faiss; on CPU it gives the faiss
    # backend's labels bit for bit (README, "Choosing a k-means backend").
    backend: ClusterBackend = ClusterBackend.faiss
    # The torch backend's distance products on a GPU: fp32 (certified exact, the default),
    # tf32 or bf16 (tensor cores, faster, not bitwise).
    torch_matmul: TorchMatmul = TorchMatmul.fp32
    # gather: rank 0 gathers every feature and clusters them (holds N x d). sharded: features
    # stay on their rank; PCA is fitted on a sample, Lloyd's sums are all-reduced (k x d per
    # iteration). Use sharded when N x d no longer fits rank 0 (docs/scaling.md).
    mode: ClusterMode = ClusterMode.gather

    def validate(self) -> None:
        checks = [
            (self.k >= 2, f"cluster.k={self.k} must be at least 2"),
            (self.pca_dim >= 0, f"cluster.pca_dim={self.pca_dim} must be >= 0"),
            (self.niter >= 1, f"cluster.niter={self.niter} must be >= 1"),
            (
                is_choice(self.mode, ClusterMode),
                unknown_choice("cluster.mode", self.mode, ClusterMode),
            ),
            (
                is_choice(self.backend, ClusterBackend),
                unknown_choice("cluster.backend", self.backend, ClusterBackend),
            ),
            (
                is_choice(self.torch_matmul, TorchMatmul),
                unknown_choice("cluster.torch_matmul", self.torch_matmul, TorchMatmul),
            ),
        ]
        raise_first_failed(checks)


@dataclass
class AugmentConfig:
    random_resized_crop: bool = True
    # Smallest crop area as a fraction of the image (torchvision's default is 0.08).
    min_scale: float = 0.08
    flip: bool = True

    def validate(self) -> None:
        if not 0 < self.min_scale <= 1:
            raise ConfigError("augment.min_scale must be in (0, 1]")


@dataclass
class OptimConfig:
    """SGD with momentum and the learning rate over the run.

    The rate at (epoch, step) is a pure function of these fields and the position, set before
    every step, so a resumed run follows the schedule of the uninterrupted one exactly.
    """

    # sgd, or lars: SGD whose step of each parameter is scaled by its trust ratio
    # lars_eta * ||w|| / (||grad|| + weight_decay * ||w||) (You et al., 2017; swav's LARC).
    optimizer: Optimizer = Optimizer.sgd
    lars_eta: float = 0.001
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    head_lr: float = 0.05
    # The head's momentum; null: optim.momentum. (DeepCluster's code steps its new head with
    # a separate SGD without momentum.)
    head_momentum: float | None = None
    # After the warmup: constant; step (times `gamma` at each epoch of `milestones`); cosine
    # (from the rate down to final_lr_factor x the rate at the end of train.epochs).
    schedule: LrSchedule = LrSchedule.constant
    # Linear warmup from 0 to the rate over this many epochs (fractions allowed; 0: none).
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    final_lr_factor: float = 0.0
    # Scale lr and head_lr by the global batch / base_batch_size (Goyal et al., 2017), so a
    # recipe moves between world sizes unchanged.
    scale_lr_with_batch: bool = False
    base_batch_size: int = 256
    # No weight decay on BatchNorm weights and on biases (every parameter with one dimension).
    no_decay_bn_bias: bool = False
    # Clip the gradients' global L2 norm to this before each step; 0: no clipping.
    clip_grad_norm: float = 0.0

    def validate(self) -> None:
        m = list(self.milestones)
        checks = [
            (
                is_choice(self.optimizer, Optimizer),
                unknown_choice("optim.optimizer", self.optimizer, Optimizer),
            ),
            (self.lars_eta > 0, f"optim.lars_eta={self.lars_eta} must be > 0"),
            (
                is_choice(self.schedule, LrSchedule),
                unknown_choice("optim.schedule", self.schedule, LrSchedule),
            ),
            (self.warmup_epochs >= 0, f"optim.warmup_epochs={self.warmup_epochs} must be >= 0"),
            (
                all(0 < a < b for a, b in zip([0, *m], m, strict=False)),
                f"optim.milestones={m} must be increasing epochs >= 1",
            ),
            (0 < self.gamma <= 1, f"optim.gamma={self.gamma} must be in (0, 1]"),
            (
                0 <= self.final_lr_factor <= 1,
                f"optim.final_lr_factor={self.final_lr_factor} must be in [0, 1]",
            ),
            (self.base_batch_size >= 1, "optim.base_batch_size must be >= 1"),
            (self.clip_grad_norm >= 0, "optim.clip_grad_norm must be >= 0 (0: off)"),
        ]
        raise_first_failed(checks)


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


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
    # The uniform sampler's version for a new run (a resumed run keeps the one it started
    # with): 2, int32 and at most two N-length temporaries; 1, the sampler before 2026-12
    # (int64, six N-length temporaries), only to reproduce a run made with it.
    sampler: int = 2
    # What `train` runs: deepcluster (DeepCluster, Caron et al. 2018), or deepcluster_v2
    # (multi-crop, k-means centroids as prototypes, a memory bank: the dcv2 section).
    method: Method = Method.deepcluster
    # On CUDA: train under bf16 autocast (the weights, gradients and optimizer stay fp32).
    # CPU training is always fp32.
    bf16: bool = True
    # torch.compile the network for training (off: eager, the default; on, the first steps
    # compile for a while: ~30 s for the small CNN on 2 CPU cores). compile_mode and
    # compile_backend are torch.compile's mode and backend (aot_eager: no code generation).
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"

    def validate(self) -> None:
        checks = [
            (
                self.compile_mode in ("default", "reduce-overhead", "max-autotune"),
                f"train.compile_mode={self.compile_mode!r} is unknown; use one of "
                "('default', 'reduce-overhead', 'max-autotune')",
            ),
            (
                self.compile_backend in COMPILE_BACKENDS,
                f"train.compile_backend={self.compile_backend!r} is unknown; use one of "
                f"{COMPILE_BACKENDS}",
            ),
            (is_choice(self.method, Method), unknown_choice("train.method", self.method, Method)),
            (self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1"),
            (
                self.global_batch_size >= 0,
                f"train.global_batch_size={self.global_batch_size} must be >= 0 (0: off)",
            ),
            (self.epochs >= 1, f"train.epochs={self.epochs} must be >= 1"),
            (self.samples_per_epoch >= 0, "train.samples_per_epoch must be >= 0"),
            (self.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
            (self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0"),
            (self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
            (self.stop_check_every >= 1, "train.stop_check_every must be >= 1"),
            (self.sampler in (1, 2), f"train.sampler={self.sampler} must be 1 or 2 (2: today's)"),
        ]
        raise_first_failed(checks)


@dataclass
class DeepClusterV2Config:
    """DeepCluster-v2 (Caron et al., "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments", 2020; swav's main_deepclusterv2.py): train.method=deepcluster_v2."""

    # k of each of the H independent k-means on the memory bank (swav: 3000 3000 3000).
    prototypes: list[int] = field(default_factory=lambda: [100, 100, 100])
    # Lloyd iterations of each (swav: 10), spherical, DeepCluster's empty-cluster split.
    kmeans_iters: int = 10
    # logits = z . C^T / temperature (swav: 0.1).
    temperature: float = 0.1
    # The projection head: Linear(feature_dim, hidden), BatchNorm, ReLU, Linear(hidden, dim).
    proj_hidden: int = 512
    proj_dim: int = 128
    # Multi-crop on the device: 2 large crops of data.image_size with area in
    # [large_min_scale, 1] (their embeddings fill the bank), and small_crops small crops of
    # small_size with area in [small_min_scale, small_max_scale] (swav: 2 x 224 in
    # [0.14, 1], 6 x 96 in [0.05, 0.14]).
    large_min_scale: float = 0.14
    small_crops: int = 6
    small_size: int = 96
    small_min_scale: float = 0.05
    small_max_scale: float = 0.14

    def validate(self) -> None:
        p = list(self.prototypes)
        checks = [
            (len(p) >= 1 and min(p) >= 2, f"dcv2.prototypes={p}: one k >= 2 per clustering"),
            (self.kmeans_iters >= 1, "dcv2.kmeans_iters must be >= 1"),
            (self.temperature > 0, f"dcv2.temperature={self.temperature} must be > 0"),
            (self.proj_hidden >= 1 and self.proj_dim >= 1, "dcv2.proj_hidden, proj_dim >= 1"),
            (0 < self.large_min_scale <= 1, "dcv2.large_min_scale must be in (0, 1]"),
            (self.small_crops >= 0, "dcv2.small_crops must be >= 0"),
            (self.small_size >= 1, "dcv2.small_size must be >= 1"),
            (
                0 < self.small_min_scale <= self.small_max_scale <= 1,
                "dcv2: need 0 < small_min_scale <= small_max_scale <= 1",
            ),
        ]
        raise_first_failed(checks)


# ------------------------------------------- checks against the data, the model and the world


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
    """cluster.k against the N samples of data.shards."""
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
