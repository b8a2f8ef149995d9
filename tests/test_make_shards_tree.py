"""make-shards from a messy ImageNet-layout tree: every file under it is written or listed with
why not, members are named by the format in their bytes, damaged files are found before any
training, and what is written reads back as the original files decode."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster_pipeline.cli import main
from cluster_pipeline.data.decode import decode_into, resize_square
from cluster_pipeline.data.imagefolder import MANIFEST_FILE, imagefolder_source
from cluster_pipeline.data.reader import SampleError, SampleReader, ShardIndex
from cluster_pipeline.data.shards import INDEX_FILE, SOURCES_FILE, write_shards
from cluster_pipeline.data.sources import SourceError

LOAD = 32
PER_SHARD = 5
# chmod 000 does not stop root from reading a file: that one case is left out then.
AS_ROOT = os.geteuid() == 0


def pixels(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    """Waves plus noise: an image JPEG codes like a photo, not like pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / 7 + seed), 128 + 100 * np.cos(y / 5), (x * y) % 256])
    return np.clip(base.transpose(1, 2, 0) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str, mode: str = "RGB", **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt, **options)
    return buf.getvalue()


def corrupt_mid_file(jpeg: bytes, seed: int = 7) -> bytes:
    """Bytes [len//2, len//2 + 2000) overwritten: libjpeg says "Corrupt JPEG data", PIL decodes
    it without a word. The bytes avoid 0xFF, so no marker appears and only the entropy-coded
    data is wrong."""
    out = bytearray(jpeg)
    mid = len(out) // 2
    assert mid + 2000 < len(out) - 2, "the JPEG is too small to damage its middle"
    out[mid : mid + 2000] = np.random.default_rng(seed).integers(0, 255, 2000, np.uint8).tobytes()
    return bytes(out)


