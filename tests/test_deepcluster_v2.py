"""DeepCluster-v2: the bank's pieces, LARS, multi-crop, and whole runs on 2 gloo ranks: exact
stop and resume, the first fill of the bank, the clustering equal on 1 and 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster_pipeline.clustering import kmeans
from cluster_pipeline.config import Config, load_config
from cluster_pipeline.data.augment import to_float
from cluster_pipeline.data.loader import batch_loader
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.models.nets import build_model
from cluster_pipeline.run import checkpoint
from cluster_pipeline.testing.multiproc import run_ranks
from cluster_pipeline.testing.stops import train_rank, weights_hash
from cluster_pipeline.training.deepcluster_v2 import (
    UNFILLED,
    Bank,
    DeepClusterV2Targets,
    drawn_mask,
    epoch_permutation_draws,
    head_clustering,
    large_and_small_views,
)
from cluster_pipeline.training.recipe import make_optimizer
from cluster_pipeline.training.seeding import Stream, stream_seed

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "digits_test.yaml")
EPOCHS = 3
# digits: 1797 samples, 2 ranks x 64: 14 steps per epoch (1792 drawn, 5 left over). One stop
# poll before each epoch's clustering and one per step: epoch e's are 15e+1 and 15e+2+s.
POLLS_PER_EPOCH = 15
DCV2 = ["train.method=deepcluster_v2", "dcv2.prototypes=[10,12]", "dcv2.small_crops=2",
        "dcv2.small_size=4", "dcv2.small_min_scale=0.2", "dcv2.small_max_scale=0.5",
        "dcv2.large_min_scale=0.5", "dcv2.proj_hidden=64", "dcv2.proj_dim=16",
        "optim.optimizer=lars", "optim.lr=0.5", "optim.head_lr=0.5", "optim.schedule=cosine",
        "optim.warmup_epochs=0.5", f"train.epochs={EPOCHS}", "train.stop_check_every=1",
        "train.checkpoint_every_steps=4", "train.keep_checkpoints=50"]  # fmt: skip


# ---------------------------------------------------------------- pieces, in this process


def test_an_epochs_draws_deal_a_permutation_in_whole_equal_steps() -> None:
    n, world, b = 1797, 3, 64
    draws = [epoch_permutation_draws(n, 5, r, world, b) for r in range(world)]
    assert {len(d) for d in draws} == {n // (world * b) * b}
    every = np.concatenate(draws)
    assert len(np.unique(every)) == len(every)  # no sample twice in an epoch
    mask = drawn_mask(n, 5, world, b)
    assert mask.sum() == len(every) and mask[every].all()
    assert not np.array_equal(draws[0], epoch_permutation_draws(n, 6, 0, world, b))


def test_taking_over_an_epochs_rows_keeps_every_sample_on_exactly_one_rank() -> None:
    """The rows nobody draws stay where they were, with their values; each rank takes the
    samples it draws, the ones it did not hold UNFILLED until a step writes them."""
    n, world, b, d = 300, 2, 16, 4
    owner = np.arange(n) % world
    banks = []
    for r in range(world):
        held = np.flatnonzero(owner == r)
        values = torch.from_numpy(held).float()[:, None, None].expand(-1, 2, d).clone()
        banks.append(Bank(held, values, np.full(len(held), 3)))
    drawn = drawn_mask(n, 9, world, b)
    new = [bank.take_over(drawn, epoch_permutation_draws(n, 9, r, world, b))
           for r, bank in enumerate(banks)]  # fmt: skip
    held = np.concatenate([bank.index for bank in new])
    assert np.array_equal(np.sort(held), np.arange(n))  # every sample once
    for r, bank in enumerate(new):
        mine = set(epoch_permutation_draws(n, 9, r, world, b).tolist())
        for j, i in enumerate(bank.index):
            kept_by_me = owner[i] == r
            if i not in mine:  # left over: stays with its old holder, its value and age
                assert kept_by_me and bank.age[j] == 3 and float(bank.emb[j, 0, 0]) == i
            elif kept_by_me:
                assert float(bank.emb[j, 1, 3]) == i
            else:
                assert bank.age[j] == UNFILLED and float(bank.emb[j].abs().sum()) == 0
    bank = new[0]
    some = bank.index[:3]
    bank.write(some, torch.ones(3, 2, d), 4)
    assert (bank.age[:3] == 4).all() and float(bank.emb[:3].sum()) == 3 * 2 * d


def test_multi_crop_views_are_one_batch_per_resolution() -> None:
    cfg = load_config(CONFIG, DCV2)
    x = torch.randn(5, 1, 8, 8)
    large, small = large_and_small_views(x, cfg, torch.Generator().manual_seed(0))
    assert large.shape == (2 * 5, 1, 8, 8) and small.shape == (2 * 5, 1, 4, 4)
    assert not torch.equal(large[:5], large[5:])  # two different crops of each image
    model = build_model(cfg.model, 1, 10)
    out = model([large, small])
    assert out.shape == (4 * 5, 10)  # one forward: the body per resolution, the head on all


def test_lars_scales_each_update_by_its_trust_ratio() -> None:
    lars = ["optim.optimizer=lars", "optim.lars_eta=0.01", "optim.momentum=0",
            "optim.weight_decay=0.1", "optim.lr=0.5", "optim.head_lr=0.5"]  # fmt: skip
    cfg = load_config(CONFIG, lars)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 10)
    opt = make_optimizer(model, cfg, 64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    for n, p in model.named_parameters():
        w, g = before[n], grads[n]
        trust = 0.01 * w.norm() / (g.norm() + 0.1 * w.norm()) if w.norm() > 0 else 1.0
        want = w - 0.5 * trust * (g + 0.1 * w)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7, msg=n)
    assert opt.param_groups[0]["weight_decay"] == 0.1  # restored after the step


# ------------------------------------------------------------------------ whole runs


STOPS = {"mid-epoch": POLLS_PER_EPOCH + 2 + 5, "before-clustering": 2 * POLLS_PER_EPOCH + 1}


def every_case(rank: int, world: int, shards: Path, base: Path) -> dict:
    """The uninterrupted run, each stop of STOPS resumed, and a run stopped at its first
    poll (the bank filled, nothing clustered yet), in one pair of rank processes."""

    def args(name: str) -> list[str]:
        return [f"data.shards={shards}", f"run.dir={base / name}", "wandb.mode=disabled", *DCV2]

    out = {"reference": train_rank(rank, world, CONFIG, args("reference"), 0)}
    for case, at in STOPS.items():
        out[case] = [
            train_rank(rank, world, CONFIG, args(case), at),
            train_rank(rank, world, CONFIG, args(case), 0),
        ]
    out["fill"] = train_rank(rank, world, CONFIG, args("fill"), 1)
    return out


@pytest.fixture(scope="module")
def runs(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dcv2")
    results = run_ranks(2, every_case, digits_shards, base, timeout=600)
    assert [r["reference"] for r in results] == ["done", "done"]
    for case in STOPS:
        assert [r[case][1] for r in results] == ["done", "done"], case
        assert all(r[case][0].startswith("stopped:") for r in results), case
    assert all(r["fill"].startswith("stopped:") for r in results)
    return base


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_its_clusterings_and_the_banks_staleness(runs: Path) -> None:
    rows = rows_of(runs / "reference")
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    for r in rows:
        assert 0 <= r["nmi_heads"] <= 1 and 0 <= r["nmi_gt"] <= 1 and r["train_loss"] > 0
        assert r["cluster_size_min"] >= 1 and r["k"] == 10
    assert rows[0]["bank_staleness_max"] == 0  # the first fill, right before epoch 0
    assert [r["bank_staleness_max"] for r in rows[1:]] == [1, 1]  # 5 left over each epoch
    assert rows[0]["nmi_prev"] is None and rows[-1]["train_loss"] < rows[0]["train_loss"]
    state = checkpoint.load(checkpoint.checkpoint_path(runs / "reference", EPOCHS))
    t = state["targets"]
    assert t["kind"] == "deepcluster_v2" and t["assignments"].shape == (2, 1797)
    for h, (k, c) in enumerate(zip((10, 12), t["centroids"], strict=True)):
        assert c.shape == (k, 16)
        torch.testing.assert_close(c.norm(dim=1), torch.ones(k))  # unit prototypes
        assert torch.bincount(t["assignments"][h].long(), minlength=k).min() >= 1  # split
    bank = t["bank"]
    assert torch.equal(bank["index"], torch.arange(1797)) and bank["emb"].shape == (1797, 2, 16)
    assert set(bank["holder"].tolist()) == {0, 1}  # sharded: both ranks held rows
    torch.testing.assert_close(bank["emb"].norm(dim=2), torch.ones(1797, 2))


@pytest.mark.parametrize("case", list(STOPS))
def test_stop_and_resume_is_bit_identical(runs: Path, case: str) -> None:
    """The bank (each rank's rows), the centroids and the assignments are in the checkpoint."""
    assert weights_hash(runs / case, EPOCHS) == weights_hash(runs / "reference", EPOCHS)
    drop = ("time_", "images_per_s")
    strip = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows_of(runs / case)]
    want = [{k: v for k, v in r.items() if not k.startswith(drop)}
            for r in rows_of(runs / "reference")]  # fmt: skip
    assert strip == want


