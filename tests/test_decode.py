"""Strict decoding, every mode to 8 bits: good images as PIL decodes them, damage an error.

Each damaged kind is made the way disks and copies damage files: bytes overwritten in the
middle of a JPEG's entropy-coded data, a flipped byte in a PNG's image data, a file cut short.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster_pipeline.data.decode import (
    ALPHA_BACKGROUND,
    DecodeError,
    decode_into,
    resize_square,
    sniff_format,
    verify,
)
from cluster_pipeline.data.reader import SampleError, SampleReader, ShardIndex
from cluster_pipeline.data.shards import write_shards
from cluster_pipeline.data.sources import Source

SIZE = 24


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB image with structure (JPEG-compressible), not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(img: Image.Image | np.ndarray, fmt: str, **kw: object) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(body: bytes, mode: str = "RGB", size: int = SIZE) -> np.ndarray:
    out = np.empty((size, size, 1 if mode == "L" else 3), np.uint8)
    decode_into(body, mode, size, out)  # type: ignore[arg-type]
    return out


def pil_reference(body: bytes, mode: str = "RGB", size: int = SIZE) -> np.ndarray:
    """Today's pixels: PIL's decode + convert + the reader's resize and crop."""
    with Image.open(io.BytesIO(body)) as im:
        arr = np.asarray(resize_square(im.convert(mode), size))
    return arr.reshape(size, size, -1)


def png_raw(pixels: np.ndarray, color_type: int, bit_depth: int) -> bytes:
    """A PNG written by hand, for what PIL cannot write (16-bit RGB): filter 0 on each row."""
    h, w = pixels.shape[:2]
    big = pixels.astype(">u2" if bit_depth == 16 else np.uint8)
    rows = b"".join(b"\0" + big[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))  # fmt: skip


def overwrite_middle(body: bytes, n: int, seed: int = 1) -> bytes:
    """`n` random bytes over the middle of the file (inside JPEG scan data here)."""
    mid = len(body) // 2
    junk = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return body[:mid] + junk + body[mid + n :]


# ----------------------------------------------------------------------- good images: as PIL


@pytest.mark.parametrize(
    "name",
    ["jpeg420", "jpeg444", "jpeg-progressive", "jpeg-grey", "jpeg-cmyk", "jpeg-square",
     "png-rgb", "png-l", "png-p", "webp-lossless", "webp-lossy", "bmp", "tiff", "gif",
     "png-1bit"],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_good_images_decode_to_the_pixels_pil_gives(name: str, mode: str) -> None:
    rgb = _smooth(30, 41)
    images = {
        "jpeg420": lambda: encode(rgb, "JPEG", quality=90),
        "jpeg444": lambda: encode(rgb, "JPEG", quality=95, subsampling=0),
        "jpeg-progressive": lambda: encode(rgb, "JPEG", quality=90, progressive=True),
        "jpeg-grey": lambda: encode(Image.fromarray(rgb).convert("L"), "JPEG", quality=90),
        "jpeg-cmyk": lambda: encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90),
        "jpeg-square": lambda: encode(rgb[:SIZE, :SIZE], "JPEG", quality=90),  # into the batch
        "png-rgb": lambda: encode(rgb, "PNG"),
        "png-l": lambda: encode(Image.fromarray(rgb).convert("L"), "PNG"),
        "png-p": lambda: encode(Image.fromarray(rgb).convert("P"), "PNG"),
        "webp-lossless": lambda: encode(rgb, "WEBP", lossless=True),
        "webp-lossy": lambda: encode(rgb, "WEBP", quality=80),
        "bmp": lambda: encode(rgb, "BMP"),
        "tiff": lambda: encode(rgb, "TIFF"),
        "gif": lambda: encode(Image.fromarray(rgb).convert("P"), "GIF"),
        "png-1bit": lambda: encode(Image.fromarray(rgb).convert("1"), "PNG"),
    }
    body = images[name]()
    np.testing.assert_array_equal(decode(body, mode), pil_reference(body, mode))
    assert verify(body) == sniff_format(body)


