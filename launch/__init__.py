"""Thin entry points, run from the repository root: `python -m launch.local` and
`python -m launch.slurm`. The launch logic is cluster_pipeline.launcher; this folder is not
installed (a generic top-level `launch` module in site-packages would shadow others)."""
