"""Read colour, shape, size and position of the objects of a shapes image back from its pixels, and for two
objects the relation between them.

DALL-E (Ramesh et al., 2021, https://arxiv.org/abs/2102.12092) is judged on whether samples show what the
caption asks for (Sec. 3.3, Fig. 2). On the procedural shapes of ``dalle.data.shapes`` that question has an
exact answer, so this is a transparent pixel-rule classifier rather than a learned one: it checks dVAE
reconstructions (``decode(encode(x))`` keeps each attribute) and, later, generated samples.

Scope: ``judge`` reads images with one object (``n_objects == 1``) on a dark background (of several blobs, the one
with the most coverage is judged); ``judge_scene`` reads up to two. An image with no object gets ``None``
everywhere, which never matches.

Every rule works on *coverage*, the fraction of a pixel the object covers, estimated from brightness: the
renderer's box filter makes an edge pixel ``coverage * colour`` on black, so sums of coverage are areas and
coverage-weighted moments are the drawn shape's moments; both survive blur, which moves mass but keeps it.
Shape is read from moments rather than from a bounding box's fill ratio because a box cannot be measured on
a blurred 4-pixel disc, while its moments barely change: the vertical skewness of an apex-up triangle is
-0.57 (disc, square: 0) and a square's kurtosis is 0.6 lower along its axes than along its diagonals (disc:
equal). Size then follows from the area and the shape's known fill ratio.

Measured on 13,500 clean renders each at 16 and 32 px and 5,400 at 64 px: every attribute right. At 32 px
with a lossy reconstruction's damage (blur sigma 0.7 px, noise std 6/255, a per-channel offset of up to
+-10): every attribute right; first errors appear near blur sigma 1.2 (shape) or offsets of +-25 (colour).
At 16 px the same damage leaves ~89% fully right: a blurred 4-pixel triangle loses its shape.

Two objects (``judge_scene``, ``Scene.matches``): the renderer leaves at least one empty pixel row or column
between them, so they are the two blobs with the most coverage (specks below MIN_OBJECT_AREA are no objects);
each is judged alone by the rules above, and the relation is read from their cells as the renderer states it
(``relations``). Blur bridges that one-pixel gap (a gap pixel gets ~0.5 coverage at sigma 0.7 px), so a scene
that shows one blob is cut between its two bright cores (SPLIT_COVERAGE) when it has two. Measured on two-object
scenes: clean renders, exact on all 3,056 at 32 px, 997 at 16 px and 569 at 64 px; with the damage above,
exact on all 3,056 at 32 px (on 1,000 with blur sigma 1.0), 569 at 64 px, but 63% of 997 at 16 px (small shapes
lose their shape; relations stay right). Single-object scenes under that damage were never cut in two (2,944).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dalle.config import COLOURS
from dalle.data.shapes import POSITIONS, RELATIONS, SIZES

ATTRIBUTES = ("colour", "shape", "size", "position")
MIN_CONTRAST = 64  # brightest pixel must exceed the background by this much (of 255), or there is no object
MASK_COVERAGE = 0.25  # a pixel belongs to the object's mask at this coverage or more
CORE_COVERAGE = 0.8  # pixels at least this covered show the object's own colour, not an edge blend
DIMMING = (0.5, 1.1)  # brightness factors a palette colour may be scaled by before it is compared
HALO = 1  # pixels around the mask still counted in the moments: anti-aliased and blurred edges
SKEW_TRIANGLE = -0.25  # vertical skewness below this is a triangle (apex up: -0.57; disc and square: 0)
SQUARENESS = 0.3  # diagonal minus axis kurtosis above this is a square (square 0.6, disc 0)
FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}  # shape area / box area, from the renderer
# A scene's blob smaller than this (canvas fraction) is a speck, not an object: a quarter of the smallest shape
# drawn (a small triangle, 0.5 * 0.25**2 = 0.031), so a single object with stray noise is not two.
MIN_OBJECT_AREA = 0.008
# Blur bridges the one-pixel gap the renderer leaves between two objects (a gap pixel gets ~0.5 coverage at
# sigma 0.7 px): a scene with one blob is split where it holds two cores this bright, each pixel to the nearer.
SPLIT_COVERAGE = 0.7
OBJECT_ATTRIBUTES = ("colour", "shape", "size")  # what a two-object caption names of each object
_COLOUR_NAMES = list(COLOURS)
_COLOUR_TABLE = np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float64)  # (C, 3)


@dataclass(frozen=True)
class Judgement:
    """The attributes read from one image; ``None`` where no object was found (always judged wrong)."""

    colour: str | None
    shape: str | None
    size: str | None
    position: str | None

    def matches(self, record: Mapping) -> dict[str, bool]:
        """Per attribute: does it equal ``record``'s? Plus ``"all"``: every attribute does."""
        result = {name: getattr(self, name) is not None and getattr(self, name) == record[name] for name in ATTRIBUTES}
        result["all"] = all(result.values())
        return result


