"""The run directory: chosen once by rank 0, holding config.yaml, logs, metrics and checkpoints."""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from cluster_pipeline import dist
from cluster_pipeline.config import Config, ConfigError, to_yaml
from cluster_pipeline.data.reader import SampleError, ShardError
from cluster_pipeline.run import lock as run_lock
from cluster_pipeline.run.logs import setup_logging

# The errors of a config or data mistake, which the CLI reports in one line.
EARLY_ERRORS = (ConfigError, ShardError, FileNotFoundError)
# What the phase timer (training/position.py) logs when a phase of work begins.
PHASE_STARTED = re.compile(rb"phase \w+ started")
# What prepare_run_dir (and a training run's lock) writes before any work, besides logs/.
SET_UP_FILES = frozenset({"config.yaml", run_lock.LOCK_NAME, f"{run_lock.LOCK_NAME}.guard"})


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


def holds_work(folder: Path) -> bool:
    """Whether `folder` holds a file that prepare_run_dir does not write (a checkpoint,
    metrics, W&B files, an output), or logs of a phase that began (extraction, training): an
    error after that is worth its logs, whatever it is."""
    for p in folder.rglob("*"):
        if not p.is_file() or p.name in SET_UP_FILES:
            continue
        if p.parent.name != "logs":
            return True
        if p.name.endswith(".debug.log") and PHASE_STARTED.search(p.read_bytes()):
            return True
    return False


@contextlib.contextmanager
def run_dir_removed_on_early_error(cfg: Config, sub: str = "") -> Iterator[None]:
    """Run the body, which prepares cfg's run directory (its `sub` folder for an analysis);
    if it then fails on a config or data mistake (EARLY_ERRORS: k above N, no shards, a bad
    checkpoint), remove the folder it created, so that no runs/<name>-<time>/ is left behind.

    Only a folder that did not exist before the body is removed, and only while it holds no
    work (`holds_work`). Every rank may remove it: the ranks fail together."""

    def folders(run_dir: str) -> list[Path]:  # the outermost first
        return [Path(run_dir), *([Path(run_dir) / sub] if sub else [])] if run_dir else []

    existed = {p for p in folders(cfg.run.dir) if p.exists()}
    try:
        yield
    except EARLY_ERRORS as exc:
        if isinstance(exc, SampleError):  # found by reading samples: work began
            raise
        created = [p for p in folders(cfg.run.dir) if p not in existed]  # run.dir is set now
        if created and created[0].is_dir() and not holds_work(created[0]):
            shutil.rmtree(created[0], ignore_errors=True)
        raise
