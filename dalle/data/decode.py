"""Decoding of one image and one caption file, every rejection with a reason (Ramesh et al. 2021, §2.3 and
Appendix C: text–image pairs are filtered before training, and the image is resized and centre-cropped).

Pure functions of the given bytes and a ``DataConfig``: no file access, no threads, no randomness, so worker
processes of the ``prepare`` stage can call them on bytes read from folders, manifests or tar shards alike.
A rejected item raises ``Skip`` with a ``reason`` from ``SKIP_REASONS`` and a short ``detail``; callers count
reasons, never parse messages. ``Skip`` pickles, so it crosses process boundaries intact.

Checks run cheapest first: empty data, then the header (pixel count, shorter side, aspect ratio) before a
single pixel is decoded, then the decode itself. Truncated files must raise, so this module relies on PIL's
default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``. PIL's own bomb guard (``Image.MAX_IMAGE_PIXELS``) applies
as well as ``cfg.max_pixels``: the smaller of the two wins. PIL's bomb warning is caught with
``warnings.catch_warnings``, which is process-wide state: call ``decode_image`` from one thread per process.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import PIL
from PIL import Image, ImageOps, features

from dalle.config import DataConfig

SKIP_REASONS: tuple[str, ...] = (
    "zero_byte",
    "truncated",
    "unreadable_image",
    "missing_codec",
    "decompression_bomb",
    "too_small",
    "extreme_aspect",
    "caption_not_utf8",
    "empty_caption",
)


class Skip(Exception):
    """An item left out: ``reason`` is one of ``SKIP_REASONS``, ``detail`` says what was found."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, f"unknown skip reason {reason!r}"
        super().__init__(reason, detail)  # both in args, so pickling (worker -> parent) rebuilds the same Skip
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def decode_image(data: bytes, cfg: DataConfig) -> np.ndarray:
    """Decode ``data`` to uint8 RGB ``(cfg.image_size, cfg.image_size, 3)``: shorter side resized, centre cropped.

    Transparency is composited on ``cfg.background``, EXIF orientation applied, animations give their first
    frame. Raises ``Skip`` for anything that cannot or should not become a training image. A file in a format that
    this Pillow has no decoder for (HEIC without pillow-heif, say) is ``missing_codec``, not ``unreadable_image``:
    the file may be fine. ``MemoryError`` is the machine's problem, not the file's, and propagates.
    """
    if not data:
        raise Skip("zero_byte", "0 bytes")
    with warnings.catch_warnings():
        # PIL warns (rather than raises) between MAX_IMAGE_PIXELS and twice that; both mean a bomb here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(data, cfg)
        except (Skip, MemoryError):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise Skip("decompression_bomb", str(err)) from err
        except Exception as err:  # PIL's plugins also raise SyntaxError, ValueError, EOFError, ... on bad input
            if (fmt := missing_codec(data)) is not None:
                detail = f"{fmt} image; this Pillow {PIL.__version__} cannot decode it: {CODEC_HINTS[fmt]}"
                raise Skip("missing_codec", detail) from err
            # PIL has no truncation exception type; its messages are "image file is truncated (...)" and
            # "Truncated File Read". WebP's decoder only says it failed, so its RIFF length tells instead.
            if isinstance(err, OSError) and ("truncated" in str(err).lower() or _riff_truncated(data)):
                raise Skip("truncated", f"{len(data)} bytes: {err}") from err
            raise Skip("unreadable_image", f"{type(err).__name__}: {err}") from err


# Formats recognised by their signature, for telling "no decoder here" from "not an image": how to get a decoder.
CODEC_HINTS = {
    "HEIF": "pip install pillow-heif and call pillow_heif.register_heif_opener(), or convert the files to JPEG",
    "AVIF": "install a Pillow built with libavif (Pillow >= 11.3 wheels have it), or pillow-avif-plugin",
    "WEBP": "install a Pillow built with libwebp (the PyPI wheels have it)",
    "JPEG2000": "install a Pillow built with OpenJPEG (the PyPI wheels have it)",
    "JXL": "pip install pillow-jxl-plugin, or convert the files",
}
_LIBRARIES = {"WEBP": "webp", "JPEG2000": "jpg_2000", "AVIF": "avif"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def missing_codec(data: bytes) -> str | None:
    """The format of ``data`` (from its signature) when this Pillow has no decoder for it; None otherwise."""
    fmt = None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "WEBP"
    elif data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        fmt = "AVIF"
    elif data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        fmt = "HEIF"
    elif data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or data[:4] == b"\xff\x4f\xff\x51":
        fmt = "JPEG2000"
    elif data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        fmt = "JXL"
    if fmt is None:
        return None
    Image.init()
    library = _LIBRARIES.get(fmt)  # formats whose plugin is always registered but needs a compiled library
    decodable = fmt in Image.OPEN and (library is None or features.check(library))
    return None if decodable else fmt


def _decode(data: bytes, cfg: DataConfig) -> np.ndarray:
    size = cfg.image_size
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size  # from the header; an animation's canvas, and the same for any EXIF rotation
        if width * height > cfg.max_pixels:
            raise Skip("decompression_bomb", f"{width}x{height} pixels > max_pixels {cfg.max_pixels}")
        short_side, long_side = min(width, height), max(width, height)
        if short_side < cfg.min_size:
            raise Skip("too_small", f"{width}x{height}: shorter side {short_side} < min_size {cfg.min_size}")
        if long_side > cfg.max_aspect * short_side:
            raise Skip("extreme_aspect", f"{width}x{height}: aspect {long_side / short_side:.2f} > {cfg.max_aspect}")
        # JPEG only: decode at a reduced DCT scale, keeping the shorter side >= 2x the target for quality.
        img.draft(None, (2 * size, 2 * size))
        img.load()  # decode now (first frame only), so a truncated file raises here and not in a resize
        ImageOps.exif_transpose(img, in_place=True)  # phone photos store rotation as a tag
        rgb = _to_rgb(img, cfg.background)
        width, height = rgb.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        # Resizing the centred square box equals "shorter side to image_size, then centre crop", with one
        # rounding instead of two; reducing_gap first shrinks by box averaging, which keeps large downscales
        # alias-free and fast. A shorter side below image_size is upscaled by the same call.
        square = rgb.resize(
            (size, size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
            reducing_gap=3.0,
        )
        return np.asarray(square, dtype=np.uint8)


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """``img`` as RGB: transparency composited on ``background``, 16/32-bit greyscale scaled to 8 bits."""
    if img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode.startswith("I"):
        # 16/32-bit greyscale (e.g. 16-bit PNG): Pillow's own conversion clips at 255 instead of scaling.
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # Plain conversion would expose whatever colour hides under transparent pixels (often black).
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return img.convert("RGB")


def _riff_truncated(data: bytes) -> bool:
    """True for a RIFF container (WebP) shorter than the length its header declares."""
    if len(data) < 12 or data[:4] != b"RIFF":
        return False
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def decode_captions(raw: bytes) -> list[str]:
    """One caption per non-blank line of ``raw`` (UTF-8, a leading BOM dropped), each stripped.

    Raises ``Skip("caption_not_utf8")`` rather than replacing bad bytes (a mis-encoded caption teaches the
    model garbage), and ``Skip("empty_caption")`` when no line has text.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise Skip("caption_not_utf8", f"byte {raw[err.start]:#04x} at offset {err.start}: {err.reason}") from err
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise Skip("empty_caption", f"{len(raw)} bytes, no non-blank line")
    return captions
