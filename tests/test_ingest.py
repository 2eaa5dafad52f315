"""Real sources (folder, manifest, webdataset shards) listed, split by hash and ingested into prepared shards."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle.config import DataConfig, EvalConfig, Params, TokenizerConfig
from dalle.data.ingest import Skipped
from dalle.data.prepare import prepare_dataset
from dalle.data.sources import ListingSkip, iter_raw, shard_urls, split_of
from dalle.data.store import load_split, verify_split

SIZE = 16
GREEN = (30, 200, 30)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(seed: int, width: int = 24, height: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _config(path, source: str, **overrides) -> DataConfig:
    fields = dict(image_size=SIZE, min_size=SIZE, n_train=1000, n_val=1000, n_test=1000, workers=1)
    return DataConfig(source=source, path=str(path), **(fields | overrides))


def _params(cfg: DataConfig) -> Params:
    blur = EvalConfig(blur_radii=(0.0, 256 / cfg.image_size))  # a radius that is >= 0.5 px at any test size
    return Params(data=cfg, tokenizer=TokenizerConfig(vocab_size=300, text_len=16), eval=blur)


def _listed(cfg: DataConfig) -> tuple[list, list]:
    listed = list(iter_raw(cfg))
    return [s for s in listed if not isinstance(s, ListingSkip)], [s for s in listed if isinstance(s, ListingSkip)]


def _write_shard(path: Path, samples: list[dict], parquet: bool = True) -> None:
    """An img2dataset-style shard: KEY.jpg/png + KEY.txt + KEY.json per sample, a .parquet beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for suffix, data in sample["files"].items():
                info = tarfile.TarInfo(f"{sample['key']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if parquet:
        rows = [{"key": s["key"], "status": "success", "width": 24} for s in samples]
        pd.DataFrame(rows).to_parquet(path.with_suffix(".parquet"), index=False)


def _wds_samples(start: int, count: int, photos: int = 5) -> list[dict]:
    samples = []
    for i in range(start, start + count):
        meta = {"key": f"{i:09d}", "caption": f"json caption {i}", "photo": f"photo-{i % photos}"}
        files = {"png": _png(_noise(i)), "txt": f"text caption {i}\n".encode(), "json": json.dumps(meta).encode()}
        samples.append({"key": f"{i:09d}", "files": files})
    return samples


@pytest.fixture
def shards(tmp_path) -> Path:
    root = tmp_path / "shards"
    _write_shard(root / "00000.tar", _wds_samples(0, 30))
    samples = _wds_samples(30, 30)
    samples[0]["files"].pop("png")  # no image
    samples[1]["files"].pop("txt")  # no caption
    samples[2]["files"]["txt"] = b"\xff\xfe bad bytes"  # not UTF-8
    samples[3]["files"]["png"] = samples[3]["files"]["png"][:60]  # truncated
    _write_shard(root / "00001.tar", samples, parquet=False)
    return root


def test_split_of_is_a_pure_function_of_the_group_with_the_configured_fractions():
    cfg = DataConfig(source="folder", path="x", val_fraction=0.1, test_fraction=0.2)
    splits = [split_of(f"group-{i}", cfg) for i in range(5000)]
    assert splits == [split_of(f"group-{i}", cfg) for i in range(5000)]
    shares = {split: splits.count(split) / len(splits) for split in ("train", "val", "test")}
    assert shares["val"] == pytest.approx(0.1, abs=0.015) and shares["test"] == pytest.approx(0.2, abs=0.02)


def test_webdataset_paths_directory_glob_brace_and_file_url(shards):
    names = ["00000.tar", "00001.tar"]
    for path in (shards, f"{shards}/*.tar", f"{shards}/{{00000..00001}}.tar", f"file://{shards}"):
        urls = shard_urls(str(path))
        assert [u.rsplit("/", 1)[-1] for u in urls] == names, path
    with pytest.raises(FileNotFoundError, match="shard .*00002.tar does not exist"):
        shard_urls(f"{shards}/{{00000..00007}}.tar")
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        shard_urls(str(shards / "nothing-*.tar"))


def test_webdataset_listing_reads_captions_metadata_and_counts_listing_skips(shards):
    samples, skips = _listed(_config(shards, "webdataset"))
    assert [(s.reason, s.key) for s in skips] == [
        ("missing_image", "00001.tar/000000030"),
        ("missing_caption", "00001.tar/000000031"),
    ]
    first = samples[0]
    assert first.key == "00000.tar/000000000" and first.group == "000000000"
    assert first.captions == b"text caption 0\n"
    assert first.meta["photo"] == "photo-0" and first.meta["status"] == "success"  # JSON and parquet merged
    by_json, _ = _listed(_config(f"file://{shards}", "webdataset", caption_key="caption", group_key="photo"))
    assert by_json[0].captions == b"json caption 0" and by_json[0].group == "photo-0"
    assert len(by_json) == 59  # the sample without .txt has a JSON caption


def test_webdataset_prepare_end_to_end(shards, tmp_path):
    cfg = _config(shards, "webdataset", group_key="photo", val_fraction=0.2, test_fraction=0.2)
    with pytest.warns(UserWarning, match="caption_not_utf8"):
        stats = prepare_dataset(_params(cfg), tmp_path / "prepared")
    assert sum(stats["n_images"].values()) == 56
    assert stats["skipped"]["missing_image"] == stats["skipped"]["missing_caption"] == 1
    assert stats["skipped"]["caption_not_utf8"] == 1 and stats["skipped"]["truncated"] == 1
    photos = {}
    for split in ("train", "val", "test"):
        part = load_split(tmp_path / "prepared", split)
        assert part.images.shape == (len(part), SIZE, SIZE, 3)
        assert verify_split(tmp_path / "prepared" / split) == []
        for record in part.records.to_dict("records"):
            photo = json.loads(record["meta"])["photo"]
            photos.setdefault(photo, set()).add(split)
            assert record["captions"][0].startswith("text caption")
    assert all(len(splits) == 1 for splits in photos.values())  # crops of one photo share a split
    assert len(photos) == 5


def test_adding_shards_never_moves_a_sample_and_caps_only_drop(tmp_path):
    root = tmp_path / "shards"
    _write_shard(root / "00000.tar", _wds_samples(0, 40, photos=40))
    cfg = _config(root, "webdataset", val_fraction=0.25, test_fraction=0.25)
    prepare_dataset(_params(cfg), tmp_path / "a")
    _write_shard(root / "00001.tar", _wds_samples(40, 40, photos=40))
    prepare_dataset(_params(cfg), tmp_path / "b")
    capped = dataclasses.replace(cfg, n_train=5, n_val=3, n_test=3)
    stats = prepare_dataset(_params(capped), tmp_path / "c")

    def sources(root: Path) -> dict[str, list[str]]:
        return {split: list(load_split(root, split).records["source"]) for split in ("train", "val", "test")}

    before, after, small = sources(tmp_path / "a"), sources(tmp_path / "b"), sources(tmp_path / "c")
    for split in before:
        assert after[split][: len(before[split])] == before[split]  # old samples kept their split and order
        assert small[split] == after[split][: len(small[split])]  # a cap drops, never reassigns
    assert {split: len(small[split]) for split in small} == {"train": 5, "val": 3, "test": 3}
    # Good samples beyond a full split are counted until every split is full; then reading stops.
    assert 0 < stats["over_cap"]["train"] <= len(after["train"]) - 5


def test_folder_and_manifest_use_the_same_hash_split(tmp_path):
    folder, rows = tmp_path / "folder", []
    for i in range(30):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_noise(i)).save(folder / "sub" / f"{i:02d}.png")
        (folder / "sub" / f"{i:02d}.txt").write_text(f"caption {i}\n\n  second {i} \n")
        rows += [(f"sub/{i:02d}.png", f"caption {i}"), (f"./sub/{i:02d}.png", f"second {i}")]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(tmp_path / "manifest.csv", index=False)
    cfg = dict(val_fraction=0.2, test_fraction=0.2)
    prepare_dataset(_params(_config(folder, "folder", **cfg)), tmp_path / "f")
    (folder / "manifest.csv").write_bytes((tmp_path / "manifest.csv").read_bytes())
    prepare_dataset(_params(_config(folder / "manifest.csv", "manifest", workers=2, **cfg)), tmp_path / "m")
    for split in ("train", "val", "test"):
        f, m = load_split(tmp_path / "f", split), load_split(tmp_path / "m", split)
        assert list(m.records["source"]) == list(f.records["source"])
        assert [list(c) for c in f.records["captions"]] == [list(c) for c in m.records["captions"]]
        np.testing.assert_array_equal(np.asarray(f.images), np.asarray(m.images))
        expected = [split_of(s, DataConfig(source="folder", path="x", **cfg)) for s in f.records["source"]]
        assert set(expected) <= {split}


