"""Wilson intervals for accuracies and bootstrap intervals for FID (dalle/intervals.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dalle.fid import frechet_distance
from dalle.intervals import (
    bootstrap_fid,
    bootstrap_fid_difference,
    error_bars,
    fid_from_moments,
    mean_interval,
    resamples_for,
    wilson,
)


def test_wilson_matches_the_closed_form():
    for successes, n in [(0, 10), (3, 10), (10, 10), (86, 128), (500, 1000)]:
        z, p = 1.959963984540054, successes / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert wilson(successes, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    low, high = wilson(64, 128)
    assert 0.41 < low < 0.5 < high < 0.59  # 128 captions: about ±8.5 points at 50%


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="got 5 of 4"):
        wilson(5, 4)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson(0, 0)


def test_moments_formula_equals_torchmetrics():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(80, 16)) * 1.3 + 0.2
    moments = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    assert fid_from_moments(*moments[0], *moments[1]) == pytest.approx(frechet_distance(a, b), rel=1e-9)


def test_bootstrap_interval_covers_the_estimate_and_shrinks_with_more_images():
    rng = np.random.default_rng(1)
    small = rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 0.5
    large = rng.normal(size=(1600, 8)), rng.normal(size=(1600, 8)) + 0.5
    widths = []
    for a, b in (small, large):
        low, high = bootstrap_fid(a, b, resamples=300, seed=0)
        assert low < frechet_distance(a, b) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # 16x the images: about a quarter of the width
    assert bootstrap_fid(*small, resamples=300, seed=0) == bootstrap_fid(*small, resamples=300, seed=0)
    assert resamples_for(64) == 1000 and resamples_for(2048) == 100
    with pytest.raises(ValueError, match="at least 10"):
        bootstrap_fid(*small, resamples=5)


def test_bootstrap_width_matches_the_spread_of_fid_over_fresh_images():
    """At the evaluation's sizes (1,000 real, 128 generated, many dimensions) resampling's own bias is large; the
    re-centred interval still contains the estimate, and its width is the spread of FID over fresh draws."""
    rng = np.random.default_rng(2)
    d, mixing = 32, rng.normal(size=(32, 32)) / np.sqrt(32)
    real = rng.normal(size=(1000, d))
    draws = [rng.normal(size=(128, d)) @ mixing + 0.3 for _ in range(40)]
    estimates = np.array([frechet_distance(real, fake) for fake in draws])
    low, high = bootstrap_fid(real, draws[0], resamples=400, seed=0)
    assert low < estimates[0] < high
    spread = (high - low) / (2 * 1.96)  # the sd a 95% interval implies
    assert 0.5 < spread / estimates.std() < 2.0, (spread, estimates.std())


def test_error_bars_are_the_distances_to_each_bound():
    rows = [{"a": 0.5, "a_low": 0.4, "a_high": 0.7}, {"a": 2.0, "a_low": 1.0, "a_high": 2.5}]
    np.testing.assert_allclose(error_bars(rows, "a"), [[0.1, 1.0], [0.2, 0.5]])


def test_mean_interval_is_the_t_interval_written_out():
    values = np.array([2.0, 3.5, 1.0, 4.0, 2.5, 3.0])
    n, mean = len(values), values.mean()
    half = 2.570581835636314 * values.std(ddof=1) / np.sqrt(n)  # t(0.975, 5)
    assert mean_interval(values) == pytest.approx((mean - half, mean + half), abs=1e-12)
    assert mean_interval(np.array([1.0, 1.0, 1.0])) == (1.0, 1.0)  # no spread: a point
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_interval(np.array([1.0]))


def test_fid_difference_of_paired_sets():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 4))
    a = rng.normal(size=(200, 4))
    # The same set: no difference, in every resample.
    assert bootstrap_fid_difference(real, a, a, 50) == (0.0, 0.0, 0.0)
    # A shifted copy: the estimate is the difference of the two FIDs, and the interval excludes 0.
    shifted = a + 0.5
    estimate, low, high = bootstrap_fid_difference(real, shifted, a, 200, seed=1)
    assert estimate == pytest.approx(frechet_distance(real, shifted) - frechet_distance(real, a), abs=1e-9)
    assert 0 < low <= estimate <= high
    # Another draw of the same distribution: no difference shown.
    estimate, low, high = bootstrap_fid_difference(real, rng.normal(size=(200, 4)), a, 200, seed=1)
    assert low < 0 < high
    with pytest.raises(ValueError, match="same shape"):
        bootstrap_fid_difference(real, a, a[:100], 50)
