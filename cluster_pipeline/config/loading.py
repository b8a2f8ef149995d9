"""Loading a Config: defaults, then a YAML file (or saved YAML text), then key=value overrides.

Unknown keys and ill-typed values are errors that name the key, so a typo in an 8-node job
fails in the first second rather than silently running the default.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError
from omegaconf.nodes import EnumNode

from cluster_pipeline.config.choices import unknown_choice
from cluster_pipeline.config.errors import ConfigError
from cluster_pipeline.config.root import Config


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    text: str | None = None,
    origin: str = "",
) -> Config:
    """Merge defaults, a YAML file (or YAML `text` from `origin`, e.g. a checkpoint's saved
    config) and `key=value` overrides into a validated Config."""
    schema = OmegaConf.structured(Config)
    where = "defaults"
    try:
        merged = schema
        if text is not None:
            where = origin or "YAML text"
            merged = OmegaConf.merge(merged, OmegaConf.create(text))
        elif path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            where = str(path)
            loaded = OmegaConf.load(path)
            merged = OmegaConf.merge(merged, loaded)
            if "name" not in loaded:
                merged.name = path.stem
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        where = "command-line overrides " + " ".join(overrides)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise config_error(exc, where) from None
    assert isinstance(cfg, Config)
    cfg.validate()
    return cfg


def config_error(exc: OmegaConfBaseException, where: str) -> ConfigError:
    """OmegaConf's error as one line naming the key; a value outside an enum gets the same
    message as the section's own check gives it."""
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    node = getattr(exc, "child_node", None)
    if isinstance(exc, ValidationError) and isinstance(node, EnumNode) and key:
        return ConfigError(unknown_choice(str(key), exc.value, node.enum_type))
    msg = str(exc).splitlines()[0]
    return ConfigError(f"bad config key {key!r} in {where}: {msg}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain values only (an enum member becomes its string): W&B's config and pickles."""

    def plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
        return {k: v.value if isinstance(v, Enum) else v for k, v in items}

    return dataclasses.asdict(cfg, dict_factory=plain)