@dataclass(frozen=True)
class Features:
    """What the rules read from the pixels; canvas fractions for lengths, pixel values for colour."""

    area: float  # total coverage / canvas area
    x: float  # coverage-weighted centroid, 0 = left edge, 1 = right edge
    y: float  # ... 0 = top edge, 1 = bottom edge
    skew_y: float  # standardised third moment of the vertical coverage profile (down is positive)
    squareness: float  # mean kurtosis along the two diagonals minus along the two axes
    core_rgb: tuple[float, float, float]  # mean colour of the fully covered pixels


def _standardised_moment(values: np.ndarray, weights: np.ndarray, order: int) -> float:
    centred = values - np.sum(weights * values) / np.sum(weights)
    variance = np.sum(weights * centred**2) / np.sum(weights)
    if variance == 0:  # a single-pixel object has no shape to speak of
        return 0.0
    return float(np.sum(weights * centred**order) / np.sum(weights) / variance ** (order / 2))


def _check_image(image: np.ndarray) -> None:
    if not (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[2] == 3
        and image.shape[0] == image.shape[1]
    ):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected a square uint8 RGB image of shape (S, S, 3), got {got}")


def _brightness(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(brightness (S, S), background level): every palette colour has a channel >= 220."""
    brightness = image.astype(np.float64).max(axis=2)
    return brightness, float(np.median(brightness))  # objects cover < 21% of the canvas (two: < 41%)


def blobs(image: np.ndarray) -> list[np.ndarray]:
    """Boolean ``(S, S)`` masks of the bright connected regions of ``image``, most coverage first; ``[]`` for an
    image without an object. The first is the object of a single-object image."""
    _check_image(image)
    brightness, background = _brightness(image)
    if brightness.max() - background < MIN_CONTRAST:
        return []
    coverage = (brightness - background) / (brightness.max() - background)
    labels, count = ndimage.label(coverage >= MASK_COVERAGE, structure=np.ones((3, 3)))
    mass = ndimage.sum_labels(coverage, labels, np.arange(1, count + 1))
    return [labels == 1 + int(index) for index in np.argsort(-mass, kind="stable")]


def measure(image: np.ndarray, mask: np.ndarray | None = None) -> Features | None:
    """The features the rules read from the blob ``mask`` (one of ``blobs(image)``), by default the blob with the
    most coverage (any others are stray noise or reconstruction artefacts); ``None`` for an image without an
    object. Exposed for inspection."""
    if mask is None:
        found = blobs(image)
        if not found:
            return None
        mask = found[0]
    _check_image(image)
    if mask.shape != image.shape[:2] or mask.dtype != bool or not mask.any():
        raise ValueError(f"mask must be a non-empty boolean {image.shape[:2]} array, got {mask.dtype} {mask.shape}")
    size = image.shape[0]
    pixels = image.astype(np.float64)
    brightness, background = _brightness(image)
    bright = (brightness - background) / (brightness.max() - background) >= MASK_COVERAGE  # some blob's pixels
    coverage = (brightness - background) / (brightness[mask].max() - background)  # this blob sets the scale
    halo = ndimage.binary_dilation(mask, structure=np.ones((3, 3)), iterations=HALO) & ~bright  # not another's
    region = mask | halo
    weights = np.where(region, np.clip(coverage, 0.0, 1.0), 0.0)  # (S, S); clipped: noise is not mass
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres; pixel i spans [i, i + 1)
    area = float(weights.sum())
    axes = [_standardised_moment(v, weights, 4) for v in (xs, ys)]
    diagonals = [_standardised_moment(v, weights, 4) for v in (xs + ys, xs - ys)]
    core = mask & (coverage >= CORE_COVERAGE)  # never empty: the blob's brightest pixel has coverage 1
    red, green, blue = pixels[core].mean(axis=0)
    return Features(
        area=area / size**2,
        x=float(np.sum(weights * xs)) / area / size,
        y=float(np.sum(weights * ys)) / area / size,
        skew_y=_standardised_moment(ys, weights, 3),
        squareness=(sum(diagonals) - sum(axes)) / 2,
        core_rgb=(float(red), float(green), float(blue)),
    )


def classify(features: Features | None) -> Judgement:
    """Colour, shape, size and position from one blob's features; ``None`` everywhere for no blob."""
    if features is None:
        return Judgement(None, None, None, None)
    # Colour: the palette entry nearest (Euclidean RGB) to the core's mean, each entry first dimmed or
    # brightened by the factor within DIMMING that fits best, so a blurred small object keeps its hue.
    rgb = np.array(features.core_rgb)
    scale = np.clip(_COLOUR_TABLE @ rgb / np.sum(_COLOUR_TABLE**2, axis=1), *DIMMING)  # (C,)
    colour = _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_COLOUR_TABLE * scale[:, None] - rgb, axis=1)))]
    # Shape: an apex-up triangle's mass sits low; a square's is flatter along its axes than its diagonals.
    if features.skew_y < SKEW_TRIANGLE:
        shape = "triangle"
    elif features.squareness > SQUARENESS:
        shape = "square"
    else:
        shape = "circle"
    # Size: the box side implied by the area and the shape's fill ratio, nearest of SIZES (boundary 0.35).
    side = math.sqrt(features.area / FILL[shape])
    size = min(SIZES, key=lambda name: abs(SIZES[name] - side))
    # Position: the 3x3 cell holding the coverage-weighted centroid, the renderer's notion of centre.
    cell = (min(int(features.y * 3), 2), min(int(features.x * 3), 2))
    position = next(name for name, row_col in POSITIONS.items() if row_col == cell)
    return Judgement(colour, shape, size, position)


