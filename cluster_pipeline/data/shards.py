"""Writing webdataset tar shards and their index.

Each sample is a group of tar members sharing the key `%09d` of its stable integer index:
`<key>.png|jpg` (the image), `<key>.idx` (the index) and `<key>.cls` (its class, when known).
Any webdataset reader can read the shards. Beside them `index.json` lists the shards with their
sample counts, byte sizes and fingerprints, the total N and the class names, and `samples.npy`
holds, per sample, (shard number, byte offset and size of the image member, class or -1): readers
use it to read any sample exactly once, or at random, and to check the shards have not changed.

From an image folder (`imagefolder`) also `manifest.jsonl`, each file under the tree and what
became of it, and `sources.npy`, each sample's original file, so that a sample that later fails
to read is reported with the file it came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cluster_pipeline.data.imagefolder import (
    MANIFEST_FILE,
    imagefolder_source,
    not_written_lines,
    tree_summary,
)
from cluster_pipeline.data.sources import (
    FileBytes,
    Source,
    digits_source,
    mnist5k_source,
    synthetic_source,
)
from cluster_pipeline.data.tar_names import NAME_FIELD, TAR_HEADER

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SAMPLES_FILE = "samples.npy"
SOURCES_FILE = "sources.npy"
FORMAT = "cluster_pipeline.shards/1"
# A shard's fingerprint hashes this many bytes at each end: two small reads per shard at startup.
FINGERPRINT_BYTES = 64 << 10


def load_source(spec: str, verify: bool = True, workers: int = 1) -> Source:
    """The source named on make-shards' command line. `verify` and `workers` are those of
    `imagefolder_source`; the built-in sets are PNGs encoded here."""
    if spec == "mnist5k":
        return mnist5k_source()
    if spec == "digits":
        return digits_source()
    if spec.startswith("imagefolder:"):
        return imagefolder_source(spec.split(":", 1)[1], verify, workers)
    if spec.startswith("synthetic:"):
        parts = spec.split(":")[1:]
        if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--source {spec!r}: use synthetic:N or synthetic:N:SIZE")
        return synthetic_source(*(int(p) for p in parts))
    raise ValueError(
        f"--source {spec!r}: use mnist5k, digits, imagefolder:PATH or synthetic:N[:SIZE]"
    )


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


def _shard_part(source: Source, start: int, stop: int) -> Source:
    """Samples start..stop-1 alone: what one shard's writer is sent. Sending the whole source
    pickled all of it once per shard: ~9 s a shard for an ImageNet tree's 1.28M paths."""
    images = source.images
    if isinstance(images, FileBytes):
        part: Sequence[bytes] = FileBytes(images.paths[start:stop])
    else:
        part = images[start:stop]
    return Source(part, source.ext[start:stop], source.labels[start:stop], source.classes)


