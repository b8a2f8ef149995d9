"""Indexing users' own webdataset shards where they lie: `cluster-pipeline index PATTERN|DIR`.

Many collections already are webdataset tars (`train-{000000..001281}.tar`). Rewriting them with
make-shards would copy the dataset; one pass over their tar headers instead writes the index
make-shards writes (index.json, samples.npy) plus members.npy, each sample's image member name
(the keys are the users' own, not make-shards' `%09d`), which the reader checks each tar header
against. Only the small .cls/.json members are read; tarfile seeks past every other member.

A sample is what webdataset makes of the tar: the key of a member is its path up to the first
"." of its file name, consecutive members with one key are one sample, and its image is the
member whose extension (lowercased) is an image extension. Odd members are named in the log
(a few per kind) and counted in the summary, never dropped unsaid.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import braceexpand
import numpy as np

from cluster_pipeline.config import ConfigError
from cluster_pipeline.data.decode import IMAGE_EXTS
from cluster_pipeline.data.reader import TAR_HEADER, ShardError, _names_member
from cluster_pipeline.data.shards import FORMAT, INDEX_FILE, SAMPLES_FILE, shard_fingerprint

log = logging.getLogger(__name__)

MEMBERS_FILE = "members.npy"
# webdataset's rule (tariterators.base_plus_ext): key = path up to the first "." of the file name.
KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset's skip_meta: members such as __index__ are metadata, not samples.
META_RE = re.compile(r"__[^/]*__($|/)")
IMAGE_SUFFIXES = frozenset(ext[1:] for ext in IMAGE_EXTS)
CLASS_FROM = ("auto", "cls", "json:FIELD", "key-prefix", "none")
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
INT_RE = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class ClassSource:
    """Where a sample's class comes from (`--class-from`)."""

    kind: str  # auto, cls, json, key-prefix or none
    field: str = ""  # the .json field, for kind json

    @classmethod
    def parse(cls, spec: str) -> ClassSource:
        if spec in ("auto", "cls", "key-prefix", "none"):
            return cls(spec)
        if spec.startswith("json:") and spec[5:]:
            return cls("json", spec[5:])
        raise ConfigError(
            f"--class-from {spec!r}: use auto (the .cls member when there is one), cls, "
            "json:FIELD (e.g. json:label), key-prefix (n01440764 of n01440764_10026) or none"
        )

    def describe(self) -> str:
        return {
            "auto": "classes from .cls members",
            "cls": "classes from .cls members",
            "json": f"classes from the .json field {self.field!r}",
            "key-prefix": "classes from the key prefix before '_'",
            "none": "no classes",
        }[self.kind]


@dataclass(frozen=True)
class IndexResult:
    index: dict  # what index.json holds
    summary: str  # the one line `cluster-pipeline index` prints
    odd: dict[str, int]  # odd members by ODD_KINDS kind, 0 where none


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


class _Oddities:
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
                log.warning("... and %d more: %s", n - WARN_LINES, _counted(kind, n))


@dataclass
class _Table:
    """The index rows gathered over all shards, and what the class values look like."""

    shard: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    value: list[int | str | None] = field(default_factory=list)
    members: list[bytes] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)  # key -> shard it was first met in
    paths: list[Path] = field(default_factory=list)  # the shards scanned so far
    first_of_type: dict[type, str] = field(default_factory=dict)  # int/str -> first member


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
    odd, table = _Oddities(), _Table()
    shards = []
    for s, path in enumerate(paths):
        first = len(table.shard)
        table.paths.append(path)
        size = _scan_shard(path, s, source, table, odd)
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
    labels, classes = _labels(table)
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
                raise ShardError(_compressed_message(packed[0], None))
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


def _compressed_message(path: Path, kind: str | None) -> str:
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
            raise ShardError(_compressed_message(path, kind))
    if path.name.endswith(COMPRESSED_SUFFIXES):
        raise ShardError(_compressed_message(path, None))


def _scan_shard(path: Path, s: int, source: ClassSource, table: _Table, odd: _Oddities) -> int:
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
    table: _Table,
    odd: _Oddities,
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


def _key(m: tarfile.TarInfo, path: Path, odd: _Oddities) -> tuple[str | None, str]:
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
    odd: _Oddities,
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
        group.value, group.where = _cls_value(_read(tf, m), where), where
    elif ext == "json" and source.kind == "json" and not group.has_json:
        group.has_json = True
        group.value, group.where = _json_value(_read(tf, m), source.field, where), where


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
    table: _Table,
    odd: _Oddities,
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
    if header is not None and not _reader_accepts(header, name.decode("utf-8", "replace")):
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


def _note_repeated_key(key: str, path: Path, s: int, table: _Table, odd: _Oddities) -> None:
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
    field = os.pread(fd, 100, image.offset_data - TAR_HEADER)
    return field.split(b"\0", 1)[0]


def _reader_accepts(header: bytes, member: str) -> bool:
    """What SampleReader.read_into checks of the header before it decodes the image."""
    return _names_member(header, 0, member)


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


def _cls_value(data: bytes, where: str) -> int | str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ShardError(f"{where}: a .cls member must be text, an integer or a name") from None
    if INT_RE.fullmatch(text):
        return _class_id(int(text), where)
    if not text:
        raise ShardError(f"{where} is empty: a .cls member holds an integer class or a name")
    return text


def _json_value(data: bytes, name: str, where: str) -> int | str | None:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ShardError(f"{where} is not JSON ({exc})") from None
    if not isinstance(obj, dict) or name not in obj:
        fields = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else "not an object"
        raise ShardError(f"{where} has no field {name!r} ({fields})")
    value = obj[name]
    if value is None:
        return None  # null: class unknown
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ShardError(f"{where}: {name}={value!r} is not a class (an integer >= 0 or a name)")
    return _class_id(value, where) if isinstance(value, int) else value


def _class_id(value: int, where: str) -> int:
    if value < 0:
        raise ShardError(
            f"{where}: class {value} is negative; classes are integers >= 0 or names "
            "(--class-from none indexes the shards without classes)"
        )
    return value


def _labels(table: _Table) -> tuple[np.ndarray, list[str]]:
    """(label per sample, -1 unknown; class names): integers as they are, names sorted."""
    if int in table.first_of_type and str in table.first_of_type:
        raise ShardError(
            f"class values are mixed: {table.first_of_type[int]} gives an integer, "
            f"{table.first_of_type[str]} a name; make them all one kind"
        )
    if str in table.first_of_type:
        classes = sorted({v for v in table.value if isinstance(v, str)})
        position = {c: i for i, c in enumerate(classes)}
        labels = [-1 if v is None else position[str(v)] for v in table.value]
        return np.asarray(labels, dtype=np.int64), classes
    ints = [-1 if v is None else int(v) for v in table.value]
    top = max(ints, default=-1)
    return np.asarray(ints, dtype=np.int64), [str(c) for c in range(top + 1)]


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
    odd = [_counted(kind, c) for kind, c in counts.items() if c]
    indexed = f"indexed {_plural(n, 'sample', 'samples')} in {_plural(shards, 'shard', 'shards')}"
    return f"{indexed} ({how}); " + (", ".join(odd) or "nothing odd")


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _counted(kind: str, n: int) -> str:
    """ODD_KINDS[kind] for a count of n."""
    return ODD_KINDS[kind].format(n=n, s="" if n == 1 else "s", its="its" if n == 1 else "their")
