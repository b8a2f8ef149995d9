"""Launching any configured command: on SLURM through submitit (`slurm`, and `job`, what runs
on every task), or on N local ranks that it starts itself (`local`). The top-level `launch/` holds
the `python -m launch.*` entry points; nothing in cluster_pipeline imports it."""
