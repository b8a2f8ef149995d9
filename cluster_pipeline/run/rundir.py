"""The run directory: chosen once by rank 0, holding config.yaml, logs, metrics and checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

from cluster_pipeline import dist
from cluster_pipeline.config import Config, to_yaml
from cluster_pipeline.run import lock as run_lock
from cluster_pipeline.run.logs import setup_logging


def prepare_run_dir(cfg: Config, ctx: dist.DistContext, sub: str = "", lock: bool = False) -> Path:
    """Resolve the run directory on rank 0, share it, save the resolved config and start logging.

    With `sub` (an analysis of a finished run, e.g. "activations"), config.yaml and logs/ go to
    run_dir/sub, so the run's own config.yaml, which a resume reads, is left as it was.
    With `lock` (a training run), rank 0 first takes the directory's lock (`lock.py`), before
    it writes anything there; every rank raises RunDirInUse if another run holds it. Release it
    with `release_run_dir`. Collective: call on every rank.
    """
    chosen = cfg.run.dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(dist.broadcast_string(ctx, chosen if ctx.is_main else None))
    cfg.run.dir = str(run_dir)
    home = run_dir / sub if sub else run_dir
    refused = ""
    if ctx.is_main:
        home.mkdir(parents=True, exist_ok=True)
        try:
            if lock:
                run_lock.acquire(home)
        except run_lock.RunDirInUse as exc:
            refused = str(exc)
        else:
            (home / "config.yaml").write_text(to_yaml(cfg))
    refused = dist.broadcast_string(ctx, refused if ctx.is_main else None)
    if refused:
        raise run_lock.RunDirInUse(refused)
    dist.barrier(ctx)
    setup_logging(home, ctx.rank)
    return run_dir


def release_run_dir(run_dir: Path, ctx: dist.DistContext) -> None:
    """Give up the lock `prepare_run_dir(lock=True)` took (rank 0; on any exit path)."""
    if ctx.is_main:
        run_lock.release(run_dir)