def judge(image: np.ndarray) -> Judgement:
    """Colour, shape, size and position of the one object in ``image`` (uint8 ``(S, S, 3)``)."""
    return classify(measure(image))


def judge_batch(images: Iterable[np.ndarray]) -> list[Judgement]:
    """``judge`` for each image of a sequence or a ``(N, S, S, 3)`` array."""
    return [judge(np.asarray(image)) for image in images]


def attribute_accuracy(images: Iterable[np.ndarray], records: Sequence[Mapping]) -> dict[str, float]:
    """Fraction of images whose judged attribute equals the record's, per attribute and ``"all"``."""
    judgements = judge_batch(images)
    if len(judgements) != len(records):
        raise ValueError(f"got {len(judgements)} images but {len(records)} records")
    if not judgements:
        raise ValueError("accuracy of zero images is undefined")
    hits = [j.matches(r) for j, r in zip(judgements, records)]
    return {name: sum(h[name] for h in hits) / len(hits) for name in (*ATTRIBUTES, "all")}


def relations(first: str, second: str) -> set[str]:
    """The relations (keys of ``shapes.RELATIONS``) that hold from an object in cell ``first`` to one in cell
    ``second``, by grid column and row: the renderer's notion (``shapes._relation``)."""
    (row1, col1), (row2, col2) = POSITIONS[first], POSITIONS[second]
    facts = {"to the left of": col1 < col2, "to the right of": col1 > col2, "above": row1 < row2, "below": row1 > row2}
    return {name for name, holds in facts.items() if holds}


