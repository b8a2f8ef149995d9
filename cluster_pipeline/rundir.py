"""The run directory: chosen once by rank 0, holding config.yaml, logs, metrics and checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

from . import dist
from .config import Config, to_yaml
from .tracking import setup_logging


def prepare_run_dir(cfg: Config, ctx: dist.DistContext) -> Path:
    """Resolve the run directory on rank 0, share it, save the resolved config and start logging.

    Collective: call on every rank.
    """
    chosen = cfg.run.dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(dist.broadcast_string(ctx, chosen if ctx.is_main else None))
    cfg.run.dir = str(run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    dist.barrier(ctx)
    setup_logging(run_dir, ctx.rank)
    return run_dir
