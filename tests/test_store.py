"""The prepared-shard format: round trips, random access with and without the in-memory cache, integrity."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from dalle.data.store import (
    INDEX_FILE,
    SplitWriter,
    TarWriter,
    decode_stored,
    encode_image,
    read_split,
    verify_split,
)


def _images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def split_dir(tmp_path):
    """23 images in shards of 10, written and adopted the way prepare's units are."""
    images = _images(23)
    writer = SplitWriter(tmp_path / "s", image_size=8)
    for start in range(0, len(images), 10):
        tar = TarWriter(tmp_path / f"unit-{start}.tar")
        records = []
        for i in range(start, min(start + 10, len(images))):
            tar.add(f"{i:09d}.png", encode_image(images[i]))
            records.append({"key": f"{i:09d}", "captions": [f"caption {i}"], "n": i})
        digest = tar.close()
        writer.add_shard(tar.path, records, tar.members, digest)
    assert writer.close() == 23
    return tmp_path / "s", images


def test_round_trip_shards_index_and_records(split_dir):
    directory, images = split_dir
    index = json.loads((directory / INDEX_FILE).read_text())
    assert [s["samples"] for s in index["shards"]] == [10, 10, 3] and index["samples"] == 23
    split = read_split(directory)
    assert split.images.shape == (23, 8, 8, 3) and len(split) == 23
    np.testing.assert_array_equal(np.asarray(split.images), images)
    assert list(split.records["n"]) == list(range(23)) and split.records["captions"][4].tolist() == ["caption 4"]
    assert verify_split(directory) == []


def test_uncached_random_access_equals_the_cache(split_dir):
    directory, images = split_dir
    streamed = read_split(directory, cache_bytes=0).images
    rows = np.array([0, 9, 10, 22, 3])
    np.testing.assert_array_equal(streamed[rows], images[rows])
    np.testing.assert_array_equal(streamed[11], images[11])
    np.testing.assert_array_equal(streamed[-1], images[-1])
    np.testing.assert_array_equal(streamed[5:15], images[5:15])
    np.testing.assert_array_equal(streamed[rows, :, :, 0], images[rows, :, :, 0])
    assert streamed._cache is None  # never decoded the whole split


def test_shards_are_plain_webdataset(split_dir):
    directory, images = split_dir
    samples = list(wds.WebDataset(str(directory / "shard-{00000..00002}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(23)]
    np.testing.assert_array_equal(decode_stored(samples[7]["png"]), images[7])


def test_verify_names_a_corrupted_shard(split_dir):
    directory, _ = split_dir
    shard = directory / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_split(directory) == ["shard-00001.tar"]
    with tarfile.open(directory / "shard-00000.tar") as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())  # deterministic member metadata


def test_lossy_formats_are_close_and_png_is_exact():
    ramp = np.linspace(0, 255, 32)
    image = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128.0), -1).astype(np.uint8)  # smooth
    assert (decode_stored(encode_image(image, "png")) == image).all()
    for image_format in ("jpeg", "webp"):
        decoded = decode_stored(encode_image(image, image_format, quality=95)).astype(int)
        assert 0 < np.abs(decoded - image).mean() < 3


def test_old_format_and_missing_index_fail_clearly(tmp_path):
    (tmp_path / "old").mkdir()
    np.save(tmp_path / "old" / "images.npy", _images(2))
    with pytest.raises(FileNotFoundError, match="older images.npy format.*prepare stage"):
        read_split(tmp_path / "old")
