"""Where and how a run executes: W&B, the run directory, the process group and the SLURM job.

Each section checks its own fields in `validate()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster_pipeline.config.choices import WandbMode, is_choice, unknown_choice
from cluster_pipeline.config.errors import raise_first_failed


@dataclass
class WandbConfig:
    # auto: online if WANDB_API_KEY is set, else offline. Also online, offline, disabled.
    mode: WandbMode = WandbMode.auto
    project: str = "cluster_pipeline"
    entity: str | None = None
    name: str | None = None
    # Rank 0 logs a row of training metrics (loss, accuracy, learning rate, img/s, data wait,
    # GPU memory) every this many steps, against train/global_step; 0: epoch rows only.
    log_every_steps: int = 50
    # Each DeepCluster epoch: a grid of `grid_clusters` random clusters, `grid_images` random
    # images of each, as a W&B image; 0: none.
    grid_clusters: int = 6
    grid_images: int = 8

    def validate(self) -> None:
        checks = [
            (is_choice(self.mode, WandbMode), unknown_choice("wandb.mode", self.mode, WandbMode)),
            (self.log_every_steps >= 0, "wandb.log_every_steps must be >= 0 (0: off)"),
            (self.grid_clusters >= 0, "wandb.grid_clusters must be >= 0 (0: off)"),
            (self.grid_images >= 1, "wandb.grid_images must be >= 1"),
        ]
        raise_first_failed(checks)


@dataclass
class RunConfig:
    """Where the run lives; any directory name is the user's choice, so nothing to check."""

    # Run directory; empty means runs/<config name>-<timestamp>, chosen by rank 0.
    dir: str = ""
    # Continue the run found in `dir` (its last checkpoint); false refuses to touch it.
    resume: bool = True
    # Progress of extraction and training on rank 0: a tqdm bar when stdout is a terminal,
    # else a log line every 30 s (logs and redirected stdout stay free of bar redraws).
    progress: bool = True


@dataclass
class DistConfig:
    """The process group's timeouts: defined here only (dist/ takes them as arguments)."""

    # Seconds a collective may wait for a live peer before the run fails (a hang). Keep it above
    # the longest wait of a healthy run: the other ranks wait in broadcast_labels while rank 0
    # clusters. Also the longest a DataLoader batch may take.
    timeout_s: int = 600
    # A rank whose heartbeat (a thread beating into the rendezvous store) has not moved for this
    # many seconds is lost (killed, or its node failed): every other rank stops with an error
    # naming it, however long its collectives may wait. 0 turns the heartbeat off (debuggers).
    heartbeat_timeout_s: float = 180.0

    def validate(self) -> None:
        checks = [
            (self.timeout_s > 0, "dist.timeout_s must be > 0"),
            (self.heartbeat_timeout_s >= 0, "dist.heartbeat_timeout_s must be >= 0 (0: off)"),
        ]
        raise_first_failed(checks)


@dataclass
class SlurmConfig:
    """The SLURM job of `make launch` (launcher/slurm.py); Make variables override these.

    The launcher reads the partition before it submits: a request that does not fit is an
    error there, and a field left unset (null) is set to what fits the partition's nodes.
    """

    nodes: int = 1
    # GPUs per node; unset: as many as the partition's nodes have (Gres=gpu:N), 0 on CPU nodes.
    gpus_per_node: int | None = None
    # Ranks per node; unset: one per GPU, or one on CPU nodes. With GPUs it must equal them.
    tasks_per_node: int | None = None
    # Unset: the node's CPUs shared among its ranks.
    cpus_per_task: int | None = None
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
    # The launcher wants it under half of timeout_min.
    signal_delay_s: int = 120
    # Requeues after timeouts before the job gives up (preemptions do not count).
    max_num_timeout: int = 20
    # Extra sbatch options, e.g. {exclusive: "", reservation: my_resa}.
    additional_parameters: dict[str, str] = field(default_factory=dict)
    # Job name; empty means the config name.
    job_name: str = ""

    def validate(self) -> None:
        gpus, tasks = self.gpus_per_node, self.tasks_per_node
        checks = [
            (self.nodes >= 1, f"slurm.nodes={self.nodes} must be >= 1"),
            (gpus is None or gpus >= 0, "slurm.gpus_per_node must be >= 0 (0: a CPU job)"),
            (tasks is None or tasks >= 1, "slurm.tasks_per_node must be >= 1"),
            (
                not gpus or tasks is None or tasks == gpus,
                f"slurm.tasks_per_node={tasks} but slurm.gpus_per_node={gpus}: a GPU job runs "
                "one rank per GPU; set them equal, or leave tasks_per_node unset",
            ),
            (
                self.cpus_per_task is None or self.cpus_per_task >= 1,
                "slurm.cpus_per_task must be >= 1",
            ),
            (self.timeout_min >= 1, "slurm.timeout_min must be >= 1"),
            (self.signal_delay_s >= 0, "slurm.signal_delay_s must be >= 0"),
            (self.max_num_timeout >= 0, "slurm.max_num_timeout must be >= 0"),
        ]
        raise_first_failed(checks)
