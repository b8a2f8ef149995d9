"""`cluster-pipeline index`: users' own webdataset shards, indexed in place, read as make-shards'.

Shards come from webdataset's own ShardWriter and from Python's tarfile with ImageNet-style
keys; each sample read through SampleReader is compared with a decode of its original bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cluster_pipeline.cli import main
from cluster_pipeline.config import ConfigError, load_config
from cluster_pipeline.data.decode import Mode, decode_into, resize_square
from cluster_pipeline.data.index_shards import MEMBERS_FILE, index_shards, shard_paths
from cluster_pipeline.data.reader import SampleReader, ShardError, ShardIndex
from cluster_pipeline.data.shards import INDEX_FILE, SAMPLES_FILE, write_shards
from cluster_pipeline.data.sources import Source, digits_source
from cluster_pipeline.run import checkpoint
from cluster_pipeline.training.methods import run_deepcluster

REPO = Path(__file__).resolve().parent.parent
LOAD = 12  # images are 16 x 20: every read resizes, then crops
LOG = "cluster_pipeline.data"  # index_shards and tar_scan, which names odd members


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def noise(seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (16, 20, channels) if channels > 1 else (16, 20)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    tf.addfile(info, io.BytesIO(data) if data else None)


def decoded(body: bytes, mode: Mode = "RGB") -> np.ndarray:
    out = np.empty((LOAD, LOAD, 3 if mode == "RGB" else 1), np.uint8)
    decode_into(body, mode, LOAD, out)
    return out


def read_all(out: Path, channels: int = 3) -> tuple[ShardIndex, list[np.ndarray]]:
    index = ShardIndex.load(out)
    reader = SampleReader(index, LOAD, channels)
    try:
        return index, [reader.read(i) for i in range(index.num_samples)]
    finally:
        reader.close()


def members(out: Path) -> list[str]:
    return [bytes(m).decode() for m in np.load(out / MEMBERS_FILE)]


# ------------------------------------------------------------ shards of webdataset's ShardWriter

# (extension, PIL format, channels) of sample i: i % 4.
KINDS = [("jpg", "JPEG", 3), ("png", "PNG", 3), ("webp", "WEBP", 3), ("png", "PNG", 1)]
N_WDS = 22  # ShardWriter's maxcount=8: shards of 8, 8, 6
NAMES = ["cat", "dog", "emu"]


def wds_shards(folder: Path, labels: str) -> list[bytes]:
    """N_WDS samples written by webdataset's ShardWriter; returns each one's image bytes."""
    folder.mkdir()
    images = []
    with wds.ShardWriter(str(folder / "wds-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(N_WDS):
            ext, fmt, channels = KINDS[i % 4]
            body = encode(noise(i, channels), fmt)
            label = i % 3 if labels == "int" else NAMES[(i * 2) % 3]
            sink.write({"__key__": f"sample{i:06d}", ext: body, "json": {"label": label, "i": i}})
            images.append(body)
    return images


@pytest.mark.parametrize("labels", ["int", "str"])
def test_shardwriter_shards_read_as_their_original_bytes_decode(tmp_path: Path, labels: str):
    images = wds_shards(tmp_path / "wds", labels)
    pattern = str(tmp_path / "wds" / "wds-{000000..000002}.tar")
    result = index_shards(pattern, class_from="json:label")
    out = tmp_path / "wds"  # default: the shards' directory
    assert [s["count"] for s in result.index["shards"]] == [8, 8, 6]
    assert [s["name"] for s in result.index["shards"]] == [f"wds-00000{s}.tar" for s in range(3)]
    assert result.summary.startswith(f"indexed {N_WDS} samples in 3 shards (classes from the "
                                     ".json field 'label': 3 classes); nothing odd")  # fmt: skip
    assert not any(result.odd.values())
    index, got = read_all(out)
    assert index.num_samples == N_WDS
    # Keys in the order webdataset itself yields them.
    urls = [str(out / f"wds-00000{s}.tar") for s in range(3)]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert [m.split(".")[0] for m in members(out)] == keys == [f"sample{i:06d}" for i in range(22)]
    for i, body in enumerate(images):
        np.testing.assert_array_equal(got[i], decoded(body), err_msg=f"sample {i}")
        _, fmt, channels = KINDS[i % 4]
        if fmt in ("JPEG", "PNG") and channels == 3:
            pil = np.asarray(resize_square(Image.open(io.BytesIO(body)).convert("RGB"), LOAD))
            np.testing.assert_array_equal(got[i], pil, err_msg=f"sample {i}")
    if labels == "int":
        assert index.classes == ["0", "1", "2"]
        np.testing.assert_array_equal(index.labels, np.arange(N_WDS) % 3)
    else:
        assert index.classes == NAMES  # sorted names, labels their position
        np.testing.assert_array_equal(index.labels, (np.arange(N_WDS) * 2) % 3)


def test_grey_reads_of_indexed_shards_equal_decode_into(tmp_path: Path):
    images = wds_shards(tmp_path / "wds", "int")
    index_shards(tmp_path / "wds", class_from="none")  # a directory: its *.tar
    index, got = read_all(tmp_path / "wds", channels=1)
    assert index.classes == [] and index.labels is None
    for i, body in enumerate(images):
        np.testing.assert_array_equal(got[i], decoded(body, "L"), err_msg=f"sample {i}")


# ------------------------------------------------- ImageNet-style shards written with tarfile

SYNSETS = ["n01440764", "n01443537"]


@pytest.fixture
def imagenet_shards(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """Two tars of ImageNet-style keys (`n01440764_10026.JPEG` + `.cls`) with every odd case;
    returns the folder and the image bytes of each sample that should be indexed, in order."""
    folder = tmp_path / "imagenet"
    folder.mkdir()
    images: list[bytes] = []

    def image(tf: tarfile.TarFile, name: str, seed: int, fmt: str = "JPEG") -> None:
        images.append(encode(noise(seed), fmt))
        add(tf, name, images[-1])

    with tarfile.open(folder / "train-0.tar", "w") as tf:
        add(tf, "train", kind=tarfile.DIRTYPE)  # non-regular: ignored
        image(tf, "n01440764_10026.JPEG", 1)
        add(tf, "n01440764_10026.cls", b"0")
        image(tf, "train/n01443537_2.JPEG", 2)  # a key with a directory part
        add(tf, "train/n01443537_2.cls", b"1\n")
        add(tf, "n01443537_9.cls", b"1")  # a key without an image: skipped
        add(tf, "n01443537_9.txt", b"no picture")
        image(tf, "n01443537_5.jpeg", 3)  # lower case
        image(tf, "n01443537_5.png", 4, "PNG")  # a second image: ignored
        add(tf, "n01443537_5.cls", b"1")
        images.pop()
        add(tf, "README", b"no key")
        add(tf, "train/n01443537_2.txt", b"late")  # unsorted: key met again, without its image
    with tarfile.open(folder / "train-1.tar", "w") as tf:
        image(tf, "n01440764_10026.JPEG", 5)  # seen in shard 0: a sample again, named
        add(tf, "n01440764_10026.cls", b"0")
        add(tf, "link.JPEG", kind=tarfile.SYMTYPE)
        for d in range(13):  # more than the log names one by one
            add(tf, f"dir{d:02d}", kind=tarfile.DIRTYPE)
        image(tf, "n01440764_77.JPEG", 6)  # no .cls: class unknown with auto
        image(tf, "n01443537_11.JPEG", 7)
    return folder, images


def test_imagenet_style_shards_counts_odd_members_named_and_reads(
    imagenet_shards: tuple[Path, list[bytes]], caplog: pytest.LogCaptureFixture
):
    folder, images = imagenet_shards
    with caplog.at_level(logging.WARNING, logger=LOG):
        result = index_shards(str(folder / "train-*.tar"))
    assert result.odd == {"no_image": 2, "unreadable_name": 0, "extra_image": 1,
                          "duplicate_key": 2, "non_regular": 15, "no_key": 1}  # fmt: skip
    assert result.summary == (
        "indexed 6 samples in 2 shards (classes from .cls members: 2 classes, 2 samples without "
        "one (class -1)); skipped 2 keys without an image, ignored 1 extra image member, 2 keys "
        "met again apart from their first members, ignored 15 non-regular members (directories, "
        "links), ignored 1 member without a key"
    )
    names = ["n01440764_10026.JPEG", "train/n01443537_2.JPEG", "n01443537_5.jpeg",
             "n01440764_10026.JPEG", "n01440764_77.JPEG", "n01443537_11.JPEG"]  # fmt: skip
    assert members(folder) == names
    index, got = read_all(folder)
    assert [s["count"] for s in result.index["shards"]] == [3, 3]
    assert index.samples[:, 3].tolist() == [0, 1, 1, 0, -1, -1]
    assert index.classes == ["0", "1"]
    table = np.load(folder / SAMPLES_FILE)
    for i, (name, body) in enumerate(zip(names, images, strict=True)):
        assert table[i, 2] == len(body)
        np.testing.assert_array_equal(got[i], decoded(body), err_msg=name)

    lines = [r.getMessage() for r in caplog.records]
    shard0, shard1 = str(folder / "train-0.tar"), str(folder / "train-1.tar")

    def logged(*parts: str) -> bool:
        return any(all(p in line for p in parts) for line in lines)

    assert logged(shard0, "'n01443537_9'", "no image member", "'n01443537_9.cls'")
    assert logged(shard0, "'n01443537_5'", "second image member 'n01443537_5.png'")
    assert logged(shard1, "'n01440764_10026'", f"seen in shard {shard0}")
    assert logged(shard0, "'train/n01443537_2'", "seen earlier in this shard", "--sort=name")
    assert logged(shard0, "'train/n01443537_2'", "no image member", "'train/n01443537_2.txt'")
    assert logged(shard0, "'train'", "directory") and logged(shard1, "'link.JPEG'", "symbolic")
    assert logged(shard0, "'README'", "no sample key")
    # 15 non-regular members: 10 named, then one line for the rest.
    assert sum("is a directory" in line or "symbolic link" in line for line in lines) == 10
    assert logged("... and 5 more", "non-regular")


def test_key_prefix_gives_the_synset_classes(imagenet_shards: tuple[Path, list[bytes]]):
    folder, _ = imagenet_shards
    result = index_shards(folder, tmp := folder.parent / "by-synset", class_from="key-prefix")
    assert "classes from the key prefix before '_': 2 classes)" in result.summary
    index = ShardIndex.load(tmp)
    assert index.classes == SYNSETS
    np.testing.assert_array_equal(index.labels, [0, 1, 1, 0, 0, 1])
    # An index kept elsewhere names the shards by absolute path, and reads them.
    assert [s["name"] for s in result.index["shards"]] == [
        str(folder / "train-0.tar"),
        str(folder / "train-1.tar"),
    ]
    assert len(read_all(tmp)[1]) == 6


def test_class_from_cls_requires_one_on_every_sample(imagenet_shards):
    folder, _ = imagenet_shards
    with pytest.raises(ShardError, match=r"train-1\.tar: sample 'n01440764_77' has no \.cls"):
        index_shards(folder, class_from="cls")
    assert not (folder / INDEX_FILE).exists()


def test_class_errors_name_the_member(tmp_path: Path):
    def shard(name: str, *items: tuple[str, bytes]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        with tarfile.open(folder / "s.tar", "w") as tf:
            for member, data in items:
                add(tf, member, data)
        return folder

    img = encode(noise(0), "PNG")
    mixed = shard("mixed", ("a.png", img), ("a.cls", b"3"), ("b.png", img), ("b.cls", b"cat"))
    with pytest.raises(ShardError, match=r"mixed.*'a\.cls' gives an integer.*'b\.cls' a name"):
        index_shards(mixed)
    bad = shard("bad", ("a.png", img), ("a.json", b'{"label": 2.5}'))
    with pytest.raises(ShardError, match=r"'a\.json': label=2\.5 is not a class"):
        index_shards(bad, class_from="json:label")
    with pytest.raises(ShardError, match=r"'a\.json' has no field 'y' \('label'\)"):
        index_shards(bad, class_from="json:y")
    negative = shard("neg", ("a.png", img), ("a.cls", b"-1"))
    with pytest.raises(ShardError, match=r"'a\.cls': class -1 is negative"):
        index_shards(negative)
    with pytest.raises(ShardError, match=r"key 'a' has no '_'"):
        index_shards(negative, class_from="key-prefix")
    with pytest.raises(ConfigError, match=r"--class-from 'json:'"):
        index_shards(negative, class_from="json:")
    nulls = shard("null", ("a.png", img), ("a.json", b'{"label": null}'))
    index_shards(nulls, class_from="json:label")
    assert ShardIndex.load(nulls).samples[:, 3].tolist() == [-1]  # null: class unknown


def test_long_and_non_ascii_member_names_are_indexed_and_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Python's tarfile keeps a non-ASCII or 100+ byte name whole in a pax record and a cut or
    '?'-for-each-character copy in the header field the reader checks; a ustar header keeps a
    long directory part in its prefix field. Every such sample is indexed and reads."""
    img = encode(noise(0), "PNG")
    long_dir = "d" * 90 + "/" + "e" * 40
    pax_names = ["ok_1.png", "café_2.png", "x" * 120 + "_3.png"]
    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for name in pax_names:
            add(tf, name, img)
    with tarfile.open(tmp_path / "ustar.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        add(tf, f"{long_dir}/n0_4.png", img)  # the name field holds the part after the prefix
    with caplog.at_level(logging.WARNING, logger=LOG):
        result = index_shards(str(tmp_path / "{pax,ustar}.tar"), class_from="none")
    assert result.odd["unreadable_name"] == 0, result.odd
    assert members(tmp_path) == [*pax_names, f"{long_dir}/n0_4.png"]
    with open(tmp_path / "pax.tar", "rb") as fh:  # the lossy header copies the reader matches
        fields = [h[:100].split(b"\0")[0] for h in iter(lambda: fh.read(512), b"")]
    assert b"caf?_2.png" in fields and b"x" * 100 in fields, fields[:12]
    got = read_all(tmp_path)[1]
    assert len(got) == 4
    for image in got:
        np.testing.assert_array_equal(image, decoded(img))


# ----------------------------------------------------------------------------- bad inputs


def test_compressed_tars_are_a_clear_error(tmp_path: Path):
    with tarfile.open(tmp_path / "plain.tar", "w") as tf:
        add(tf, "a.png", encode(noise(0), "PNG"))
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "s-0.tar.gz").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    (packed / "s-1.tar").write_bytes((packed / "s-0.tar.gz").read_bytes())  # gzip, named .tar
    for spec in (packed / "s-0.tar.gz", packed / "s-1.tar", packed / "s-*.tar*"):
        with pytest.raises(ShardError) as err:
            index_shards(spec, tmp_path / "out")
        text = str(err.value)
        assert "gzip-compressed" in text and "cannot be read at random" in text, text
        assert "gunzip -k" in text and "make-shards" in text, text
    (packed / "s-1.tar").unlink()
    with pytest.raises(ShardError, match=r"s-0\.tar\.gz is a compressed tar.*gunzip -k"):
        index_shards(packed, tmp_path / "out")  # a folder of .tar.gz only


