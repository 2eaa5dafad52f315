"""The procedural shapes dataset: determinism, the zero-shot hold-out, labels checked from pixels alone."""

import dataclasses
import itertools
import math
import re

import numpy as np
import pytest
from scipy import ndimage

from dalle.config import COLOURS, SHAPES, DataConfig
from dalle.data.shapes import (
    POSITIONS,
    RELATION_TEMPLATES,
    RELATIONS,
    SIZES,
    SYNONYMS,
    TEMPLATES,
    canonical_caption,
    iter_shapes,
)

CFG = DataConfig(image_size=32, n_train=64, n_val=16, n_test=64)
KEYS = {
    "captions",
    "n_objects",
    "shape",
    "colour",
    "size",
    "position",
    "shape2",
    "colour2",
    "size2",
    "position2",
    "relation",
    "held_out",
}
ATTRIBUTES = ("shape", "colour", "size", "position")
SIDE = {"small": 0.25, "large": 0.45}  # box side / canvas: the contract, written out rather than imported
FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}  # shape area / box area


def draw(seed=0, split="train", n=64, **changes):
    return list(iter_shapes(dataclasses.replace(CFG, **changes), seed, split, n))


def objects_of(record):
    """The record's objects as attribute dicts, first object first."""
    return [{key: record[key + suffix] for key in ATTRIBUTES} for suffix in ("", "2")[: record["n_objects"]]]


def held_pairs(record):
    return [obj for obj in objects_of(record) if (obj["colour"], obj["shape"]) in CFG.holdout_pairs]


def relation_holds(record):
    (row1, col1), (row2, col2) = POSITIONS[record["position"]], POSITIONS[record["position2"]]
    truth = {
        "to the left of": col1 < col2,
        "to the right of": col1 > col2,
        "above": row1 < row2,
        "below": row1 > row2,
    }
    return truth[record["relation"]]


def test_contract_constants():
    assert SIZES == SIDE
    assert list(POSITIONS.items()) == [
        ("top left", (0, 0)),
        ("top", (0, 1)),
        ("top right", (0, 2)),
        ("left", (1, 0)),
        ("center", (1, 1)),
        ("right", (1, 2)),
        ("bottom left", (2, 0)),
        ("bottom", (2, 1)),
        ("bottom right", (2, 2)),
    ]
    assert canonical_caption("large", "red", "circle", "top left") == "a large red circle in the top left"
    with pytest.raises(ValueError, match="'hexagon'"):
        canonical_caption("small", "red", "hexagon", "top")


def test_synonyms_are_unambiguous():
    # A word that could name two sizes (or two shapes, or two places) would make some captions lie.
    for names in (SIZES, SHAPES, POSITIONS):
        words = [word for name in names for word in SYNONYMS[name]]
        assert len(words) == len(set(words)), words
        assert all(SYNONYMS[name][0] == name for name in names)
    synonym_words = {word for phrases in SYNONYMS.values() for phrase in phrases for word in phrase.split()}
    assert not set(COLOURS) & synonym_words


@pytest.mark.parametrize("max_objects", [1, 2])
def test_same_seed_same_bytes_and_records(max_objects):
    first, again = draw(max_objects=max_objects), draw(max_objects=max_objects)
    assert [image.tobytes() for image, _ in first] == [image.tobytes() for image, _ in again]
    assert [record for _, record in first] == [record for _, record in again]
    for image, record in first:
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        assert set(record) == KEYS


def test_seed_and_split_change_the_images():
    images = {
        (seed, split): np.stack([image for image, _ in draw(seed=seed, split=split, n=16)])
        for seed, split in [(0, "train"), (1, "train"), (0, "val"), (0, "test")]
    }
    for a, b in itertools.combinations(images, 2):
        assert not np.array_equal(images[a], images[b]), (a, b)


def test_bad_split_names_it():
    with pytest.raises(ValueError, match="'valid'"):
        iter_shapes(CFG, 0, "valid", 4)  # raised at the call, before any iteration


@pytest.mark.parametrize("max_objects", [1, 2])
def test_holdout_never_in_train_or_val(max_objects):
    for split in ("train", "val"):
        records = [r for _, r in draw(split=split, n=1500, max_objects=max_objects, image_size=16)]
        for record in records:
            assert not held_pairs(record) and not record["held_out"], record
        two = sum(r["n_objects"] == 2 for r in records)
        assert two == 0 if max_objects == 1 else 0.45 < two / len(records) < 0.55


@pytest.mark.parametrize("max_objects, fraction", [(1, 0.5), (2, 0.3), (2, 1.0), (1, 0.0)])
def test_test_split_holds_out_the_configured_fraction(max_objects, fraction):
    n = 301
    records = [r for _, r in draw(split="test", n=n, max_objects=max_objects, heldout_fraction=fraction)]
    assert sum(r["held_out"] for r in records) == round(n * fraction)
    for record in records:
        # A held-out image has exactly one object with a held-out pair; every other object is a seen pair.
        assert len(held_pairs(record)) == int(record["held_out"]), record
    if max_objects == 2 and 0 < fraction < 1:
        assert {r["n_objects"] for r in records if r["held_out"]} == {1, 2}


def test_no_holdout_pairs_means_nothing_held_out():
    records = [r for _, r in draw(split="test", n=200, holdout_pairs=(), heldout_fraction=1.0)]
    assert not any(r["held_out"] for r in records)
    assert {(r["colour"], r["shape"]) for r in records} >= set(CFG.holdout_pairs)


