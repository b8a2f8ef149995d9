"""`evaluate`: linear probes per layer, kNN and NMI; equal on 1 and 2 ranks; a fixed split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster_pipeline import dist
from cluster_pipeline.analysis.probe import knn_top1, linear_probe
from cluster_pipeline.config import ClusterConfig, ModelConfig, load_config
from cluster_pipeline.data.reader import split_ids
from cluster_pipeline.models.nets import build_model
from cluster_pipeline.testing.multiproc import run_ranks

CFG = "configs/digits_test.yaml"
ONE = dist.DistContext(0, 1, 0, torch.device("cpu"))
C = 10


def labelled_and_noise(n: int = 1000, d: int = 32, seed: int = 0):
    """(features that carry the label: one-hot * 6 + unit noise, pure noise, labels)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    noise = rng.normal(size=(n, d)).astype(np.float32)
    carry = noise.copy()
    carry[:, :C] += 6.0 * np.eye(C, dtype=np.float32)[y]
    return carry, rng.normal(size=(n, d)).astype(np.float32), y


def test_probe_learns_the_label_and_nothing_from_noise() -> None:
    carry, noise, y = labelled_and_noise()
    good = linear_probe(ONE, carry[:600], y[:600], carry[600:], y[600:], C, iters=50)
    assert good.top1 > 0.97 and good.dim == 32
    bad = linear_probe(ONE, noise[:600], y[:600], noise[600:], y[600:], C, iters=50)
    assert abs(bad.top1 - 1 / C) < 0.07  # 400 test rows: chance is 0.1 +- 0.015
    assert bad.train_top1 > bad.top1  # it did fit the noise it was given


def test_knn_and_nmi_see_the_label_and_nothing_from_noise() -> None:
    # Imported here, as are other heavy modules: the spawned ranks of the next test import this
    # file to find their function, and sklearn and the CLI would cost each of them seconds.
    from cluster_pipeline.clustering.kmeans import cluster_features
    from cluster_pipeline.clustering.metrics import nmi

    carry, noise, y = labelled_and_noise()
    assert knn_top1(carry[:600], y[:600], carry[600:], y[600:], C, k=20) > 0.97
    assert abs(knn_top1(noise[:600], y[:600], noise[600:], y[600:], C, k=20) - 1 / C) < 0.07
    c = ClusterConfig(k=C, pca_dim=0, use_gpu=False)
    good = cluster_features(carry, c, seed=0).labels
    bad = cluster_features(noise, c, seed=0).labels
    assert nmi(good, y) > 0.9 and nmi(bad, y) < 0.05  # type: ignore[operator]


def _probe_on_ranks(rank: int, world: int) -> tuple[float, float, float, int]:
    """The probe on `world` ranks, each holding a different, uneven share of the rows."""
    ctx = dist.init_distributed(timeout_s=60, heartbeat_timeout_s=0) if world > 1 else ONE
    carry, _, y = labelled_and_noise(seed=1)
    carry[:, C:] *= 3.0  # a harder problem, so the fit runs for a while
    tr, te = (slice(0, 250), slice(250, 600)), (slice(600, 700), slice(700, 1000))
    if world == 1:
        tr, te = (slice(0, 600),), (slice(600, 1000),)
    r = linear_probe(ctx, carry[tr[rank]], y[tr[rank]], carry[te[rank]], y[te[rank]], C,
                     weight_decay=1e-2, iters=30)  # fmt: skip
    return r.top1, r.train_top1, r.loss, r.iters


@pytest.mark.slow
def test_probe_on_two_ranks_equals_one_rank() -> None:
    single = _probe_on_ranks(0, 1)
    ranks = run_ranks(2, _probe_on_ranks)
    assert ranks[0] == ranks[1]  # every rank ends with the same numbers
    top1, train_top1, loss, iters = ranks[0]
    assert iters > 5 and (top1, train_top1, iters) == (single[0], single[1], single[3])
    assert loss == pytest.approx(single[2], rel=1e-5)


