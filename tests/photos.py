"""Real-photograph fixture datasets, built offline from the sample photos scikit-image's wheel ships.

Each item is a crop of one photograph (a zoom, a position, a flip or greyscale, a size) with a caption that
says all of that in words, so a small contrastive model has something real to learn. Crops of one photograph
share ``photo``, the group key that keeps them on one side of a split. The same items are written in the
three layouts the data stage reads:

- ``folder``: ``KEY.jpg`` + ``KEY.txt`` (+ ``KEY.json`` holding ``photo``), flat;
- ``manifest``: ``manifest.csv`` with columns ``image`` (relative), ``caption``, ``photo``, images in ``images/``;
- ``webdataset``: img2dataset's layout, ``00000.tar`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) with
  ``00000.parquet`` and ``00000_stats.json`` beside each shard.

With ``bad_files=True`` each layout also holds edge cases: good ones that must be kept (transparency, EXIF
rotation, CMYK, 16-bit, animations) and bad ones that ``dalle.data.decode`` must skip, counted per reason in
``EXPECTED_SKIPS[layout]``. Captions are read from the ``.txt`` files (or the CSV); the JSON ``caption`` of a
bad-caption item is null. The counts hold for any ``DataConfig`` with ``min_size`` in 7..48,
``max_aspect`` in 1.25..9 and ``max_pixels`` in 50_000..899_999_999 (the defaults qualify).

Run ``python -m tests.photos --out DIR --n 2000`` for bigger sets (benchmarks). Everything is a pure function
of ``(n, seed)``: the same bytes on every run.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import math
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

# name -> (file in skimage/data, description, in colour)
PHOTOS: dict[str, tuple[str, str, bool]] = {
    "astronaut": ("astronaut.png", "a smiling astronaut in an orange space suit", True),
    "brick": ("brick.png", "a grey brick wall", False),
    "camera": ("camera.png", "a man in a black coat behind a camera on a tripod", False),
    "chelsea": ("chelsea.png", "a tabby cat with green eyes", True),
    "coffee": ("coffee.png", "a cup of coffee on a red saucer", True),
    "coins": ("coins.png", "old silver coins on a dark table", False),
    "color": ("color.png", "a rainbow colour wheel on black", True),
    "grass": ("grass.png", "a close view of dry grass", False),
    "gravel": ("gravel.png", "a patch of grey gravel", False),
    "horse": ("horse.png", "a black horse silhouette on white", False),
    "hubble": ("hubble_deep_field.jpg", "galaxies scattered across a black sky", True),
    "ihc": ("ihc.png", "brown and blue stained tissue under a microscope", True),
    "moon": ("moon.png", "the grey cratered surface of the moon", False),
    "motorcycle": ("motorcycle_left.png", "a red motorcycle in a garage", True),
    "page": ("page.png", "a printed page of text", False),
    "retina": ("retina.jpg", "an orange retina with red blood vessels", True),
    "rocket": ("rocket.jpg", "a rocket on its launch pad at dusk", True),
    "text": ("text.png", "handwritten equations on paper", False),
}
ZOOMS = {"close-up": 0.4, "crop": 0.65, "wide view": 0.9}  # crop side as a fraction of the shorter side
POSITIONS = {
    "top left": (0.0, 0.0),
    "top": (0.5, 0.0),
    "top right": (1.0, 0.0),
    "left side": (0.0, 0.5),
    "centre": (0.5, 0.5),
    "right side": (1.0, 0.5),
    "bottom left": (0.0, 1.0),
    "bottom": (0.5, 1.0),
    "bottom right": (1.0, 1.0),
}
TRANSFORMS = {"": 0.4, "mirrored left to right": 0.2, "upside down": 0.2, "in black and white": 0.2}
SOURCE_SIDE = 512  # sources are shrunk to this longer side once: crops are at most 160 px
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 48, 160, 1.25
JPEG_QUALITY = 90

# Edge cases, each one defect at most: the good ones must decode, the bad ones raise Skip with this reason.
GOOD_EDGES = ("rgba", "palette-alpha", "exif-rotated", "cmyk", "grey16", "apng", "animated-webp")
BAD_EDGES = {
    "truncated": "truncated",
    "zero-byte": "zero_byte",
    "latin1-caption": "caption_not_utf8",
    "blank-caption": "empty_caption",
    "tiny": "too_small",
    "wide": "extreme_aspect",
    "bomb": "decompression_bomb",
    "heic": "missing_codec",
}
# Per layout: a CSV is one text file, so a non-UTF-8 caption would sink the whole manifest, not one row.
LAYOUT_BAD_EDGES = {
    "folder": {**BAD_EDGES, "no-caption": "missing_caption"},
    "manifest": {**{k: v for k, v in BAD_EDGES.items() if v != "caption_not_utf8"}, "no-image": "missing_image"},
    "webdataset": dict(BAD_EDGES),
}
EXPECTED_SKIPS: dict[str, dict[str, int]] = {
    layout: dict(Counter(edges.values())) for layout, edges in LAYOUT_BAD_EDGES.items()
}


@functools.cache
def _source(name: str) -> Image.Image:
    """The sample photo as RGB (transparency on white), longer side at most ``SOURCE_SIDE``."""
    import skimage  # a dev dependency: only the fixture needs it

    with Image.open(Path(skimage.__file__).parent / "data" / PHOTOS[name][0]) as img:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    img.thumbnail((SOURCE_SIDE, SOURCE_SIDE), Image.Resampling.LANCZOS)
    return img


def _crop(name: str, zoom: float, position: tuple[float, float], aspect: float, short_side: int) -> Image.Image:
    """A ``zoom`` x shorter-side box of photo ``name`` at ``position`` (fractions), resized to ``short_side``."""
    source = _source(name)
    width, height = source.size
    side = zoom * min(width, height)
    box_w, box_h = min(width, side * math.sqrt(aspect)), min(height, side / math.sqrt(aspect))
    left, top = position[0] * (width - box_w), position[1] * (height - box_h)
    scale = short_side / min(box_w, box_h)
    size = (min(MAX_SIDE, round(box_w * scale)), min(MAX_SIDE, round(box_h * scale)))
    box = (left, top, left + box_w, top + box_h)
    return source.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)


def photo_items(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct captioned crops, photographs in turn (a seeded order), the rest drawn from ``seed``.

    Each item: ``key`` ("photo-00012"), ``photo`` (group key), ``image`` (PIL RGB, 48..160 px sides, aspect
    at most 1.25) and ``caption``.
    """
    rng = np.random.default_rng(seed)
    names = [list(PHOTOS)[i] for i in rng.permutation(len(PHOTOS))]
    items: list[dict] = []
    seen: set[bytes] = set()
    while len(items) < n:
        name = names[len(items) % len(names)]
        description, colour = PHOTOS[name][1:]
        aspect = float(np.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT))))
        short_side = int(rng.integers(MIN_SIDE, round(MAX_SIDE / MAX_ASPECT) + 1))
        zoom_name = rng.choice([*ZOOMS, "whole"], p=[0.3, 0.3, 0.25, 0.15])
        if zoom_name == "whole":
            image, words = _crop(name, 1.0, (0.5, 0.5), aspect, short_side), ["the whole photo"]
        else:
            position_name = rng.choice(list(POSITIONS))
            jitter = rng.uniform(-0.08, 0.08, 2)  # never two identical boxes
            position = tuple(np.clip(np.add(POSITIONS[position_name], jitter), 0.0, 1.0))
            image = _crop(name, ZOOMS[zoom_name], position, aspect, short_side)
            words = [f"{zoom_name} of the {position_name}"]
        transform = rng.choice(list(TRANSFORMS), p=list(TRANSFORMS.values()))
        if transform == "mirrored left to right":
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif transform == "upside down":
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        elif transform == "in black and white" and colour:
            image = image.convert("L").convert("RGB")
        if transform and (colour or transform != "in black and white"):
            words.append(transform)
        fingerprint = hashlib.sha256(repr(image.size).encode() + image.tobytes()).digest()
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        key = f"photo-{len(items):05d}"
        items.append({"key": key, "photo": name, "image": image, "caption": ", ".join([description, *words])})
    return items


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    return _encode(image, "JPEG", quality=JPEG_QUALITY)


