"""Real image–caption sources for the data stage (Ramesh et al. 2021, §2.3: training uses text–image pairs).

Three layouts, chosen by ``data.source``; each is listed lazily as :class:`RawSample` s, nothing decoded yet:

- ``folder``: ``data.path`` is a directory, searched recursively, of images (``IMAGE_SUFFIXES``, any case: JPEG,
  PNG, WebP, AVIF, HEIC/HEIF, JPEG XL, JPEG 2000, TIFF, BMP, GIF), each with a same-stem ``.txt`` beside it
  holding one caption per line, and optionally a same-stem ``.json`` of metadata. Sorted by path.
- ``manifest``: ``data.path`` is a CSV or Parquet file with columns ``image`` (relative to the manifest's
  directory, or absolute) and ``caption``; further columns are metadata. Rows naming the same image become one
  sample with several captions. Sorted by path.
- ``webdataset``: ``data.path`` is a directory of ``.tar`` shards, a glob, a brace pattern
  (``shards/{00000..00099}.tar``) or one shard, local or any fsspec URL (``s3://``, ``gs://``, ``file://``). A
  sample is the files sharing a key (img2dataset's ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``), read with the
  webdataset library's tar iterators over fsspec streams. The caption is ``KEY.txt``, or the JSON field
  ``data.caption_key``; the JSON and the row of the shard's ``.parquet`` (when present) are kept as metadata.

Splits are a pure function of each sample's *group*: the SHA-256 of the group (the field ``data.group_key`` of
its metadata, else its key or path) mapped to [0, 1) and cut at ``val_fraction`` and ``val_fraction +
test_fraction``. Adding data never moves a sample to another split, and crops of one photograph that share a
group never straddle train and test. The ``n_*`` caps only drop samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import fsspec
import pandas as pd

from dalle.config import DataConfig

# Photo formats are all listed, also those this Pillow may not decode (HEIC without pillow-heif): such a file is
# counted as a missing_codec skip with the way to a decoder, not silently left out of the listing.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".tif", ".tiff", ".bmp")
IMAGE_SUFFIXES += (".gif",)
MANIFEST_READERS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MANIFEST_COLUMNS = ("image", "caption")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RawSample:
    """One listed sample: ``image`` is a local path or the encoded bytes; ``captions`` the raw ``.txt`` bytes
    (decoded by the worker, so a bad encoding is counted) or already-parsed captions."""

    key: str
    group: str
    image: str | bytes
    captions: bytes | tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)


class ListingSkip(Exception):
    """A sample that cannot even be listed (no image, no caption, no group); ``reason`` names why."""

    def __init__(self, reason: str, key: str):
        super().__init__(f"{reason}: {key}")
        self.reason, self.key = reason, key


def split_of(group: str, cfg: DataConfig) -> str:
    """The split of a group: its SHA-256 as a fraction in [0, 1), cut at the val and test fractions."""
    fraction = int.from_bytes(hashlib.sha256(group.encode("utf-8")).digest()[:8], "big") / 2**64
    if fraction < cfg.val_fraction:
        return "val"
    if fraction < cfg.val_fraction + cfg.test_fraction:
        return "test"
    return "train"


def iter_raw(cfg: DataConfig) -> Iterator[RawSample | ListingSkip]:
    """Every sample of ``cfg.path`` in source order; a sample that cannot be listed comes as a ListingSkip."""
    if cfg.source not in ("folder", "manifest", "webdataset"):
        raise ValueError(f"data.source: real sources are folder, manifest or webdataset, got {cfg.source!r}")
    assert cfg.path is not None  # DataConfig requires a path for real sources
    if cfg.source == "webdataset":
        return iter_webdataset(cfg, shard_urls(cfg.path))
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"data.path: {path} does not exist (data.source is {cfg.source!r})")
    return _iter_folder(path, cfg) if cfg.source == "folder" else _iter_manifest(path, cfg)


def _group(meta: dict, key: str, cfg: DataConfig) -> str:
    if cfg.group_key is None:
        return key
    value = meta.get(cfg.group_key)
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        raise ListingSkip("missing_group", key)
    return str(value)


def _iter_folder(root: Path, cfg: DataConfig) -> Iterator[RawSample | ListingSkip]:
    if not root.is_dir():
        raise ValueError(f"data.path: {root} is not a directory; data.source 'folder' expects one of images")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for image in images:
        key = image.relative_to(root).as_posix()
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            yield ListingSkip("missing_caption", key)
            continue
        meta_file = image.with_suffix(".json")
        try:
            meta = json.loads(meta_file.read_bytes()) if meta_file.is_file() else {}
            group = _group(meta if isinstance(meta, dict) else {}, key, cfg)
        except json.JSONDecodeError:
            yield ListingSkip("bad_metadata", key)
            continue
        except ListingSkip as skip:
            yield skip
            continue
        yield RawSample(key, group, str(image), caption_file.read_bytes(), meta)


def _iter_manifest(manifest: Path, cfg: DataConfig) -> Iterator[RawSample | ListingSkip]:
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
    if cfg.group_key is not None and cfg.group_key not in table.columns:
        raise ValueError(f"data.group_key: manifest {manifest} has no column {cfg.group_key!r}")
    root = manifest.parent
    rows: dict[Path, tuple[list[str], dict]] = {}  # image -> (captions, metadata of its first row)
    extra = [c for c in table.columns if c not in MANIFEST_COLUMNS]
    for row in table.to_dict("records"):
        image_path = Path(os.path.normpath(root / _text(row["image"])))  # "./a.jpg" and "a.jpg" are one image
        captions, _ = rows.setdefault(image_path, ([], {c: _plain(row[c]) for c in extra}))
        if _text(row["caption"]):
            captions.append(_text(row["caption"]))
    for image_path in sorted(rows):
        captions, meta = rows[image_path]
        key = _relative(image_path, root)
        if not image_path.is_file():
            yield ListingSkip("missing_image", key)
        elif not captions:  # counted per image: a blank row beside good ones is just dropped
            yield ListingSkip("empty_caption", key)
        else:
            try:
                yield RawSample(key, _group(meta, key, cfg), str(image_path), tuple(captions), meta)
            except ListingSkip as skip:
                yield skip


def _text(value: Any) -> str:
    """A manifest cell as stripped text; Parquet gives None or NaN for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _plain(value: Any) -> Any:
    """A metadata value JSON can hold (NumPy scalars from Parquet become Python ones)."""
    return value.item() if hasattr(value, "item") else value


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # absolute manifest entries outside the manifest's folder keep their full path
        return path.as_posix()


