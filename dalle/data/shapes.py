"""Procedural "coloured shapes with captions": a small, fully controlled text-to-image dataset.

DALL-E (Ramesh et al., 2021, "Zero-Shot Text-to-Image Generation", https://arxiv.org/abs/2102.12092) is judged
in Sec. 3.3 and Fig. 2 on combining concepts in ways its training captions never did. This module builds a
toy version of that test that needs no download: one or two filled shapes on black, each with a colour, a size
and a cell of a 3x3 grid, captioned by random templates and synonyms. A few (colour, shape) pairs are kept out
of train and val and shown only in part of test, so zero-shot composition can be measured.

Geometry, shared with evaluation code (keep it exact): the canvas is ``cfg.image_size`` square; a shape fills
a square box whose side is ``SIZES[size]`` of the canvas; the triangle is isosceles, apex up, base = height =
the box side. An object's centre is its area centroid (for the triangle, 2/3 of the way down its box), because
that is what a measurement from pixels finds; it lies in the named cell, at least ``MARGIN`` from the cell's
edges, and the whole box lies on the canvas. Shapes are drawn at ``SUPERSAMPLE`` x and box-filtered down, so
edges are anti-aliased while interior pixels are exactly ``COLOURS[colour]``.

Hold-out rule: in split "test", exactly ``round(n * cfg.heldout_fraction)`` images, chosen by a seeded
permutation, are held out (``held_out=True``); in those, exactly one object has a held-out (colour, shape)
pair. Every other object, in every split, has a seen pair.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dalle.config import COLOURS, SHAPES, DataConfig

SPLITS = ("train", "val", "test")
SIZES = {"small": 0.25, "large": 0.45}  # box side as a fraction of the canvas
POSITIONS = {  # name -> (row, col) on the 3x3 grid, row 0 at the top
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
RELATIONS = {  # where the first object is relative to the second -> the same fact from the second's side
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
# Words a caption may use for each plain size, shape and position name; the plain name comes first. Colours
# have no synonyms: the hold-out pairs are about them, so they stay unambiguous.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big", "huge"),
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "top left": ("top left", "upper left", "top left corner"),
    "top": ("top", "top middle", "upper middle"),
    "top right": ("top right", "upper right", "top right corner"),
    "left": ("left", "middle left", "center left"),
    "center": ("center", "middle"),
    "right": ("right", "middle right", "center right"),
    "bottom left": ("bottom left", "lower left", "bottom left corner"),
    "bottom": ("bottom", "bottom middle", "lower middle"),
    "bottom right": ("bottom right", "lower right", "bottom right corner"),
}
# One object. The first template, filled with the plain names, is the canonical caption.
TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "a {colour} {shape}, {size}, at the {position}",
    "there is a {size} {colour} {shape} in the {position} of the image",
    "{position}: a {size} {colour} {shape}",
    "a {size} {colour} {shape} on a black background, in the {position}",
    "the {position} of the picture shows a {size} {colour} {shape}",
    "{size} {colour} {shape}, {position}",
)
# Two objects; "{relation}" says where the first object is relative to the second.
RELATION_TEMPLATES = (
    "a {colour} {shape} {relation} a {colour2} {shape2}",
    "a {size} {colour} {shape} {relation} a {size2} {colour2} {shape2}",
    "there is a {size} {colour} {shape} {relation} a {size2} {colour2} {shape2}",
    "a {size} {colour} {shape} in the {position} and a {size2} {colour2} {shape2} in the {position2}",
    "a {size2} {colour2} {shape2} with a {colour} {shape} {relation} it",
    "two shapes: a {size} {colour} {shape} {relation} a {size2} {colour2} {shape2}",
)

SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, exact interior colour
# Least distance (canvas fraction) from an object's centre to its cell's edges, so a centroid measured from
# anti-aliased pixels is still clearly in the cell. A large triangle in the top row leaves room for < 0.028.
MARGIN = 0.025
JITTER = 1 / 12  # centres wander up to a quarter cell from the cell's middle, where the canvas edge allows
_TRIES_AS_SAMPLED = 10  # two-object placements tried with the sampled sizes before both become small
_TRIES = 200

_Box = tuple[int, int, int]  # (x0, y0, side) in pixels of the supersampled canvas


@dataclass(frozen=True)
class _Object:
    colour: str
    shape: str
    size: str
    position: str
    box: _Box


def canonical_caption(size: str, colour: str, shape: str, position: str) -> str:
    """``a {size} {colour} {shape} in the {position}``: the one caption every evaluation can rely on."""
    for value, known in ((size, SIZES), (colour, COLOURS), (shape, SHAPES), (position, POSITIONS)):
        if value not in known:
            raise ValueError(f"unknown name {value!r}; expected one of: {', '.join(known)}")
    return TEMPLATES[0].format(size=size, colour=colour, shape=shape, position=position)


def canonical_relation_caption(
    size: str, colour: str, shape: str, relation: str, size2: str, colour2: str, shape2: str
) -> str:
    """``a {size} {colour} {shape} {relation} a {size2} {colour2} {shape2}``: the two-object caption every
    evaluation can rely on; ``relation`` says where the first object is relative to the second."""
    for value, known in (
        (size, SIZES),
        (colour, COLOURS),
        (shape, SHAPES),
        (relation, RELATIONS),
        (size2, SIZES),
        (colour2, COLOURS),
        (shape2, SHAPES),
    ):
        if value not in known:
            raise ValueError(f"unknown name {value!r}; expected one of: {', '.join(known)}")
    return RELATION_TEMPLATES[1].format(
        size=size, colour=colour, shape=shape, relation=relation, size2=size2, colour2=colour2, shape2=shape2
    )


def _centre(rng: np.random.Generator, cell: int, before: float, after: float) -> float:
    """One coordinate (canvas fraction) of an object's centre in grid row/column ``cell``.

    ``before``/``after``: how far the object extends on either side of its centre; it must stay on the canvas.
    """
    lo = max(cell / 3 + MARGIN, before)
    hi = min((cell + 1) / 3 - MARGIN, 1 - after)
    assert lo <= hi, f"an object extending {before:.3f}/{after:.3f} cannot sit in cell {cell}"
    middle = (cell + 0.5) / 3
    start, stop = max(lo, middle - JITTER), min(hi, middle + JITTER)
    if start > stop:  # a large object at the canvas edge: the jitter window lies outside what fits
        return min(max(middle, lo), hi)
    return float(rng.uniform(start, stop))


def _place(rng: np.random.Generator, shape: str, size: str, position: str, image_size: int) -> _Box:
    canvas = SUPERSAMPLE * image_size
    side = round(SIZES[size] * canvas)
    extent = side / canvas
    above = extent * (2 / 3 if shape == "triangle" else 1 / 2)  # centroid to the top of the box
    row, col = POSITIONS[position]
    cx = _centre(rng, col, extent / 2, extent / 2)
    cy = _centre(rng, row, above, extent - above)
    x0 = min(max(round((cx - extent / 2) * canvas), 0), canvas - side)
    y0 = min(max(round((cy - above) * canvas), 0), canvas - side)
    return x0, y0, side


def _apart(a: _Object, b: _Object) -> bool:
    """True when a whole empty output pixel row or column separates the two boxes.

    Stricter than "boxes do not intersect": anti-aliased edges can share an output pixel, and then the two
    objects would be one connected blob to anyone measuring them from pixels.
    """
    for axis in (0, 1):
        a_lo, a_hi = a.box[axis] // SUPERSAMPLE, (a.box[axis] + a.box[2] - 1) // SUPERSAMPLE
        b_lo, b_hi = b.box[axis] // SUPERSAMPLE, (b.box[axis] + b.box[2] - 1) // SUPERSAMPLE
        if a_hi + 1 < b_lo or b_hi + 1 < a_lo:
            return True
    return False


def _relation(rng: np.random.Generator, first: _Object, second: _Object) -> str:
    (row1, col1), (row2, col2) = POSITIONS[first.position], POSITIONS[second.position]
    facts = {
        "to the left of": col1 < col2,
        "to the right of": col1 > col2,
        "above": row1 < row2,
        "below": row1 > row2,
    }
    true = [name for name, holds in facts.items() if holds]
    return true[rng.integers(len(true))]


def _sample_scene(
    rng: np.random.Generator, cfg: DataConfig, held_out: bool, seen: list, held: list
) -> tuple[list[_Object], str | None]:
    n_objects = 1 if cfg.max_objects == 1 else 1 + int(rng.integers(2))
    odd_one = int(rng.integers(n_objects)) if held_out else -1  # the object that gets a held-out pair
    pairs = [held[rng.integers(len(held))] if i == odd_one else seen[rng.integers(len(seen))] for i in range(n_objects)]
    positions = [list(POSITIONS)[cell] for cell in rng.permutation(len(POSITIONS))[:n_objects]]
    sizes = [list(SIZES)[rng.integers(len(SIZES))] for _ in range(n_objects)]
    for attempt in range(_TRIES):
        if attempt == _TRIES_AS_SAMPLED:
            sizes = ["small"] * n_objects  # e.g. two large shapes in neighbouring cells never fit apart
        objects = [
            _Object(colour, shape, size, position, _place(rng, shape, size, position, cfg.image_size))
            for (colour, shape), size, position in zip(pairs, sizes, positions)
        ]
        if n_objects == 1:
            return objects, None
        if _apart(*objects):
            return objects, _relation(rng, *objects)
    raise AssertionError(f"cannot place two small shapes in {positions} apart on a {cfg.image_size}px canvas")


def _caption(rng: np.random.Generator, objects: list[_Object], relation: str | None) -> str:
    def pick(name: str) -> str:
        options = SYNONYMS[name]
        return options[rng.integers(len(options))]

    if len(objects) == 1:
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
    else:
        template = RELATION_TEMPLATES[rng.integers(len(RELATION_TEMPLATES))]
        if rng.random() < 0.5:  # describe the same scene from the second object's side
            objects, relation = objects[::-1], RELATIONS[relation]
    fields = {"relation": relation}
    for obj, suffix in zip(objects, ("", "2")):
        fields.update(
            {
                f"size{suffix}": pick(obj.size),
                f"colour{suffix}": obj.colour,
                f"shape{suffix}": pick(obj.shape),
                f"position{suffix}": pick(obj.position),
            }
        )
    # "a orange box" -> "an orange box". Plain sizes start with a consonant: canonical captions are untouched.
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(**fields))


def _render(objects: list[_Object], image_size: int) -> np.ndarray:
    """Draw the objects on black; returns uint8 ``(image_size, image_size, 3)``."""
    canvas = Image.new("RGB", (SUPERSAMPLE * image_size, SUPERSAMPLE * image_size))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        x0, y0, side = obj.box
        x1, y1 = x0 + side - 1, y0 + side - 1  # PIL boxes include their last pixel
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return np.array(canvas.reduce(SUPERSAMPLE))


def iter_shapes(cfg: DataConfig, seed: int, split: str, n: int) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield n (image uint8 (S,S,3), record) pairs for split in {"train","val","test"}.

    The same (cfg, seed, split, n) gives the same bytes; splits draw from separate streams of the seed.
    Arguments are checked here, not at the first ``next``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _generate(cfg, np.random.default_rng([seed, SPLITS.index(split)]), split, n)


def _generate(cfg: DataConfig, rng: np.random.Generator, split: str, n: int) -> Iterator[tuple[np.ndarray, dict]]:
    held = list(cfg.holdout_pairs)
    seen = [(colour, shape) for colour in COLOURS for shape in SHAPES if (colour, shape) not in held]
    held_out = np.zeros(n, dtype=bool)
    if split == "test" and held:
        held_out[rng.permutation(n)[: round(n * cfg.heldout_fraction)]] = True
    for index in range(n):
        objects, relation = _sample_scene(rng, cfg, bool(held_out[index]), seen, held)
        first, second = objects[0], (objects[1] if len(objects) == 2 else None)
        record = {
            "captions": [_caption(rng, objects, relation) for _ in range(cfg.captions_per_image)],
            "n_objects": len(objects),
            "shape": first.shape,
            "colour": first.colour,
            "size": first.size,
            "position": first.position,
            "shape2": second.shape if second else None,
            "colour2": second.colour if second else None,
            "size2": second.size if second else None,
            "position2": second.position if second else None,
            "relation": relation,
            "held_out": bool(held_out[index]),
        }
        yield _render(objects, cfg.image_size), record
