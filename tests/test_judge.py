"""The pixel-rule judge: exact on clean renders, tolerant of reconstruction damage, able to say no."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from dalle.config import COLOURS, DataConfig
from dalle.data.judge import ATTRIBUTES, Judgement, attribute_accuracy, judge, judge_batch
from dalle.data.shapes import POSITIONS, iter_shapes

CFG = DataConfig(max_objects=1)
N_PER_SPLIT = 300  # train + test (half of test held out): 600 images per size


@pytest.fixture(scope="module", params=[16, 32, 64])
def shapes(request):
    cfg = dataclasses.replace(CFG, image_size=request.param)
    pairs = [pair for split in ("train", "test") for pair in iter_shapes(cfg, 0, split, N_PER_SPLIT)]
    return [image for image, _ in pairs], [record for _, record in pairs]


@pytest.fixture(scope="module")
def shapes32():
    pairs = [
        pair
        for split in ("train", "test")
        for pair in iter_shapes(dataclasses.replace(CFG, image_size=32), 1, split, N_PER_SPLIT)
    ]
    return [image for image, _ in pairs], [record for _, record in pairs]


def degrade(image, rng, sigma=0.7, noise=6.0, shift=10):
    """A lossy reconstruction's damage: blur each channel, add noise and a per-channel offset, clip."""
    pixels = image.astype(np.float64)
    pixels = np.stack([ndimage.gaussian_filter(pixels[..., c], sigma) for c in range(3)], axis=-1)
    pixels += rng.normal(0.0, noise, pixels.shape) + rng.integers(-shift, shift + 1, size=3)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def first(records, **wanted):
    return next(i for i, r in enumerate(records) if all(r[k] == v for k, v in wanted.items()))


def test_clean_renders_are_read_exactly(shapes):
    images, records = shapes
    assert sum(r["held_out"] for r in records) == N_PER_SPLIT // 2  # held-out pairs are judged too
    assert attribute_accuracy(images, records) == {name: 1.0 for name in (*ATTRIBUTES, "all")}


def test_degraded_renders_still_read(shapes32):
    images, records = shapes32
    rng = np.random.default_rng(0)
    accuracy = attribute_accuracy([degrade(image, rng) for image in images], records)
    assert accuracy["all"] >= 0.97, accuracy  # measured: 1.0


def test_matches_compares_each_attribute():
    record = {"colour": "red", "shape": "circle", "size": "small", "position": "top"}
    judged = Judgement("red", "square", "small", "top")
    assert judged.matches(record) == {
        "colour": True,
        "shape": False,
        "size": True,
        "position": True,
        "all": False,
    }
    assert Judgement("red", "circle", "small", "top").matches(record)["all"]


def test_wrong_colour_is_caught(shapes32):
    images, records = shapes32
    for index in range(0, 60, 3):
        image, record = images[index], records[index]
        names = list(COLOURS)
        other = names[(names.index(record["colour"]) + 1) % len(names)]
        # On black, every pixel is coverage * colour: swap the colour, keep the coverage.
        coverage = image.max(axis=-1, keepdims=True) / max(COLOURS[record["colour"]])
        recoloured = np.rint(coverage * np.array(COLOURS[other])).astype(np.uint8)
        judged = judge(recoloured)
        assert judged.colour == other
        assert judged.matches(record) == {
            "colour": False,
            "shape": True,
            "size": True,
            "position": True,
            "all": False,
        }


@pytest.mark.parametrize("size", ["small", "large"])
def test_square_where_the_record_says_circle_is_caught(shapes32, size):
    images, records = shapes32
    index = first(records, shape="circle", size=size)
    image, record = images[index], records[index]
    rows, cols = np.nonzero(image.any(axis=-1))
    square = np.zeros_like(image)
    square[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = COLOURS[record["colour"]]
    judged = judge(square)
    assert judged.shape == "square"
    assert judged.matches(record) == {
        "colour": True,
        "shape": False,
        "size": True,
        "position": True,
        "all": False,
    }


def test_moved_object_is_caught(shapes32):
    images, records = shapes32
    moved = 0
    for image, record in zip(images, records):
        row, col = POSITIONS[record["position"]]
        if col != 0:
            continue
        # A left-column object moved a third of the canvas right lands in the middle column, still whole.
        judged = judge(np.roll(image, image.shape[1] // 3 + 1, axis=1))
        assert POSITIONS[judged.position] == (row, 1)
        assert judged.matches(record) == {
            "colour": True,
            "shape": True,
            "size": True,
            "position": False,
            "all": False,
        }
        moved += 1
    assert moved >= 100


def test_no_object_means_every_attribute_wrong():
    rng = np.random.default_rng(0)
    black = np.zeros((32, 32, 3), dtype=np.uint8)
    noise = np.clip(rng.normal(8, 6, size=(32, 32, 3)), 0, 255).astype(np.uint8)  # a dark, noisy nothing
    record = {"colour": "red", "shape": "circle", "size": "small", "position": "top"}
    for image in (black, noise):
        assert judge(image) == Judgement(None, None, None, None)
        assert not any(judge(image).matches(record).values())
    assert attribute_accuracy([black], [record]) == {name: 0.0 for name in (*ATTRIBUTES, "all")}


def test_a_stray_speck_is_ignored(shapes32):
    images, records = shapes32
    for index in range(0, 40, 2):
        image, record = images[index].copy(), records[index]
        row, col = POSITIONS[record["position"]]
        far = (31 if row == 0 else 0, 31 if col == 0 else 0)  # the canvas corner farthest from the object
        image[far] = (255, 255, 255)
        assert judge(image).matches(record)["all"], (record, judge(image))


def test_batch_accepts_an_array(shapes32):
    images, records = shapes32
    batch = np.stack(images[:8])  # (8, 32, 32, 3)
    assert judge_batch(batch) == [judge(image) for image in images[:8]]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="uint8"):
        judge(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(S, S, 3\)"):
        judge(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="2 records"):
        attribute_accuracy([np.zeros((32, 32, 3), dtype=np.uint8)], [{}, {}])
