"""The prepared-data format: per split a memory-mappable ``images.npy`` and a ``records.parquet`` manifest.

``images.npy`` is uint8 (N, S, S, 3) in NumPy's own format, so ``np.load(mmap_mode="r")`` reads any row without
loading the file: datasets far larger than memory train from it. Row i of ``records.parquet`` describes image
i: its captions (a list; training samples one per epoch) and, for the shapes source, its attribute labels.
``stats.json`` is written last and marks the directory complete.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

SPLITS = ("train", "val", "test")
STATS_FILE = "stats.json"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8, memory-mapped
    records: pd.DataFrame  # N rows, column "captions" holds lists of strings

    def __len__(self) -> int:
        return len(self.records)


def write_split(
    directory: Path, samples: Iterable[tuple[np.ndarray, dict]], capacity: int, image_size: int, desc: str
) -> int:
    """Stream (image, record) pairs into ``directory``; returns how many were written (<= capacity)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "images.npy"
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(capacity, image_size, image_size, 3))
    records = []
    for image, record in tqdm(samples, total=capacity, desc=desc, unit="img", leave=False):
        if len(records) == capacity:
            break
        images[len(records)] = image
        records.append(record)
    count = len(records)
    images.flush()
    del images
    if count < capacity:  # skipped inputs: rewrite at the exact length so N always matches the records
        kept = np.load(path, mmap_mode="r")[:count].copy()
        np.save(path, kept)
    pd.DataFrame.from_records(records).to_parquet(directory / "records.parquet", index=False)
    return count


def load_split(root: str | Path, split: str) -> Split:
    """Open a prepared split; fails clearly if the directory is missing or was never completed."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not (root / STATS_FILE).is_file():
        raise FileNotFoundError(f"{root} is not a complete prepared dataset (no {STATS_FILE}); run the prepare stage")
    return read_split(root / split)


def read_split(directory: Path) -> Split:
    """Open one split directory as written by :func:`write_split` (no completeness check)."""
    images = np.load(directory / "images.npy", mmap_mode="r")
    records = pd.read_parquet(directory / "records.parquet")
    assert len(images) == len(records), f"{directory}: {len(images)} images but {len(records)} records"
    return Split(images=images, records=records)
