"""Run a function on N real gloo ranks (separate processes) and collect each rank's return value."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from limits import limit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_GROUPS = itertools.count()


def next_rendezvous_port() -> None:
    """In a run_ranks process, before each process group after the first: its own
    MASTER_PORT (the first one + a count, the same on every rank). On one port a rank may read
    the previous group's addresses from a store not yet gone and connect to a peer's closed
    gloo socket ("Connection refused"), leaving the others waiting."""
    base = int(os.environ.setdefault("CLUSTER_PIPELINE_TEST_BASE_PORT", os.environ["MASTER_PORT"]))
    os.environ["MASTER_PORT"] = str(base + next(_GROUPS))


# Intra-op threads of every rank the tests start (run_ranks, start_cli_ranks, and launch.local
# with launcher_env): torch's CPU results depend on the thread count, so runs compared bit for
# bit must use the same one, whatever OMP_NUM_THREADS the suite runs under.
RANK_THREADS = 1


def launcher_env(threads: int | None = RANK_THREADS) -> dict[str, str]:
    """This environment for a launch.local or torchrun subprocess: none of this process's rank
    variables, and `threads` threads per rank (None: OMP_NUM_THREADS as it is here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env if threads is None else env | {"OMP_NUM_THREADS": str(threads)}


def _worker(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(RANK_THREADS),
    )  # fmt: skip
    # A spawned child inherits "spawn" as its default start method; a torchrun rank starts with
    # the platform default (fork on Linux), so its DataLoader workers must not be spawned here.
    multiprocessing.set_start_method(None, force=True)
    # torch was imported (to unpickle fn) before OMP_NUM_THREADS was set.
    import torch

    torch.set_num_threads(RANK_THREADS)
    import torch.distributed as tdist

    try:
        result: Any = ("ok", fn(rank, world, *args))
        if tdist.is_initialized():
            # Every rank done with its collectives before any tears gloo down: rank 0 hosts the
            # store its peers still talk to.
            tdist.barrier()
    except BaseException as exc:
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 120) -> list[Any]:
    """fn(rank, world, *args) on `world` processes; returns results in rank order. `timeout`
    is an idle machine's limit (`limits.limit` stretches it by the load).

    `fn` must be a module-level function. The processes get torchrun's environment variables, so
    `cluster_pipeline.dist.init_distributed` joins a real gloo group.
    """
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _worker, args=(world, _free_port(), out, fn, args), nprocs=world, join=False,
            start_method="spawn",
        )  # fmt: skip
        import time

        deadline = time.monotonic() + limit(timeout)
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"ranks did not finish within {timeout} s")
        results = [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(world)]
    errors = [f"rank {r}: {msg}" for r, (status, msg) in enumerate(results) if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]


def start_cli_ranks(
    argv: list[str], out_dir: Path, world: int = 2, env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """`python ARGV` as `world` ranks with torchrun's environment but no torchrun agent, which
    would stop the other ranks itself when one dies. Rank r's output goes to out_dir/out<r>.txt.
    """
    port = _free_port()
    repo = Path(__file__).resolve().parent.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        rank_env = dict(env or os.environ, RANK=str(rank), WORLD_SIZE=str(world),
                        LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        OMP_NUM_THREADS=str(RANK_THREADS), PYTHONPATH=str(repo))  # fmt: skip
        with open(out_dir / f"out{rank}.txt", "w") as out:
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=repo, env=rank_env,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
    return procs


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the processes still running (cleanup after a failed test)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
