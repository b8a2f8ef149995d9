"""DeepCluster-v2 (Caron et al., 2020; swav's main_deepclusterv2.py): a targets strategy of
the one epoch loop.

    memory bank: each sample's L2-normalized embeddings of its 2 large crops, as the last
    epoch's training left them; sharded, each rank holding its own rows, keyed by sample index
    ──H spherical k-means, sharded (Lloyd's sums all-reduced, exact on any number of ranks)──▶
    centroids C_h (the prototypes: not learned) and assignments a_h (all_gather: N per head)
    ──▶ multi-crop views ──network + projection head, L2──▶ z
    ──loss = mean over h of CE(z C_hᵀ / τ, a_h[sample])──▶ SGD/LARS step
    ──▶ the large crops' z are the samples' new bank rows

There is no extraction pass: the bank is the training's own output. What fills it before the
first step (epoch 0): the freshly initialized network's embeddings of every sample's two large
crops, one forward pass in training mode (as swav's init_memory, which runs before training
from the random network), its BatchNorm statistics left as they were. A checkpoint holds the
bank; a run stopped before its first one fills it again, alike.

Each epoch is a seeded permutation of the N samples dealt over the ranks, in whole steps; the
few left over (fewer than world x batch) keep their older rows: `bank_staleness_*` says how many
epochs old the rows clustered were.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cluster_pipeline import dist
from cluster_pipeline.clustering import kmeans, metrics
from cluster_pipeline.clustering.labels import as_labels
from cluster_pipeline.clustering.ranks import Ranks
from cluster_pipeline.config import ClusterConfig, Config, ConfigError, per_rank_batch_size
from cluster_pipeline.data.augment import random_resized_crop, to_float
from cluster_pipeline.data.loader import batch_loader
from cluster_pipeline.data.reader import ShardIndex
from cluster_pipeline.features.extract import as_layout
from cluster_pipeline.features.gather import all_gather_labels, gather_features
from cluster_pipeline.models.nets import ClusterNet, ProjectionHead
from cluster_pipeline.training.checkpoints import to_array, to_tensor
from cluster_pipeline.training.recipe import clip_gradients
from cluster_pipeline.training.seeding import Stream, stream_seed
from cluster_pipeline.training.session import Session
from cluster_pipeline.training.targets import Columns, Targets

LARGE_VIEWS = 2  # the crops whose embeddings fill the bank (swav's crops_for_assign: 0 1)
FIRST_FILL = -1  # a bank row's age: written by the fill before epoch 0
UNFILLED = -2  # a row this rank takes over this epoch and has not trained on yet

DCV2_COLUMNS: Columns = (
    ("epoch", "epoch", 0), ("nmi_prev", "nmi_prev", 3), ("nmi_gt", "nmi_gt", 3),
    ("nmi_heads", "nmi_heads", 3), ("train_loss", "loss", 3), ("train_acc", "acc", 3),
    ("n_empty_before_split", "empty", 0), ("bank_staleness_max", "stale", 0),
    ("time_cluster_s", "cluster_s", 1), ("time_train_s", "train_s", 1),
    ("images_per_s", "img/s", 0),
)  # fmt: skip


@dataclasses.dataclass
class Bank:
    """This rank's rows of the memory bank: row j is sample `index[j]` (sorted), its
    `emb[j]` (views x d, unit rows) and the epoch whose training wrote it (`age`)."""

    index: np.ndarray  # (n,) int64
    emb: torch.Tensor  # (n, views, d) float32, on the training device
    age: np.ndarray  # (n,) int64

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.index, idx)

    def write(self, idx: np.ndarray, z: torch.Tensor, epoch: int) -> None:
        """Sample idx[i]'s embeddings z[i] (views x d), written in `epoch`."""
        rows = self.rows(idx)
        self.emb[torch.from_numpy(rows).to(self.emb.device)] = z
        self.age[rows] = epoch

    def take_over(self, drawn: np.ndarray, mine: np.ndarray) -> Bank:
        """The rows this rank holds during an epoch: the ones nobody draws (`drawn`, an
        N-mask over all ranks' draws) stay where they are, and each rank takes the samples it
        draws (rows it did not hold are UNFILLED until its step writes them)."""
        keep = ~drawn[self.index]
        index = np.union1d(self.index[keep], mine)
        emb = torch.zeros((len(index), *self.emb.shape[1:]), device=self.emb.device)
        age = np.full(len(index), UNFILLED, dtype=np.int64)
        had = np.isin(index, self.index)
        old = self.rows(index[had])
        emb[torch.from_numpy(np.flatnonzero(had)).to(emb.device)] = self.emb[
            torch.from_numpy(old).to(emb.device)
        ]
        age[had] = self.age[old]
        return Bank(index, emb, age)