def _ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header block for a regular file `name` of `size` bytes: mode 0444, owner
    0, mtime 0, so that the same samples always make the same shard bytes."""
    raw = name.encode()
    if len(raw) > NAME_FIELD:
        raise ValueError(f"tar member name over {NAME_FIELD} bytes: {name!r}")
    h = bytearray(TAR_HEADER)
    h[: len(raw)] = raw
    h[100:108] = b"0000444\0"
    h[108:116] = h[116:124] = b"0000000\0"  # uid, gid
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"  # mtime
    h[148:156] = b" " * 8  # the checksum counts its own field as spaces
    h[156:157] = b"0"  # a regular file
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _write_shard(part: Source, out: Path, name: str, start: int) -> np.ndarray:
    """One tar of `part`, samples start.. on; returns their (data offset, size) in the tar.

    Each sample's members in webdataset's order (its keys sorted): cls, idx, then the image.
    The headers are written here, not with tarfile (its pax headers cost ~1 ms a sample in
    Python: 20 minutes of one core for ImageNet's count), and the offsets are known as they
    are written instead of read back."""
    offsets = np.empty((len(part.ext), 2), dtype=np.int64)
    pos = 0
    with open(out / name, "wb") as fh:
        for j in range(len(part.ext)):
            key = f"{start + j:09d}"
            members = {part.ext[j]: part.images[j], "idx": str(start + j).encode()}
            if part.labels[j] >= 0:
                members["cls"] = str(int(part.labels[j])).encode()
            for ext in sorted(members):
                data = members[ext]
                if ext == part.ext[j]:
                    offsets[j] = pos + TAR_HEADER, len(data)
                pad = -len(data) % TAR_HEADER
                fh.write(_ustar_header(f"{key}.{ext}", len(data)) + data + b"\0" * pad)
                pos += TAR_HEADER + len(data) + pad
        fh.write(b"\0" * (2 * TAR_HEADER))  # the end-of-archive marker
    return offsets


def write_shards(
    source: Source,
    out: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    workers: int = 1,
) -> dict:
    """Write `source` as tar shards plus index.json and samples.npy; return the index.

    From an image folder also sources.npy (each sample's file) and manifest.jsonl (every file
    under the folder and what became of it), and a warning per file not written. `workers`
    processes write shards side by side (reading and encoding dominate at ImageNet scale);
    index.json is written last, so an interrupted run leaves no index behind.
    """
    if samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(source.images)
    starts = list(range(0, n, samples_per_shard))
    names = [f"{prefix}-{s:06d}.tar" for s in range(len(starts))]
    stops = [min(n, start + samples_per_shard) for start in starts]
    parts = [_shard_part(source, a, b) for a, b in zip(starts, stops, strict=True)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            offsets = list(pool.map(_write_shard, parts, [out] * len(starts), names, starts))
    else:
        jobs = zip(parts, names, starts, strict=True)
        offsets = [_write_shard(part, out, name, start) for part, name, start in jobs]
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
    if source.root is not None:
        index["source_root"] = str(source.root)
    if source.sources is not None:
        _write_sources(source.sources, out / SOURCES_FILE)
        index["sources_file"] = SOURCES_FILE
    if source.files is not None:
        _write_manifest(source, names, samples_per_shard, out / MANIFEST_FILE)
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX_FILE)
    for stale, kept in ((SOURCES_FILE, source.sources), (MANIFEST_FILE, source.files)):
        if kept is None:  # left by an earlier make-shards into this folder: no longer true
            (out / stale).unlink(missing_ok=True)
    if source.files is None:
        log.info("wrote %d samples in %d shards to %s", n, len(shards), out)
        return index
    for line in not_written_lines(source, out):
        log.warning("%s", line)
    log.info("%s", tree_summary(source, out, len(shards)))
    return index


def _write_sources(sources: list[str], path: Path) -> None:
    """Each sample's file as fixed-width utf-8 bytes (dtype S<longest>), memory-mapped by the
    reader; the original bytes of a name that is not valid utf-8."""
    encoded = [os.fsencode(s) for s in sources]
    names = np.array(encoded, dtype=f"S{max(1, *map(len, encoded))}")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, names)
    os.replace(tmp, path)


def _write_manifest(source: Source, names: list[str], per_shard: int, path: Path) -> None:
    """One JSON line per path under the folder, in walk order: written (sample, shard, member,
    class) or not written (reason); a folder that was not walked, with its reason."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
        for e in source.files or []:
            line: dict[str, str | int]
            if e.path.endswith("/"):
                line = {"path": e.path, "status": "not walked", "reason": e.reason}
            elif e.sample < 0:
                line = {"path": e.path, "status": "not written", "reason": e.reason}
            else:
                line = {
                    "path": e.path,
                    "status": "written",
                    "sample": e.sample,
                    "shard": names[e.sample // per_shard],
                    "member": f"{e.sample:09d}.{source.ext[e.sample]}",
                    "class": source.classes[source.labels[e.sample]],
                }
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def iter_webdataset(shard_dir: str | Path) -> Iterator[dict]:
    """The shards read back by the webdataset library itself (a check that they are standard).
    Imported here: writing and reading shards needs no webdataset."""
    import webdataset as wds

    index = json.loads((Path(shard_dir) / INDEX_FILE).read_text())
    urls = [str(Path(shard_dir) / s["name"]) for s in index["shards"]]
    yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False)