def test_gif_first_frame_and_exif_orientation_not_applied() -> None:
    a, b = _smooth(SIZE, SIZE, 1), _smooth(SIZE, SIZE, 2)[::-1]
    frames = [Image.fromarray(x).convert("P") for x in (a, b)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    gif = buf.getvalue()
    with Image.open(io.BytesIO(gif)) as im:
        assert im.n_frames == 2
        first = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(decode(gif), first)
    # EXIF orientation 6 ("rotate 90 clockwise to view") is not applied: pixels as stored,
    # by libjpeg and by PIL alike.
    exif = Image.Exif()
    exif[0x0112] = 6
    tall = _smooth(SIZE, SIZE + 8, 3)
    body = encode(tall, "JPEG", quality=92, exif=exif.tobytes())
    with Image.open(io.BytesIO(body)) as im:
        assert im.getexif()[0x0112] == 6
    np.testing.assert_array_equal(decode(body), pil_reference(body))


def test_metadata_only_jpeg_warning_is_not_damage() -> None:
    """An unknown JFIF revision makes libjpeg warn; the image itself is whole and decodes."""
    body = bytearray(encode(_smooth(SIZE, SIZE), "JPEG", quality=90))
    at = body.index(b"JFIF\0") + 5
    body[at] = 3  # version 3.xx
    np.testing.assert_array_equal(decode(bytes(body)), pil_reference(bytes(body)))


# ------------------------------------------------------------------------- damage is an error


def _damaged() -> dict[str, tuple[bytes, str]]:
    rgb = _smooth(120, 160)
    jpeg = encode(rgb, "JPEG", quality=90)
    cmyk = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90)
    png = encode(rgb, "PNG")
    idat = png.index(b"IDAT") + 4 + 50
    flipped = png[:idat] + bytes([png[idat] ^ 0x10]) + png[idat + 1 :]
    return {
        "jpeg-entropy-overwritten": (overwrite_middle(jpeg, 2000), "Corrupt JPEG data"),
        # (libjpeg's bit reader swallows the first few bytes of junk: 100 it reports)
        "jpeg-extraneous-before-eoi": (jpeg[:-2] + b"x" * 100 + jpeg[-2:], "extraneous bytes"),
        "jpeg-cut": (jpeg[: len(jpeg) // 2], "Premature end of JPEG file"),
        "jpeg-cmyk-overwritten": (overwrite_middle(cmyk, 2000), "Corrupt JPEG data"),
        "png-idat-byte-flipped": (flipped, "fails its CRC"),
        "png-cut": (png[: len(png) * 2 // 3], "truncated PNG"),
        "webp-cut": (encode(rgb, "WEBP", quality=80)[:-200], "does not decode"),
        "gif-cut": (encode(Image.fromarray(rgb).convert("P"), "GIF")[:-400], "does not decode"),
        "tiff-cut": (encode(rgb, "TIFF")[:-5000], "does not decode"),
        "bmp-cut": (encode(rgb, "BMP")[:-5000], "does not decode"),
        "not-an-image": (b"hello, this is text\n" * 20, "does not decode"),
    }


@pytest.mark.parametrize("name", sorted(_damaged()))
def test_damaged_images_are_errors_not_pixels(name: str) -> None:
    body, reason = _damaged()[name]
    for mode in ("RGB", "L"):
        with pytest.raises(DecodeError, match=reason):
            decode(body, mode)
    with pytest.raises(DecodeError, match=reason):
        verify(body)


def test_pil_lenient_mode_set_elsewhere_does_not_make_decoding_lenient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Some libraries switch PIL's LOAD_TRUNCATED_IMAGES on at import; decoding stays strict
    and leaves the switch as it found it."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for name in ("gif-cut", "tiff-cut", "bmp-cut", "png-cut"):
        body, reason = _damaged()[name]
        with pytest.raises(DecodeError, match=reason):
            decode(body)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_lenient_decoders_would_have_accepted_the_damage() -> None:
    """The cases above are real: PIL decodes the overwritten JPEG without a word (the old
    fallback's garbage), and its pixels differ from the original's."""
    body, _ = _damaged()["jpeg-entropy-overwritten"]
    with Image.open(io.BytesIO(body)) as im:
        garbage = np.asarray(im.convert("RGB"))
    rgb = _smooth(120, 160)
    with Image.open(io.BytesIO(encode(rgb, "JPEG", quality=90))) as im:
        clean = np.asarray(im.convert("RGB"))
    assert (np.abs(garbage.astype(int) - clean).max(-1) > 8).mean() > 0.05


# --------------------------------------------------------------- every mode, to 8 bits


def test_16_bit_images_are_scaled_not_clipped() -> None:
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 65536, (SIZE, SIZE)).astype(np.uint16)
    rgb = rng.integers(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
    want_grey = (grey >> 8).astype(np.uint8)
    for body in (encode(Image.fromarray(grey), "PNG"), png_raw(grey, 0, 16),
                 encode(Image.fromarray(grey), "TIFF")):  # fmt: skip
        got = decode(body, "L")[..., 0]
        np.testing.assert_array_equal(got, want_grey)
        np.testing.assert_array_equal(decode(body, "RGB"), np.repeat(want_grey[..., None], 3, -1))
    got = decode(png_raw(rgb, 2, 16), "RGB")
    np.testing.assert_array_equal(got, (rgb >> 8).astype(np.uint8))
    # Clipping would have made nearly everything 255.
    assert (got == 255).mean() < 0.05


def test_32_bit_and_float_images_are_scaled() -> None:
    rng = np.random.default_rng(6)
    ints = rng.integers(0, 2**31 - 1, (SIZE, SIZE)).astype(np.int32)
    np.testing.assert_array_equal(decode(encode(Image.fromarray(ints), "TIFF"), "L")[..., 0],
                                  (ints >> 23).astype(np.uint8))  # fmt: skip
    floats = rng.random((SIZE, SIZE)).astype(np.float32)
    floats[0, :3] = [-0.5, 1.5, np.nan]
    want = (np.clip(np.nan_to_num(floats), 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(decode(encode(Image.fromarray(floats), "TIFF"), "L")[..., 0],
                                  want)  # fmt: skip


def _over_background(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.uint16)[..., None]
    return ((rgb.astype(np.uint16) * a + ALPHA_BACKGROUND * (255 - a) + 127) // 255).astype(
        np.uint8
    )


def test_alpha_is_composited_over_the_documented_background() -> None:
    rng = np.random.default_rng(7)
    rgb = _smooth(SIZE, SIZE, 4)
    alpha = rng.integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    want = _over_background(rgb, alpha)
    rgba = np.dstack([rgb, alpha])
    for fmt in ("PNG", "WEBP", "TIFF"):
        kw = {"lossless": True} if fmt == "WEBP" else {}
        got = decode(encode(Image.fromarray(rgba, "RGBA"), fmt, **kw))
        np.testing.assert_array_equal(got, want, err_msg=fmt)
    assert (got[0, 0] == ALPHA_BACKGROUND).all() and (got[0, 1] == rgb[0, 1]).all()
    # Grey + alpha.
    grey = rgb[..., 0]
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    got = decode(encode(la, "PNG"), "L")[..., 0]
    np.testing.assert_array_equal(got, _over_background(np.dstack([grey] * 3), alpha)[..., 0])


def test_palette_images_with_transparency() -> None:
    rgb = _smooth(SIZE, SIZE, 8)
    p = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    index = np.asarray(p)
    clear = int(index[0, 0])
    palette = np.asarray(p.getpalette()[: 3 * 16], np.uint8).reshape(-1, 3)
    want = palette[index]
    want[index == clear] = ALPHA_BACKGROUND
    for fmt in ("PNG", "GIF"):
        got = decode(encode(p, fmt, transparency=clear))
        np.testing.assert_array_equal(got, want, err_msg=fmt)


def test_sniff_format_follows_the_bytes_not_the_name() -> None:
    rgb = _smooth(8, 8)
    assert sniff_format(encode(rgb, "PNG")) == "png"
    assert sniff_format(encode(rgb, "JPEG")) == "jpg"
    assert sniff_format(encode(rgb, "WEBP")) == "webp"
    assert sniff_format(encode(rgb, "GIF")) == "gif"
    assert sniff_format(encode(rgb, "BMP")) == "bmp"
    assert sniff_format(encode(rgb, "TIFF")) == "tif"
    assert sniff_format(b"RIFF\0\0\0\0WAVEfmt ") is None
    assert sniff_format(b"") is None and sniff_format(b"plain text") is None


# --------------------------------------------------------- through the reader, as a sample


def test_reader_fails_or_skips_a_damaged_jpeg_naming_shard_and_key(tmp_path: Path) -> None:
    rgb = _smooth(40, 52)
    good = encode(rgb, "JPEG", quality=90)
    images = [good, overwrite_middle(good, 600), encode(rgb, "PNG")]
    write_shards(Source(images, ["jpg", "jpg", "png"], np.zeros(3, np.int64), ["a"]), tmp_path)
    reader = SampleReader(ShardIndex.load(tmp_path), load_size=SIZE, channels=3)
    try:
        np.testing.assert_array_equal(reader.read(0), pil_reference(good))
        with pytest.raises(SampleError, match=r"shard-000000.tar: sample 000000001: damaged JPEG"):
            reader.read(1)
        idx, imgs, bad, reasons = reader.read_batch_skipping(np.arange(3))
        np.testing.assert_array_equal(idx, [0, 2])
        np.testing.assert_array_equal(bad, [1])
        assert "Corrupt JPEG data" in reasons[0], reasons
        np.testing.assert_array_equal(imgs[1], pil_reference(images[2]))
    finally:
        reader.close()