def flip_in_idat(png: bytes) -> bytes:
    """One byte of the first IDAT chunk's data inverted: its CRC no longer matches."""
    pos = 8
    while png[pos + 4 : pos + 8] != b"IDAT":
        pos += 12 + int.from_bytes(png[pos : pos + 4], "big")
    length = int.from_bytes(png[pos : pos + 4], "big")
    out = bytearray(png)
    out[pos + 8 + length // 2] ^= 0xFF
    return bytes(out)


# What each file under the tree holds and what make-shards must do with it, in walk order:
# (path, written as: member extension, or None, the reason, or its start, when verified).
# "damaged" files are written with --no-verify (their magic bytes are right).
GOOD_RGB = ("a/pic.png", "a/really_png.JPEG", "a/rgb.jpg", "b/sub/deeper/nested.png",
            "c/café au lait.jpg", "d/linked.jpg")  # fmt: skip
DAMAGED = {
    "b/corrupt.jpg": "damaged: damaged JPEG: libjpeg says 'Corrupt JPEG data:",
    "b/truncated.jpg": "damaged: damaged JPEG: libjpeg says 'Premature end of JPEG file'",
    "c/flipped.png": "damaged: damaged PNG: chunk 'IDAT' at byte ",
}


def expected_files() -> list[tuple[str, str | None, str]]:
    rows: list[tuple[str, str | None, str]] = [
        ("stray.jpg", None, "not in a class folder"),
        ("a/cmyk.jpg", "jpg", ""),
        ("a/grey.jpg", "jpg", ""),
        ("a/photo.webp", "webp", ""),
        ("a/pic.png", "png", ""),
        ("a/really_png.JPEG", "png", ""),
        ("a/rgb.jpg", "jpg", ""),
        ("a/loop/", None, "the image folder itself (a symlink loop or a second link to it)"),
        ("b/.DS_Store", None, "not an image"),
        ("b/anim.gif", "gif", ""),
        ("b/corrupt.jpg", None, DAMAGED["b/corrupt.jpg"]),
        ("b/empty.jpg", None, "zero bytes"),
        ("b/img.bmp", "bmp", ""),
        ("b/img.tif", "tif", ""),
        ("b/notes.txt", None, "not an image"),
        ("b/truncated.jpg", None, DAMAGED["b/truncated.jpg"]),
        ("b/sub/deeper/nested.png", "png", ""),
        ("c/café au lait.jpg", "jpg", ""),
        ("c/dangling.jpg", None, "unreadable: [Errno 2] No such file or directory"),
        ("c/flipped.png", None, DAMAGED["c/flipped.png"]),
        ("c/locked.jpg", None, "unreadable: [Errno 13] Permission denied"),
        ("c/pipe.jpg", None, "unreadable: not a regular file"),
        ("d/linked.jpg", "jpg", ""),
    ]
    return [r for r in rows if not (AS_ROOT and r[0] == "c/locked.jpg")]


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def tree(tmp_path: Path):
    root = tmp_path / "tree"
    big = encode(pixels(128, 160, seed=5), "JPEG", quality=90)
    write(root / "stray.jpg", encode(pixels(seed=1), "JPEG", quality=90))
    write(root / "a/cmyk.jpg", encode(pixels(seed=2), "JPEG", "CMYK", quality=90))
    write(root / "a/grey.jpg", encode(pixels(seed=3), "JPEG", "L", quality=90))
    write(root / "a/photo.webp", encode(pixels(seed=4), "WEBP", quality=90))
    write(root / "a/pic.png", encode(pixels(seed=6), "PNG"))
    write(root / "a/really_png.JPEG", encode(pixels(seed=7), "PNG"))
    write(root / "a/rgb.jpg", encode(pixels(seed=8), "JPEG", quality=90))
    os.symlink("..", root / "a/loop")
    write(root / "b/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(200))
    write(root / "b/anim.gif", encode(pixels(seed=9), "GIF", "P"))
    write(root / "b/corrupt.jpg", corrupt_mid_file(big))
    write(root / "b/empty.jpg", b"")
    write(root / "b/img.bmp", encode(pixels(seed=10), "BMP"))
    write(root / "b/img.tif", encode(pixels(seed=11), "TIFF"))
    write(root / "b/notes.txt", b"labels come from the folder names\n")
    write(root / "b/truncated.jpg", big[: len(big) // 2])
    write(root / "b/sub/deeper/nested.png", encode(pixels(seed=12), "PNG"))
    write(root / "c/café au lait.jpg", encode(pixels(seed=13), "JPEG", quality=85))
    os.symlink("missing.jpg", root / "c/dangling.jpg")
    write(root / "c/flipped.png", flip_in_idat(encode(pixels(seed=14), "PNG")))
    if not AS_ROOT:
        write(root / "c/locked.jpg", encode(pixels(seed=15), "JPEG"))
        (root / "c/locked.jpg").chmod(0)
    os.mkfifo(root / "c/pipe.jpg")  # must not be opened: reading it would block for ever
    write(tmp_path / "elsewhere/linked.jpg", encode(pixels(seed=16), "JPEG", quality=95))
    os.symlink(tmp_path / "elsewhere", root / "d")  # a class folder that is a link: followed
    (root / "e").mkdir()  # a class without images
    yield root
    if not AS_ROOT:
        (root / "c/locked.jpg").chmod(0o644)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_FILE).read_text().splitlines()]


def summary(root: Path, out: Path, written: int, shards: int, counts: str) -> str:
    files = len([r for r in expected_files() if not r[0].endswith("/")])
    return (
        f"{files} files under {root}: {written} written in {shards} shards to {out}; "
        f"{files - written} not written ({counts}); 1 folder not walked; every file is listed "
        f"in {out / MANIFEST_FILE}"
    )


def unreadable() -> int:
    return 2 if AS_ROOT else 3


# ------------------------------------------------------------------------ what became of each


@pytest.mark.parametrize("workers", [1, 2])
def test_every_file_is_written_or_listed_with_its_reason(tree: Path, tmp_path: Path, workers: int):
    out = tmp_path / "shards"
    source = imagefolder_source(tree, verify=True, workers=workers)
    index = write_shards(source, out, samples_per_shard=PER_SHARD, workers=workers)

    lines = manifest(out)
    want = expected_files()
    assert [line["path"] for line in lines] == [path for path, _, _ in want]
    sample = 0
    for line, (path, ext, reason) in zip(lines, want, strict=True):
        if ext is None:
            status = "not walked" if path.endswith("/") else "not written"
            assert line["status"] == status, line
            assert line["reason"].startswith(reason), line
            assert set(line) == {"path", "status", "reason"}
            continue
        assert line == {
            "path": path,
            "status": "written",
            "sample": sample,
            "shard": f"shard-{sample // PER_SHARD:06d}.tar",
            "member": f"{sample:09d}.{ext}",
            "class": path.split("/")[0],
        }
        sample += 1
    assert index["num_samples"] == sample == 12
    assert index["classes"] == ["a", "b", "c", "d", "e"]
    assert index["source_root"] == str(tree)
    assert index["sources_file"] == SOURCES_FILE

    # The members in the tars are those the manifest names: the extension the bytes hold.
    members = []
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            members += [m.name for m in tf if not m.name.endswith((".idx", ".cls"))]
    assert members == [line["member"] for line in lines if line["status"] == "written"]

    names = np.load(out / SOURCES_FILE)
    assert names.dtype.kind == "S"
    written = [line["path"] for line in lines if line["status"] == "written"]
    assert [n.decode("utf-8") for n in names] == written
    assert "c/café au lait.jpg" in written
    table = ShardIndex.load(out).samples
    assert [index["classes"][c] for c in table[:, 3]] == [p.split("/")[0] for p in written]


def test_summary_line_and_one_warning_per_file_not_written(tree: Path, tmp_path: Path, caplog):
    out = tmp_path / "shards"
    with caplog.at_level("INFO", logger="cluster_pipeline"):
        write_shards(imagefolder_source(tree), out, samples_per_shard=PER_SHARD)
    counts = (
        f"2 not an image, 1 zero bytes, 3 damaged, {unreadable()} unreadable, "
        "1 not in a class folder"
    )
    assert summary(tree, out, 12, 3, counts) in caplog.messages
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    bad = [(p, why) for p, ext, why in expected_files() if ext is None]
    assert len(warned) == len(bad)
    for message, (path, why) in zip(warned, bad, strict=True):
        status = "not walked" if path.endswith("/") else "not written"
        assert message.startswith(f"{status}: {tree}/{path}: {why}"), message


def test_warnings_stop_after_twenty_and_point_at_the_manifest(tmp_path: Path, caplog):
    root = tmp_path / "tree"
    write(root / "cls/ok.png", encode(pixels(), "PNG"))
    for j in range(25):
        write(root / f"cls/note{j:02d}.txt", b"not an image")
    out = tmp_path / "shards"
    with caplog.at_level("WARNING", logger="cluster_pipeline"):
        write_shards(imagefolder_source(root), out)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 21
    assert warned[0] == f"not written: {root}/cls/note00.txt: not an image"
    assert warned[-1] == f"... and 5 more, see {out / MANIFEST_FILE}"
    assert len(manifest(out)) == 26


def test_a_folder_that_cannot_be_listed_is_in_the_manifest(tmp_path: Path, monkeypatch):
    """Listing is refused as for a folder chmod 000 (os.scandir patched: root lists anything)."""
    root = tmp_path / "tree"
    write(root / "cls/ok.png", encode(pixels(), "PNG"))
    write(root / "cls/private/hidden.png", encode(pixels(), "PNG"))
    scandir = os.scandir

    def refuse(path="."):
        if os.fspath(path).endswith("private"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    source = imagefolder_source(root)
    assert [(e.path, e.sample, e.reason) for e in source.files or []] == [
        ("cls/ok.png", 0, ""),
        ("cls/private/", -1, "unreadable: [Errno 13] Permission denied"),
    ]


# ----------------------------------------------------------------------------- reading back


@pytest.mark.parametrize("channels", [1, 3])
def test_written_images_read_back_as_their_files_decode(tree: Path, tmp_path: Path, channels):
    out = tmp_path / "shards"
    write_shards(imagefolder_source(tree), out, samples_per_shard=PER_SHARD)
    index = ShardIndex.load(out)
    reader = SampleReader(index, load_size=LOAD, channels=channels)
    mode = "L" if channels == 1 else "RGB"
    try:
        written = [line["path"] for line in manifest(out) if line["status"] == "written"]
        for i, path in enumerate(written):
            want = np.empty((LOAD, LOAD, channels), np.uint8)
            decode_into((tree / path).read_bytes(), mode, LOAD, want)
            np.testing.assert_array_equal(reader.read(i), want, err_msg=path)
            if path in GOOD_RGB and channels == 3:
                with Image.open(tree / path) as im:
                    pil = np.asarray(resize_square(im.convert("RGB"), LOAD))
                np.testing.assert_array_equal(reader.read(i), pil, err_msg=path)
        assert set(GOOD_RGB) <= set(written)
    finally:
        reader.close()


def test_no_verify_writes_damaged_files_and_reading_them_names_the_original(
    tree: Path, tmp_path: Path
):
    out = tmp_path / "shards"
    source = imagefolder_source(tree, verify=False)
    write_shards(source, out, samples_per_shard=PER_SHARD)
    lines = {line["path"]: line for line in manifest(out)}
    for path in ("b/empty.jpg", "b/notes.txt", "c/pipe.jpg", "stray.jpg"):
        assert lines[path]["status"] == "not written"  # the cheap checks still run
    reader = SampleReader(ShardIndex.load(out), load_size=LOAD, channels=3)
    try:
        for path, reason in DAMAGED.items():
            line = lines[path]
            assert line["status"] == "written", line
            with pytest.raises(SampleError) as err:
                reader.read(line["sample"])
            message = str(err.value)
            assert str(out / line["shard"]) in message
            assert f"sample {line['sample']:09d} ({path})" in message
            assert reason.removeprefix("damaged: ") in message
        assert sum(line["status"] == "written" for line in lines.values()) == 15
    finally:
        reader.close()


# ------------------------------------------------------------------------------------ the CLI


def test_cli_prints_the_summary_and_matches_the_in_process_run(tree: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    argv = ["make-shards", "--source", f"imagefolder:{tree}", "--out", str(out),
            "--samples-per-shard", str(PER_SHARD), "--workers", "2"]  # fmt: skip
    assert main(argv) == 0
    counts = (
        f"2 not an image, 1 zero bytes, 3 damaged, {unreadable()} unreadable, "
        "1 not in a class folder"
    )
    assert capsys.readouterr().out == f"make-shards: {summary(tree, out, 12, 3, counts)}\n"
    serial = tmp_path / "serial"
    write_shards(imagefolder_source(tree, workers=1), serial, samples_per_shard=PER_SHARD)
    assert manifest(out) == manifest(serial)

    unverified = tmp_path / "unverified"
    assert main([*argv[:4], str(unverified), *argv[5:], "--no-verify"]) == 0
    counts = f"2 not an image, 1 zero bytes, {unreadable()} unreadable, 1 not in a class folder"
    assert capsys.readouterr().out == f"make-shards: {summary(tree, unverified, 15, 3, counts)}\n"


def test_a_tree_without_any_image_is_an_error(tmp_path: Path, capsys):
    root = tmp_path / "tree"
    write(root / "readme.txt", b"x")
    write(root / "cls/empty.jpg", b"")
    write(root / "cls/notes.txt", b"x")
    with pytest.raises(SourceError, match=r"no image to write among its 3 files \(1 not an image, "
                       r"1 zero bytes, 1 not in a class folder\); e\.g\. 'readme\.txt' \(not in a "
                       r"class folder\), 'cls/empty\.jpg' \(zero bytes\)"):  # fmt: skip
        imagefolder_source(root)
    out = tmp_path / "shards"
    assert main(["make-shards", "--source", f"imagefolder:{root}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cluster-pipeline make-shards: error: imagefolder {root}: no image to write" in err
    assert f"Expected {root}/<class>/<image>" in err
    assert not (out / INDEX_FILE).exists()

    flat = tmp_path / "flat"
    write(flat / "a.jpg", encode(pixels(), "JPEG"))
    with pytest.raises(SourceError, match=r"1 not in a class folder\), and it has no class folder"):
        imagefolder_source(flat)
