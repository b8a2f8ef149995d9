"""An ImageNet-layout image folder as a make-shards source, every file under it accounted for.

Each file is written as a sample, or left out with its reason (not an image, zero bytes,
unreadable, damaged, not in a class folder); `manifest.jsonl` beside index.json lists each file
and what became of it, and the make-shards log names the files left out (the first
MAX_WARNINGS) and sums them up in one line.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cluster_pipeline.data.decode import DecodeError, sniff_format
from cluster_pipeline.data.decode import verify as verify_image
from cluster_pipeline.data.sources import FileBytes, Source, SourceError, TreeEntry

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.jsonl"
# Reasons a file under an image folder is not written, in the order the summary counts them
# (the part before ':' of "damaged: <decoder's message>", "unreadable: <OS error>").
REASONS = ("not an image", "zero bytes", "damaged", "unreadable", "not in a class folder")
# Warning lines naming files not written; the others are in manifest.jsonl.
MAX_WARNINGS = 20


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
