"""`python -m launch.local --nproc 2 COMMAND ...`: see cluster_pipeline/launcher/local.py."""

import sys

from cluster_pipeline.launcher.local import main

if __name__ == "__main__":
    sys.exit(main())