def test_the_clustering_of_the_bank_on_one_process_equals_two_ranks(runs: Path) -> None:
    """Epoch 1's H k-means ran sharded on 2 ranks; on 1 process, from the bank as epoch 0
    left it (the epoch-boundary checkpoint), they give the same bits."""
    ref = runs / "reference"
    bank = checkpoint.load(checkpoint.checkpoint_path(ref, 1))["targets"]["bank"]
    during = checkpoint.load(checkpoint.checkpoint_path(ref, 1, 4))["targets"]
    cfg = load_config(CONFIG, DCV2)
    x = bank["emb"].numpy()
    for h in range(2):
        c, seed = head_clustering(cfg, h, 1, 1797)
        one = kmeans.cluster_features(np.ascontiguousarray(x[:, h % 2]), c, seed)
        np.testing.assert_array_equal(one.labels, during["assignments"][h].numpy())
        np.testing.assert_array_equal(one.centroids, during["centroids"][h].numpy())


def test_the_first_fill_is_the_new_networks_embeddings_of_the_large_crops(
    runs: Path, digits_shards: Path
) -> None:
    """Stopped at its first poll (before epoch 0's clustering): the checkpoint's bank is the
    initial network's L2-normalized projections of each sample's two large crops, computed
    here again the way the fill does (training-mode BatchNorm, each rank's rows in batches)."""
    state = checkpoint.load(checkpoint.list_checkpoints(runs / "fill")[-1])
    bank = state["targets"]["bank"]
    assert (bank["age"] == -1).all() and state["targets"]["assignments"] is None
    cfg = load_config(CONFIG, [f"data.shards={digits_shards}", *DCV2])
    torch.manual_seed(stream_seed(cfg.train.seed, Stream.MODEL))
    model = build_model(cfg.model, 1, cfg.cluster.k)
    index = ShardIndex.load(digits_shards)
    DeepClusterV2Targets(cfg).make_head(model, index,
                                        stream_seed(cfg.train.seed, Stream.HEAD, -1))  # fmt: skip
    model.train()
    reader = SampleReader(index, cfg.data.load_size, 1)
    n, b, gen = 1797, 64, torch.Generator()
    seed = stream_seed(cfg.train.seed, Stream.EPOCH, 0)
    left = np.flatnonzero(~drawn_mask(n, seed, 2, b))
    rank = 1  # the second rank's rows
    rows = np.union1d(epoch_permutation_draws(n, seed, rank, 2, b), left[left % 2 == rank])
    assert (bank["holder"][rows] == rank).all()
    with torch.no_grad():
        for step, (idx, images, *_) in enumerate(batch_loader(reader, rows, b, 0)):
            gen.manual_seed(stream_seed(cfg.train.seed, Stream.BANK_FILL, 0, rank, step))
            (large,) = large_and_small_views(to_float(images, [0.3], [0.35]), cfg, gen, False)
            z = F.normalize(model(large), dim=1).view(2, len(idx), -1).transpose(0, 1)
            torch.testing.assert_close(bank["emb"][idx], z, rtol=1e-5, atol=1e-6)


def test_bad_dcv2_settings_are_one_line(digits_shards: Path) -> None:
    from cluster_pipeline.config import ConfigError

    cfg = load_config(CONFIG, [f"data.shards={digits_shards}", *DCV2, "dcv2.prototypes=[5000]"])
    with pytest.raises(ConfigError, match=r"dcv2\.prototypes=\[5000\]: k above the 1797"):
        DeepClusterV2Targets(cfg).check(ShardIndex.load(digits_shards))
    with pytest.raises(ConfigError, match=r"dcv2\.temperature=0\.0 must be > 0"):
        load_config(CONFIG, ["dcv2.temperature=0"])
    assert isinstance(cfg, Config)
