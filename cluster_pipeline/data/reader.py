"""Reading samples from the shards: the index checked against them, and one sample at a time.

Every read goes through the offsets in samples.npy with one `pread` per sample (tar header +
image bytes), checks the tar header names the expected sample's image (`tar_names`), and
decodes it strictly (`decode.decode_into`: damage is an error, never pixels) into fixed-size
uint8 arrays. A sample that cannot be read is a SampleError naming the shard, the key and the
original file; `read_batch_skipping` leaves it out and reports it, so one bad image costs one
sample, not the batch or the run. `loader` builds the batches of a rank from these reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster_pipeline.clustering.keys import SALT_SPLIT, sample_keys
from cluster_pipeline.data.decode import IMAGE_EXTS, DecodeError, Mode, decode_into
from cluster_pipeline.data.shards import (
    FINGERPRINT_BYTES,
    FORMAT,
    INDEX_FILE,
    SAMPLES_FILE,
    shard_fingerprint,
)
from cluster_pipeline.data.tar_names import TAR_HEADER, header_name, names_member

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard is missing, changed since its index was written, truncated or holds a bad sample."""

    exit_status = 2  # bad input, on every rank (dist.exit_status_of)


class SampleError(ShardError):
    """One sample cannot be read: its bytes are cut off, it has no image member, or its image
    does not decode. data.on_error=skip leaves such samples out; fail stops the run."""


@dataclass
class SampleNames:
    """Per-sample names kept beside samples.npy, each read when first asked for (mmap): the
    member name of each sample's image in its shard (shards indexed by `cluster-pipeline
    index`, whose keys are the users' own) and the original file it was made from (make-shards
    from an image folder). At ImageNet scale that is 1.28M names, so they are never copied into
    every rank and worker: only an error message or the header check reads one.
    """

    root: Path
    members_file: str | None = None
    sources_file: str | None = None
    _open: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def member(self, sample_id: int) -> str | None:
        """The image member's name in the tar; None: `%09d` of the sample id + an extension."""
        return self._name(self.members_file, sample_id)

    def source(self, sample_id: int) -> str | None:
        """The file the sample was made from, relative to the tree make-shards read."""
        return self._name(self.sources_file, sample_id)

    def _name(self, file: str | None, sample_id: int) -> str | None:
        if file is None:
            return None
        if file not in self._open:
            self._open[file] = np.load(self.root / file, mmap_mode="r")
        return bytes(self._open[file][sample_id]).decode("utf-8", errors="replace")

    def __getstate__(self) -> dict:
        """Workers map the files themselves: a mapped array would travel as a full copy."""
        return {**self.__dict__, "_open": {}}


@dataclass(frozen=True)
class ShardIndex:
    root: Path
    shard_names: list[str]
    shard_counts: np.ndarray
    shard_bytes: np.ndarray
    samples: np.ndarray  # (N, 4) int64: shard, offset, size, class (-1 unknown)
    classes: list[str]
    # The sample id (its key in the shards) of each row; None: row i is sample i. A split
    # (`split`) keeps some rows, renumbered 0..n-1 for everything downstream.
    ids: np.ndarray | None = None
    split_name: str = "all"
    names: SampleNames | None = None

    def describe(self, sample_id: int) -> str:
        """'sample <key> (<original file>)': how errors and skips name a sample."""
        member = self.names.member(sample_id) if self.names else None
        key = f"{sample_id:09d}" if member is None else f"{member!r}"
        source = self.names.source(sample_id) if self.names else None
        return f"sample {key}" + (f" ({source})" if source else "")

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray | None:
        """True classes (evaluation only), or None when any is unknown."""
        col = self.samples[:, 3]
        return None if (col < 0).any() else col

    def sample_id(self, i: int) -> int:
        return i if self.ids is None else int(self.ids[i])

    def split(self, name: str, test_fraction: float, seed: int) -> ShardIndex:
        """The rows of split `name` (all, train or test) of `split_ids`'s fixed rule."""
        if name == "all":
            return self
        train, test = split_ids(self.num_samples, test_fraction, seed)
        keep = train if name == "train" else test
        ids = keep if self.ids is None else self.ids[keep]
        return dataclasses.replace(self, samples=self.samples[keep], ids=ids, split_name=name)

    def shards_of(self, indices: np.ndarray) -> list[str]:
        return [self.shard_names[s] for s in np.unique(self.samples[indices, 0])]

    @classmethod
    def load(cls, root: str | Path, allow_truncated: bool = False) -> ShardIndex:
        """Read index.json and samples.npy and check every shard against them, before any work.

        Each shard must exist with its recorded size and, when the index has fingerprints
        (indexes written before them load unchecked), the same first and last 64 KiB. With
        `allow_truncated` (data.on_error=skip) a shard cut short is accepted if its head is
        unchanged: the samples past the cut fail to read and are skipped like any bad sample.
        """
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
        for s, (entry, size) in enumerate(zip(meta["shards"], sizes, strict=True)):
            problem = _check_shard(root / entry["name"], s, int(size), entry.get("fingerprint"),
                                   samples, allow_truncated)  # fmt: skip
            if problem:
                problems.append(problem)
        if problems:
            raise ShardError(
                "; ".join(problems) + f". The shards in {root} no longer match their index: "
                "restore them, or re-run `cluster-pipeline make-shards` to rewrite shards and index"
            )
        files = SampleNames(root, meta.get("members_file"), meta.get("sources_file"))
        classes = list(meta.get("classes", []))
        return cls(root, names, counts, sizes, samples, classes, names=files)