def epoch_permutation_draws(n: int, seed: int, rank: int, world: int, b: int) -> np.ndarray:
    """This rank's draws of a DeepCluster-v2 epoch: a seeded permutation of the N samples
    dealt over the ranks, cut to whole steps, as many on every rank."""
    return np.ascontiguousarray(epoch_permutation(n, seed, world, b)[rank::world])


def epoch_permutation(n: int, seed: int, world: int, b: int) -> np.ndarray:
    """All ranks' draws of the epoch in dealing order: rank r's are every world-th from r."""
    per_rank = n // (world * b) * b
    return np.random.default_rng(seed).permutation(n)[: per_rank * world]


def drawn_mask(n: int, seed: int, world: int, b: int) -> np.ndarray:
    """Which samples some rank draws in the epoch of `seed` (an N-mask, alike on every rank):
    one permutation, not one per rank."""
    mask = np.zeros(n, dtype=bool)
    mask[epoch_permutation(n, seed, world, b)] = True
    return mask


def head_clustering(cfg: Config, h: int, epoch: int, n: int) -> tuple[ClusterConfig, int]:
    """Clustering h of an epoch: spherical k-means with k = dcv2.prototypes[h] and
    dcv2.kmeans_iters iterations on every row (the cluster section's backend and split), and
    its seed."""
    c = dataclasses.replace(cfg.cluster, k=cfg.dcv2.prototypes[h], pca_dim=0, l2_normalize=True,
                            spherical=True, niter=cfg.dcv2.kmeans_iters,
                            max_points_per_centroid=n)  # fmt: skip
    return c, stream_seed(cfg.train.seed, Stream.EPOCH, epoch) + 7919 * h


def large_and_small_views(
    x: torch.Tensor, cfg: Config, gen: torch.Generator, small: bool = True
) -> list[torch.Tensor]:
    """Multi-crop on the batch, on the device: [the 2 large crops, then the small ones
    concatenated] (one tensor per resolution, the model's multi-resolution forward)."""
    v, size, flip = cfg.dcv2, cfg.data.image_size, cfg.augment.flip
    large = [random_resized_crop(x, size, v.large_min_scale, flip, gen) for _ in range(2)]
    out = [torch.cat(large)]
    if small and v.small_crops:
        crops = [random_resized_crop(x, v.small_size, v.small_min_scale, flip, gen,
                                     max_scale=v.small_max_scale)
                 for _ in range(v.small_crops)]  # fmt: skip
        out.append(torch.cat(crops))
    return out


