"""Strict image decoding: encoded bytes to a fixed-size 8-bit L or RGB array, or a DecodeError.

Strict means that damage is never decoded into pixels. A decoder that reports damaged data
(libjpeg's "Corrupt JPEG data: ...", "Premature end of JPEG file", a PNG chunk whose CRC does
not match, a truncated file) makes the image a `DecodeError`; nothing falls back to a lenient
decoder that would accept what the strict one refused.

- JPEG: libjpeg-turbo (simplejpeg) with its warnings as errors. libjpeg finds most damage to
  the entropy-coded data (294 of 300 random overwrites in a test); the rest, and zero-filled
  blocks that happen to decode as valid codes, no decoder can tell from an image. YCbCr, grey and RGB JPEGs are
  decoded by it (pixels equal PIL's: the same library, the same slow integer IDCT and fancy
  upsampling); CMYK/YCCK JPEGs are checked by it and converted by PIL, whose Adobe CMYK
  handling differs. Warnings about metadata only (an unknown JFIF revision, a bad ICC marker)
  are not damage.
- PNG: every chunk's CRC is checked, then PIL decodes; a stream cut short is an error.
- WebP, BMP, TIFF, GIF (its first frame) and anything else PIL opens: PIL, which raises on
  truncated data (its lenient `ImageFile.LOAD_TRUNCATED_IMAGES` is kept off while decoding,
  whatever another library set it to).

Modes, to 8 bits (`to_8bit`):
- 16-bit samples (PNG, TIFF: PIL's I;16 modes) keep their high byte, v >> 8, as PIL itself does
  for 16-bit RGB PNGs; a 32-bit integer image ("I") is scaled from its bit depth (TIFF's
  BitsPerSample, else 0..2**31-1), negatives to 0; a float image ("F") is read as 0..1 and
  scaled by 255, values outside clipped.
- Alpha (RGBA, LA, PA, and palette, grey or RGB images with a transparent colour) is
  composited over ALPHA_BACKGROUND, white: what a viewer shows, and what product photos and
  logos, the transparent images of real collections, are drawn against.
- EXIF orientation is not applied: pixels are used as stored, as PIL and torchvision's
  ImageFolder do, so features match models trained that way and both decoders agree.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from typing import Literal

import numpy as np
import simplejpeg
from PIL import Image, ImageFile

# The extension each format's members get in shards: the format found in the bytes, not the
# file name (ImageNet holds a PNG named .JPEG and CMYK JPEGs).
MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"WEBP", 8, "webp"),  # after "RIFF" + size
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tif"),
    (b"MM\x00*", 0, "tif"),
)
# Member extensions readers take as the sample's image (webdataset's usual names included).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
ALPHA_BACKGROUND = 255
# JPEG colour spaces libjpeg turns into the RGB that PIL's convert("RGB") gives (CMYK and
# YCCK differ: PIL inverts Adobe CMYK itself), checked pixel for pixel in tests/test_data.py.
LIBJPEG_AS_PIL = ("YCbCr", "Gray", "RGB")
# libjpeg warnings about metadata, not about the coded image: the pixels are whole.
JPEG_BENIGN = ("unknown JFIF revision", "Unknown Adobe color transform", "bad ICC marker",
               "thumbnail image size does not match")  # fmt: skip
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

Mode = Literal["L", "RGB"]
_PNG_CHUNK = struct.Struct(">I4s")  # length, type
_PNG_CRC = struct.Struct(">I")


class DecodeError(ValueError):
    """The bytes are not an image this decoder accepts whole: damaged, truncated or unknown."""


def sniff_format(body: bytes | memoryview) -> str | None:
    """The image format of `body` from its first bytes ("jpg", "png", ...), None if not an image."""
    head = bytes(body[:16])
    for magic, at, ext in MAGIC:
        if head[at : at + len(magic)] == magic:
            return ext if ext != "webp" or head[:4] == b"RIFF" else None
    return None


def decode_into(body: bytes | memoryview, mode: Mode, size: int, out: np.ndarray) -> None:
    """Decode `body` strictly into `out`, (size, size, channels) uint8: the shorter side resized
    to `size` (bilinear), then center cropped. Raises DecodeError naming what is wrong.

    A size x size RGB JPEG is decoded by libjpeg straight into `out`: no PIL image and no
    copies, ~1.5x faster than `Image.open` + `np.asarray`.
    """
    head = bytes(body[:8])
    if head[:3] == b"\xff\xd8\xff":
        if _jpeg_into(body, mode, size, out):
            return
    elif head == b"\x89PNG\r\n\x1a\n":
        check_png(body)
    out[...] = _pil(body, mode, size).reshape(out.shape)


def _jpeg_into(body: bytes | memoryview, mode: Mode, size: int, out: np.ndarray) -> bool:
    """A JPEG that libjpeg converts as PIL does, decoded into `out`; False when PIL must convert
    it (CMYK/YCCK), after libjpeg found its data whole. DecodeError on damage."""
    h, w, colorspace = _jpeg_header(body)
    if colorspace not in LIBJPEG_AS_PIL:
        _libjpeg(body, "CMYK")  # the damage check only
        return False
    square = (w, h) == (size, size)
    if mode == "L" and colorspace == "Gray":
        arr = _libjpeg(body, "GRAY", out if square else None)
    elif mode == "RGB":
        arr = _libjpeg(body, "RGB", out if square else None)
    else:  # PIL's RGB -> L on libjpeg's RGB: what PIL's decode + convert("L") gives
        arr = np.asarray(Image.fromarray(_libjpeg(body, "RGB")).convert("L"))[..., None]
        if square:
            out[...] = arr
    if not square:
        img = Image.fromarray(arr if arr.shape[2] == 3 else arr[..., 0])
        out[...] = np.asarray(resize_square(img, size)).reshape(out.shape)
    return True


def verify(body: bytes | memoryview) -> str:
    """Decode `body` whole, as the reader will, and return its format ("jpg", "png", ...).
    Raises DecodeError when it is not an image or is damaged."""
    ext = sniff_format(body)
    if ext == "jpg":
        whole_in_libjpeg = _jpeg_header(body)[2] in LIBJPEG_AS_PIL
        _libjpeg(body, "RGB" if whole_in_libjpeg else "CMYK")
        if whole_in_libjpeg:
            return ext
    elif ext == "png":
        check_png(body)
    _pil(body, "RGB")
    return ext or _pil_format(body)


def _jpeg_header(body: bytes | memoryview) -> tuple[int, int, str]:
    for strict in (True, False):
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(body, strict=strict)
            return h, w, colorspace
        except ValueError as exc:
            if not strict or not any(b in str(exc) for b in JPEG_BENIGN):
                raise DecodeError(f"JPEG header does not decode ({exc})") from None
    raise AssertionError("unreachable")


def _libjpeg(
    body: bytes | memoryview, colorspace: str, out: np.ndarray | None = None
) -> np.ndarray:
    """libjpeg's decode with its warnings as errors. A warning about metadata only stops
    libjpeg before it has looked at the image data (and simplejpeg raises it even when not
    strict), so the image is decoded again, as strictly, without that metadata."""
    try:
        return simplejpeg.decode_jpeg(body, colorspace=colorspace, buffer=out)
    except ValueError as exc:
        message = str(exc)
        if not any(b in message for b in JPEG_BENIGN):
            raise DecodeError(f"damaged JPEG: libjpeg says {message!r}") from None
    try:
        return simplejpeg.decode_jpeg(_without_metadata(body), colorspace=colorspace, buffer=out)
    except ValueError as exc:
        raise DecodeError(f"damaged JPEG: libjpeg says {str(exc)!r}") from None


def _without_metadata(body: bytes | memoryview) -> bytes:
    """The JPEG with the segments libjpeg only parses, never decodes with, left out or made
    plain: EXIF/XMP (APP1), ICC profiles (APP2), comments, JFIF thumbnails (JFXX); a JFIF
    header of another revision rewritten as 1.01 without thumbnail. The markers that decide
    the pixels (frame, tables, Adobe's colour transform in APP14) are kept as they are."""
    data = bytes(body)
    parts, pos = [data[:2]], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: the image data follows
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos:end]
        if marker == 0xE0 and segment[4:9] == b"JFIF\0" and len(segment) >= 18:
            parts.append(b"\xff\xe0\x00\x10JFIF\x00\x01\x01" + segment[11:16] + b"\x00\x00")
        elif marker not in (0xE0, 0xE1, 0xE2, 0xFE):
            parts.append(segment)
        pos = end
    return b"".join(parts) + data[pos:]


