"""Specialist groups (Hinton et al. 2015, 5.3): the streamed covariance of a generalist's
predictions, k-means on its columns, and the `specialists` command on 2 real gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_e2e import cli

from cluster_pipeline import dist
from cluster_pipeline.analysis.specialists import (
    COLUMNS,
    METHODS,
    MomentSums,
    cluster_columns,
    column_matrix,
    stream_prediction_moments,
)
from cluster_pipeline.cli import main
from cluster_pipeline.config import load_config, to_yaml
from cluster_pipeline.data.augment import center_crop, to_float
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.features.gather import gather_features
from cluster_pipeline.models.layers import LayerTaps
from cluster_pipeline.models.nets import build_model
from cluster_pipeline.models.weights import load_weights, model_state
from cluster_pipeline.run.setup import open_data_and_model
from cluster_pipeline.testing.multiproc import run_ranks

CONFIG = "configs/digits_test.yaml"
PAIRS = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def paired_predictions(n: int = 3000, seed: int = 0) -> np.ndarray:
    """A generalist that confuses each class with its partner (0/1, 2/3, ...): for a sample of
    class c its softmax puts most mass on c, much of the rest on c's partner."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 10, n)
    logits = rng.normal(0, 0.5, (n, 10))
    logits[np.arange(n), truth] += 4.0
    logits[np.arange(n), truth ^ 1] += 3.0 + rng.normal(0, 0.5, n)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def groups_of(labels: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(labels == g).tolist() for g in range(labels.max() + 1)]


@pytest.mark.parametrize("columns", COLUMNS)
@pytest.mark.parametrize("method", METHODS)
def test_confused_pairs_come_back_as_groups(method: str, columns: str) -> None:
    p = paired_predictions()
    sums = MomentSums(10, torch.device("cpu"))
    for batch in np.array_split(p, 7):  # streamed in uneven batches
        sums.add(torch.from_numpy(batch))
    moments = sums.all_reduced(dist.DistContext(0, 1, 0, torch.device("cpu")), len(p))
    cov = moments.covariance()
    want = np.cov(p.astype(np.float64), rowvar=False)
    assert np.abs(cov - want).max() <= 1e-12 * np.abs(want).max()
    np.testing.assert_allclose(moments.mean, p.astype(np.float64).mean(0), rtol=1e-12)
    # online: mini-batches of 4 columns, so the centroids really move batch by batch; one such
    # run finds the pairs about 1 time in 3 (a local optimum otherwise), the best of 10 does
    x = column_matrix(cov, columns)
    labels = cluster_columns(x, 5, method, seed=0, restarts=10, batch_size=4)
    assert groups_of(labels) == PAIRS
    three = cluster_columns(x, 3, method, seed=1, restarts=5, batch_size=4)
    assert np.bincount(three).min() >= 1  # no empty group
    assert all(len(set(three[pair])) == 1 for pair in PAIRS)  # pairs are never split


def _stream_and_gather(rank: int, world: int, shards: str, weights: str) -> dict | None:
    # 1797 samples: 898 + 899 on 2 ranks; batches of 449 are the same on 1 rank and on 2, so
    # the logits are bit for bit the same and only the float64 summation order differs.
    cfg = load_config(CONFIG, [f"data.shards={shards}", "data.extract_batch_size=449"])
    ctx = dist.init_distributed(60, 0)
    index, reader, model = open_data_and_model(cfg, ctx)
    load_weights(model, model_state(weights), weights)
    moments, skipped = stream_prediction_moments(model, reader, cfg, ctx)
    with LayerTaps(model, ["head"]) as taps:  # the same logits, gathered whole for np.cov
        idx, logits, lost = extract_features(model, reader, cfg, ctx, taps)
    gathered = gather_features(ctx, idx, logits, index.num_samples, lost)
    if gathered is None:
        return None
    probs = torch.softmax(torch.from_numpy(gathered.feats), dim=1).numpy()
    return {"cov": moments.covariance(), "n": moments.count, "skipped": skipped, "probs": probs}


def test_streamed_covariance_on_two_ranks_equals_np_cov(
    digits_shards: Path, generalist: Path
) -> None:
    two = run_ranks(2, _stream_and_gather, str(digits_shards), str(generalist))[0]
    one = run_ranks(1, _stream_and_gather, str(digits_shards), str(generalist))[0]
    want = np.cov(two["probs"].astype(np.float64), rowvar=False)  # n - 1, as the stream
    assert two["n"] == 1797 and two["skipped"] == 0 and two["cov"].shape == (10, 10)
    print(
        np.abs(want).max(), np.abs(two["cov"] - want).max(), np.abs(one["cov"] - two["cov"]).max()
    )
    assert np.abs(want).max() > 1e-3  # predictions vary: not a vacuous comparison
    scale = np.abs(want).max()
    assert np.abs(two["cov"] - want).max() <= 1e-10 * scale
    assert np.abs(one["cov"] - two["cov"]).max() <= 1e-10 * scale