class DeepClusterV2Targets(Targets):
    """H clusterings of the memory bank each epoch; their centroids are the prototypes."""

    kind, head, columns = "deepcluster_v2", "projection", DCV2_COLUMNS

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.bank: Bank | None = None
        self.pending: dict[str, Any] | None = None  # a checkpoint's state, placed in begin()
        self.assignments: np.ndarray | None = None  # (H, N) int32 on every rank
        self.centroids: list[torch.Tensor] = []  # H of (k_h, d) unit rows, on the device
        self.prev_labels: np.ndarray | None = None
        self.stats: dict[str, Any] = {}
        self.saved_bank: dict[str, np.ndarray] | None = None  # rank 0's gathered bank

    # ------------------------------------------------------------------------------ set-up

    def report_k(self, cfg: Config) -> int | None:
        return int(cfg.dcv2.prototypes[0])

    def make_head(self, model: ClusterNet, index: ShardIndex, seed: int) -> None:
        """The projection head, initialized alike on every rank (from `seed`)."""
        v = self.check(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = ProjectionHead(model.feature_dim, v.proj_hidden, v.proj_dim)
        model.head = head.to(next(model.parameters()).device)  # type: ignore[assignment]

    def check(self, index: ShardIndex) -> Any:
        """The dcv2 section against N; data.on_error=fail (the bank covers every sample)."""
        v, n = self.cfg.dcv2, index.num_samples
        if max(v.prototypes) > n:
            raise ConfigError(f"dcv2.prototypes={list(v.prototypes)}: k above the {n} samples "
                              f"in {self.cfg.data.shards}; lower it")  # fmt: skip
        if v.small_size > self.cfg.data.load_size:
            raise ConfigError(f"dcv2.small_size={v.small_size} exceeds data.load_size="
                              f"{self.cfg.data.load_size}")  # fmt: skip
        if self.cfg.data.on_error != "fail":
            raise ConfigError("train.method=deepcluster_v2 needs data.on_error=fail: its memory "
                              "bank holds a row for every sample")  # fmt: skip
        return v

    def begin(self, s: Session) -> bool:
        """The bank: this rank's rows of the checkpoint's, or the first fill. Nothing to save
        at once: epoch 0's clustering comes first (`for_epoch`)."""
        if self.pending is not None:
            self.place(s.ctx)
        else:
            self.bank = self.first_fill(s)
        return False

    @torch.no_grad()
    def first_fill(self, s: Session) -> Bank:
        """Epoch 0's bank: the new network's embeddings of the large crops of this rank's
        epoch-0 draws and of its share (index mod world) of the samples nobody draws."""
        cfg, ctx, n = s.cfg, s.ctx, s.index.num_samples
        b = per_rank_batch_size(cfg, ctx.world)
        seed = stream_seed(cfg.train.seed, Stream.EPOCH, 0)
        left = np.flatnonzero(~drawn_mask(n, seed, ctx.world, b))
        rows = np.union1d(epoch_permutation_draws(n, seed, ctx.rank, ctx.world, b),
                          left[left % ctx.world == ctx.rank])  # fmt: skip
        emb = torch.zeros((len(rows), LARGE_VIEWS, cfg.dcv2.proj_dim), device=ctx.device)
        bank = Bank(rows, emb, np.full(len(rows), FIRST_FILL))
        buffers = {k: v.clone() for k, v in s.model.state_dict().items()
                   if "running" in k or "num_batches" in k}  # fmt: skip
        s.model.train()
        gen = torch.Generator()
        for step, (idx, images, *_) in enumerate(
            batch_loader(s.reader, rows, b, cfg.data.num_workers, cfg.dist.timeout_s)
        ):
            gen.manual_seed(stream_seed(cfg.train.seed, Stream.BANK_FILL, 0, ctx.rank, step))
            x = to_float(images.to(ctx.device), cfg.data.mean, cfg.data.std)
            (large,) = large_and_small_views(x, cfg, gen, small=False)
            z = F.normalize(s.model(as_layout(large, cfg, ctx)).float(), dim=1)
            bank.write(idx.numpy(), z.view(LARGE_VIEWS, len(idx), -1).transpose(0, 1), -1)
        s.model.load_state_dict(buffers, strict=False)  # the fill leaves no statistic behind
        return bank

    # ------------------------------------------------------------------------- each epoch

    def for_epoch(self, s: Session) -> None:
        """The H clusterings of the bank, then this epoch's rows of the bank.

        Collective: call on every rank."""
        cfg, ctx, epoch, n = s.cfg, s.ctx, s.pos.epoch, s.index.num_samples
        assert self.bank is not None
        if (self.bank.age == UNFILLED).any():
            raise RuntimeError("the memory bank has rows no step wrote: an epoch ended early")
        s.stop.stop_if_requested(s.pos)
        with s.pos.timer("cluster"):
            self.cluster_bank(s)
        stale = epoch - 1 - self.bank.age
        total = dist.all_reduce(ctx, np.array([stale.sum(), len(stale)], np.float64))
        worst = dist.all_reduce(ctx, np.array([stale.max(initial=0)], np.int64), "max")
        self.stats |= {"bank_staleness_mean": float(total[0] / total[1]),
                       "bank_staleness_max": int(worst[0])}  # fmt: skip
        b = per_rank_batch_size(cfg, ctx.world)
        seed = stream_seed(cfg.train.seed, Stream.EPOCH, epoch)
        mine = epoch_permutation_draws(n, seed, ctx.rank, ctx.world, b)
        self.bank = self.bank.take_over(drawn_mask(n, seed, ctx.world, b), mine)

    def cluster_bank(self, s: Session) -> None:
        """H independent spherical k-means (dcv2.prototypes, dcv2.kmeans_iters), head h on
        large crop h mod 2's rows, sharded; every rank gets the centroids and all N labels."""
        cfg, ctx, n = s.cfg, s.ctx, s.index.num_samples
        assert self.bank is not None
        x = self.bank.emb.cpu().numpy()
        gpu = (ctx.device.index or 0) if ctx.device.type == "cuda" else None
        labels, centroids, losses, empty = [], [], [], 0
        for h in range(len(cfg.dcv2.prototypes)):
            c, seed = head_clustering(cfg, h, s.pos.epoch, n)
            engine = kmeans.make_engine(c, gpu, all_gpus=False)
            rows = np.ascontiguousarray(x[:, h % LARGE_VIEWS])
            got = kmeans.cluster(Ranks(ctx), self.bank.index, rows, c, seed, engine)
            labels.append(all_gather_labels(ctx, self.bank.index, got.labels,
                                            np.zeros(0, np.int64), n))  # fmt: skip
            centroids.append(torch.from_numpy(got.centroids).to(ctx.device))
            losses.append(got.loss)
            empty += got.n_empty_before_split
        self.assignments = np.stack([as_labels(v) for v in labels])
        self.centroids = centroids
        self.labels = self.assignments[0]
        self.stats = {"kmeans_loss": float(np.mean(losses)), "n_empty_before_split": empty,
                      "k": int(cfg.dcv2.prototypes[0])}  # fmt: skip
        if ctx.is_main:
            self.stats["nmi_prev"] = metrics.nmi(self.prev_labels, self.labels)
            pairs = [metrics.nmi(self.assignments[i], self.assignments[j]) or 0.0
                     for i in range(len(labels)) for j in range(i + 1, len(labels))]  # fmt: skip
            self.stats["nmi_heads"] = float(np.mean(pairs)) if pairs else None
        self.prev_labels = None

    def draws(self, s: Session, batch_size: int) -> np.ndarray:
        seed = stream_seed(s.cfg.train.seed, Stream.EPOCH, s.pos.epoch)
        return epoch_permutation_draws(s.index.num_samples, seed, s.ctx.rank, s.ctx.world,
                                       batch_size)  # fmt: skip

    def train_step(
        self, s: Session, idx: torch.Tensor, images: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """Multi-crop views, one forward, the mean over heads of the cross-entropy between
        every view's z C_hᵀ / τ and its sample's assignment; the large views' z go to the
        bank. Returns (loss, accuracy of head 0 on the first large view)."""
        cfg, ctx = s.cfg, s.ctx
        assert self.bank is not None and self.assignments is not None
        x = to_float(images, cfg.data.mean, cfg.data.std)
        views = [as_layout(v, cfg, ctx) for v in large_and_small_views(x, cfg, gen)]
        b, crops = len(idx), LARGE_VIEWS + cfg.dcv2.small_crops
        with torch.autocast(ctx.device.type, torch.bfloat16,
                            enabled=cfg.train.bf16 and ctx.device.type == "cuda"):  # fmt: skip
            out = s.ddp(views)
        z = F.normalize(out.float(), dim=1)
        targets = torch.from_numpy(self.assignments[:, idx.numpy()]).to(ctx.device).long()
        logits = [z @ c.T / cfg.dcv2.temperature for c in self.centroids]
        loss = torch.stack([F.cross_entropy(logits_h, targets[h].repeat(crops))
                            for h, logits_h in enumerate(logits)]).mean()  # fmt: skip
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(s.ddp, cfg.optim.clip_grad_norm)
        s.optimizer.step()
        large = z[: LARGE_VIEWS * b].detach().view(LARGE_VIEWS, b, -1).transpose(0, 1)
        self.bank.write(idx.numpy(), large, s.pos.epoch)
        accuracy = (logits[0][:b].detach().argmax(1) == targets[0]).to(loss.dtype).mean()
        return torch.stack([loss.detach(), accuracy])

    def epoch_row(self, truth: np.ndarray | None) -> dict[str, Any]:
        assert self.labels is not None
        row = dict(self.stats) | {"nmi_gt": metrics.nmi(truth, self.labels),
                                  "ari_gt": metrics.ari(truth, self.labels)}  # fmt: skip
        return row | metrics.cluster_stats(self.labels, int(self.stats["k"]))

    def end_epoch(self) -> np.ndarray | None:
        self.prev_labels, self.labels = self.labels, None
        return self.prev_labels

    @property
    def final_labels(self) -> np.ndarray | None:
        return self.prev_labels

    # ------------------------------------------------------------------------ checkpoints

    def collect(self, ctx: dist.DistContext) -> None:
        """Every rank's bank rows (embeddings, age, holder) on rank 0, each sample once.

        Collective: call on every rank."""
        assert self.bank is not None
        bank = self.bank
        n_views, d = bank.emb.shape[1:]
        packed = np.concatenate([
            bank.emb.reshape(len(bank.index), -1).cpu().numpy(),
            bank.age[:, None].astype(np.float32), np.full((len(bank.index), 1), ctx.rank,
                                                          np.float32)], axis=1)  # fmt: skip
        num = int(dist.all_reduce(ctx, np.array([len(bank.index)], np.int64))[0])
        got = gather_features(ctx, bank.index, packed, num)
        if got is None:
            self.saved_bank = None
            return
        rows = got.feats
        self.saved_bank = {
            "index": got.index, "emb": rows[:, :-2].reshape(-1, n_views, d).copy(),
            "age": rows[:, -2].astype(np.int64), "holder": rows[:, -1].astype(np.int64),
        }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        bank = self.saved_bank or {}
        return super().state_dict() | {
            "assignments": to_tensor(self.assignments),
            "centroids": [c.cpu() for c in self.centroids],
            "prev_labels": to_tensor(self.prev_labels), "stats": dict(self.stats),
            "bank": {k: to_tensor(v) for k, v in bank.items()},
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], run_dir: Path) -> None:
        super().load_state_dict(state, run_dir)
        assignments, prev = to_array(state["assignments"]), to_array(state["prev_labels"])
        self.assignments = None if assignments is None else assignments.astype(np.int32)
        self.prev_labels = None if prev is None else as_labels(prev)
        self.stats = dict(state["stats"])
        self.pending = state

    def place(self, ctx: dist.DistContext) -> None:
        """After a resume: this rank's rows of the saved bank (the rank that held each; at an
        epoch boundary with another number of ranks, holder mod world), centroids on the
        device."""
        state, self.pending = self.pending, None
        assert state is not None
        bank = {k: v.numpy() for k, v in state["bank"].items()}
        index, holder = bank["index"], bank["holder"] % ctx.world
        mine = holder == ctx.rank
        self.bank = Bank(index[mine], torch.from_numpy(bank["emb"][mine]).to(ctx.device),
                         bank["age"][mine])  # fmt: skip
        self.centroids = [c.to(ctx.device) for c in state["centroids"]]
