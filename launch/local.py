"""Run a cluster-pipeline command on N local ranks through torchrun (gloo on CPU, NCCL on GPUs).

python -m launch.local --nproc 2 train --config configs/demo_mnist.yaml
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


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
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
