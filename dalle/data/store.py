"""The prepared-data format: per split, WebDataset tar shards of encoded images plus an index.

A split directory holds::

    shard-00000.tar ...   WebDataset shards of ``KEY.png`` (or ``.jpg``/``.webp``, ``data.image_format``)
    records.parquet       row i describes image i: ``key``, ``captions`` (a list), ``source``; on shapes, labels
    members.npy           (N, 3) int64: shard number, byte offset and byte size of image i inside its shard
    index.json            the format, image size and format, and per shard its name, samples, bytes and sha256

Why tar and not Parquet row groups: the shards are exactly what WebDataset and img2dataset users already read and
write (``tar tf`` shows them, ``webdataset.WebDataset`` streams them), and a tar member is stored uncompressed at a
fixed offset, so ``members.npy`` gives random access to any image with one ``mmap`` slice: the trainers keep asking
for the images of batch ``step`` in any order, which keeps the batch a pure function of seed and step. Shards are
written deterministically (fixed member metadata, lossless PNG by default), so the same inputs give the same bytes.
The records live only in ``records.parquet`` (a per-sample ``KEY.json`` member would cost 1 KB of tar header and
padding per image, more than a 32 px PNG itself).

Reading: :class:`ImageShards` is an array-like ``(N, S, S, 3)`` uint8. A split whose decoded pixels fit in
``cache_bytes`` is decoded once into memory (small data stays as fast as a NumPy array); a larger one decodes the
images of each request from the memory-mapped shards. ``stats.json`` beside the splits is written last and marks the
directory complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SPLITS = ("train", "val", "test")
STATS_FILE = "stats.json"
INDEX_FILE = "index.json"
RECORDS_FILE = "records.parquet"
MEMBERS_FILE = "members.npy"
FORMAT = "dalle-prepared-shards/1"
SUFFIXES = {"png": "png", "jpeg": "jpg", "webp": "webp"}
DEFAULT_CACHE_BYTES = 4096 * 2**20


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """uint8 (S, S, 3) → file bytes; PNG is lossless and deterministic (fixed compression level, no metadata)."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image, "RGB")
    if image_format == "png":
        pil.save(buffer, format="PNG", compress_level=6)
    elif image_format == "jpeg":
        pil.save(buffer, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        pil.save(buffer, format="WEBP", quality=quality, method=4)
    return buffer.getvalue()


def decode_stored(data: bytes | memoryview) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


class TarWriter:
    """One tar shard with fixed member metadata, written under a temporary name and renamed when closed."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.members: list[tuple[int, int]] = []  # (data offset, size) of each member

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)  # fixed metadata: the same samples give the same bytes
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        header = info.tobuf(tarfile.USTAR_FORMAT)
        self.members.append((self._tar.offset + len(header), len(data)))  # addfile puts the data after the header
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> dict:
        """Finish and publish the shard; returns its ``bytes`` and ``sha256``."""
        self._tar.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        return {"bytes": self.path.stat().st_size, "sha256": file_sha256(self.path)}


class SplitWriter:
    """Assembles a split from finished tar shards: their records, member offsets and the index."""

    def __init__(self, directory: Path, image_size: int, image_format: str = "png"):
        self.directory = directory
        self.image_size, self.image_format = image_size, image_format
        self.members: list[tuple[int, int, int]] = []
        self.shards: list[dict] = []
        self._tables: list[pa.Table] = []  # records per shard, columnar: far smaller than dicts
        directory.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.members)

    def add_shard(self, path: Path, records: list[dict], members: list[tuple[int, int]], digest: dict) -> None:
        """Adopt a finished tar shard (moved into the split) with its records and member offsets."""
        name = f"shard-{len(self.shards):05d}.tar"
        os.replace(path, self.directory / name)
        self.shards.append({"name": name, "samples": len(records), **digest})
        self.members.extend((len(self.shards) - 1, offset, size) for offset, size in members)
        self._tables.append(pa.Table.from_pylist(records))

    def close(self) -> int:
        """Write the records, members and index; returns the sample count."""
        # A column that is null in one shard and text in another (e.g. a second object) is unified by promotion.
        records = pa.concat_tables(self._tables, promote_options="default") if self._tables else pa.table({})
        pq.write_table(records, self.directory / RECORDS_FILE)
        np.save(self.directory / MEMBERS_FILE, np.asarray(self.members, dtype=np.int64).reshape(-1, 3))
        index = {
            "format": FORMAT,
            "image_size": self.image_size,
            "image_format": self.image_format,
            "samples": len(self.members),
            "shards": self.shards,
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        return len(self.members)


def caption_lists(directory: Path, batch_size: int = 8192) -> Iterator[list[list[str]]]:
    """The ``captions`` column of a split's records, a batch of images at a time (the rest is never loaded)."""
    for batch in pq.ParquetFile(directory / RECORDS_FILE).iter_batches(batch_size, columns=["captions"]):
        yield batch.column(0).to_pylist()


def shard_intact(path: Path, entry: dict) -> bool:
    """Whether the file at ``path`` has the ``bytes`` and ``sha256`` recorded in ``entry``."""
    return path.is_file() and path.stat().st_size == entry["bytes"] and file_sha256(path) == entry["sha256"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ImageShards:
    """The images of one split as a read-only array-like ``(N, S, S, 3)`` uint8.

    Supports ``len``, ``shape``, integer / slice / index-array indexing and ``np.asarray``. Decodes everything once
    into memory when it fits in ``cache_bytes``; otherwise each access decodes just the requested images.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, directory: Path, index: dict, members: np.ndarray, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.directory, self.members = directory, members
        size = index["image_size"]
        self.shape = (len(members), size, size, 3)
        self.index_shards = index["shards"]
        self.shard_names = [shard["name"] for shard in index["shards"]]
        self.shard_lengths = tuple(shard["samples"] for shard in index["shards"])  # images per shard, in row order
        self._maps: dict[int, mmap.mmap] = {}
        self._cache: np.ndarray | None = None
        self._cacheable = int(np.prod(self.shape)) <= cache_bytes

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 4

    def _bytes(self, row: int) -> memoryview:
        shard, offset, size = (int(v) for v in self.members[row])
        if shard not in self._maps:
            with open(self.directory / self.shard_names[shard], "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._maps[shard])[offset : offset + size]

    def _decode_rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        for i, row in enumerate(rows):
            out[i] = decode_stored(self._bytes(int(row)))
        return out

    def _cached(self) -> np.ndarray | None:
        if self._cache is None and self._cacheable:
            rows = np.arange(len(self))
            chunks = [self._decode_rows(rows[i : i + 4096]) for i in range(0, len(rows), 4096)]
            self._cache = np.concatenate(chunks) if chunks else np.empty(self.shape, np.uint8)
            self._cache.setflags(write=False)
        return self._cache

    def __getitem__(self, index) -> np.ndarray:
        cache = self._cached()
        if cache is not None:
            return cache[index]
        if isinstance(index, tuple):  # e.g. images[rows, :, :, 0]: rows first, then the rest
            return self[index[0]][(slice(None), *index[1:])]
        if isinstance(index, slice):  # O(rows asked for), never O(N)
            return self._decode_rows(np.asarray(range(len(self))[index], dtype=np.int64))
        rows = np.asarray(index)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if rows.ndim == 0:
            return self[np.atleast_1d(rows)][0]
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return self._decode_rows(np.where(rows < 0, rows + len(self), rows))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self[start : start + 1024]


@dataclass(frozen=True)
class Split:
    images: ImageShards  # (N, S, S, 3) uint8, array-like
    records: pd.DataFrame  # N rows, column "captions" holds lists of strings

    def __len__(self) -> int:
        return len(self.records)


def load_split(root: str | Path, split: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Split:
    """Open a prepared split; fails clearly if the directory is missing or was never completed."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not (root / STATS_FILE).is_file():
        raise FileNotFoundError(f"{root} is not a complete prepared dataset (no {STATS_FILE}); run the prepare stage")
    return read_split(root / split, cache_bytes)


def read_split(directory: Path, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Split:
    """Open one split directory as written by :class:`SplitWriter` (no completeness check)."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        hint = "it holds the older images.npy format" if (directory / "images.npy").exists() else "not prepared"
        raise FileNotFoundError(f"{index_path} not found ({hint}); run the prepare stage")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}; rerun the prepare stage")
    members = np.load(directory / MEMBERS_FILE)
    records = pd.read_parquet(directory / RECORDS_FILE)
    assert len(members) == len(records) == index["samples"], f"{directory}: index, members and records disagree"
    return Split(images=ImageShards(directory, index, members, cache_bytes), records=records)


def verify_split(directory: Path) -> list[str]:
    """Names of the shards whose size or sha256 differs from the index (empty when the split is intact)."""
    index = json.loads((directory / INDEX_FILE).read_text())
    return [shard["name"] for shard in index["shards"] if not shard_intact(directory / shard["name"], shard)]
