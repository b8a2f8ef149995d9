"""Shards on disk to batches on the device: writing, exactly-once reading, sampling, augmentation."""