@functools.cache
def _bomb_png(side: int = 30_000) -> bytes:
    """A real 1-bit ``side`` x ``side`` black PNG (900 M pixels for 30 000): ~110 kB on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    rows = (b"\x00" * (1 + math.ceil(side / 8))) * 1000  # filter byte + packed bits, per row
    body = b"".join(compressor.compress(rows) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def edge_items() -> list[dict]:
    """Edge-case items (keys ``edge-*`` kept, ``bad-*`` skipped), already encoded: ``data`` bytes and ``ext``.

    Each has ``expect`` (its skip reason, None for good ones), ``photo``, the header's ``width`` and ``height``,
    and ``caption``: text, raw bytes for the caption file, or None for no caption file (``data`` None: no image).
    """
    crop = functools.partial(_crop, zoom=0.6, position=(0.5, 0.5), aspect=1.0, short_side=64)
    items = []

    def add(name, expect, photo, data, ext, size, caption: str | bytes | None = "") -> None:
        caption = f"{PHOTOS[photo][1]}, crop of the centre" if caption == "" else caption
        key = f"{'bad' if expect else 'edge'}-{name}"
        items.append(
            {"key": key, "photo": photo, "data": data, "ext": ext, "expect": expect, "caption": caption}
            | {"width": size[0], "height": size[1]}
        )

    rgba = np.asarray(crop("astronaut").convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1], dtype=np.uint8)  # fades in from the left
    add("rgba", None, "astronaut", _encode(Image.fromarray(rgba, "RGBA"), "PNG"), "png", (64, 64))
    palette = crop("coffee").quantize(64)
    add("palette-alpha", None, "coffee", _encode(palette, "PNG", transparency=0), "png", (64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    cat = _crop("chelsea", 0.6, (0.5, 0.5), MAX_ASPECT, 64)
    add("exif-rotated", None, "chelsea", _encode(cat, "JPEG", quality=JPEG_QUALITY, exif=exif), "jpg", cat.size)
    cmyk = crop("motorcycle").convert("CMYK")
    add("cmyk", None, "motorcycle", _encode(cmyk, "JPEG", quality=JPEG_QUALITY), "jpg", (64, 64))
    grey16 = np.asarray(crop("moon").convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    add("grey16", None, "moon", _encode(Image.fromarray(grey16), "PNG"), "png", (64, 64))
    frames = [_crop("rocket", 0.6, (x, 0.5), 1.0, 64) for x in (0.3, 0.5, 0.7)]
    apng = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("apng", None, "rocket", apng, "png", (64, 64))
    frames = [_crop("astronaut", 0.5, (0.5, y), 1.0, 64) for y in (0.2, 0.4, 0.6)]
    webp = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, quality=90)
    add("animated-webp", None, "astronaut", webp, "webp", (64, 64))

    cat = _jpeg(crop("chelsea"))
    add("truncated", "truncated", "chelsea", cat[: len(cat) // 2], "jpg", (64, 64))
    add("zero-byte", "zero_byte", "coins", b"", "jpg", (0, 0))
    latin1 = f"{PHOTOS['coffee'][1]} in a caf\xe9\n".encode("latin-1")
    add("latin1-caption", "caption_not_utf8", "coffee", _jpeg(crop("coffee")), "jpg", (64, 64), latin1)
    add("blank-caption", "empty_caption", "moon", _jpeg(crop("moon")), "jpg", (64, 64), b" \n\t\n")
    add("tiny", "too_small", "coins", _jpeg(_crop("coins", 0.6, (0.5, 0.5), 1.0, 6)), "jpg", (6, 6))
    strip = crop("hubble").resize((640, 64))
    add("wide", "extreme_aspect", "hubble", _jpeg(strip), "jpg", strip.size)
    add("bomb", "decompression_bomb", "moon", _bomb_png(), "png", (30_000, 30_000))
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # an iPhone photo's signature
    add("heic", "missing_codec", "coffee", heic, "heic", (64, 64))
    add("no-caption", "missing_caption", "grass", _jpeg(crop("grass")), "jpg", (64, 64), None)
    add("no-image", "missing_image", "gravel", None, "jpg", (0, 0))
    return items


def _image_file(item: dict) -> tuple[str, bytes | None]:
    """``(extension, bytes)`` of an item; photo items are JPEG-encoded unless already encoded."""
    if "data" in item:
        return item["ext"], item["data"]
    return "jpg", _jpeg(item["image"])


def _caption_file(item: dict) -> bytes | None:
    caption = item["caption"]
    return caption.encode() + b"\n" if isinstance(caption, str) else caption


def _metadata(item: dict, image: bytes | None) -> dict:
    """img2dataset's per-sample JSON, plus ``photo``."""
    width, height = item["image"].size if "image" in item else (item["width"], item["height"])
    return {
        "key": item["key"],
        "caption": item["caption"] if isinstance(item["caption"], str) else None,
        "photo": item["photo"],
        "url": f"https://example.invalid/{item['photo']}/{item['key']}",
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "sha256": None if image is None else hashlib.sha256(image).hexdigest(),
    }


