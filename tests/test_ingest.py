"""Ingestion of real image–caption datasets: tiny folders and manifests built with PIL in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle.config import DataConfig
from dalle.data.ingest import REASONS, Skipped, iter_real, list_items, load_image, split_items

SIZE = 16
GREEN = (30, 200, 30)


def _save(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _thirds(width: int, height: int) -> Image.Image:
    """Red, green, blue thirds along the longer side."""
    pixels = np.zeros((height, width, 3), np.uint8)
    long_side = max(width, height)
    for i, colour in enumerate([(230, 30, 30), GREEN, (40, 80, 255)]):
        span = slice(i * long_side // 3, (i + 1) * long_side // 3)
        pixels[(slice(None), span) if width >= height else (span, slice(None))] = colour
    return Image.fromarray(pixels)


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    return path


def _truncated_png(path: Path) -> Path:
    _save(path, Image.fromarray(_noise(64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as img:  # the header survives, so only decoding can notice
        assert img.size == (64, 64)
    return path


def _good_images() -> dict[str, Image.Image]:
    """Various sizes, aspect ratios and modes, each a file name relative to the dataset root."""
    rgba = np.zeros((50, 30, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 10, 10), np.linspace(0, 255, 30, dtype=np.uint8)
    return {
        "a.png": Image.new("RGB", (40, 30), GREEN),
        "b.png": Image.fromarray(rgba, "RGBA"),
        "c.PNG": Image.new("L", (64, 64), 100),
        "nested/d.jpg": Image.fromarray(_noise(100, 60)),
        "nested/deeper/e.webp": Image.fromarray(_noise(33, 17, seed=2)),
        "f.png": Image.fromarray(_noise(20, 20, seed=3)).convert("P"),
        "g.jpeg": Image.new("CMYK", (50, 20), (0, 255, 255, 0)),
    }


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    for name, img in _good_images().items():
        _save(root / name, img).with_suffix(".txt").write_text(f"a picture called {name}\n")
    (root / "a.txt").write_text("a green rectangle\n\n   a flat green image  \n")
    _corrupt(root / "bad/corrupt.jpg").with_suffix(".txt").write_text("noise\n")
    _truncated_png(root / "bad/truncated.png").with_suffix(".txt").write_text("half an image\n")
    _save(root / "bad/empty.png", Image.new("RGB", (20, 20))).with_suffix(".txt").write_text("\n  \n")
    _save(root / "bad/nocap.png", Image.new("RGB", (20, 20)))
    (root / "notes.txt").write_text("a caption file without an image is ignored\n")
    (root / "README.md").write_text("not an image\n")
    return root


def _config(path: Path, source: str = "folder", **overrides) -> DataConfig:
    fields = dict(image_size=SIZE, n_train=100, n_val=2, n_test=2, workers=3) | overrides
    return DataConfig(source=source, path=str(path), **fields)


def _drain(cfg: DataConfig, seed: int = 0) -> tuple[dict[str, list[tuple[np.ndarray, dict]]], Skipped]:
    skipped = Skipped()
    return {split: list(it) for split, it in iter_real(cfg, seed, skipped).items()}, skipped


def _expect_counts(**counts: int) -> dict[str, int]:
    return {reason: counts.get(reason, 0) for reason in REASONS}


@pytest.mark.parametrize("width, height, middle", [(48, 16, np.s_[:, 16:32]), (16, 48, np.s_[16:32, :])])
def test_centre_crop_without_resampling_is_the_middle_square(tmp_path, width, height, middle):
    pixels = _noise(width, height)
    path = _save(tmp_path / "noise.png", Image.fromarray(pixels))
    np.testing.assert_array_equal(load_image(path, SIZE), pixels[middle])


@pytest.mark.parametrize("size", [(192, 32), (32, 192)])
def test_downscaled_centre_crop_keeps_only_the_middle_third(tmp_path, size):
    # The centred 32x32 square lies deep inside the green third, beyond the bicubic filter's reach.
    image = load_image(_save(tmp_path / "thirds.png", _thirds(*size)), SIZE)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert (image == GREEN).all()


@pytest.mark.parametrize(
    "img, colour",
    [
        (Image.new("RGB", (300, 200), GREEN), GREEN),
        (Image.new("L", (20, 40), 100), (100, 100, 100)),
        (Image.new("RGB", (20, 20), GREEN).convert("P", palette=Image.Palette.ADAPTIVE), GREEN),
        (Image.new("RGBA", (20, 20), (200, 10, 10, 255)), (200, 10, 10)),
        (Image.new("RGBA", (20, 20), (0, 0, 0, 0)), (255, 255, 255)),  # transparent: white, not black
        (Image.new("LA", (20, 20), (50, 255)), (50, 50, 50)),
        (Image.fromarray(np.full((20, 20), 257 * 60, np.uint16)), (60, 60, 60)),  # 16-bit grey is scaled
    ],
)
def test_modes_become_rgb_and_solid_colours_survive(tmp_path, img, colour):
    image = load_image(_save(tmp_path / "solid.png", img), SIZE)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert (image == colour).all()


def test_transparent_palette_and_cmyk(tmp_path):
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    assert (load_image(_save(tmp_path / "p.png", palette), SIZE) == 255).all()
    cmyk = load_image(_save(tmp_path / "c.jpg", Image.new("CMYK", (40, 20), (0, 255, 255, 0))), SIZE)
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 50  # red, give or take JPEG


def test_folder_listing(folder):
    items, skipped = list_items(_config(folder))
    sources = [item.source for item in items]
    assert sources == sorted(sources)
    assert set(sources) == set(_good_images()) | {"bad/corrupt.jpg", "bad/truncated.png"}
    assert skipped.counts() == _expect_counts(empty_caption=1, missing_caption=1)
    assert skipped.paths["empty_caption"] == ["bad/empty.png"]
    assert skipped.paths["missing_caption"] == ["bad/nocap.png"]
    by_source = {item.source: item for item in items}
    assert by_source["a.png"].captions == ["a green rectangle", "a flat green image"]
    assert by_source["nested/deeper/e.webp"].image == folder / "nested/deeper/e.webp"


def test_folder_iter_real_decodes_good_images_and_counts_bad_ones(folder):
    splits, skipped = _drain(_config(folder))
    records = [record for split in splits.values() for _, record in split]
    assert sorted(r["source"] for r in records) == sorted(_good_images())
    for split in splits.values():
        for image, record in split:
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
            assert record["captions"] and all(isinstance(c, str) for c in record["captions"])
    assert skipped.counts() == _expect_counts(unreadable_image=2, empty_caption=1, missing_caption=1)
    assert sorted(skipped.paths["unreadable_image"]) == ["bad/corrupt.jpg", "bad/truncated.png"]


def _manifest(tmp_path: Path, suffix: str) -> Path:
    root = tmp_path / "set"
    images = {name: _save(root / "images" / name, img) for name, img in _good_images().items()}
    _corrupt(root / "images/corrupt.jpg")
    _save(root / "images/blank.png", Image.new("RGB", (20, 20)))
    outside = _save(tmp_path / "elsewhere/abs.png", Image.new("RGB", (30, 20), GREEN))
    rows = [(f"images/{name}", f"caption of {name}") for name in images]
    rows += [
        ("./images/a.png", "  a second caption for a  "),  # same image, spelled differently
        ("images/a.png", ""),  # a blank row beside good ones is dropped, not counted
        ("images/missing.png", "nothing here"),
        ("images/blank.png", "   "),
        ("images/corrupt.jpg", "noise"),
        (str(outside), "absolute path"),
    ]
    frame = pd.DataFrame(rows, columns=["image", "caption"]).assign(extra=1)
    path = root / f"manifest{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".pq"])
def test_manifest(tmp_path, suffix):
    cfg = _config(_manifest(tmp_path, suffix), source="manifest")
    items, skipped = list_items(cfg)
    assert skipped.counts() == _expect_counts(missing_image=1, empty_caption=1)
    assert skipped.paths == {
        "unreadable_image": [], "empty_caption": ["images/blank.png"],
        "missing_image": ["images/missing.png"], "missing_caption": [],
    }  # fmt: skip
    by_source = {item.source: item for item in items}
    assert by_source["images/a.png"].captions == ["caption of a.png", "a second caption for a"]
    outside = (tmp_path / "elsewhere/abs.png").as_posix()
    assert len(items) == len(_good_images()) + 2 and outside in by_source

    splits, skipped = _drain(cfg)
    decoded = {record["source"]: (image, record) for split in splits.values() for image, record in split}
    assert set(decoded) == {f"images/{name}" for name in _good_images()} | {outside}
    assert decoded["images/a.png"][1]["captions"] == ["caption of a.png", "a second caption for a"]
    assert (decoded["images/a.png"][0] == GREEN).all()
    assert skipped.counts() == _expect_counts(unreadable_image=1, missing_image=1, empty_caption=1)


def _sources(cfg: DataConfig, seed: int) -> dict[str, list[str]]:
    return {split: [record["source"] for _, record in part] for split, part in _drain(cfg, seed)[0].items()}


def test_splits_are_deterministic_disjoint_and_bounded(folder):
    cfg = _config(folder, n_train=3, n_val=2, n_test=2)  # 9 listed items: 2 are left over
    order = {seed: _sources(cfg, seed) for seed in (0, 1)}
    assert order[0] == _sources(cfg, 0)
    assert order[0] != order[1]

    items, _ = list_items(cfg)
    listed = split_items(items, cfg, seed=0)
    assert {split: len(part) for split, part in listed.items()} == {"train": 3, "val": 2, "test": 2}
    sources = [item.source for part in listed.values() for item in part]
    assert len(sources) == len(set(sources))
    for split, part in listed.items():  # decoding keeps the listed order, minus undecodable files
        assert order[0][split] == [item.source for item in part if not item.source.startswith("bad/")]


def test_missing_paths_raise_file_not_found(tmp_path):
    for source, name in [("manifest", "nope.csv"), ("folder", "nope")]:
        with pytest.raises(FileNotFoundError, match=rf"data\.path.*{name}"):
            iter_real(_config(tmp_path / name, source=source), 0, Skipped())


def test_bad_manifests_raise_value_error(tmp_path):
    no_caption = tmp_path / "no_caption.csv"
    pd.DataFrame({"image": ["a.png"], "text": ["a"]}).to_csv(no_caption, index=False)
    with pytest.raises(ValueError, match=r"no_caption\.csv.*'caption'"):
        list_items(_config(no_caption, source="manifest"))
    (tmp_path / "list.txt").write_text("a.png,a\n")
    with pytest.raises(ValueError, match=r"list\.txt"):
        list_items(_config(tmp_path / "list.txt", source="manifest"))
    with pytest.raises(ValueError, match="data.source"):
        list_items(DataConfig(source="shapes"))


def test_nothing_usable_raises(tmp_path):
    root = tmp_path / "bad"
    _save(root / "nocap.png", Image.new("RGB", (20, 20)))
    _save(root / "empty.png", Image.new("RGB", (20, 20))).with_suffix(".txt").write_text("\n")
    with pytest.raises(ValueError, match=r"data\.path.*'empty_caption': 1, 'missing_image': 0, 'missing_cap"):
        iter_real(_config(root), 0, Skipped())


def test_split_left_empty_raises(folder):
    with pytest.raises(ValueError, match=r"'train' split.*data\.n_val=5"):
        iter_real(_config(folder, n_val=5, n_test=4), 0, Skipped())


def test_split_that_decodes_to_nothing_raises(tmp_path):
    for i in range(3):
        _corrupt(tmp_path / f"c{i}.jpg").with_suffix(".txt").write_text("noise\n")
    skipped = Skipped()
    splits = iter_real(_config(tmp_path, n_val=1, n_test=1), 0, skipped)
    with pytest.raises(ValueError, match="'val' split failed to decode"):
        list(splits["val"])
    assert skipped.counts()["unreadable_image"] == 1


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
