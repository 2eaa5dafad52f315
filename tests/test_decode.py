"""``dalle.data.decode``: one behaviour per test, on images built here with PIL and numpy."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from dalle.config import DataConfig
from dalle.data import decode
from dalle.data.decode import SKIP_REASONS, Skip, decode_captions, decode_image

SIZE = 16
RED, GREEN, BLUE = (230, 30, 30), (30, 200, 30), (40, 80, 255)
SKY = (10, 120, 200)


def _cfg(**overrides) -> DataConfig:
    return DataConfig(**{"image_size": SIZE, "min_size": 8, **overrides})


def _encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _skip_reason(fn, *args) -> str:
    with pytest.raises(Skip) as caught:
        fn(*args)
    return caught.value.reason


def _png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG that claims ``width`` x ``height`` but holds one row: only its header is ever read."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + (width + 7) // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def _legacy_load_image(data: bytes, image_size: int) -> np.ndarray:
    """``dalle.data.ingest.load_image`` as it was before ``decode``, on bytes (white background)."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft(None, (2 * image_size, 2 * image_size))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
        if img.mode.startswith("I"):
            grey = np.asarray(img, dtype=np.float64) / 257.0
            img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "RGBa", "La"):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        rgb = img.convert("RGB")
        width, height = rgb.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        square = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
        return np.asarray(square, dtype=np.uint8)


def _ordinary_images() -> dict[str, bytes]:
    rgba = np.dstack([_noise(40, 30), np.linspace(0, 255, 40, dtype=np.uint8)[None].repeat(30, 0)])
    return {
        "big jpeg (draft)": _encode(Image.fromarray(_noise(300, 200)), "JPEG", quality=90),
        "rgb png": _encode(Image.fromarray(_noise(45, 30, seed=1))),
        "grey png": _encode(Image.fromarray(_noise(30, 50, seed=2)[..., 0])),
        "rgba png": _encode(Image.fromarray(rgba, "RGBA")),
        "palette png": _encode(Image.fromarray(_noise(33, 33, seed=3)).quantize(16)),
        "webp": _encode(Image.fromarray(_noise(64, 48, seed=4)), "WEBP", quality=80),
    }


@pytest.mark.parametrize("name", list(_ordinary_images()))
def test_equals_legacy_load_image_on_ordinary_images(name):
    data = _ordinary_images()[name]
    out = decode_image(data, _cfg())
    assert out.dtype == np.uint8 and out.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(out, _legacy_load_image(data, SIZE))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_the_configured_background(mode):
    if mode == "P":  # palette entry 0 marked transparent
        data = _encode(Image.new("P", (20, 20), 0), transparency=0)
    else:
        data = _encode(Image.new(mode, (20, 20), (200,) * (len(mode) - 1) + (0,)))
    out = decode_image(data, _cfg(background=SKY))
    assert (out == SKY).all()


def test_exif_orientation_6_rotates_clockwise():
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, :24], pixels[:, 24:] = RED, BLUE  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: left goes to the top
    out = decode_image(_encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif), _cfg())
    top, bottom = out[: SIZE // 2 - 2].reshape(-1, 3).mean(0), out[SIZE // 2 + 2 :].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(top, RED, atol=12)
    np.testing.assert_allclose(bottom, BLUE, atol=12)


def test_cmyk_jpeg_becomes_rgb():
    data = _encode(Image.new("RGB", (24, 24), GREEN).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, _cfg())
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), GREEN, atol=6)


def test_16_bit_png_is_scaled_not_clipped():
    grey16 = np.full((20, 20), 128 * 257, np.uint16)
    grey16[:, 10:] = 40 * 257
    data = _encode(Image.fromarray(grey16))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, _cfg(image_size=20))
    assert (out[:, :10] == 128).all() and (out[:, 10:] == 40).all()


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animations_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (20, 20), colour) for colour in (RED, GREEN, BLUE)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data, _cfg())
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), RED, atol=2)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_files_are_truncated(fmt, keep):
    data = _encode(Image.fromarray(_noise(64, 64)), fmt)
    assert _skip_reason(decode_image, data[: int(len(data) * keep)], _cfg()) == "truncated"


def test_zero_bytes():
    assert _skip_reason(decode_image, b"", _cfg()) == "zero_byte"


def test_garbage_is_unreadable_with_the_error_in_the_detail():
    with pytest.raises(Skip) as caught:
        decode_image(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(), _cfg())
    assert caught.value.reason == "unreadable_image"
    assert "UnidentifiedImageError" in caught.value.detail


def test_more_pixels_than_max_pixels_is_a_bomb():
    data = _encode(Image.fromarray(_noise(64, 64)))
    assert _skip_reason(decode_image, data, _cfg(max_pixels=64 * 64 - 1)) == "decompression_bomb"
    assert decode_image(data, _cfg(max_pixels=64 * 64)).shape == (SIZE, SIZE, 3)


