"""Imported by the DataLoader's forkserver only (its preload list, in loader.py): the
forkserver ignores the stop signals sent to its rank's process group, which would otherwise
kill it mid-run, and dies with the rank, taking its DataLoader workers with it.

It also loads PIL's format plugins once, here: PIL imports them on the first `Image.open` of
each process, ~0.2 s that every worker of every loader (two a rank per epoch) paid on its
first batch, before it decoded anything."""

from PIL import Image

from cluster_pipeline.run.stop import shield_child

shield_child()
Image.preinit()
