"""Reading samples from the shards: exactly-once partitions for extraction, random access for training.

Both paths read through the offsets in samples.npy with one `pread` per sample (tar header +
image bytes), check the tar header names the expected sample, and decode with PIL into fixed-size
uint8 arrays. Workers build whole batches, so the main process receives one array per batch.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .shards import FORMAT, INDEX_FILE, SAMPLES_FILE

TAR_HEADER = 512


class ShardError(RuntimeError):
    """A shard is missing, changed since its index was written, truncated or holds a bad sample."""


@dataclass(frozen=True)
class ShardIndex:
    root: Path
    shard_names: list[str]
    shard_counts: np.ndarray
    shard_bytes: np.ndarray
    samples: np.ndarray  # (N, 4) int64: shard, offset, size, class (-1 unknown)
    classes: list[str]

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray | None:
        """True classes (evaluation only), or None when any is unknown."""
        col = self.samples[:, 3]
        return None if (col < 0).any() else col

    def shards_of(self, indices: np.ndarray) -> list[str]:
        return [self.shard_names[s] for s in np.unique(self.samples[indices, 0])]

    @classmethod
    def load(cls, root: str | Path) -> ShardIndex:
        """Read index.json and samples.npy and check every shard exists with its recorded size."""
        root = Path(root)
        path = root / INDEX_FILE
        if not path.is_file():
            raise ShardError(
                f"{path} not found: data.shards must be a directory written by "
                "`cluster-pipeline make-shards`"
            )
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise ShardError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        samples = np.load(root / SAMPLES_FILE)
        names = [s["name"] for s in meta["shards"]]
        counts = np.asarray([s["count"] for s in meta["shards"]], dtype=np.int64)
        sizes = np.asarray([s["bytes"] for s in meta["shards"]], dtype=np.int64)
        if len(samples) != meta["num_samples"] or counts.sum() != meta["num_samples"]:
            raise ShardError(
                f"{root}: index.json says {meta['num_samples']} samples, shards sum to "
                f"{counts.sum()}, samples.npy has {len(samples)}; rewrite the shards"
            )
        problems = []
        for name, size in zip(names, sizes, strict=True):
            f = root / name
            if not f.is_file():
                problems.append(f"{f} is missing")
            elif f.stat().st_size != size:
                problems.append(
                    f"{f} has {f.stat().st_size} bytes but the index recorded {size} "
                    "(truncated or changed since make-shards)"
                )
        if problems:
            raise ShardError("; ".join(problems))
        return cls(root, names, counts, sizes, samples, list(meta.get("classes", [])))


def _resize_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then center crop to size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class SampleReader:
    """Reads and decodes samples by index; one per DataLoader worker (file handles are per process)."""

    def __init__(self, index: ShardIndex, load_size: int, channels: int) -> None:
        self.index = index
        self.load_size = load_size
        self.mode = "L" if channels == 1 else "RGB"
        self.channels = channels
        self._fds: dict[int, int] = {}

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self.index.root / self.index.shard_names[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getstate__(self) -> dict:
        """Workers started by spawn/forkserver open their own files: descriptors do not travel."""
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def read(self, i: int) -> np.ndarray:
        shard, offset, size, _ = (int(v) for v in self.index.samples[i])
        name = self.index.shard_names[shard]
        raw = os.pread(self._fd(shard), TAR_HEADER + size, offset - TAR_HEADER)
        if len(raw) != TAR_HEADER + size:
            raise ShardError(f"shard {self.index.root / name} is truncated at sample {i}")
        member = raw[:100].split(b"\0", 1)[0].decode(errors="replace")
        if not member.startswith(f"{i:09d}."):
            raise ShardError(
                f"shard {self.index.root / name}: expected sample {i:09d} at byte {offset}, "
                f"found {member!r}; the shard changed since its index was written"
            )
        try:
            with Image.open(io.BytesIO(raw[TAR_HEADER:])) as im:
                img = _resize_square(im.convert(self.mode), self.load_size)
                arr = np.asarray(img, dtype=np.uint8)
        except Exception as exc:
            raise ShardError(
                f"shard {self.index.root / name}: sample {i:09d} has an undecodable image ({exc})"
            ) from exc
        return arr.reshape(self.load_size, self.load_size, self.channels)

    def read_batch(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.load_size, self.load_size, self.channels), np.uint8)
        for j, i in enumerate(indices):
            out[j] = self.read(int(i))
        return out


class BatchDataset(Dataset):
    """Item j is the decoded batch `batches[j]`: one worker reads one whole batch."""

    def __init__(self, reader: SampleReader, batches: list[np.ndarray]) -> None:
        self.reader = reader
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batches[j]
        images = torch.from_numpy(self.reader.read_batch(idx))
        return torch.from_numpy(idx.astype(np.int64)), images


def batch_loader(
    reader: SampleReader,
    indices: np.ndarray,
    batch_size: int,
    num_workers: int,
    timeout_s: float = 0,
) -> DataLoader:
    """Batches of (sample indices, uint8 NHWC images) in order; each batch read by one worker.

    The DataLoader hands each item to exactly one worker, so within a rank every index in
    `indices` is read exactly once whatever the number of workers. Workers come from a
    forkserver: forking a rank that runs gloo, tqdm and OpenMP threads can deadlock the child
    (CPython gh-112275), which would stall every rank until the collective timeout. A batch that
    takes more than `timeout_s` (0: no limit) is an error rather than a silent stall.
    """
    batches = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    workers: dict = {}
    if num_workers > 0:
        torch.multiprocessing.set_forkserver_preload(["torch", __name__])
        workers = {
            "multiprocessing_context": "forkserver",
            "prefetch_factor": 4,
            "timeout": timeout_s,
        }
    return DataLoader(
        BatchDataset(reader, batches),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        **workers,
    )


def rank_partition(num_samples: int, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous slice of 0..N-1 for extraction; slices of all ranks tile 0..N-1.

    Splitting by sample rather than by shard balances ranks whatever the shard count, and a rank
    whose slice is empty simply reads nothing.
    """
    lo, hi = rank * num_samples // world, (rank + 1) * num_samples // world
    return np.arange(lo, hi, dtype=np.int64)
