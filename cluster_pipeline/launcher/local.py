"""Run a cluster-pipeline command on N local ranks through torchrun (gloo on CPU, NCCL on GPUs).

python -m launch.local --nproc 2 train --config configs/demo_mnist.yaml
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cluster_pipeline.cli import EXIT_DIR_ENV
from cluster_pipeline.dist import EXIT_RANK_LOST


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this machine")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="cluster-pipeline arguments")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give a cluster-pipeline command, e.g. train --config configs/demo_mnist.yaml")
    env = dict(os.environ)
    # Two ranks on two cores: one intra-op thread each keeps them from fighting over the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={args.nproc}", "-m", "cluster_pipeline", *args.command,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cluster-pipeline-exit-") as exits:
        env[EXIT_DIR_ENV] = exits
        return ranks_exit_status(subprocess.call(cmd, env=env), Path(exits))


def ranks_exit_status(torchrun_status: int, exits: Path) -> int:
    """The ranks' own exit status, which torchrun turns into 1: that of the cause (the first
    rank, in rank order, that did not exit EXIT_RANK_LOST because another was gone), e.g. 2 for
    a damaged sample, 75 for a stop; torchrun's when no rank left one (killed, or os._exit)."""
    if torchrun_status == 0:
        return 0
    found = sorted((int(f.name[4:]), int(f.read_text())) for f in exits.glob("rank*"))
    statuses = [s for _, s in found if s != 0]
    causes = [s for s in statuses if s != EXIT_RANK_LOST] or statuses
    return causes[0] if causes else torchrun_status
