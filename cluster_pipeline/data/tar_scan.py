"""One pass over the tar headers of a user's shard, grouping its members into samples as
webdataset does.

A sample is what webdataset makes of the tar: the key of a member is its path up to the first
"." of its file name, consecutive members with one key are one sample, and its image is the
member whose extension (lowercased) is an image extension. Odd members are named in the log
(a few per kind) and counted, never dropped unsaid. Only the small .cls/.json members are
read; tarfile seeks past every other member.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cluster_pipeline.data.class_values import ClassSource, cls_value, json_value
from cluster_pipeline.data.decode import IMAGE_EXTS
from cluster_pipeline.data.reader import ShardError
from cluster_pipeline.data.tar_names import NAME_FIELD, TAR_HEADER, header_name, names_member

log = logging.getLogger(__name__)

# webdataset's rule (tariterators.base_plus_ext): key = path up to the first "." of the file name.
KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset's skip_meta: members such as __index__ are metadata, not samples.
META_RE = re.compile(r"__[^/]*__($|/)")
IMAGE_SUFFIXES = frozenset(ext[1:] for ext in IMAGE_EXTS)
# Compressed tars cannot be read at random: (magic, format, command that undoes it).
COMPRESSED_MAGIC = (
    (b"\x1f\x8b", "gzip", "gunzip"),
    (b"BZh", "bzip2", "bunzip2"),
    (b"\xfd7zXZ\x00", "xz", "unxz"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
)
COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".tbz", ".tbz2", ".xz", ".txz", ".zst")
# Log lines naming odd members, per kind; past these, one "... and N more" line.
WARN_LINES = 10
# How the summary counts each kind of odd member.
ODD_KINDS = {
    "no_image": "skipped {n} key{s} without an image",
    "unreadable_name": "skipped {n} sample{s} whose tar header the reader cannot match to its name",
    "extra_image": "ignored {n} extra image member{s}",
    "duplicate_key": "{n} key{s} met again apart from {its} first members",
    "non_regular": "ignored {n} non-regular member{s} (directories, links)",
    "no_key": "ignored {n} member{s} without a key",
}


@dataclass
class _Sample:
    """A run of consecutive members sharing one key, while its shard is scanned."""

    key: str
    members: list[str] = field(default_factory=list)
    image: tarfile.TarInfo | None = None
    value: int | str | None = None  # the class as found, None: unknown
    where: str = ""  # the member the class came from, for messages
    has_cls: bool = False
    has_json: bool = False


class Oddities:
    """Counts odd members by kind and names the first WARN_LINES of each in the log."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def note(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= WARN_LINES:
            log.warning("%s", message)

    def close(self) -> None:
        for kind, n in self.counts.items():
            if n > WARN_LINES:
                log.warning("... and %d more: %s", n - WARN_LINES, counted(kind, n))


@dataclass
class Table:
    """The index rows gathered over all shards, and what the class values look like."""

    shard: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    value: list[int | str | None] = field(default_factory=list)
    members: list[bytes] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)  # key -> shard it was first met in
    paths: list[Path] = field(default_factory=list)  # the shards scanned so far
    first_of_type: dict[type, str] = field(default_factory=dict)  # int/str -> first member


def compressed_message(path: Path, kind: str | None) -> str:
    """Why a compressed shard is refused and how to undo it; `kind` as its magic says."""
    undo = next((cmd for _, k, cmd in COMPRESSED_MAGIC if k == kind), None)
    if undo is None:
        suffixes = {".gz": "gunzip", ".tgz": "gunzip", ".bz2": "bunzip2", ".xz": "unxz"}
        undo = next((c for suffix, c in suffixes.items() if path.name.endswith(suffix)), "")
    how = f"`{undo} -k {path}` (writes the .tar beside it)" if undo else "decompressing it"
    return (
        f"shard {path} is a {kind + '-compressed' if kind else 'compressed'} tar: a compressed "
        "tar cannot be read at random (each sample would need the shard decompressed up to it). "
        f"Re-shard it uncompressed, e.g. by {how}, or write new shards with `cluster-pipeline "
        "make-shards`"
    )


def _check_uncompressed(path: Path, head: bytes) -> None:
    if head[257:262] == b"ustar":  # a tar header: a member name may start like any magic
        return
    for magic, kind, _ in COMPRESSED_MAGIC:
        if head.startswith(magic):
            raise ShardError(compressed_message(path, kind))
    if path.name.endswith(COMPRESSED_SUFFIXES):
        raise ShardError(compressed_message(path, None))