def test_manifest_listing_skips_and_metadata(tmp_path):
    Image.fromarray(_noise(0)).save(tmp_path / "a.png")
    Image.fromarray(_noise(1)).save(tmp_path / "b.png")
    table = pd.DataFrame(
        [("a.png", "first", "p1"), ("./a.png", "again", "p1"), ("b.png", " ", "p2"), ("gone.png", "x", "p3")],
        columns=["image", "caption", "photo"],
    )
    table.to_parquet(tmp_path / "m.parquet", index=False)
    samples, skips = _listed(_config(tmp_path / "m.parquet", "manifest", group_key="photo"))
    assert [(s.key, s.captions, s.group, s.meta) for s in samples] == [
        ("a.png", ("first", "again"), "p1", {"photo": "p1"})
    ]
    assert sorted((s.reason, s.key) for s in skips) == [("empty_caption", "b.png"), ("missing_image", "gone.png")]
    with pytest.raises(ValueError, match="data.group_key.*'album'"):
        _listed(_config(tmp_path / "m.parquet", "manifest", group_key="album"))


def test_bad_paths_and_manifests_raise_naming_them(tmp_path):
    for source, name in [("manifest", "nope.csv"), ("folder", "nope")]:
        with pytest.raises(FileNotFoundError, match=rf"data\.path.*{name}"):
            _listed(_config(tmp_path / name, source))
    pd.DataFrame({"image": ["a.png"], "text": ["a"]}).to_csv(tmp_path / "no_caption.csv", index=False)
    with pytest.raises(ValueError, match=r"no_caption\.csv.*'caption'"):
        _listed(_config(tmp_path / "no_caption.csv", "manifest"))
    (tmp_path / "list.txt").write_text("a.png,a\n")
    with pytest.raises(ValueError, match=r"list\.txt"):
        _listed(_config(tmp_path / "list.txt", "manifest"))


def test_a_split_left_empty_fails_and_names_the_fractions(tmp_path):
    for i in range(3):
        Image.fromarray(_noise(i)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a caption\n")
    with pytest.raises(ValueError, match=r"no usable images left for split.*data\.val_fraction=0\.05"):
        prepare_dataset(_params(_config(tmp_path, "folder")), tmp_path.parent / "out")


def test_warn_lists_counts_and_first_five_paths():
    skipped = Skipped()
    for i in range(7):
        skipped.add("missing_image", f"img{i}.png")
    skipped.add("empty_caption", "blank.png")
    with pytest.warns(UserWarning, match=r"data/set: skipped 8") as caught:
        skipped.warn("data/set")
    message = str(caught[0].message)
    assert "missing_image: 7 (img0.png" in message and "img4.png" in message and "img5.png" not in message
    assert "empty_caption: 1 (blank.png)" in message and "unreadable_image" not in message
