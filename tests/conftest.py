"""Shared fixtures: real shards built once per session, W&B kept offline and inside tmp dirs;
the markers every test gets: `slow` for those that start rank processes or whole runs, and
exactly one of `integration` (slow or slurm) and `unit` (the rest).

`make test` runs everything; `make test-fast` (-m unit) the unit tests.
"""

from __future__ import annotations

import faulthandler
import logging
import os
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: a local SLURM cluster)

from cluster_pipeline.data.shards import write_shards
from cluster_pipeline.data.sources import digits_source

REPO = Path(__file__).resolve().parent.parent

# Fixtures that start rank processes or whole runs (seconds each): every test that uses one is
# marked slow, as are the tests marked so where they start processes themselves.
SLOW_FIXTURES = frozenset({
    "world1", "world2", "world3", "resumed", "reference", "two_rank_run", "supervised",
    "clusterfit", "runs", "generalist", "trained", "skip_run", "rank_results", "gather_results",
    "ddp_results", "one_epoch", "two_node_run", "slurm_cluster",
})  # fmt: skip


# Markers that make a test an integration test: it starts rank processes, whole runs or SLURM.
INTEGRATION_MARKERS = ("slow", "slurm", "integration")


# Seconds the test process may take to exit once the session is over. A hang at exit (a
# child that never joins) then prints every thread's stack and fails the run at once, instead
# of passing every test and waiting out CI's time limit.
EXIT_GRACE_S = 120


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        integration = any(item.get_closest_marker(m) for m in INTEGRATION_MARKERS)
        if integration and item.get_closest_marker("unit"):
            raise pytest.UsageError(
                f"{item.nodeid} is marked unit but starts rank processes or runs (marked "
                f"{', '.join(m for m in INTEGRATION_MARKERS if item.get_closest_marker(m))})"
            )
        item.add_marker(pytest.mark.integration if integration else pytest.mark.unit)


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No network, no API key: every W&B file lands in a temporary directory."""
    base = tmp_path_factory.getbasetemp() / "wandb-home"
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):  # fmt: skip
        (base / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(base / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1797 digits as 4 real webdataset shards (500, 500, 500, 297 samples)."""
    out = tmp_path_factory.mktemp("digits")
    write_shards(digits_source(), out, samples_per_shard=500)
    return out


@pytest.fixture
def dist_env(monkeypatch: pytest.MonkeyPatch):
    """Clear torchrun variables so a test process is a world of one unless it says otherwise."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    yield
    os.environ.pop("RANK", None)


@pytest.fixture
def run_cli(dist_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """`cluster-pipeline ARGS` as a world of one in this process: (exit status, stderr).

    No signal handlers are installed in pytest, and the run's log handlers are removed after.
    """
    from cluster_pipeline import cli

    monkeypatch.setattr(cli.StopFlag, "install", lambda self, *a: {})

    def run(*args: str) -> tuple[int, str]:
        status = cli.main(list(args))
        return status, capsys.readouterr().err

    yield run
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cluster_pipeline", False):
            root.removeHandler(h)
            h.close()
