"""Typed config: unknown keys and bad values fail naming the key; checks against the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster_pipeline.config import (
    ARCHS,
    Config,
    ConfigError,
    load_config,
    to_yaml,
    validate_against_data,
)

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "configs" / "digits_test.yaml"


def test_load_digits_test_config():
    cfg = load_config(DIGITS)
    assert isinstance(cfg, Config)
    assert cfg.name == "digits_test"  # the file stem names the run
    assert cfg.data.shards == "data/digits"
    assert cfg.data.load_size == 8 and cfg.data.image_size == 8
    assert cfg.model.arch == "small_cnn" and cfg.model.width == 8
    assert cfg.cluster.k == 20 and cfg.cluster.pca_dim == 16
    assert cfg.augment.flip is False
    assert cfg.train.batch_size == 64
    # Keys the file does not set keep their defaults.
    assert cfg.cluster.max_points_per_centroid == 256
    assert cfg.optim.momentum == 0.9


def test_overrides_apply_with_types():
    cfg = load_config(DIGITS, ["cluster.k=7", "augment.flip=true", "optim.lr=0.5"])
    assert cfg.cluster.k == 7 and isinstance(cfg.cluster.k, int)
    assert cfg.augment.flip is True
    assert cfg.optim.lr == 0.5


def test_resolved_config_round_trips_through_yaml(tmp_path: Path):
    cfg = load_config(DIGITS, ["cluster.k=9"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    again = load_config(saved)
    assert again.cluster.k == 9
    assert again == cfg


def test_unknown_key_in_yaml_names_it(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  kk: 3\n")
    with pytest.raises(ConfigError, match="kk") as info:
        load_config(bad)
    assert "bad.yaml" in str(info.value)  # and the file it came from


def test_unknown_top_level_key_in_yaml_names_it(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusterr:\n  k: 3\n")
    with pytest.raises(ConfigError, match="clusterr"):
        load_config(bad)


@pytest.mark.parametrize("override", ["cluster.kk=3", "nokey=1", "train.epoch=3"])
def test_unknown_override_key_names_it(override: str):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, [override])
    assert key in str(info.value)


def test_bad_value_type_names_key():
    with pytest.raises(ConfigError, match=r"cluster\.k") as info:
        load_config(DIGITS, ["cluster.k=abc"])
    assert "abc" in str(info.value)


def test_bad_value_type_in_yaml_names_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(bad)


def test_unknown_arch_names_model_arch():
    with pytest.raises(ConfigError, match=r"model\.arch") as info:
        load_config(DIGITS, ["model.arch=vgg16"])
    assert "vgg16" in str(info.value)
    assert all(a in str(info.value) for a in ARCHS)  # says what would work


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match=r"cluster\.k"):
        load_config(DIGITS, ["cluster.k"])


def test_missing_config_file_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("cluster.k=1", "cluster.k"),
        ("cluster.pca_dim=-1", "cluster.pca_dim"),
        ("data.channels=2", "data.channels"),
        ("data.image_size=9", "data.image_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("wandb.mode=sometimes", "wandb.mode"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DIGITS, [override])


# ----------------------------------------------------------------------- validate_against_data


def test_validate_against_data_accepts_the_digits_setup():
    cfg = load_config(DIGITS)
    validate_against_data(cfg, num_samples=1797, feature_dim=128, world=2)  # no exception


def test_validate_against_data_k_above_n():
    cfg = load_config(DIGITS, ["cluster.k=2000"])
    with pytest.raises(ConfigError) as info:
        validate_against_data(cfg, num_samples=1797, feature_dim=128, world=1)
    msg = str(info.value)
    assert "cluster.k" in msg and "2000" in msg and "1797" in msg
    validate_against_data(cfg, num_samples=2000, feature_dim=128, world=1)  # k == N is fine


def test_validate_against_data_pca_dim_above_feature_dim():
    cfg = load_config(DIGITS, ["cluster.pca_dim=256"])
    with pytest.raises(ConfigError) as info:
        validate_against_data(cfg, num_samples=1797, feature_dim=128, world=1)
    msg = str(info.value)
    assert "cluster.pca_dim" in msg and "256" in msg and "128" in msg
    cfg0 = load_config(DIGITS, ["cluster.pca_dim=0"])  # 0 disables PCA: always fine
    validate_against_data(cfg0, num_samples=1797, feature_dim=128, world=1)


def test_validate_against_data_pca_dim_above_n():
    cfg = load_config(DIGITS, ["cluster.pca_dim=64", "cluster.k=10"])
    with pytest.raises(ConfigError, match=r"cluster\.pca_dim"):
        validate_against_data(cfg, num_samples=50, feature_dim=128, world=1)


def test_validate_against_data_batch_too_large():
    cfg = load_config(DIGITS, ["train.batch_size=64", "cluster.k=10"])
    validate_against_data(cfg, num_samples=128, feature_dim=128, world=2)  # exactly one step
    with pytest.raises(ConfigError, match=r"train\.batch_size") as info:
        validate_against_data(cfg, num_samples=127, feature_dim=128, world=2)
    assert "127" in str(info.value)
    cfg_spe = load_config(DIGITS, ["train.batch_size=64", "train.samples_per_epoch=100"])
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        validate_against_data(cfg_spe, num_samples=1797, feature_dim=128, world=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="SyncBatchNorm is valid with CUDA")
def test_sync_bn_without_cuda_is_a_clear_error() -> None:
    cfg = load_config(REPO / "configs" / "digits_test.yaml", ["model.sync_bn=true"])
    with pytest.raises(ConfigError, match=r"model\.sync_bn=true needs CUDA"):
        validate_against_data(cfg, 1797, 128, world=2)
    validate_against_data(cfg, 1797, 128, world=1)  # one process: nothing to synchronize