def shard_urls(path: str) -> list[str]:
    """The shards a ``data.path`` names: a directory's ``*.tar``, a glob, a brace pattern or one shard."""
    urls = []
    for pattern in braceexpand.braceexpand(path):
        fs, root = fsspec.core.url_to_fs(pattern)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        unstrip = (lambda p: p) if protocol in ("file", "local") else (lambda p, scheme=protocol: f"{scheme}://{p}")

        if any(ch in pattern for ch in "*?["):
            urls.extend(unstrip(p) for p in sorted(fs.glob(root)) if p.endswith(".tar"))
        elif fs.isdir(root):
            urls.extend(unstrip(p) for p in sorted(fs.glob(root.rstrip("/") + "/*.tar")))
        elif fs.exists(root):
            urls.append(unstrip(root))
        else:
            raise FileNotFoundError(f"data.path: shard {pattern} does not exist (data.source is 'webdataset')")
    if not urls:
        raise FileNotFoundError(f"data.path: {path} names no .tar shards (data.source is 'webdataset')")
    return urls


def _opened(urls: list[str]) -> Iterator[dict]:
    """fsspec streams in the form webdataset's tar expander takes, closed after each shard."""
    for url in urls:
        with fsspec.open(url, "rb") as stream:
            yield {"url": url, "stream": stream}


def _shard_table(url: str) -> dict[str, dict]:
    """img2dataset's ``.parquet`` beside a shard, by key (empty when there is none)."""
    parquet = url[: -len(".tar")] + ".parquet"
    fs, path = fsspec.core.url_to_fs(parquet)
    if not fs.exists(path):
        return {}
    with fsspec.open(parquet, "rb") as f:
        table = pd.read_parquet(f)
    if "key" not in table.columns:
        return {}
    return {str(row["key"]): {k: _plain(v) for k, v in row.items()} for row in table.to_dict("records")}


def iter_webdataset(cfg: DataConfig, urls: list[str]) -> Iterator[RawSample | ListingSkip]:
    """The samples of the shards ``urls``, in order."""
    # Imported here: the webdataset package imports torch (~1 s, ~250 MB), which folder and manifest workers skip.
    from webdataset.tariterators import group_by_keys, tar_file_expander

    tables: dict[str, dict[str, dict]] = {}
    for sample in group_by_keys(tar_file_expander(_opened(urls))):
        url, key = sample["__url__"], sample["__key__"]
        name = f"{url.rsplit('/', 1)[-1]}/{key}"  # shard file and key: what a user finds with `tar tf`
        if url not in tables:
            tables = {url: _shard_table(url)}  # one shard's table at a time
        image = next((sample[s[1:]] for s in IMAGE_SUFFIXES if s[1:] in sample), None)
        if image is None:
            yield ListingSkip("missing_image", name)
            continue
        meta = dict(tables[url].get(key.rsplit("/", 1)[-1], {}))
        if "json" in sample:
            try:
                loaded = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield ListingSkip("bad_metadata", name)
                continue
            meta.update(loaded if isinstance(loaded, dict) else {})
        if cfg.caption_key is not None:
            caption = meta.get(cfg.caption_key)
            if not isinstance(caption, str):
                yield ListingSkip("missing_caption", name)
                continue
            captions: bytes | tuple[str, ...] = caption.encode("utf-8")
        elif "txt" in sample:
            captions = sample["txt"]
        else:
            yield ListingSkip("missing_caption", name)
            continue
        try:
            yield RawSample(name, _group(meta, key, cfg), image, captions, meta)
        except ListingSkip as skip:
            yield skip