def check_png(body: bytes | memoryview) -> None:
    """Every chunk of a PNG whole: its length within the file, its CRC right, an IEND at the end.

    PIL checks CRCs of few chunks and none of the image data (IDAT); zlib's own checksum
    catches most damage there, not all. crc32 runs at GB/s: a few microseconds per image.
    """
    pos, n = 8, len(body)
    while True:
        if pos + 12 > n:
            raise DecodeError(f"truncated PNG: it ends at byte {n} inside a chunk header")
        length, kind = _PNG_CHUNK.unpack_from(body, pos)
        end = pos + 12 + length
        if end > n:
            raise DecodeError(
                f"truncated PNG: chunk {kind.decode(errors='replace')!r} at byte {pos} needs "
                f"{length} bytes, the file ends at byte {n}"
            )
        if zlib.crc32(body[pos + 4 : end - 4]) != _PNG_CRC.unpack_from(body, end - 4)[0]:
            raise DecodeError(
                f"damaged PNG: chunk {kind.decode(errors='replace')!r} at byte {pos} fails its CRC"
            )
        if kind == b"IEND":
            return
        pos = end


def _pil(body: bytes | memoryview, mode: Mode, size: int | None = None) -> np.ndarray:
    """The image decoded whole by PIL, converted to 8-bit `mode` (and `resize_square`d).

    PIL's lenient mode (`ImageFile.LOAD_TRUNCATED_IMAGES`, which some libraries switch on at
    import) would fill a truncated image's missing rows with grey: it is off while we decode.
    """
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(body)) as im:
            img = to_8bit(im, mode)
            return np.asarray(img if size is None else resize_square(img, size))
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"image does not decode ({_no_address(exc)})") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _pil_format(body: bytes | memoryview) -> str:
    with Image.open(io.BytesIO(body)) as im:
        return (im.format or "img").lower().replace("jpeg", "jpg").replace("tiff", "tif")