def _weights(path: Path, seed: int) -> None:
    """A plain state_dict of the digits config's model, as seeded with `seed`."""
    cfg = load_config(CFG)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="small_cnn", width=cfg.model.width), 1, cfg.cluster.k)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def runs(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """evaluate of one state_dict on 2 ranks and on 1, and of a random init on 1 rank."""
    from test_e2e import cli

    tmp = tmp_path_factory.mktemp("evaluate")
    _weights(tmp / "weights.pt", seed=1)
    out = {name: tmp / name for name in ("two", "one", "random")}
    weights = ("--checkpoint", str(tmp / "weights.pt"))
    jobs = {
        # data.split=train in the config must not matter: evaluate reads both sides itself.
        "two": ((*weights, f"data.shards={digits_shards}", "data.split=train"), 2),
        "one": ((*weights, f"data.shards={digits_shards}"), 0),
        "random": (("--layers", "block3", f"data.shards={digits_shards}"), 0),
    }
    for name, (args, nproc) in jobs.items():
        res = cli("evaluate", "--config", CFG, "--out", str(out[name]), *args,
                  "evaluate.probe_iters=40", nproc=nproc)  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        if name == "one":
            assert "knn k=20" in res.stdout and "evaluation.json" in res.stdout
    return out


def report(folder: Path) -> dict:
    return json.loads((folder / "evaluation.json").read_text())


def test_evaluate_writes_every_layer_and_sane_numbers(runs: dict[str, Path]) -> None:
    r = report(runs["two"])
    assert r["schema"] == 1 and r["checkpoint"].endswith("weights.pt") and not r["random_init"]
    assert list(r["probe"]) == ["block1", "block2", "block3"]  # small_cnn's layer_names
    for p in r["probe"].values():
        assert 0.0 <= p["top1"] <= 1.0 and p["dim"] > 0
    assert r["probe"]["block1"]["top1"] > 0.5  # 8x8 digits, 10 classes: far above chance
    assert r["knn"]["k"] == 20 and 0.0 <= r["knn"]["top1"] <= 1.0
    assert 0.0 <= r["nmi"] <= 1.0 and r["seconds"] > 0 and r["world_size"] == 2
    assert r["split"]["train"] == 1438 and r["split"]["test"] == 359
    md = (runs["two"] / "evaluation.md").read_text()
    assert all(f"| {layer} | top1 |" in md for layer in r["probe"]) and "| knn k=20 |" in md


def test_two_ranks_equal_one_rank(runs: dict[str, Path]) -> None:
    two, one = report(runs["two"]), report(runs["one"])
    assert one["world_size"] == 1
    for layer, p in two["probe"].items():
        # Full-batch L-BFGS on the same rows: only float rounding of the all-reduce differs,
        # which may flip at most a borderline test sample.
        assert abs(p["top1"] - one["probe"][layer]["top1"]) <= 1 / 359 + 1e-9, layer
        assert p["loss"] == pytest.approx(one["probe"][layer]["loss"], rel=1e-3), layer
    assert two["knn"]["top1"] == pytest.approx(one["knn"]["top1"], abs=1 / 359 + 1e-9)
    assert two["nmi"] == pytest.approx(one["nmi"], abs=0.02)


def test_weights_are_loaded_not_a_random_init(runs: dict[str, Path]) -> None:
    ckpt, rand = report(runs["two"]), report(runs["random"])
    assert rand["random_init"] and rand["checkpoint"] is None and list(rand["probe"]) == ["block3"]
    assert (ckpt["knn"]["top1"], ckpt["nmi"]) != (rand["knn"]["top1"], rand["nmi"])


def test_split_is_fixed_disjoint_and_covers_every_sample(runs: dict[str, Path]) -> None:
    train_ids, test_ids = split_ids(1797, 0.2, 0)
    for name in ("two", "one", "random"):
        train = np.load(runs[name] / "samples-train.npy")
        test = np.load(runs[name] / "samples-test.npy")
        assert np.array_equal(train, train_ids) and np.array_equal(test, test_ids), name
        assert not np.intersect1d(train, test).size
        assert np.array_equal(np.union1d(train, test), np.arange(1797))


@pytest.mark.slow
def test_unknown_layer_is_a_clear_error(digits_shards: Path, tmp_path: Path) -> None:
    from test_e2e import cli

    res = cli("evaluate", "--config", CFG, f"data.shards={digits_shards}", "--layers",
              "block1,conv9", "--out", str(tmp_path / "out"))  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "'conv9'" in lines[0] and "block1" in lines[0]


def test_missing_checkpoint_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster_pipeline.cli import main

    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nope.pt" in lines[0] and "does not exist" in lines[0]
    assert main(["evaluate", "--config", CFG, "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert main(["evaluate"]) == 2 and "--checkpoint" in capsys.readouterr().err