def test_pil_bomb_error_and_warning_are_bombs():
    # 900 M pixels: PIL raises DecompressionBombError while reading the header.
    assert _skip_reason(decode_image, _png_header(30_000, 30_000), _cfg()) == "decompression_bomb"
    # 100 M pixels with a lenient max_pixels: PIL only warns, which counts as a bomb too.
    assert _skip_reason(decode_image, _png_header(10_000, 10_000), _cfg(max_pixels=10**9)) == "decompression_bomb"


def test_shorter_side_below_min_size_is_too_small():
    data = _encode(Image.fromarray(_noise(40, 20)))
    assert _skip_reason(decode_image, data, _cfg(min_size=21)) == "too_small"
    assert decode_image(data, _cfg(min_size=20)).shape == (SIZE, SIZE, 3)


def test_shorter_side_between_min_size_and_image_size_is_upscaled():
    data = _encode(Image.fromarray(_noise(30, 20)))
    out = decode_image(data, _cfg(image_size=32, min_size=16))
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, _legacy_load_image(data, 32))


def test_extreme_aspect():
    assert _skip_reason(decode_image, _encode(Image.fromarray(_noise(100, 30))), _cfg()) == "extreme_aspect"
    assert _skip_reason(decode_image, _encode(Image.fromarray(_noise(30, 100))), _cfg()) == "extreme_aspect"
    assert decode_image(_encode(Image.fromarray(_noise(90, 30))), _cfg()).shape == (SIZE, SIZE, 3)


def test_never_raises_anything_but_skip_on_corrupted_bytes():
    rng = np.random.default_rng(0)
    originals = [_encode(Image.fromarray(_noise(40, 40)), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP")]
    for trial in range(80):
        data = np.frombuffer(originals[trial % len(originals)], np.uint8).copy()
        data[rng.integers(0, len(data), 4)] = rng.integers(0, 256, 4)  # four random bytes overwritten
        try:
            assert decode_image(data.tobytes(), _cfg()).shape == (SIZE, SIZE, 3)
        except Skip as skip:
            assert skip.reason in SKIP_REASONS


HEIC_HEADER = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)
JXL_CODESTREAM = b"\xff\x0a" + bytes(200)


@pytest.mark.parametrize("data,fmt,hint", [(HEIC_HEADER, "HEIF", "pillow-heif"), (JXL_CODESTREAM, "JXL", "jxl")])
def test_a_format_without_a_decoder_here_is_missing_codec_not_unreadable(data, fmt, hint):
    with pytest.raises(Skip) as caught:  # this Pillow has no HEIF or JPEG XL plugin
        decode_image(data, _cfg())
    assert caught.value.reason == "missing_codec"
    assert caught.value.detail.startswith(f"{fmt} image") and hint in caught.value.detail


def test_missing_codec_reads_the_signature_and_asks_pillow(monkeypatch):
    webp = _encode(Image.fromarray(_noise(40, 40)), "WEBP")
    assert decode.missing_codec(webp) is None  # the wheel's Pillow decodes WebP
    monkeypatch.setattr(decode.features, "check", lambda name: name != "webp")  # a Pillow built without libwebp
    assert decode.missing_codec(webp) == "WEBP"
    assert decode.missing_codec(_encode(Image.fromarray(_noise(40, 40)), "PNG")) is None


def test_memory_error_is_not_a_bad_file(monkeypatch):
    def out_of_memory(data, cfg):
        raise MemoryError

    monkeypatch.setattr(decode, "_decode", out_of_memory)
    with pytest.raises(MemoryError):
        decode_image(_encode(Image.fromarray(_noise(40, 40))), _cfg())


def test_skip_pickles_for_worker_processes():
    skip = pickle.loads(pickle.dumps(Skip("truncated", "12 bytes")))
    assert (skip.reason, skip.detail, str(skip)) == ("truncated", "12 bytes", "truncated: 12 bytes")
    with pytest.raises(AssertionError):
        Skip("no_such_reason")


def test_captions_one_per_non_blank_line_stripped_bom_dropped():
    raw = "\ufeff  a red car \r\n\n\t\na blue bus\n  \n".encode()
    assert decode_captions(raw) == ["a red car", "a blue bus"]
    assert decode_captions("café au lait".encode()) == ["café au lait"]


def test_caption_not_utf8_is_skipped_not_replaced():
    with pytest.raises(Skip) as caught:
        decode_captions("a café".encode("latin-1"))
    assert caught.value.reason == "caption_not_utf8"
    assert "0xe9" in caught.value.detail


@pytest.mark.parametrize("raw", [b"", b"\n \n\t", "\ufeff\n".encode()])
def test_empty_caption(raw):
    assert _skip_reason(decode_captions, raw) == "empty_caption"