def split_ids(num_samples: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, test ids), sorted: the test set is the round(test_fraction * N) samples with
    the smallest keys of a hash of (sample id, seed). A pure function of (N, fraction, seed):
    the same on every run, rank and machine, disjoint, and blind to class and shard layout
    (MNIST-5k with the defaults: 4000 / 1000)."""
    ids = np.arange(num_samples, dtype=np.int64)
    order = np.lexsort((ids, sample_keys(ids, seed, SALT_SPLIT)))
    n_test = round(test_fraction * num_samples)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _check_shard(
    f: Path,
    s: int,
    size: int,
    fingerprint: dict[str, str] | None,
    samples: np.ndarray,
    allow_truncated: bool,
) -> str | None:
    """What is wrong with shard number `s` at path `f`, or None when it matches the index."""
    if not f.is_file():
        return f"{f} is missing"
    actual = f.stat().st_size
    if actual > size:
        return f"{f} has {actual} bytes but the index recorded {size}: it changed since make-shards"
    if actual < size:
        ends = samples[:, 1] + samples[:, 2]
        cut = np.flatnonzero((samples[:, 0] == s) & (ends > actual))
        where = f"cut at sample {cut[0]:09d}" if len(cut) else "cut after its last sample"
        head_changed = (
            fingerprint is not None
            and actual >= min(size, FINGERPRINT_BYTES)
            and shard_fingerprint(f, size)["head"] != fingerprint["head"]
        )
        if head_changed:
            return f"{f} is truncated ({actual} of {size} bytes) and its first 64 KiB changed"
        if not allow_truncated:
            return (
                f"{f} is truncated: {actual} of {size} bytes, {where} ({len(cut)} samples lost; "
                "data.on_error=skip would leave them out)"
            )
        log.warning("%s is truncated (%d of %d bytes), %s: its %d samples past the cut will be "
                    "skipped as unreadable", f, actual, size, where, len(cut))  # fmt: skip
        return None
    if fingerprint and shard_fingerprint(f) != fingerprint:
        return (
            f"{f} changed since make-shards: same size ({size} bytes) but different bytes in "
            "its first or last 64 KiB"
        )
    return None


class SampleReader:
    """Reads and decodes samples by index; one per DataLoader worker (file handles are per
    process)."""

    def __init__(self, index: ShardIndex, load_size: int, channels: int) -> None:
        self.index = index
        self.load_size = load_size
        self.mode: Mode = "L" if channels == 1 else "RGB"
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
        """Sample i as a (load_size, load_size, channels) uint8 array (see `read_into`)."""
        out = self._empty(1)[0]
        self.read_into(i, out)
        return out

    def read_into(self, i: int, out: np.ndarray) -> None:
        """Decode sample i into `out`, a (load_size, load_size, channels) uint8 array.

        Raises SampleError when this sample alone is bad, and ShardError when the bytes at its
        offset belong to another sample (the shard was rewritten: every offset is suspect).
        """
        shard, offset, size, _ = (int(v) for v in self.index.samples[i])
        i = self.index.sample_id(i)  # its key in the shard (differs from the row in a split)
        fd = self._fd(shard)
        raw = os.pread(fd, TAR_HEADER + size, offset - TAR_HEADER)
        if len(raw) != TAR_HEADER + size:
            raise self._error(
                shard, i, f"truncated: the file ends at byte {os.fstat(fd).st_size}, before "
                f"this sample's image ends at byte {offset + size}"
            )  # fmt: skip
        header = header_name(raw)
        expected = self.index.names.member(i) if self.index.names else None
        if not names_member(header, i, expected):
            raise ShardError(
                f"shard {self._path(shard)}: expected {self.index.describe(i)} at byte {offset}, "
                f"found {header.decode(errors='replace')!r}; the shard changed since its index "
                "was written: index or write the shards again"
            )
        member = header.decode(errors="replace") if expected is None else expected
        if not member.lower().endswith(IMAGE_EXTS):
            raise self._error(shard, i, f"no image member ({member!r} where its image was)")
        try:
            decode_into(memoryview(raw)[TAR_HEADER:], self.mode, self.load_size, out)
        except DecodeError as exc:
            raise self._error(shard, i, str(exc)) from None

    def _error(self, shard: int, sample_id: int, reason: str) -> SampleError:
        return SampleError(f"shard {self._path(shard)}: {self.index.describe(sample_id)}: {reason}")

    def _path(self, shard: int) -> Path:
        """For messages only: a path join per sample slowed reading MNIST-5k by ~5%."""
        return self.index.root / self.index.shard_names[shard]

    def _empty(self, n: int) -> np.ndarray:
        return np.empty((n, self.load_size, self.load_size, self.channels), np.uint8)

    def read_batch(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The images of `indices`, decoded into `out` when given (len(indices) rows)."""
        out = self._empty(len(indices)) if out is None else out
        for j, i in enumerate(indices):
            self.read_into(int(i), out[j])
        return out

    def read_batch_skipping(
        self, indices: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(indices read, their images, indices that raised SampleError, why each did).

        The loop is read_batch's; a batch without bad samples is returned as read (`out`
        itself when given), no copy.
        """
        out = self._empty(len(indices)) if out is None else out
        bad: list[int] = []
        reasons: list[str] = []
        for j, i in enumerate(indices):
            try:
                self.read_into(int(i), out[j])
            except SampleError as exc:
                bad.append(j)
                reasons.append(str(exc))
        if not bad:
            return indices, out, indices[:0], reasons
        keep = np.ones(len(indices), dtype=bool)
        keep[bad] = False
        return indices[keep], out[keep], indices[~keep], reasons
