"""Run a function on N real gloo ranks (separate local processes) and collect each rank's
return value; start the CLI as N ranks; the environment of a launcher subprocess.

Each rank is a fresh `python -c` process with torchrun's environment variables, as torchrun
starts `python -m cluster_pipeline`: `dist.init_distributed` joins a real gloo group, and a
DataLoader worker started from the forkserver re-imports no main module (a benchmark module
run as __main__ would be re-imported by every worker of every epoch, seconds each).
"""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster_pipeline.testing.limits import limit

# The checkout the package is imported from: tests and benchmarks run from one.
REPO = Path(__file__).resolve().parents[2]

# Intra-op threads of every rank the tests start (run_ranks, start_cli_ranks, and launch.local
# with launcher_env): torch's CPU results depend on the thread count, so runs compared bit for
# bit must use the same one, whatever OMP_NUM_THREADS the suite runs under.
RANK_THREADS = 1

_BOOT = (
    "import sys; from cluster_pipeline.testing.multiproc import _rank_main; _rank_main(sys.argv[1])"
)
_GROUPS = itertools.count()


def free_port() -> int:
    """A TCP port free on this machine now, for a group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def next_rendezvous_port() -> None:
    """In a run_ranks process, before each process group after the first: its own
    MASTER_PORT (the first one + a count, the same on every rank). On one port a rank may read
    the previous group's addresses from a store not yet gone and connect to a peer's closed
    gloo socket ("Connection refused"), leaving the others waiting."""
    base = int(os.environ.setdefault("CLUSTER_PIPELINE_TEST_BASE_PORT", os.environ["MASTER_PORT"]))
    os.environ["MASTER_PORT"] = str(base + next(_GROUPS))


def launcher_env(threads: int | None = RANK_THREADS) -> dict[str, str]:
    """This environment for a launch.local or torchrun subprocess: none of this process's rank
    variables, and `threads` threads per rank (None: OMP_NUM_THREADS as it is here).

    Nor this process's W&B service (WANDB_SERVICE, set by wandb in a process that started one):
    a launched command starts its own, as a user's would. Sharing one made a rerun after a
    SIGKILL fail with "run ID … is in use" (the killed run's stream was still registered)."""
    private = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_SERVICE")
    env = {k: v for k, v in os.environ.items() if k not in private}
    return env if threads is None else env | {"OMP_NUM_THREADS": str(threads)}


def _rank_env(rank: int, world: int, port: int, threads: int, env: dict[str, str]) -> dict:
    return dict(
        env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )  # fmt: skip


def _rank_main(out: str) -> None:
    """A rank of run_ranks: call the function named in out/call.pkl, leave out/rank<r>.pkl."""
    sys_path, module, name, args = pickle.loads(Path(out, "call.pkl").read_bytes())
    sys.path[:] = sys_path  # the caller's: the tests' folder holds their modules
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from cluster_pipeline import dist

    try:
        fn = getattr(importlib.import_module(module), name)
        result: Any = ("ok", fn(rank, world, *pickle.loads(args)))
        # Every rank done with its collectives before any tears gloo down: rank 0 hosts the
        # store its peers still talk to.
        dist.leave_group(barrier=True)
    except BaseException as exc:
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        dist.leave_group(barrier=False)  # after an error: at once
    tmp = Path(out, f"rank{rank}.pkl.tmp")
    tmp.write_bytes(pickle.dumps(result))
    tmp.rename(Path(out, f"rank{rank}.pkl"))


def _module_of(fn: Callable) -> str:
    """The module a fresh process imports `fn` from (`python -m bench.NAME`: bench.NAME)."""
    if fn.__module__ != "__main__":
        return fn.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise ValueError(f"run_ranks: {fn.__qualname__} must live in an importable module")
    return spec.name


def run_ranks(
    world: int, fn: Callable, *args: Any, timeout: float = 120, threads: int | None = RANK_THREADS
) -> list[Any]:
    """fn(rank, world, *args) on `world` processes; returns results in rank order. `timeout`
    is an idle machine's limit (`limits.limit` stretches it by the load). `threads` per rank;
    None: cores ÷ world, as `launch.local` runs ranks (benchmarks).

    `fn` must be a module-level function. A rank that raises fails the call (AssertionError
    with every rank's traceback); one that dies without a result stops the others at once.
    """
    per_rank = threads if threads is not None else max(1, (os.cpu_count() or 1) // world)
    port, env = free_port(), launcher_env(threads=None)
    with tempfile.TemporaryDirectory() as out:
        call = (list(sys.path), _module_of(fn), fn.__qualname__, pickle.dumps(args))
        Path(out, "call.pkl").write_bytes(pickle.dumps(call))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _BOOT, out], env=_rank_env(r, world, port, per_rank, env)
            )
            for r in range(world)
        ]
        try:
            _wait(procs, Path(out), time.monotonic() + limit(timeout), timeout)
        finally:
            kill_all(procs)
        results = [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(world)]
    errors = [f"rank {r}: {msg}" for r, (status, msg) in enumerate(results) if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]


def _wait(procs: list[subprocess.Popen], out: Path, deadline: float, timeout: float) -> None:
    """Until every rank has exited; a rank gone without its result (killed, os._exit) ends
    the wait, since its peers would wait for it until their collectives time out."""
    while [p.poll() for p in procs].count(None):  # every rank polled: any() would stop early
        for r, p in enumerate(procs):
            if p.returncode is not None and not (out / f"rank{r}.pkl").exists():
                raise AssertionError(f"rank {r} exited with status {p.returncode} and no result")
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks did not finish within {timeout} s")
        time.sleep(0.05)
    for r, p in enumerate(procs):
        if not (out / f"rank{r}.pkl").exists():
            raise AssertionError(f"rank {r} exited with status {p.returncode} and no result")


def start_cli_ranks(
    argv: list[str], out_dir: Path, world: int = 2, env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """`python ARGV` as `world` ranks with torchrun's environment but no torchrun agent, which
    would stop the other ranks itself when one dies. Rank r's output goes to out_dir/out<r>.txt.
    """
    port = free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        rank_env = dict(env or launcher_env(threads=None), RANK=str(rank), WORLD_SIZE=str(world),
                        LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        OMP_NUM_THREADS=str(RANK_THREADS), PYTHONPATH=str(REPO))  # fmt: skip
        with open(out_dir / f"out{rank}.txt", "w") as out:
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=rank_env,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
    return procs


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the processes still running (cleanup after a failed test)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
