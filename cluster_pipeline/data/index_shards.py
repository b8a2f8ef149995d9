"""Indexing users' own webdataset shards where they lie: `cluster-pipeline index PATTERN|DIR`.

Many collections already are webdataset tars (`train-{000000..001281}.tar`). Rewriting them with
make-shards would copy the dataset; one pass over their tar headers instead writes the index
make-shards writes (index.json, samples.npy) plus members.npy, each sample's image member name
(the keys are the users' own, not make-shards' `%09d`), which the reader checks each tar header
against. Only the small .cls/.json members are read; tarfile seeks past every other member.

`tar_scan` groups each shard's members into samples as webdataset does, naming odd members in
the log and counting them in the summary; `class_values` reads the samples' classes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import braceexpand
import numpy as np

from cluster_pipeline.data.class_values import ClassSource, labels_of
from cluster_pipeline.data.decode import IMAGE_EXTS
from cluster_pipeline.data.reader import ShardError
from cluster_pipeline.data.shards import FORMAT, INDEX_FILE, SAMPLES_FILE, shard_fingerprint
from cluster_pipeline.data.tar_scan import (
    COMPRESSED_SUFFIXES,
    ODD_KINDS,
    Oddities,
    Table,
    compressed_message,
    counted,
    scan_shard,
)

log = logging.getLogger(__name__)

MEMBERS_FILE = "members.npy"


@dataclass(frozen=True)
class IndexResult:
    index: dict  # what index.json holds
    summary: str  # the one line `cluster-pipeline index` prints
    odd: dict[str, int]  # odd members by ODD_KINDS kind, 0 where none


def index_shards(
    pattern_or_dir: str | Path, out: str | Path | None = None, class_from: str = "auto"
) -> IndexResult:
    """Index existing webdataset shards for ShardIndex/SampleReader in one pass over them.

    `pattern_or_dir`: a brace pattern (`/data/train-{000000..001281}.tar`), a glob, one tar, or
    a directory (its `*.tar`, sorted). `out` (default: the shards' directory) receives
    samples.npy, members.npy, then index.json, each written atomically; the shards are only
    read, so `out` elsewhere indexes read-only shards. `class_from`: see `ClassSource.parse`.
    Raises ShardError naming the shard (and member) for what cannot be indexed.
    """
    source = ClassSource.parse(class_from)
    paths = shard_paths(pattern_or_dir)
    out_dir = Path(out) if out is not None else _common_directory(paths, str(pattern_or_dir))
    _check_writable(out_dir)
    odd, table = Oddities(), Table()
    shards = []
    for s, path in enumerate(paths):
        first = len(table.shard)
        table.paths.append(path)
        size = scan_shard(path, s, source, table, odd)
        if len(table.shard) == first:
            log.warning("shard %s holds no samples", path)
        shards.append(
            {
                "name": _shard_name(path, out_dir),
                "count": len(table.shard) - first,
                "first_index": first,
                "bytes": size,
                "fingerprint": shard_fingerprint(path, size),
            }
        )
        if (s + 1) % 100 == 0:
            log.info("indexed %d of %d shards (%d samples)", s + 1, len(paths), len(table.shard))
    odd.close()
    n = len(table.shard)
    if n == 0:
        raise ShardError(
            f"no samples found in {pattern_or_dir} ({len(paths)} shards): no key has a member "
            f"with an image extension ({', '.join(IMAGE_EXTS)})"
        )
    labels, classes = labels_of(table.value, table.first_of_type)
    samples = np.empty((n, 4), dtype=np.int64)
    samples[:, 0], samples[:, 1], samples[:, 2] = table.shard, table.offset, table.size
    samples[:, 3] = labels
    counts = {kind: odd.counts[kind] for kind in ODD_KINDS}
    index = {
        "format": FORMAT,
        "num_samples": n,
        "classes": classes,
        "shards": shards,
        "members_file": MEMBERS_FILE,
        "indexed_from": {"pattern": str(pattern_or_dir), "class_from": class_from, "odd": counts},
    }
    width = max(len(m) for m in table.members)
    members = np.array(table.members, dtype=f"S{width}")
    _write_index(out_dir, samples, members, index)
    summary = _summary(n, len(shards), source, classes, int((labels < 0).sum()), counts)
    log.info("%s; index in %s", summary, out_dir)
    return IndexResult(index, summary, counts)


def shard_paths(pattern_or_dir: str | Path) -> list[Path]:
    """The shard files PATTERN|DIR names, in order. Brace ranges are webdataset's (braceexpand,
    zero padding kept) and every file they name must exist; a glob must match something."""
    text = str(pattern_or_dir)
    if os.path.isdir(text):
        found = sorted(p for p in Path(text).glob("*.tar") if p.is_file())
        if not found:
            packed = sorted(p for p in Path(text).iterdir() if p.name.endswith(COMPRESSED_SUFFIXES))
            if packed:
                raise ShardError(compressed_message(packed[0], None))
            raise ShardError(f"{text} holds no *.tar files (a directory is indexed by its *.tar)")
        return found
    paths: list[Path] = []
    missing: list[str] = []
    for item in braceexpand.braceexpand(text):
        if any(c in item for c in "*?["):
            hits = sorted(h for h in glob.glob(item) if os.path.isfile(h))
            if not hits:
                raise ShardError(f"no file matches {item!r}")
            paths += [Path(h) for h in hits]
        elif os.path.isfile(item):
            paths.append(Path(item))
        else:
            missing.append(item)
    if missing:
        more = f" (and {len(missing) - 1} more of {text})" if len(missing) > 1 else ""
        raise ShardError(f"shard {missing[0]} does not exist{more}")
    repeated = [p for p, c in Counter(os.path.abspath(p) for p in paths).items() if c > 1]
    if repeated:
        raise ShardError(f"shard {repeated[0]} is named twice by {text}")
    return paths


def _common_directory(paths: list[Path], pattern: str) -> Path:
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
    if len(folders) > 1:
        raise ShardError(
            f"the shards of {pattern} lie in {len(folders)} directories ({folders[0]}, "
            f"{folders[1]}, ...): give --out DIR for the index"
        )
    return Path(folders[0])


def _check_writable(out: Path) -> None:
    """Before the pass, not after it: users' shard folders are often read-only."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardError(f"cannot create the index directory {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ShardError(
            f"cannot write the index into {out} (not writable); give --out DIR to keep it "
            "elsewhere: the shards are only read"
        )


