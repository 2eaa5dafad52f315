"""Real image–caption datasets for the data stage (Ramesh et al. 2021, §2.3: training uses text–image pairs).

Two layouts, chosen by ``data.source``:

- ``folder``: ``data.path`` is a directory, searched recursively, of images (.jpg/.jpeg/.png/.webp, any case),
  each with a same-stem ``.txt`` beside it holding one caption per line (blank lines ignored).
- ``manifest``: ``data.path`` is a CSV or Parquet file with columns ``image`` (relative to the manifest's
  directory, or absolute) and ``caption``. Rows naming the same image become one item with several captions.

Listing is cheap (paths and captions only), so splits are drawn before any pixel is decoded: items sorted by
path, permuted by the seed, then val, test and train are cut in that order (``n_*`` are maxima). Decoding is
lazy, threaded (PIL releases the GIL while decoding) and order-preserving. One bad file never stops a run:
it is skipped and counted by reason in ``Skipped``, which the caller reports with ``Skipped.warn``.

Each image becomes RGB, resized so its shorter side is ``image_size`` and centre-cropped to a square; no
randomness, so prepared data is reproducible. Truncated files must raise, so this module relies on PIL's
default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tqdm import tqdm

from dalle.config import DataConfig

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
MANIFEST_READERS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MANIFEST_COLUMNS = ("image", "caption")
REASONS = ("unreadable_image", "empty_caption", "missing_image", "missing_caption")
SPLITS = ("train", "val", "test")
WARN_EXAMPLES = 5
PREFETCH_PER_WORKER = 4  # decoded images in flight per thread: enough to hide latency, bounded memory


@dataclass
class Skipped:
    """Items left out, by reason: ``paths[reason]`` lists their image paths relative to the dataset root."""

    paths: dict[str, list[str]] = field(default_factory=lambda: {reason: [] for reason in REASONS})

    def add(self, reason: str, path: str) -> None:
        assert reason in REASONS, f"unknown skip reason {reason!r}"
        self.paths[reason].append(path)

    def update(self, other: Skipped) -> None:
        for reason in REASONS:
            self.paths[reason].extend(other.paths[reason])

    def counts(self) -> dict[str, int]:
        return {reason: len(self.paths[reason]) for reason in REASONS}

    def warn(self, source: str) -> None:
        """One warning naming ``source`` with each non-empty reason's count and first few paths."""
        lines = []
        for reason in REASONS:
            paths = self.paths[reason]
            if paths:
                more = f", ... ({len(paths) - WARN_EXAMPLES} more)" if len(paths) > WARN_EXAMPLES else ""
                lines.append(f"  {reason}: {len(paths)} ({', '.join(paths[:WARN_EXAMPLES])}{more})")
        if lines:
            total = sum(self.counts().values())
            warnings.warn(f"{source}: skipped {total} items\n" + "\n".join(lines), stacklevel=2)


@dataclass(frozen=True)
class Item:
    """One image and its captions; ``source`` is the image path relative to the dataset root (posix)."""

    image: Path
    captions: list[str]
    source: str


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode ``path`` to uint8 RGB ``(image_size, image_size, 3)``: shorter side resized, centre cropped.

    Raises whatever PIL raises on an unreadable or truncated file.
    """
    with Image.open(path) as img:
        # JPEG only: decode at a reduced DCT scale, keeping the shorter side >= 2x the target for quality.
        img.draft(None, (2 * image_size, 2 * image_size))
        img.load()  # decode now, so a truncated file raises here and not halfway through a resize
        ImageOps.exif_transpose(img, in_place=True)  # phone photos store rotation as a tag
        rgb = _to_rgb(img)
        width, height = rgb.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        # Resizing the centred square box equals "shorter side to image_size, then centre crop", with one
        # rounding instead of two; reducing_gap first shrinks by box averaging, which keeps large
        # downscales alias-free and fast.
        square = rgb.resize(
            (image_size, image_size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
            reducing_gap=3.0,
        )
        return np.asarray(square, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode.startswith("I"):
        # 16/32-bit greyscale (e.g. 16-bit PNG): Pillow's own conversion clips at 255 instead of scaling.
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # Plain conversion would expose whatever colour hides under transparent pixels (often black);
        # compositing on white matches how such images are viewed.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def list_items(cfg: DataConfig) -> tuple[list[Item], Skipped]:
    """All usable items under ``cfg.path`` sorted by source, and the ones skipped while listing."""
    if cfg.source not in ("folder", "manifest"):
        raise ValueError(f"data.source: ingestion reads 'folder' or 'manifest' datasets, got {cfg.source!r}")
    assert cfg.path is not None  # DataConfig requires a path for real sources
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"data.path: {path} does not exist (data.source is {cfg.source!r})")
    items, skipped = _list_folder(path) if cfg.source == "folder" else _list_manifest(path)
    return sorted(items, key=lambda item: item.source), skipped


def _list_folder(root: Path) -> tuple[list[Item], Skipped]:
    if not root.is_dir():
        raise ValueError(f"data.path: {root} is not a directory; data.source 'folder' expects one of images")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    items, skipped = [], Skipped()
    for image in images:
        source = image.relative_to(root).as_posix()
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            skipped.add("missing_caption", source)
            continue
        # utf-8-sig drops a BOM; a stray bad byte should cost one character, not the whole item.
        text = caption_file.read_text(encoding="utf-8-sig", errors="replace")
        captions = [line.strip() for line in text.splitlines() if line.strip()]
        if not captions:
            skipped.add("empty_caption", source)
            continue
        items.append(Item(image, captions, source))
    return items, skipped


def _list_manifest(manifest: Path) -> tuple[list[Item], Skipped]:
    reader = MANIFEST_READERS.get(manifest.suffix.lower())
    if reader is None:
        raise ValueError(f"data.path: {manifest}: a manifest must end in {', '.join(MANIFEST_READERS)}")
    try:
        if reader == "csv":
            # Everything as text, and an empty cell as "" rather than NaN: blank captions are plain strings.
            table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        else:
            table = pd.read_parquet(manifest)
    except (ValueError, OSError) as err:  # pandas' parser errors and pyarrow's ArrowInvalid are ValueErrors
        raise ValueError(f"data.path: cannot read manifest {manifest}: {err}") from err
    for column in MANIFEST_COLUMNS:
        if column not in table.columns:
            raise ValueError(
                f"data.path: manifest {manifest} has no column {column!r}; "
                f"expected {', '.join(MANIFEST_COLUMNS)}, found {', '.join(map(str, table.columns))}"
            )
    root = manifest.parent
    captions: dict[Path, list[str]] = {}  # insertion order = order of first appearance
    for image, caption in zip(table["image"].tolist(), table["caption"].tolist()):
        image_path = Path(os.path.normpath(root / _text(image)))  # "./a.jpg" and "a.jpg" are one image
        captions.setdefault(image_path, [])
        if _text(caption):
            captions[image_path].append(_text(caption))
    items, skipped = [], Skipped()
    for image_path, image_captions in captions.items():
        source = _relative(image_path, root)
        if not image_path.is_file():
            skipped.add("missing_image", source)
        elif not image_captions:  # counted per image: a blank row beside good ones is just dropped
            skipped.add("empty_caption", source)
        else:
            items.append(Item(image_path, image_captions, source))
    return items, skipped


def _text(value: Any) -> str:
    """A manifest cell as stripped text; Parquet gives None or NaN for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # absolute manifest entries outside the manifest's folder keep their full path
        return path.as_posix()