def scan_shard(path: Path, s: int, source: ClassSource, table: Table, odd: Oddities) -> int:
    """Append shard `s`'s samples to `table`, in tar order; return the shard's byte size."""
    try:
        fh = open(path, "rb")  # noqa: SIM115  (closed below; only the open is guarded)
    except OSError as exc:
        raise ShardError(f"cannot read shard {path}: {exc.strerror}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        _check_uncompressed(path, fh.read(TAR_HEADER))
        fh.seek(0)
        with _open_tar(fh, path) as tf:
            last = _scan_members(tf, fh.fileno(), path, size, s, source, table, odd)
            _check_end(fh, path, tf.offset, size, last)
    return size


def _open_tar(fh: IO[bytes], path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=fh, mode="r:")
    except tarfile.ReadError as exc:
        raise ShardError(f"shard {path} is not a tar archive ({exc})") from None


def _scan_members(
    tf: tarfile.TarFile,
    fd: int,
    path: Path,
    size: int,
    s: int,
    source: ClassSource,
    table: Table,
    odd: Oddities,
) -> str | None:
    """Group the members into samples and add them to `table`; return the last member's name."""
    group: _Sample | None = None
    last = None
    while True:
        try:
            m = tf.next()
        except tarfile.ReadError as exc:  # data cut short, a broken pax/GNU header
            raise ShardError(
                f"shard {path} breaks at byte {min(tf.offset, size)} of {size}, after member "
                f"{last!r}: {exc}; the shard is truncated or damaged"
            ) from None
        if m is None:
            break
        tf.members.clear()  # type: ignore[attr-defined]  # a header pass keeps no TarInfo list
        last = m.name
        if m.offset_data + m.size > size:
            raise ShardError(
                f"shard {path} is truncated at byte {size}: member {m.name!r} needs bytes "
                f"{m.offset_data}..{m.offset_data + m.size}"
            )
        key, ext = _key(m, path, odd)
        if key is None:
            continue
        if group is None or key != group.key:
            if group is not None:
                _add_sample(group, path, fd, s, source, table, odd)
            group = _Sample(key)
        group.members.append(m.name)
        _add_member(group, m, ext, tf, path, source, odd)
    if group is not None:
        _add_sample(group, path, fd, s, source, table, odd)
    return last


def _key(m: tarfile.TarInfo, path: Path, odd: Oddities) -> tuple[str | None, str]:
    """(key, lowercased extension) of member `m`, or (None, "") for what is no sample's."""
    if not m.isreg() or m.issparse():
        kinds = ((m.isdir, "directory"), (m.issym, "symbolic link"), (m.islnk, "hard link"),
                 (m.issparse, "sparse file"))  # fmt: skip
        kind = next((k for test, k in kinds if test()), "special file")
        odd.note("non_regular", f"shard {path}: member {m.name!r} is a {kind}; ignored")
        return None, ""
    match = KEY_RE.match(m.name)
    if match is None or META_RE.match(m.name):
        odd.note(
            "no_key",
            f"shard {path}: member {m.name!r} has no sample key (webdataset's key is the name up "
            "to the first '.' of its file name; __name__ members are metadata); ignored",
        )
        return None, ""
    return match.group(1), match.group(2).lower()


def _add_member(
    group: _Sample,
    m: tarfile.TarInfo,
    ext: str,
    tf: tarfile.TarFile,
    path: Path,
    source: ClassSource,
    odd: Oddities,
) -> None:
    where = f"shard {path}: member {m.name!r}"
    if ext in IMAGE_SUFFIXES:
        if group.image is None:
            group.image = m
        else:
            odd.note("extra_image", f"shard {path}: key {group.key!r} has a second image member "
                     f"{m.name!r}; its first, {group.image.name!r}, is the sample's")  # fmt: skip
    elif ext == "cls" and source.kind in ("auto", "cls") and not group.has_cls:
        group.has_cls = True
        group.value, group.where = cls_value(_read(tf, m), where), where
    elif ext == "json" and source.kind == "json" and not group.has_json:
        group.has_json = True
        group.value, group.where = json_value(_read(tf, m), source.field, where), where


def _read(tf: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    fh = tf.extractfile(m)
    assert fh is not None  # a regular member
    return fh.read()


def _add_sample(
    group: _Sample,
    path: Path,
    fd: int,
    s: int,
    source: ClassSource,
    table: Table,
    odd: Oddities,
) -> None:
    _note_repeated_key(group.key, path, s, table, odd)
    image = group.image
    if image is None:
        shown = ", ".join(repr(n) for n in group.members[:3])
        more = f" and {len(group.members) - 3} more" if len(group.members) > 3 else ""
        odd.note("no_image", f"shard {path}: key {group.key!r} has no image member ({shown}"
                 f"{more}; images are {', '.join(IMAGE_EXTS)}); skipped")  # fmt: skip
        return
    name = image.name.encode("utf-8", "surrogateescape")  # tarfile's decoding, undone
    header = _header_name(fd, image)
    if header is not None and not names_member(header, 0, name.decode("utf-8", "replace")):
        odd.note(
            "unreadable_name",
            f"shard {path}: member {image.name!r} has {header!r} in its tar header's name field "
            "(a non-ASCII or 100+ byte name kept whole only in a pax or GNU record): the reader "
            "checks that field, so it is skipped; rename it (ASCII, shorter) or re-shard with "
            "`cluster-pipeline make-shards`",
        )
        return
    value = _class_of(group, path, source)
    if value is not None:
        table.first_of_type.setdefault(type(value), group.where)
    table.shard.append(s)
    table.offset.append(image.offset_data)
    table.size.append(image.size)
    table.value.append(value)
    table.members.append(name)


def _note_repeated_key(key: str, path: Path, s: int, table: Table, odd: Oddities) -> None:
    """A key met again after other keys: webdataset makes each run of its members a sample."""
    first = table.seen.get(key)
    if first is None:
        table.seen[key] = s
        return
    where = "earlier in this shard" if first == s else f"in shard {table.paths[first]}"
    odd.note(
        "duplicate_key",
        f"shard {path}: key {key!r} was seen {where}, apart from these members; like webdataset, "
        "each run of consecutive members is a sample of its own (a tar written unsorted, e.g. "
        "by plain `tar cf`, splits samples: `tar --sort=name` keeps them together)",
    )


def _header_name(fd: int, image: tarfile.TarInfo) -> bytes | None:
    """The name field of the image's own tar header as the reader will see it, read only for
    the names that field may not hold whole (non-ASCII, 100 bytes or more); None otherwise."""
    raw = image.name.encode("utf-8", "surrogateescape")
    if image.name.isascii() and len(raw) < 100:
        return None
    return header_name(os.pread(fd, NAME_FIELD, image.offset_data - TAR_HEADER))


def _class_of(group: _Sample, path: Path, source: ClassSource) -> int | str | None:
    if source.kind == "cls" and not group.has_cls:
        raise ShardError(
            f"shard {path}: sample {group.key!r} has no .cls member ({', '.join(group.members)}); "
            "--class-from cls needs one on every sample (auto leaves such classes unknown)"
        )
    if source.kind == "json" and not group.has_json:
        raise ShardError(
            f"shard {path}: sample {group.key!r} has no .json member ({', '.join(group.members)}) "
            f"for --class-from json:{source.field}"
        )
    if source.kind == "key-prefix":
        base = group.key.rsplit("/", 1)[-1]
        prefix, sep, _ = base.partition("_")
        if not sep or not prefix:
            raise ShardError(
                f"shard {path}: key {group.key!r} has no '_': --class-from key-prefix takes the "
                "class from the part of the key's file name before its first '_' (n01440764 of "
                "n01440764_10026)"
            )
        group.where = f"shard {path}: key {group.key!r}"
        return prefix
    return group.value


def _check_end(fh: IO[bytes], path: Path, offset: int, size: int, last: str | None) -> None:
    """tarfile stops without a word at a header it cannot parse or at the end of the file:
    a whole tar ends in a block of zeros where its next header would be."""
    fh.seek(offset)
    block = fh.read(TAR_HEADER)
    if block == b"\0" * TAR_HEADER:
        return
    after = f"after member {last!r}" if last is not None else "at its start"
    if len(block) < TAR_HEADER:
        raise ShardError(
            f"shard {path} is truncated at byte {size}, {after}: it ends without the zero "
            "blocks that end a tar (samples written after it are lost)"
        )
    raise ShardError(f"shard {path} is damaged at byte {offset}, {after}: no tar header there")


def counted(kind: str, n: int) -> str:
    """ODD_KINDS[kind] for a count of n."""
    return ODD_KINDS[kind].format(n=n, s="" if n == 1 else "s", its="its" if n == 1 else "their")
