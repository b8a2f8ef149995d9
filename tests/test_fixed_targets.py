"""Training on fixed targets: train-supervised, pretrain-rotnet and clusterfit on real shards.

The supervised run is the pretrained network of the ClusterFit runs. ClusterFit runs end to end
on 2 torchrun ranks; its clustering on 2 ranks equals the one on 1 rank, and a run stopped
mid-epoch and continued ends bit-identical to the uninterrupted torchrun run, without
clustering again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_e2e import cli, rows_of

from cluster_pipeline import dist
from cluster_pipeline.cli import main
from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.setup import open_data_and_model
from cluster_pipeline.run.stop import StopFlag, Stopped
from cluster_pipeline.run.wandb_file import read_wandb_file
from cluster_pipeline.testing.multiproc import next_rendezvous_port, run_ranks
from cluster_pipeline.testing.stops import StopAtPoll
from cluster_pipeline.training.clusterfit import (
    LABELS_FILE,
    SUMMARY_FILE,
    cluster_pretrained,
    clusterfit_config,
)
from cluster_pipeline.training.methods import run_clusterfit
from cluster_pipeline.training.rotnet import rotate_batch

pytestmark = pytest.mark.slow  # every test here starts rank processes or whole runs

CONFIG = "configs/digits_test.yaml"
N = 1797
K = 24
EPOCHS = 2
# ClusterFit runs: 2 ranks x 64 = 128 images per step, 5 steps per epoch (640 draws).
FIT = [f"cluster.k={K}", f"train.epochs={EPOCHS}", "train.samples_per_epoch=640",
       "train.stop_check_every=1", "train.checkpoint_every_steps=2",
       "train.keep_checkpoints=50"]  # fmt: skip


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode() + t.numpy().tobytes())
    return h.hexdigest()


def values(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "images_per_s"}
            for r in rows_of(run_dir)]  # fmt: skip


@pytest.fixture(scope="module")
def supervised(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("sup") / "run"
    res = cli("train-supervised", "--config", CONFIG, f"data.shards={digits_shards}",
              f"run.dir={run_dir}", "train.epochs=2")  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def test_supervised_learns_the_classes(supervised: Path) -> None:
    rows = rows_of(supervised)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[-1]["train_acc"] > 0.5, rows  # chance: 0.1
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert weights(checkpoint.checkpoint_path(supervised, 2))["head.weight"].shape[0] == 10


def test_supervised_without_labels_is_a_clear_error(
    digits_shards: Path, tmp_path: Path, dist_env: None, capsys: pytest.CaptureFixture
) -> None:
    shards = tmp_path / "unlabelled"
    shutil.copytree(digits_shards, shards)
    samples = np.load(shards / "samples.npy")
    samples[:, 3] = -1
    np.save(shards / "samples.npy", samples)
    code = main(["train-supervised", "--config", CONFIG, f"data.shards={shards}",
                 f"run.dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and str(shards) in err and "no class label" in err, err


def test_rotate_batch_turns_each_image_four_ways() -> None:
    img = torch.zeros(1, 1, 3, 3)
    img[0, 0, 0, 0], img[0, 0, 0, 1] = 1.0, 2.0  # top-left corner and its right neighbour
    x, y = rotate_batch(torch.cat([img, img + 10]), torch.tensor([7, 7]))
    assert x.shape == (8, 1, 3, 3) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(x[0], img[0]) and torch.equal(x[1], img[0] + 10)
    # 90 degrees counter-clockwise: the top row becomes the left column, read upwards.
    assert x[2, 0, 2, 0] == 1.0 and x[2, 0, 1, 0] == 2.0
    assert x[4, 0, 2, 2] == 1.0 and x[4, 0, 2, 1] == 2.0  # 180
    assert x[6, 0, 0, 2] == 1.0 and x[6, 0, 1, 2] == 2.0  # 270
    assert x[2:].sum(dim=(1, 2, 3)).tolist() == x[:2].sum(dim=(1, 2, 3)).tolist() * 3


def test_rotnet_beats_chance(digits_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = cli("pretrain-rotnet", "--config", CONFIG, f"data.shards={digits_shards}",
              f"run.dir={run_dir}", "train.epochs=3")  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = rows_of(run_dir)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] < 1.5, rows
    assert rows[-1]["train_acc"] > 0.5, rows  # chance: 0.25
    assert weights(checkpoint.checkpoint_path(run_dir, 3))["head.weight"].shape[0] == 4


@pytest.fixture(scope="module")
def clusterfit(
    supervised: Path, digits_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run_dir = tmp_path_factory.mktemp("fit") / "run"
    res = cli("clusterfit", "--pretrained", str(checkpoint.checkpoint_path(supervised, 2)),
              "--config", CONFIG, f"data.shards={digits_shards}", f"run.dir={run_dir}", *FIT,
              nproc=2)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def test_clusterfit_end_to_end(clusterfit: Path, supervised: Path) -> None:
    labels = np.load(clusterfit / LABELS_FILE)
    assert labels.shape == (N,) and labels.min() == 0
    assert np.bincount(labels, minlength=K).min() >= 1 and labels.max() == K - 1
    summary = json.loads((clusterfit / SUMMARY_FILE).read_text())
    assert summary["k"] == K and summary["n_empty_clusters"] == 0
    assert summary["nmi_gt"] > 0.5  # features of a network trained on the classes
    assert {"time_extract_s", "time_cluster_s", "time_gather_s"} <= summary.keys()
    rows = rows_of(clusterfit)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert all(r["train_loss"] > 0 and 0 <= r["train_acc"] <= 1 for r in rows)
    ckpts = sorted(checkpoint.list_checkpoints(clusterfit))
    first, last = checkpoint.load(ckpts[0]), checkpoint.load(ckpts[-1])
    pos = first["position"]
    assert (pos["epoch"], pos["step"], pos["started"]) == (0, 0, True)  # before the first step
    assert (last["schema_version"], last["targets"]["kind"]) == (2, "fixed")
    assert np.array_equal(last["targets"]["labels"].numpy(), labels)
    new, pre = last["model"], weights(checkpoint.checkpoint_path(supervised, 2))
    assert new["head.weight"].shape[0] == K
    assert not torch.equal(new["block1.0.weight"], pre["block1.0.weight"])
    assert not torch.equal(new["block1.0.weight"], first["model"]["block1.0.weight"])
    history = read_wandb_file(next((clusterfit / "wandb").glob("offline-run-*/run-*.wandb")))
    assert [h["epoch"] for h in history.epoch_rows] == list(range(EPOCHS))


def cluster_rank(rank: int, world: int, args: list[str], pretrained: str) -> np.ndarray:
    cfg = clusterfit_config(CONFIG, pretrained, args)
    with dist.process_group(cfg.dist.timeout_s, 0) as ctx:
        index, reader, _ = open_data_and_model(cfg, ctx, clusters=False)
        labels, _ = cluster_pretrained(cfg, ctx, index, reader, Path(cfg.run.dir))
    return labels


def test_clusterfit_clustering_on_two_ranks_equals_one_rank(
    clusterfit: Path, supervised: Path, digits_shards: Path, tmp_path: Path
) -> None:
    args = [f"data.shards={digits_shards}", f"run.dir={tmp_path}", *FIT]
    pretrained = str(checkpoint.checkpoint_path(supervised, 2))
    (alone,) = run_ranks(1, cluster_rank, args, pretrained)
    assert np.array_equal(alone, np.load(clusterfit / LABELS_FILE))


def fit_rank(rank: int, world: int, args: list[str], pretrained: str, stop_at: int) -> str:
    next_rendezvous_port()
    try:
        flag = StopAtPoll(stop_at) if stop_at else StopFlag()
        run_clusterfit(clusterfit_config(CONFIG, pretrained, args), flag)
    except Stopped as stop:
        return f"stopped:{stop.checkpoint}"
    return "done"


def stop_then_resume(
    rank: int, world: int, args: list[str], pretrained: str, stop_at: int
) -> tuple[str, str]:
    return fit_rank(rank, world, args, pretrained, stop_at), fit_rank(
        rank, world, args, pretrained, 0
    )


def test_clusterfit_stop_and_resume_is_bit_identical_without_clustering_again(
    clusterfit: Path, supervised: Path, digits_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *FIT]
    pretrained = str(checkpoint.checkpoint_path(supervised, 2))
    # Stopped in epoch 1 before step 3, then run again: one pair of rank processes for both runs.
    results = run_ranks(2, stop_then_resume, args, pretrained, 5 + 4)
    assert [r[0] for r in results] == [f"stopped:{checkpoint.checkpoint_path(run_dir, 1, 3)}"] * 2
    assert [r[1] for r in results] == ["done"] * 2
    final = checkpoint.checkpoint_path(run_dir, EPOCHS)
    assert digest(weights(final)) == digest(weights(checkpoint.checkpoint_path(clusterfit, EPOCHS)))
    assert values(run_dir) == values(clusterfit)
    assert (run_dir / "logs" / "rank0.log").read_text().count("ClusterFit clustering:") == 1


def test_clusterfit_without_config_takes_the_pretrained_runs(supervised: Path) -> None:
    ckpt = str(checkpoint.checkpoint_path(supervised, 2))
    cfg = clusterfit_config(None, ckpt, ["cluster.k=30"])
    assert cfg.clusterfit.pretrained == ckpt and cfg.run.dir == "" and cfg.cluster.k == 30
    assert cfg.model.width == 8 and cfg.name.startswith("clusterfit-")


@pytest.mark.parametrize("case", ["missing", "garbled", "wrong-arch"])
def test_clusterfit_bad_pretrained_is_a_one_line_error(
    case: str, supervised: Path, digits_shards: Path, tmp_path: Path, dist_env: None,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    pretrained, extra = str(checkpoint.checkpoint_path(supervised, 2)), []
    if case == "missing":
        pretrained = str(tmp_path / "nope.pt")
    elif case == "garbled":
        pretrained = str(tmp_path / "garbled.pt")
        Path(pretrained).write_bytes(b"not a checkpoint" * 100)
    else:
        extra = [
            "clusterfit.pretrained_model.arch=small_cnn",
            "clusterfit.pretrained_model.width=16",
        ]
    args = [f"data.shards={digits_shards}", f"run.dir={tmp_path / 'run'}", *extra]
    code = main(["clusterfit", "--pretrained", pretrained, "--config", CONFIG, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert pretrained in err, err
    if case == "wrong-arch":
        assert "model.arch" in err, err
