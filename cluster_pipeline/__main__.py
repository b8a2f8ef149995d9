import sys

from cluster_pipeline.cli import entry

sys.exit(entry())