def measure(image, blob):
    """Colour, cell, box sides, area and apex of one object, from its pixels; ``blob`` is its boolean mask."""
    pixels = image[blob].astype(float)
    # Anti-aliasing against black only scales the colour, so every pixel is (coverage * rgb), rounded.
    colours = [
        name for name, rgb in COLOURS.items() if np.abs(pixels - np.outer(pixels.max(1) / max(rgb), rgb)).max() <= 1.5
    ]
    assert len(colours) == 1, f"pixels are not one colour on black: {colours}"
    rgb = np.array(COLOURS[colours[0]])
    coverage = np.where(blob, image[..., rgb.argmax()] / rgb.max(), 0.0)
    # Coverage-weighted centroid, pixel centres at +0.5: the box filter keeps the drawn shape's first moment.
    cy, cx = (np.indices(blob.shape) + 0.5).reshape(2, -1) @ coverage.ravel() / coverage.sum()
    ys, xs = np.nonzero(blob)
    size = image.shape[0]
    rows = coverage[ys.min() : ys.max() + 1].sum(1)
    half = len(rows) // 2
    return {
        "colour": colours[0],
        "core": tuple(image[int(cy), int(cx)]),  # the pixel under the centroid lies inside every shape
        "cell": (int(3 * cy / size), int(3 * cx / size)),
        "mask_cell": (int(3 * (ys.mean() + 0.5) / size), int(3 * (xs.mean() + 0.5) / size)),
        "sides": (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1),
        "area": coverage.sum(),
        # A triangle's upper half holds 1/4 of its area, its lower half 3/4; discs and squares are symmetric.
        "apex_up": rows[:half].sum() < 0.6 * rows[-half:].sum(),
    }


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("max_objects", [1, 2])
def test_pixels_match_labels(image_size, max_objects):
    for image, record in draw(split="test", n=150, image_size=image_size, max_objects=max_objects):
        # 8-connected blobs: two objects must not even touch diagonally.
        blobs, count = ndimage.label(image.any(-1), structure=np.ones((3, 3)))
        assert count == record["n_objects"], record
        measured = {m["cell"]: m for m in (measure(image, blobs == label) for label in range(1, count + 1))}
        objects = objects_of(record)
        assert set(measured) == {POSITIONS[obj["position"]] for obj in objects}, record
        for obj in objects:
            m = measured[POSITIONS[obj["position"]]]
            side = SIDE[obj["size"]] * image_size
            assert m["mask_cell"] == m["cell"], (m, obj)
            assert m["colour"] == obj["colour"] and m["core"] == COLOURS[obj["colour"]], (m, obj)
            assert all(abs(s - side) <= 2 for s in m["sides"]), (m, obj, side)
            assert m["area"] / side**2 == pytest.approx(FILL[obj["shape"]], abs=0.06), (m, obj)
            assert m["apex_up"] == (obj["shape"] == "triangle"), (m, obj)
        if count == 2:
            assert relation_holds(record), record


def possible_captions(record):
    """Every caption the templates and synonyms allow for the record, naming either object first."""

    def fillings(objects, relation):
        worded = ("size", "shape", "position")  # colours have no synonyms
        per_object = [
            [
                dict(zip(worded, words), colour=obj["colour"])
                for words in itertools.product(*(SYNONYMS[obj[key]] for key in worded))
            ]
            for obj in objects
        ]
        for words in itertools.product(*per_object):
            fields = {"relation": relation}
            for named, suffix in zip(words, ("", "2")):
                fields |= {key + suffix: value for key, value in named.items()}
            yield fields

    objects = objects_of(record)
    if len(objects) == 1:
        fills = itertools.product(TEMPLATES, fillings(objects, None))
    else:
        forward = fillings(objects, record["relation"])
        backward = fillings(objects[::-1], RELATIONS[record["relation"]])
        fills = itertools.product(RELATION_TEMPLATES, itertools.chain(forward, backward))
    return {re.sub(r"\ba (?=[aeiou])", "an ", template.format(**fields)) for template, fields in fills}


@pytest.mark.parametrize("max_objects", [1, 2])
def test_captions_are_honest(max_objects):
    records = [r for _, r in draw(n=300, image_size=16, max_objects=max_objects, captions_per_image=4)]
    canonical = 0
    for record in records:
        assert len(record["captions"]) == 4
        allowed = possible_captions(record)
        for caption in record["captions"]:
            assert caption == caption.lower() and caption in allowed, (caption, record)
            assert {obj["colour"] for obj in objects_of(record)} <= set(re.findall("[a-z]+", caption))
        if record["n_objects"] == 1:
            args = (record["size"], record["colour"], record["shape"], record["position"])
            assert canonical_caption(*args) == "a {} {} {} in the {}".format(*args)
            canonical += canonical_caption(*args) in record["captions"]
    if max_objects == 1:
        assert canonical > 0
        assert len({c for r in records for c in r["captions"]}) > 200  # templates and synonyms do vary


def test_longest_caption_fits():
    def longest(names):
        phrases = [phrase for name in names for phrase in SYNONYMS.get(name, (name,))]
        return max(phrases, key=lambda phrase: len(phrase.split()))

    slots = {
        "size": longest(SIZES),
        "colour": longest(COLOURS),
        "shape": longest(SHAPES),
        "position": longest(POSITIONS),
        "relation": longest(RELATIONS),
    }
    slots |= {key + "2": value for key, value in slots.items()}
    assert max(len(t.format(**slots).split()) for t in TEMPLATES + RELATION_TEMPLATES) <= 24