@dataclass(frozen=True)
class Scene:
    """The (up to two) objects read from one image, most coverage first."""

    objects: tuple[Judgement, ...]

    def matches(self, record: Mapping) -> dict[str, bool]:
        """Does the scene show a two-object ``record`` (fields ``colour``.. ``position``, ``colour2``..
        ``position2``, ``relation``)? The two judged objects are assigned to the record's first and second
        object in the order that matches more of their colours, shapes and sizes (ties: the one where the
        relation holds). Per part: ``colour_shape_both`` (each object's colour and shape), ``objects`` (each
        object's colour, shape and size), ``relation`` (the record's relation holds between the assigned
        objects' judged cells) and ``exact`` (objects and relation). Fewer than two objects never match."""
        if record.get("relation") not in RELATIONS:
            raise ValueError(f"expected a two-object record with a relation, got relation {record.get('relation')!r}")
        wanted = [{name: record[name + suffix] for name in OBJECT_ATTRIBUTES} for suffix in ("", "2")]
        if len(self.objects) < 2:
            return dict.fromkeys(("colour_shape_both", "objects", "relation", "exact"), False)

        def hits(order: tuple[int, int]) -> tuple[list[dict[str, bool]], bool]:
            first, second = (self.objects[i] for i in order)
            attribute_hits = [
                {name: getattr(judged, name) == want[name] for name in OBJECT_ATTRIBUTES}
                for judged, want in zip((first, second), wanted)
            ]
            return attribute_hits, record["relation"] in relations(first.position, second.position)

        attribute_hits, relation = max(
            (hits(order) for order in ((0, 1), (1, 0))),
            key=lambda hit: (sum(sum(h.values()) for h in hit[0]), hit[1]),
        )
        objects = all(all(h.values()) for h in attribute_hits)
        return {
            "colour_shape_both": all(h["colour"] and h["shape"] for h in attribute_hits),
            "objects": objects,
            "relation": relation,
            "exact": objects and relation,
        }


def judge_scene(image: np.ndarray) -> Scene:
    """The two blobs of ``image`` with the most coverage (specks below MIN_OBJECT_AREA skipped; one blob with two
    cores is cut in two, see ``_split``), each judged alone by the single-object rules."""
    masks = blobs(image)[:2]
    features = [f for f in (measure(image, mask) for mask in masks) if f.area >= MIN_OBJECT_AREA]
    if len(features) == 1:
        parts = [measure(image, part) for part in _split(image, masks[0])]
        features = parts if len(parts) == 2 and min(f.area for f in parts) >= MIN_OBJECT_AREA else features
    return Scene(tuple(classify(f) for f in features))


def _split(image: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """``mask`` cut between its two cores (pixels at SPLIT_COVERAGE of its brightest) with the most coverage,
    each pixel to the nearer core; ``[mask]`` when it has one core."""
    brightness, background = _brightness(image)
    coverage = (brightness - background) / (brightness[mask].max() - background)
    cores, count = ndimage.label(mask & (coverage >= SPLIT_COVERAGE), structure=np.ones((3, 3)))
    if count < 2:
        return [mask]
    mass = ndimage.sum_labels(coverage, cores, np.arange(1, count + 1))
    first, second = 1 + np.argsort(-mass, kind="stable")[:2]
    # Distance to the nearest pixel of each of the two cores; mask pixels go to the nearer one.
    near_first = ndimage.distance_transform_edt(cores != first)
    near_second = ndimage.distance_transform_edt(cores != second)
    return [mask & (near_first <= near_second), mask & (near_first > near_second)]


def scene_accuracy(images: Iterable[np.ndarray], records: Sequence[Mapping]) -> dict[str, float]:
    """Fraction of images that show their two-object record, per part of ``Scene.matches`` and ``exact``."""
    scenes = [judge_scene(np.asarray(image)) for image in images]
    if len(scenes) != len(records):
        raise ValueError(f"got {len(scenes)} images but {len(records)} records")
    if not scenes:
        raise ValueError("accuracy of zero images is undefined")
    hits = [scene.matches(record) for scene, record in zip(scenes, records)]
    return {name: sum(h[name] for h in hits) / len(hits) for name in hits[0]}