def split_items(items: list[Item], cfg: DataConfig, seed: int) -> dict[str, list[Item]]:
    """Deterministic split: sort by source, permute by ``seed``, cut val, then test, then train (maxima)."""
    ordered = sorted(items, key=lambda item: item.source)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    val_end = min(cfg.n_val, len(shuffled))
    test_end = min(val_end + cfg.n_test, len(shuffled))
    return {
        "train": shuffled[test_end : test_end + cfg.n_train],
        "val": shuffled[:val_end],
        "test": shuffled[val_end:test_end],
    }


def iter_split(items: list[Item], cfg: DataConfig, skipped: Skipped, split: str) -> Iterator[tuple[np.ndarray, dict]]:
    """Lazily decode ``items`` in order with ``cfg.workers`` threads; failures go to ``skipped``.

    Raises ValueError at the end if the split had items and every one of them failed to decode.
    """
    decoded = _decode_in_order([item.image for item in items], cfg.image_size, cfg.workers)
    kept = 0
    progress = tqdm(decoded, total=len(items), desc=f"decode {split}", unit="img")
    with contextlib.closing(decoded), progress:
        for image, item in zip(progress, items):
            if image is None:
                skipped.add("unreadable_image", item.source)
                continue
            kept += 1
            yield image, {"captions": list(item.captions), "source": item.source}
    if items and not kept:
        raise ValueError(
            f"data.path: {cfg.path}: all {len(items)} images of the {split!r} split failed to decode "
            f"(skipped so far: {skipped.counts()})"
        )


def _decode_in_order(paths: list[Path], image_size: int, workers: int) -> Iterator[np.ndarray | None]:
    """``load_image`` per path (None on failure), in order, with a bounded number of decodes in flight."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    pending: deque[Future] = deque()
    try:
        for path in paths:
            pending.append(pool.submit(_try_load, path, image_size))
            # Unlike pool.map, which submits everything at once, a window keeps a slow consumer from
            # holding a whole split of decoded images in memory.
            if len(pending) >= PREFETCH_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _try_load(path: Path, image_size: int) -> np.ndarray | None:
    try:
        return load_image(path, image_size)
    except Exception:  # PIL's plugins raise OSError, SyntaxError, ValueError, EOFError, ... on bad input
        return None


def iter_real(cfg: DataConfig, seed: int, skipped: Skipped) -> dict[str, Iterator[tuple[np.ndarray, dict]]]:
    """``{"train", "val", "test"}`` → lazy ``(image uint8 (S, S, 3), {"captions", "source"})`` iterators.

    Listing skips are added to ``skipped`` now, decoding skips as the iterators run. Raises ValueError when
    nothing usable is listed, or when ``n_val`` and ``n_test`` leave a split empty.
    """
    items, listing_skipped = list_items(cfg)
    skipped.update(listing_skipped)
    if not items:
        raise ValueError(f"data.path: {cfg.path}: no usable image–caption pairs (skipped {skipped.counts()})")
    splits = split_items(items, cfg, seed)
    for split in SPLITS:
        if not splits[split]:
            raise ValueError(
                f"data.path: {cfg.path}: only {len(items)} usable items, which leaves the {split!r} split "
                f"empty after data.n_val={cfg.n_val} and data.n_test={cfg.n_test}"
            )
    return {split: iter_split(splits[split], cfg, skipped, split) for split in SPLITS}
