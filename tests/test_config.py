"""Typed config: unknown keys and bad values fail naming the key; checks against the data."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from enum import StrEnum
from pathlib import Path

import pytest
import torch

from cluster_pipeline.config import (
    ARCHS,
    Arch,
    ClusterConfig,
    ClusterFitConfig,
    ClusterMode,
    Config,
    ConfigError,
    DataConfig,
    DistConfig,
    EvaluateConfig,
    ModelConfig,
    OnError,
    PoolRule,
    SlurmConfig,
    Split,
    TrainConfig,
    WandbMode,
    load_config,
    parse_pool_rule,
    to_dict,
    to_yaml,
    validate_against_data,
)
from cluster_pipeline.testing.limits import limit

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


# ------------------------------------------------------------- enum fields and saved configs

ENUM_FIELDS = {
    "model.arch": ARCHS,
    "clusterfit.pretrained_model.arch": ARCHS,
    "cluster.mode": ("gather", "sharded"),
    "data.on_error": ("fail", "skip"),
    "data.split": ("all", "train", "test"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
    "optim.schedule": ("constant", "step", "cosine"),
}


@pytest.mark.parametrize("key", ENUM_FIELDS)
def test_bad_enum_value_is_one_line_naming_key_value_and_choices(key: str, tmp_path: Path):
    expected = f"{key}='nope' is unknown; use one of {ENUM_FIELDS[key]}"
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, [f"{key}=nope"])
    assert str(info.value) == expected
    # The same message from a YAML file, and from a section built in Python and validated.
    head, _, leaf = key.rpartition(".")
    yaml_text = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(head.split(".")))
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"{yaml_text}{'  ' * (head.count('.') + 1)}{leaf}: nope\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == expected
    cfg = Config(clusterfit=ClusterFitConfig(pretrained_model=ModelConfig()))
    section = cfg
    for part in head.split("."):
        section = getattr(section, part)
    setattr(section, leaf, "nope")
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value) == expected


@pytest.mark.parametrize("key", ENUM_FIELDS)
def test_every_choice_loads_and_compares_as_its_string(key: str):
    for value in ENUM_FIELDS[key]:
        cfg = load_config(DIGITS, [f"{key}={value}"])
        section = cfg
        for part in key.split("."):
            section = getattr(section, part)
        assert isinstance(section, StrEnum) and section == value and f"{section}" == value
        assert json.dumps(section) == f'"{value}"'  # metrics and reports keep plain strings


def test_enum_member_names_are_their_values():
    """OmegaConf reads and writes an enum field by member name: name == value keeps YAML as
    it was before the enums (plain strings)."""
    for choices in (Arch, ClusterMode, OnError, Split, WandbMode):
        assert all(m.name == m.value for m in choices), choices
    assert tuple(Arch) == ARCHS


def test_saved_config_from_before_the_enums_loads_and_dumps_the_same(tmp_path: Path):
    """A run directory's config.yaml as written before the enum fields (plain strings)."""
    old = (
        "data:\n  shards: data/digits\n  on_error: skip\n  split: train\n"
        "model:\n  arch: resnet18\ncluster:\n  mode: sharded\nwandb:\n  mode: disabled\n"
        "clusterfit:\n  pretrained_model:\n    arch: alexnet_bn\n"
    )
    cfg = load_config(None, text=old, origin="an old config.yaml")
    assert cfg.data.on_error is OnError.skip and cfg.data.split is Split.train
    assert cfg.model.arch == "resnet18" and cfg.clusterfit.pretrained_model is not None
    assert cfg.cluster.mode is ClusterMode.sharded and cfg.wandb.mode == WandbMode.disabled
    dumped = to_yaml(cfg)
    for line in ("  on_error: skip\n", "  split: train\n", "  arch: resnet18\n",
                 "  mode: sharded\n", "  mode: disabled\n", "    arch: alexnet_bn\n"):  # fmt: skip
        assert line in dumped, line
    assert load_config(None, text=dumped) == cfg


