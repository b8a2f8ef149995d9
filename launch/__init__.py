"""Launchers: local multi-rank runs (torchrun) and, later, submitit/SLURM. Imports cluster_pipeline,
never the other way round."""
