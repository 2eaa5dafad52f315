"""The real-photograph fixture (``tests/photos.py``): deterministic, distinct, readable in all three layouts, and
every edge case decodes or is skipped exactly as ``EXPECTED_SKIPS`` says."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset
from photos import BAD_EDGES, EXPECTED_SKIPS, GOOD_EDGES, LAYOUT_BAD_EDGES, PHOTOS, build_photo_datasets, main
from photos import photo_items as make_photo_items

from dalle.config import DataConfig
from dalle.data.decode import SKIP_REASONS, Skip, decode_captions, decode_image

N = 240
IMAGE_EXTS = ("jpg", "png", "webp", "heic")
CFG = DataConfig(image_size=32)  # the defaults: min_size 32, max_aspect 3, max_pixels ~89 M
LISTING_REASONS = ("missing_caption", "missing_image")  # found by a reader before anything is decoded


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    return build_photo_datasets(tmp_path_factory.mktemp("photos"), n=N, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _outcome(image: bytes | None, caption: bytes | None) -> str:
    """``"kept"`` or the skip reason, checking what a reader would: presence, then caption, then pixels."""
    if image is None:
        return "missing_image"
    if caption is None:
        return "missing_caption"
    try:
        decode_captions(caption)
        decode_image(image, CFG)
    except Skip as skip:
        return skip.reason
    return "kept"


def _check_outcomes(layout: str, outcomes: dict[str, str]) -> None:
    """Photo items all kept, good edges kept, bad edges skipped with their reason; totals = EXPECTED_SKIPS."""
    expected = {f"photo-{i:05d}": "kept" for i in range(N)}
    expected |= {f"edge-{name}": "kept" for name in GOOD_EDGES}
    expected |= {f"bad-{name}": reason for name, reason in LAYOUT_BAD_EDGES[layout].items()}
    assert outcomes == expected
    assert dict(Counter(r for r in outcomes.values() if r != "kept")) == EXPECTED_SKIPS[layout]


def test_expected_skips_use_decode_reasons():
    for counts in EXPECTED_SKIPS.values():
        assert set(counts) <= set(SKIP_REASONS) | set(LISTING_REASONS)
    assert set(EXPECTED_SKIPS["webdataset"]) == set(BAD_EDGES.values())


def test_builder_is_deterministic(tmp_path):
    first = _files(Path(build_photo_datasets(tmp_path / "a", n=40, seed=3)["folder"]).parent)
    again = _files(Path(build_photo_datasets(tmp_path / "b", n=40, seed=3)["folder"]).parent)
    other = _files(Path(build_photo_datasets(tmp_path / "c", n=40, seed=4, bad_files=False)["folder"]).parent)
    assert first.keys() == again.keys() and all(first[name] == again[name] for name in first)
    assert first["folder/photo-00000.jpg"] != other["folder/photo-00000.jpg"]


def test_photo_items_are_distinct_captioned_crops():
    items = make_photo_items(N, seed=0)
    assert [item["key"] for item in items] == [f"photo-{i:05d}" for i in range(N)]
    pixels = {np.asarray(item["image"]).tobytes() + repr(item["image"].size).encode() for item in items}
    assert len(pixels) == N
    assert {item["photo"] for item in items} == set(PHOTOS)
    captions = Counter(item["caption"] for item in items)
    assert len(captions) > N // 2, "captions should mostly tell crops apart"
    for item in items:
        image = item["image"]
        assert image.mode == "RGB" and 48 <= min(image.size) and max(image.size) <= 160
        assert max(image.size) / min(image.size) <= 1.26
        assert item["caption"].startswith(PHOTOS[item["photo"]][1])


def test_folder_layout(datasets):
    root = datasets["folder"]
    outcomes = {}
    for path in sorted(root.iterdir()):
        if path.suffix[1:] in IMAGE_EXTS:
            caption = path.with_suffix(".txt")
            outcomes[path.stem] = _outcome(path.read_bytes(), caption.read_bytes() if caption.exists() else None)
            assert json.loads(path.with_suffix(".json").read_text())["key"] == path.stem
    _check_outcomes("folder", outcomes)


def test_manifest_layout(datasets):
    manifest = datasets["manifest"]
    with manifest.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["image", "caption", "photo"]
    outcomes = {}
    for row in rows:
        image = manifest.parent / row["image"]
        data = image.read_bytes() if image.exists() else None
        outcomes[Path(row["image"]).stem] = _outcome(data, row["caption"].encode())
    _check_outcomes("manifest", outcomes)


def test_webdataset_layout(datasets):
    root = datasets["webdataset"]
    tars = sorted(root.glob("*.tar"))
    assert [path.name for path in tars] == [f"{i:05d}.tar" for i in range(len(tars))] and len(tars) > 1
    urls = str(root) + f"/{{00000..{len(tars) - 1:05d}}}.tar"
    outcomes = {}
    for sample in webdataset.WebDataset(urls, shardshuffle=False):  # no decoding: raw bytes per extension
        (ext,) = [ext for ext in IMAGE_EXTS if ext in sample]
        assert "json" in sample and "txt" in sample
        metadata = json.loads(sample["json"])
        assert metadata["key"] == sample["__key__"] and metadata["status"] == "success"
        assert {"caption", "photo", "url", "width", "height"} <= set(metadata)
        outcomes[sample["__key__"]] = _outcome(sample[ext], sample["txt"])
    _check_outcomes("webdataset", outcomes)
    for tar in tars:  # img2dataset's companions: one parquet and one stats file per shard
        table = pq.read_table(tar.with_suffix(".parquet"))
        stats = json.loads((root / f"{tar.stem}_stats.json").read_text())
        assert stats["successes"] == stats["count"] == table.num_rows
        assert {"key", "caption", "photo", "url", "status", "width", "height"} <= set(table.column_names)


def test_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["photos", "--out", str(tmp_path), "--n", "20", "--per-shard", "8"])
    main()
    assert len(list((tmp_path / "folder").glob("photo-*.jpg"))) == 20
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 5  # 20 photos + 14 edge cases, 8 per shard