@pytest.fixture(scope="module")
def generalist(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generalist: the digits small CNN trained 60 supervised steps, saved as a run
    checkpoint (weights and config)."""
    path = tmp_path_factory.mktemp("generalist") / "generalist.pt"
    shards = digits_shards
    cfg = load_config(CONFIG, [f"data.shards={shards}"])
    index = ShardIndex.load(shards)
    images = SampleReader(index, cfg.data.load_size, cfg.data.channels).read_batch(
        np.arange(index.num_samples)
    )
    x = center_crop(to_float(torch.from_numpy(images), cfg.data.mean, cfg.data.std), 8)
    y = torch.from_numpy(index.labels)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = torch.randint(0, len(y), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": model.state_dict(), "config": to_yaml(cfg)}, path)
    return path


def test_specialists_command_on_two_ranks(
    digits_shards: Path, generalist: Path, tmp_path: Path
) -> None:
    ckpt = generalist
    run = tmp_path / "spec"
    res = cli("specialists", "--checkpoint", str(ckpt), "--shards", str(digits_shards),
              "--groups", "4", "--restarts", "3", f"run.dir={run}", nproc=2)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    info = json.loads((run / "specialists.json").read_text())
    assert info["method"] == "kmeans" and info["columns"] == "correlation"
    assert info["num_groups"] == 4
    assert info["num_samples"] == 1797 and info["num_classes"] == 10
    members = sorted(c for g in info["groups"] for c in g["class_ids"])
    assert members == list(range(10))  # every class in exactly one group
    for g in info["groups"]:
        assert g["size"] == len(g["class_ids"]) >= 1
        assert g["classes"] == [str(c) for c in g["class_ids"]]  # the digits' class names
    cov = np.load(run / "covariance.npy")
    assert cov.shape == (10, 10) and np.array_equal(cov, cov.T) and (np.diag(cov) > 0).all()
    assert (run / "covariance.png").stat().st_size > 10_000
    assert (run / "logs" / "rank1.log").is_file()


def test_bad_input_is_one_line_exit_2(
    digits_shards: Path, tmp_path: Path, dist_env: None, capsys: pytest.CaptureFixture
) -> None:
    model = build_model(load_config(CONFIG).model, 1, 10)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    common = ["--shards", str(digits_shards), f"run.dir={tmp_path / 'r'}"]

    def run(*args: str) -> tuple[int, str]:
        code = main(["specialists", *args, *common])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return code, err

    code, err = run(
        "--checkpoint", str(tmp_path / "plain.pt"), "--config", CONFIG, "--groups", "11"
    )
    assert code == 2 and "--groups 11" in err and "1..10" in err
    code, err = run("--checkpoint", str(tmp_path / "nope.pt"), "--groups", "3")
    assert code == 2 and "nope.pt does not exist" in err
    code, err = run("--checkpoint", str(tmp_path / "plain.pt"), "--groups", "3")
    assert code == 2 and "plain state_dict with no saved config" in err
    assert not (tmp_path / "r").exists()  # nothing was started


def test_outputs_are_named_as_classes_only_for_a_classifier_of_the_classes(
    digits_shards: Path, tmp_path: Path
) -> None:
    from cluster_pipeline.analysis.specialists import class_names, head_over_clusters
    from cluster_pipeline.data.reader import ShardIndex

    saved = {
        "supervised": {"epoch": 3, "head": "classes"},  # train-supervised's run checkpoint
        "deepcluster": {"epoch": 3},  # DeepCluster's: no "head" entry, outputs are clusters
        "clusterfit": {"epoch": 3, "head": "clusters"},
        "plain": {"head.weight": torch.zeros(10, 4)},  # a plain state_dict of a classifier
    }
    over_clusters = {}
    for name, payload in saved.items():
        torch.save(payload, tmp_path / f"{name}.pt")
        over_clusters[name] = head_over_clusters(str(tmp_path / f"{name}.pt"))
    assert over_clusters == {
        "supervised": False, "deepcluster": True, "clusterfit": True, "plain": False
    }  # fmt: skip
    index = ShardIndex.load(digits_shards)
    assert class_names(10, index, pseudo=False)[:3] == ["0", "1", "2"]
    assert class_names(10, index, pseudo=True)[0] == "pseudo-class 0"
    assert class_names(20, index, pseudo=False)[0] == "pseudo-class 0"  # not the classes