def to_8bit(im: Image.Image, mode: Mode) -> Image.Image:
    """`im` as 8-bit L or RGB: high bit depths scaled, alpha composited (see the module doc).
    An 8-bit image without transparency gets PIL's own convert, unchanged."""
    if im.mode in HIGH_DEPTH_MODES:
        im = Image.fromarray(_scale_to_8bit(im), "L")
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:]
        rgb = (rgba[..., :3] * alpha + ALPHA_BACKGROUND * (255 - alpha) + 127) // 255
        im = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return im if im.mode == mode else im.convert(mode)


def _scale_to_8bit(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    if im.mode == "F":
        return (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if im.mode != "I":
        return (a.astype(np.uint16) >> 8).astype(np.uint8)
    bits = _bit_depth(im)
    return (np.clip(a.astype(np.int64), 0, (1 << bits) - 1) >> (bits - 8)).astype(np.uint8)


def _bit_depth(im: Image.Image) -> int:
    """Bits per sample of a 32-bit integer ("I") image: PNG's 16 (older PIL opened 16-bit PNGs
    as "I"), TIFF's BitsPerSample, else the 31 bits of a non-negative int32."""
    if im.format == "PNG":
        return 16
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        return max(8, min(bits, 31))
    return 31


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then center crop to size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _no_address(exc: BaseException) -> str:
    """PIL's message without the object address ("<_io.BytesIO object at 0x7f...>")."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)) or type(exc).__name__
