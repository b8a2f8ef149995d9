"""Run a cluster-pipeline command on N local ranks (gloo on CPU, NCCL on GPUs).

python -m launch.local --nproc 2 train --config configs/demo_mnist.yaml

The launcher starts the ranks itself, with torchrun's environment variables, in its
process group, and stays their parent:
- Ctrl-C, SIGTERM, SIGUSR2 or SIGHUP, to the launcher or to its process group, is a stop:
  every rank stops at its next step boundary, rank 0 writes the checkpoint, every rank and
  the launcher exit 75, and the same command continues the run. A second Ctrl-C aborts at
  once, without a checkpoint (exit 130).
- When the launcher dies (even by SIGKILL) its ranks get SIGTERM (a parent-death signal), so
  they stop the same way instead of training on as orphans.
- Its exit status is the ranks' own: that of the first rank, in rank order, that failed for a
  reason of its own (2 for a damaged sample, 75 for a stop), not 69 (a rank that stopped
  because another was gone).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from cluster_pipeline.exits import EXIT_ABORTED, EXIT_RANK_LOST
from cluster_pipeline.run.stop import LAUNCHER_PID_ENV, LOCAL_SIGNALS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env | {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), LAUNCHER_PID_ENV: str(os.getpid()),
    }  # fmt: skip


class Ranks:
    """The rank processes, and what the launcher does with the signals it gets."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs, self.interrupts = procs, 0

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                say("second Ctrl-C: aborting the ranks at once, without a checkpoint")
                self.send(signal.SIGKILL)
                return
            say("Ctrl-C: every rank stops at its next step and rank 0 writes a checkpoint; "
                "Ctrl-C again to abort at once")  # fmt: skip
            signum = signal.SIGTERM  # the ranks count their own Ctrl-Cs: this is not a second
        else:
            say(f"{signal.Signals(signum).name}: the ranks stop at their next step, with a "
                "checkpoint")  # fmt: skip
        self.send(signum)

    def send(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)  # a process gone meanwhile is no error

    def wait(self) -> list[int]:
        while any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        return [p.returncode for p in self.procs]


def say(line: str) -> None:
    print(f"launch.local: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this machine")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="cluster-pipeline arguments")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give a cluster-pipeline command, e.g. train --config configs/demo_mnist.yaml")
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    # Two ranks on two cores: one intra-op thread each keeps them from fighting over the cores.
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    port = free_port()
    cmd = [sys.executable, "-m", "cluster_pipeline", *args.command]
    ranks = Ranks([])
    previous = {s: signal.signal(s, ranks.on_signal) for s in LOCAL_SIGNALS}
    try:
        for rank in range(args.nproc):
            ranks.procs.append(subprocess.Popen(cmd, env=rank_env(rank, args.nproc, port, threads)))
        statuses = ranks.wait()
    finally:
        ranks.send(signal.SIGKILL)  # only ranks still running: the launcher itself failed
        for s, handler in previous.items():
            signal.signal(s, handler)
    if ranks.interrupts > 1:
        return EXIT_ABORTED
    return ranks_exit_status(statuses)


def ranks_exit_status(statuses: list[int]) -> int:
    """The launcher's exit status from its ranks': 0 when all succeeded, else that of the cause
    (the first rank, in rank order, whose status is not EXIT_RANK_LOST), as a shell reports a
    rank killed by a signal (128 + N)."""
    codes = [128 - s if s < 0 else s for s in statuses]
    failed = [s for s in codes if s != 0]
    causes = [s for s in failed if s != EXIT_RANK_LOST] or failed
    return causes[0] if causes else 0
