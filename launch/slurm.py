"""`python -m launch.slurm [COMMAND] ...`, `make launch`: see cluster_pipeline/launcher/slurm.py."""

import sys

from cluster_pipeline.launcher.slurm import main

if __name__ == "__main__":
    sys.exit(main())
