"""Imported by the DataLoader's forkserver only (its preload list, in loader.py): the
forkserver ignores the stop signals sent to its rank's process group, which would otherwise
kill it mid-run, and dies with the rank, taking its DataLoader workers with it."""

from cluster_pipeline.run.stop import shield_child

shield_child()