def _shard_name(path: Path, out: Path) -> str:
    """The shard's path relative to the index when it lies below it (the two move together),
    else absolute (an index kept elsewhere). ShardIndex joins root / name either way."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    return os.path.abspath(path) if rel == ".." or rel.startswith(".." + os.sep) else rel


def _write_index(out: Path, samples: np.ndarray, members: np.ndarray, index: dict) -> None:
    """samples.npy and members.npy, then index.json: an interrupted run leaves no index (an
    earlier one's index.json goes first, since it would no longer match samples.npy)."""
    try:
        (out / INDEX_FILE).unlink(missing_ok=True)
        _replace(out / SAMPLES_FILE, lambda fh: np.save(fh, samples))
        _replace(out / MEMBERS_FILE, lambda fh: np.save(fh, members))
        _replace(out / INDEX_FILE, lambda fh: fh.write(json.dumps(index, indent=1).encode()))
    except OSError as exc:
        raise ShardError(f"cannot write the index into {out}: {exc}") from None


def _replace(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def _summary(
    n: int, shards: int, source: ClassSource, classes: list[str], unknown: int,
    counts: dict[str, int],
) -> str:  # fmt: skip
    how = source.describe()
    if source.kind != "none":
        how += f": {_plural(len(classes), 'class', 'classes')}"
        if unknown:
            how += f", {_plural(unknown, 'sample', 'samples')} without one (class -1)"
    odd = [counted(kind, c) for kind, c in counts.items() if c]
    indexed = f"indexed {_plural(n, 'sample', 'samples')} in {_plural(shards, 'shard', 'shards')}"
    return f"{indexed} ({how}); " + (", ".join(odd) or "nothing odd")


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