def test_patterns_that_name_no_file_are_errors(tmp_path: Path):
    for s in (0, 1, 3):
        with tarfile.open(tmp_path / f"t-{s:03d}.tar", "w") as tf:
            add(tf, f"k{s}.png", encode(noise(s), "PNG"))
    assert [p.name for p in shard_paths(str(tmp_path / "t-{000..001}.tar"))] == [
        "t-000.tar",
        "t-001.tar",
    ]
    with pytest.raises(ShardError, match=r"shard .*t-002\.tar does not exist$"):
        index_shards(str(tmp_path / "t-{000..003}.tar"))
    with pytest.raises(ShardError, match=r"t-004\.tar does not exist \(and 1 more of "):
        index_shards(str(tmp_path / "t-{004..005}.tar"))
    with pytest.raises(ShardError, match=r"no file matches '.*u-\*\.tar'"):
        index_shards(str(tmp_path / "u-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"holds no \*\.tar"):
        index_shards(tmp_path / "empty")
    with pytest.raises(ShardError, match=r"t-000\.tar is named twice"):
        index_shards(str(tmp_path / "t-{000,000}.tar"))
    assert not (tmp_path / INDEX_FILE).exists()


def test_truncated_and_damaged_tars_name_shard_and_byte(tmp_path: Path):
    with tarfile.open(tmp_path / "whole.tar", "w") as tf:
        for k in range(4):
            add(tf, f"k{k}.png", encode(noise(k), "PNG"))
    whole = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tf:
        infos = tf.getmembers()
    cases = {
        # cut inside the third image
        "mid.tar": (whole[: infos[2].offset_data + 10], r"truncated at byte \d+: member 'k2.png'"),
        # cut between members: tarfile alone would take it for the end
        "gap.tar": (whole[: infos[3].offset], r"truncated at byte \d+, after member 'k2.png'"),
        # a header overwritten with garbage
        "bad.tar": (whole[: infos[2].offset] + b"\x07" * 512 + whole[infos[2].offset + 512 :],
                    rf"damaged at byte {infos[2].offset}, after member 'k1.png'"),
        "not.tar": (b"hello" * 300, r"not a tar archive"),
    }  # fmt: skip
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ShardError, match=rf"shard .*{name} .*{message}"):
            index_shards(tmp_path / name, tmp_path / "out")
    padding = len(whole) - infos[3].offset_data - infos[3].size  # the last image's padding
    cut = whole[: infos[3].offset_data + infos[3].size + 100]
    assert padding > 100
    (tmp_path / "pad.tar").write_bytes(cut)
    with pytest.raises(ShardError, match=r"pad\.tar (breaks|is truncated) at byte"):
        index_shards(tmp_path / "pad.tar", tmp_path / "out")


# -------------------------------------------------------------- the index against the shards


def ranged_shard(path: Path, keys: list[str]) -> list[bytes]:
    """A tar of 64 x 80 noise PNGs (~15 KB each) and .cls members under `keys`."""
    bodies = []
    with tarfile.open(path, "w") as tf:
        for k, key in enumerate(keys):
            bodies.append(encode(noise(k, 3).repeat(4, axis=0).repeat(4, axis=1), "PNG"))
            add(tf, f"{key}.png", bodies[-1])
            add(tf, f"{key}.cls", str(k % 2).encode())
    return bodies


def test_a_shard_rewritten_after_indexing_is_caught(tmp_path: Path):
    keys = [f"img_{k:03d}" for k in range(40)]  # ~16 KB a sample: 640 KB, beyond fingerprints
    bodies = ranged_shard(tmp_path / "s.tar", keys)
    index_shards(tmp_path)
    assert ShardIndex.load(tmp_path).num_samples == 40
    # Same layout, other content: the fingerprint of the first 64 KiB changes.
    original = (tmp_path / "s.tar").read_bytes()
    head = bytearray(original)
    head[1024 + 600] ^= 0xFF  # inside the first image
    (tmp_path / "s.tar").write_bytes(bytes(head))
    with pytest.raises(ShardError, match=r"s\.tar changed since"):
        ShardIndex.load(tmp_path)
    # A key renamed in the middle, same length: size and fingerprints hold, the header check
    # of members.npy catches it when that sample is read.
    renamed = keys.copy()
    renamed[20] = "img_999"
    assert ranged_shard(tmp_path / "s.tar", renamed) == bodies
    assert (tmp_path / "s.tar").read_bytes() != original
    index = ShardIndex.load(tmp_path)
    reader = SampleReader(index, LOAD, 3)
    try:
        np.testing.assert_array_equal(reader.read(19), decoded(bodies[19]))
        with pytest.raises(ShardError, match=r"expected sample 'img_020\.png'.*'img_999\.png'"):
            reader.read(20)
    finally:
        reader.close()


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` unwritable: mode 0o555 and, for root (whom permissions do not stop), a
    read-only bind mount."""
    mounted = False
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:
            for args in (
                ["--bind", str(folder), str(folder)],
                ["-o", "remount,bind,ro", str(folder)],
            ):
                res = subprocess.run(["mount", *args], capture_output=True, text=True)
                assert res.returncode == 0, f"mount {args}: {res.stderr}"
                mounted = True
        yield
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_only_shards_are_indexed_elsewhere(tmp_path: Path):
    shards = tmp_path / "ro"
    shards.mkdir()
    bodies = ranged_shard(shards / "a.tar", ["x_1", "x_2", "y_3"])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in shards.iterdir())
    with read_only(shards):
        with pytest.raises(ShardError, match=r"cannot write the index into .*ro.*give --out"):
            index_shards(shards)
        result = index_shards(str(shards / "*.tar"), tmp_path / "idx", class_from="key-prefix")
        assert sorted((p.name, p.stat().st_mtime_ns) for p in shards.iterdir()) == before
        index, got = read_all(tmp_path / "idx")
    assert result.index["shards"][0]["name"] == str(shards / "a.tar")
    assert index.classes == ["x", "y"] and index.labels.tolist() == [0, 0, 1]
    for image, body in zip(got, bodies, strict=True):
        np.testing.assert_array_equal(image, decoded(body))
    # An index above the shards names them relative to itself.
    up = index_shards(shards, tmp_path)
    assert up.index["shards"][0]["name"] == "ro/a.tar"
    assert ShardIndex.load(tmp_path).num_samples == 3


# ------------------------------------------------------------------------------------- CLI


def test_cli_prints_the_summary_and_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    wds_shards(tmp_path / "wds", "int")
    code = main(["index", str(tmp_path / "wds"), "--out", str(tmp_path / "i"),
                 "--class-from", "json:label"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"indexed {N_WDS} samples in 3 shards"), out
    assert json.loads((tmp_path / "i" / INDEX_FILE).read_text())["num_samples"] == N_WDS
    for argv, message in (
        ([str(tmp_path / "none-*.tar")], "no file matches"),
        ([str(tmp_path / "wds"), "--class-from", "label"], "--class-from 'label'"),
        ([str(tmp_path / "wds"), "--class-from", "cls"], "has no .cls member"),
    ):
        assert main(["index", *argv, "--out", str(tmp_path / "j")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cluster-pipeline index: error: ") and message in err, err
        assert err.count("\n") == 1, err


# ------------------------------------- a training run on indexed shards equals one on make-shards

N_DIGITS = 200


def digest(run_dir: Path, epochs: int) -> str:
    h = hashlib.sha256()
    for name, t in sorted(checkpoint.load(checkpoint.checkpoint_path(run_dir, epochs))["model"]
                          .items()):  # fmt: skip
        h.update(name.encode() + t.numpy().tobytes())
    return h.hexdigest()


def values(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "images_per_s"}
            for r in rows]  # fmt: skip


@pytest.mark.slow
def test_training_on_indexed_shards_equals_training_on_make_shards(tmp_path: Path, dist_env: None):
    digits = digits_source()
    source = Source(digits.images[:N_DIGITS], digits.ext[:N_DIGITS], digits.labels[:N_DIGITS],
                    digits.classes)  # fmt: skip
    write_shards(source, tmp_path / "made", samples_per_shard=64)
    own = tmp_path / "own"
    own.mkdir()
    for s in range(4):  # other keys, other shard sizes, an extra member per sample
        with tarfile.open(own / f"digits-{s}.tar", "w") as tf:
            for i in range(s * 50, (s + 1) * 50):
                add(tf, f"set/digit-{i:05d}.png", source.images[i])
                add(tf, f"set/digit-{i:05d}.cls", str(int(source.labels[i])).encode())
                add(tf, f"set/digit-{i:05d}.txt", b"scikit-learn digits")
    index_shards(own, class_from="cls")
    made, indexed = ShardIndex.load(tmp_path / "made"), ShardIndex.load(own)
    assert indexed.classes == made.classes and (indexed.labels == made.labels).all()
    assert (indexed.samples[:, 1] != made.samples[:, 1]).all()  # the layouts differ
    epochs = 3
    for name in ("made", "own"):
        cfg = load_config(str(REPO / "configs" / "digits_test.yaml"), [
            f"data.shards={tmp_path / name}", f"run.dir={tmp_path / ('run-' + name)}",
            "cluster.k=10", f"train.epochs={epochs}", "wandb.mode=disabled",
        ])  # fmt: skip
        run_deepcluster(cfg)
    a, b = tmp_path / "run-made", tmp_path / "run-own"
    assert values(a) == values(b) and len(values(a)) == epochs
    assert digest(a, epochs) == digest(b, epochs)
    for e in range(epochs):
        name = f"epoch-{e:04d}.npy"
        np.testing.assert_array_equal(np.load(a / "assignments" / name),
                                      np.load(b / "assignments" / name))  # fmt: skip
