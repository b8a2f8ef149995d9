"""Weights from a file into a model: a run checkpoint (its "model" entry and saved config) or a
plain state_dict, read through `checkpoint.load` (weights_only=True, never code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cluster_pipeline.config import Config, ConfigError, load_config
from cluster_pipeline.models.nets import ClusterNet
from cluster_pipeline.run import checkpoint


def config_for_weights(
    config: str | None, weights: str, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """The config a command on `weights` runs with: `config` when given, else the one a run
    checkpoint saved (its model and data settings), plus `overrides` (e.g. data.shards=...)."""
    if config is not None:
        return load_config(config, overrides)
    text = saved_config_text(weights)
    if text is None:
        raise ConfigError(
            f"{weights} is a plain state_dict with no saved config: pass --config with the "
            "model.arch and data settings it was trained with"
        )
    return load_config(None, overrides, text=text, origin=f"the config saved in {weights}")


def saved_config_text(weights: str | Path) -> str | None:
    """The YAML config a run checkpoint saved; None for a plain state_dict."""
    saved = load_torch_file(weights)
    text = saved.get("config") if isinstance(saved, dict) else None
    return text if isinstance(text, str) else None


def check_weights_file(path: str | Path) -> Path:
    """`path`, if it may be a file torch.save wrote; else one line that names it and says why:
    a user's --checkpoint may be any path. A look at its first and last bytes, not a load."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    problem = checkpoint.why_not_a_checkpoint(path)
    if problem is not None:
        raise ConfigError(f"{path} is not a checkpoint: {problem}")
    return path


def load_torch_file(path: str | Path) -> Any:
    """`checkpoint.load` (weights only, to the CPU), failing with one line that names the file."""
    path = check_weights_file(path)
    try:
        return checkpoint.load(path)
    except Exception as exc:
        raise ConfigError(f"{path} is not a checkpoint that loads: {load_failure(exc)}") from None


def load_failure(exc: Exception) -> str:
    """torch.load's reason in one short line: its messages run over many, and the one of a
    weights-only refusal advises a load that can run code."""
    _, refused, detail = str(exc).partition("WeightsUnpickler error:")
    if refused:  # e.g. "Unsupported global: GLOBAL __main__.Foo was not an allowed global"
        line = next((line.strip() for line in detail.splitlines() if line.strip()), "")
        return f"it holds more than tensors and containers ({line.split('. ')[0]})"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in a run checkpoint (its "model" entry) or in a plain state_dict file."""
    state = load_torch_file(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds no state_dict (a dict of tensors, or a 'model' entry)")
    return state


def load_weights(model: ClusterNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, resizing the head to the checkpoint's number of classes.

    A DeepCluster head has cluster.k outputs and a RotNet head 4, so the head is sized from the
    weights rather than from the config. Any other mismatch names the architecture to use.
    """
    if "head.weight" in state:
        model.set_head(int(state["head.weight"].shape[0]))
        model.head.to(next(model.parameters()).device)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2]
        raise ConfigError(
            f"{source} does not fit model.arch of this config ({type(model).__name__}): "
            f"{' '.join(first).strip() or exc}; set model.arch (and model.width, model.sobel) "
            "to the architecture the weights were trained with"
        ) from None