def test_to_dict_holds_plain_values_a_checkpoint_can_load(tmp_path: Path):
    cfg = load_config(DIGITS, ["cluster.mode=sharded", "data.split=test"])
    saved = to_dict(cfg)
    assert type(saved["cluster"]["mode"]) is str and saved["cluster"]["mode"] == "sharded"
    assert type(saved["model"]["arch"]) is str and type(saved["wandb"]["mode"]) is str
    torch.save({"config": to_yaml(cfg), "cfg": saved}, tmp_path / "ck.pt")
    loaded = torch.load(tmp_path / "ck.pt", weights_only=True)  # no enum class in the pickle
    assert loaded["cfg"] == saved
    assert load_config(None, text=loaded["config"]) == cfg


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 7, paths
    for path in paths:
        cfg = load_config(path)
        assert isinstance(cfg, Config) and cfg.data.shards, path
        assert load_config(None, text=to_yaml(cfg)) == cfg, path


# ------------------------------------------------------------ section checks, pool rule, import


def test_each_section_checks_its_own_fields_without_loading():
    """OmegaConf's merges never call __post_init__: the checks are `validate()` methods, which
    load_config runs through Config.validate, and which code that changes fields runs again."""
    with pytest.raises(ConfigError, match=r"^train\.epochs=0 must be >= 1$"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(ConfigError, match=r"^cluster\.k=1 must be at least 2$"):
        ClusterConfig(k=1).validate()
    with pytest.raises(ConfigError, match=r"^data\.channels=2 must be 1 or 3$"):
        DataConfig(shards="x", channels=2).validate()
    with pytest.raises(ConfigError, match=r"^slurm\.nodes=0 must be >= 1$"):
        SlurmConfig(nodes=0).validate()
    with pytest.raises(ConfigError, match=r"^dist\.timeout_s must be > 0$"):
        DistConfig(timeout_s=0).validate()
    with pytest.raises(ConfigError, match=r"^evaluate\.knn_k=0 must be >= 1$"):
        EvaluateConfig(knn_k=0).validate()
    cfg = load_config(DIGITS)
    cfg.activations.pool = "mean"  # as the CLI's --pool does after loading
    with pytest.raises(ConfigError, match=re.escape("activations.pool='mean' is unknown")):
        cfg.validate()


def test_the_first_failing_check_is_reported_in_section_order():
    """model, clusterfit, cluster, data, train, augment, wandb, dist, slurm, activations,
    evaluate: the order validate_config checked them in."""
    with pytest.raises(ConfigError, match=r"^cluster\.k=1 "):
        load_config(DIGITS, ["slurm.nodes=0", "train.epochs=0", "data.channels=2", "cluster.k=1"])
    with pytest.raises(ConfigError, match=r"^data\.channels=2 "):
        load_config(DIGITS, ["evaluate.knn_k=0", "train.epochs=0", "data.channels=2"])


POOL_KEYS = ("evaluate.pool", "clusterfit.pool", "activations.pool")


def test_pool_rule_has_one_parser_used_by_every_pool_field():
    assert parse_pool_rule("avg") == PoolRule("avg") and parse_pool_rule("max") == PoolRule("max")
    assert parse_pool_rule("grid:3") == PoolRule("grid", 3)
    assert parse_pool_rule("dims:9600") == PoolRule("dims", 9600)
    for bad in ("mean", "grid:0", "grid", "dims:-1", "dims:x", "avg:2", ""):
        with pytest.raises(ConfigError, match=re.escape(f"pool rule {bad!r} is unknown")):
            parse_pool_rule(bad)
    for key in POOL_KEYS[:2]:
        with pytest.raises(ConfigError) as info:
            load_config(DIGITS, [f"{key}=grid:0"])
        assert str(info.value) == (
            f"{key}: pool rule 'grid:0' is unknown; use avg, max, grid:S or dims:D"
        )
    with pytest.raises(ConfigError, match=re.escape("activations.pool='grid:0' is unknown")):
        load_config(DIGITS, ["activations.pool=grid:0"])
    for rule in ("avg", "max", "grid:2", "dims:64"):
        load_config(DIGITS, [f"{key}={rule}" for key in POOL_KEYS])


def test_config_imports_nothing_else_of_the_package():
    """config is the bottom of the package: models, layers and analyses import it, never back."""
    code = (
        "import sys, cluster_pipeline.config\n"
        "print(sorted(m for m in sys.modules if m.startswith('cluster_pipeline')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=limit(120)).stdout  # fmt: skip
    loaded = ast.literal_eval(out.strip())
    others = [
        m for m in loaded if m != "cluster_pipeline" and not m.startswith("cluster_pipeline.config")
    ]
    assert not others, others
    assert "cluster_pipeline.config" in loaded
