"""cluster_pipeline: DeepCluster and ClusterFit on webdataset shards, with DDP, faiss and SLURM."""

__version__ = "0.1.0"
