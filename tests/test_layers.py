"""Named-layer taps: pooled activations of any module, extracted exactly once like the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_e2e import cli

from cluster_pipeline.config import ConfigError, ModelConfig, load_config, to_yaml
from cluster_pipeline.data.reader import ShardIndex
from cluster_pipeline.models.layers import LayerTaps, pool_activation
from cluster_pipeline.models.nets import build_model
from cluster_pipeline.models.weights import config_for_weights, load_weights, model_state


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="small_cnn", width=8), 1, 10).eval()


def test_pool_rules_give_fixed_sizes() -> None:
    x = torch.arange(2 * 4 * 6 * 6, dtype=torch.float32).reshape(2, 4, 6, 6)
    assert torch.equal(pool_activation(x, "avg"), x.mean(dim=(2, 3)))
    assert torch.equal(pool_activation(x, "max"), x.amax(dim=(2, 3)))
    assert torch.equal(pool_activation(x, "grid:3"), torch.flatten(F.avg_pool2d(x, 2), 1))
    assert pool_activation(x, "dims:40").shape == (2, 4 * 3 * 3)  # largest S with 4*S*S <= 40
    assert pool_activation(x, "dims:1").shape == (2, 4)  # never below 1 x 1
    assert pool_activation(x[:, :, 0, 0], "grid:3").shape == (2, 4)  # flat rows pass through
    with pytest.raises(ConfigError, match="pool rule 'mean'"):
        LayerTaps(small_cnn(), ["block1"], pool="mean")  # type: ignore[arg-type]


def test_taps_equal_the_modules_outputs() -> None:
    model = small_cnn()
    x = torch.randn(3, 1, 28, 28)
    with (
        LayerTaps(model, ["block1", "block3", "fc", "head"], pool="grid:2") as taps,
        torch.no_grad(),
    ):
        rows = taps.forward(x)
        parts = taps.split(rows.numpy())
        b1 = model.block1(model.input_layer(x))
        feats = model.features(x)
        expected = {
            "block1": torch.flatten(F.adaptive_avg_pool2d(b1, 2), 1),
            "block3": model.block3(model.block2(b1)).flatten(1),
            "fc": feats,
            "head": model(x),
        }
    assert list(parts) == ["block1", "block3", "fc", "head"]
    for name, want in expected.items():
        np.testing.assert_allclose(parts[name], want.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert not model.block1._forward_hooks  # hooks are gone after the with block
    with pytest.raises(ConfigError, match="'block9' is not a module of SmallCNN"):
        LayerTaps(model, ["block9"])


def test_load_weights_sizes_the_head_and_names_a_wrong_arch(tmp_path: Path) -> None:
    source = build_model(ModelConfig(arch="small_cnn", width=8), 1, 4)  # a RotNet-like head
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    target = small_cnn()
    load_weights(target, model_state(tmp_path / "ckpt.pt"), "ckpt.pt")
    assert target.head.out_features == 4
    assert torch.equal(target.block1[0].weight, source.block1[0].weight)
    wide = build_model(ModelConfig(arch="small_cnn", width=16), 1, 10)
    with pytest.raises(ConfigError, match=r"does not fit model\.arch"):
        load_weights(wide, model_state(tmp_path / "ckpt.pt"), "ckpt.pt")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt does not exist"):
        model_state(tmp_path / "nope.pt")


@pytest.mark.slow
def test_extract_layers_on_two_ranks_equals_one_process(
    digits_shards: Path, tmp_path: Path
) -> None:
    def extract(name: str, layers: str, nproc: int = 0):
        shards = f"data.shards={digits_shards}"
        return cli("extract", "--config", "configs/digits_test.yaml", shards,
                   f"run.dir={tmp_path / ('run-' + name)}", "--layers", layers, "--pool", "grid:2",
                   "--out", str(tmp_path / name), nproc=nproc)  # fmt: skip

    one, two = extract("one", "block2,fc"), extract("two", "block2,fc", nproc=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    for folder in ("one", "two"):
        index = np.load(tmp_path / folder / "index.npy")
        assert np.array_equal(np.sort(index), np.arange(1797))  # every sample exactly once
    b2 = np.load(tmp_path / "one" / "features-block2.npy")
    assert b2.shape == (1797, 16 * 2 * 2)  # digits_test.yaml: small_cnn width 8
    assert np.load(tmp_path / "one" / "features-fc.npy").shape == (1797, 128)
    for name in ("block2", "fc"):
        a = np.load(tmp_path / "one" / f"features-{name}.npy")[
            np.argsort(np.load(tmp_path / "one" / "index.npy"))
        ]
        b = np.load(tmp_path / "two" / f"features-{name}.npy")[
            np.argsort(np.load(tmp_path / "two" / "index.npy"))
        ]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    bad = extract("bad", "block7")
    assert bad.returncode == 2 and "'block7' is not a module of SmallCNN" in bad.stderr


def test_config_comes_from_a_run_checkpoint_or_config(tmp_path: Path) -> None:
    cfg = load_config("configs/digits_test.yaml", ["model.width=12"])
    model = build_model(cfg.model, 1, 10)
    torch.save({"model": model.state_dict(), "config": to_yaml(cfg)}, tmp_path / "run.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    got = config_for_weights(None, str(tmp_path / "run.pt"), ["data.shards=/x"])
    assert got.model.width == 12 and got.data.shards == "/x"
    assert (
        config_for_weights("configs/digits_test.yaml", str(tmp_path / "plain.pt")).model.width == 8
    )
    with pytest.raises(ConfigError, match="plain state_dict with no saved config"):
        config_for_weights(None, str(tmp_path / "plain.pt"))


@pytest.mark.slow
def test_extract_on_the_test_split(digits_shards: Path, tmp_path: Path) -> None:
    res = cli("extract", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
              "data.split=test", f"run.dir={tmp_path / 'run'}",
              "--out", str(tmp_path / "f"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    test = ShardIndex.load(digits_shards).split("test", 0.2, 0)
    assert np.load(tmp_path / "f" / "features.npy").shape == (359, 128)
    assert np.array_equal(np.load(tmp_path / "f" / "labels.npy"), test.labels)