def write_folder(root: Path, items: list[dict]) -> Path:
    """``root/KEY.ext`` + ``KEY.txt`` + ``KEY.json`` per item; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for item in items:
        ext, image = _image_file(item)
        caption = _caption_file(item)
        if image is not None:
            (root / f"{item['key']}.{ext}").write_bytes(image)
        if caption is not None:
            (root / f"{item['key']}.txt").write_bytes(caption)
        (root / f"{item['key']}.json").write_text(json.dumps(_metadata(item, image), indent=1))
    return root


def write_manifest(root: Path, items: list[dict]) -> Path:
    """``root/manifest.csv`` (image, caption, photo) and ``root/images/KEY.ext``; returns the CSV's path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption", "photo"])
        for item in items:
            ext, image = _image_file(item)
            caption = _caption_file(item)
            relative = f"images/{item['key']}.{ext}"
            if image is not None:
                (root / relative).write_bytes(image)
            # A CSV is one text file: a non-UTF-8 caption raises here (LAYOUT_BAD_EDGES leaves it out).
            writer.writerow([relative, "" if caption is None else caption.decode().strip(), item["photo"]])
    return manifest


def write_shards(root: Path, items: list[dict], per_shard: int = 64) -> Path:
    """img2dataset layout: ``root/00000.tar`` (KEY.ext, KEY.txt, KEY.json) + ``.parquet`` + ``_stats.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(items), per_shard)):
        rows = []
        with tarfile.open(root / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for item in items[start : start + per_shard]:
                ext, image = _image_file(item)
                metadata = _metadata(item, image)
                members = {ext: image, "txt": _caption_file(item), "json": json.dumps(metadata).encode()}
                for suffix, data in members.items():
                    if data is not None:
                        _add_member(tar, f"{item['key']}.{suffix}", data)
                rows.append(metadata)
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet")
        stats = {
            "count": len(rows),
            "successes": len(rows),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": 0.0,
            "start_time": 0.0,
            "end_time": 0.0,
            "status_dict": {"success": len(rows)},
        }
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return root


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed mtime, owner and mode: the same bytes on every run
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _interleave(items: list[dict], extras: list[dict]) -> list[dict]:
    """``extras`` spread evenly through ``items``, so edge cases land in several shards."""
    merged = list(items)
    for i, extra in enumerate(extras):
        merged.insert(round((i + 1) * len(merged) / (len(extras) + 1)), extra)
    return merged


def build_photo_datasets(
    root: Path, n: int = 240, seed: int = 0, bad_files: bool = True, per_shard: int = 64, progress: bool = False
) -> dict[str, Path]:
    """The same ``n`` photo items (plus edge cases when ``bad_files``) in all three layouts under ``root``.

    Returns ``{"folder": root/"folder", "manifest": root/"manifest"/"manifest.csv", "webdataset": root/"shards"}``.
    """
    root = Path(root)
    items = photo_items(n, seed)
    for item in tqdm(items, desc="encode", unit="img", disable=not progress):
        item["ext"], item["data"] = "jpg", _jpeg(item["image"])  # once, for all three layouts
    edges = {layout: [] for layout in LAYOUT_BAD_EDGES}
    if bad_files:
        every = edge_items()
        for layout, bad in LAYOUT_BAD_EDGES.items():
            edges[layout] = [e for e in every if e["expect"] is None or e["key"].removeprefix("bad-") in bad]
    steps = tqdm(total=3, desc="write", unit="layout", disable=not progress)
    with steps:
        paths = {"folder": write_folder(root / "folder", _interleave(items, edges["folder"]))}
        steps.update()
        paths["manifest"] = write_manifest(root / "manifest", _interleave(items, edges["manifest"]))
        steps.update()
        paths["webdataset"] = write_shards(root / "shards", _interleave(items, edges["webdataset"]), per_shard)
        steps.update()
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write folder/, manifest/, shards/ into")
    parser.add_argument("--n", type=int, default=2000, help="photo items per layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per .tar shard")
    parser.add_argument("--no-bad-files", action="store_true", help="leave out the edge cases")
    args = parser.parse_args()
    paths = build_photo_datasets(
        args.out, args.n, args.seed, bad_files=not args.no_bad_files, per_shard=args.per_shard, progress=True
    )
    for layout, path in paths.items():
        print(f"{layout}: {path}")


if __name__ == "__main__":
    main()
