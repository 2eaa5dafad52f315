"""FID: the Fréchet distance against an independent computation, zero for a set against itself, growing with blur;
the evaluation network reads real shapes images' attributes (else caption accuracy would be meaningless)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from dalle.config import MIN_BLUR_SIGMA, DataConfig, EvalConfig, EvalNetConfig, FieldError, Params
from dalle.data.shapes import iter_shapes
from dalle.evalnet import EvalNet, caption_accuracy, image_features, train_evalnet
from dalle.fid import blur, frechet_distance


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (independent of torchmetrics' eigenvalue route)."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_matches_scipy_and_the_closed_form():
    rng = np.random.default_rng(0)
    d = 8
    a = rng.normal(size=(4000, d))
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    b = rng.normal(size=(3000, d)) @ mixing + 0.5
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-4)
    # Known distance for exactly isotropic sets: N(0, I) vs N(m, s² I) gives |m|² + d (1 - s)².
    white = lambda x: (x - x.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # noqa: E731
    x, y = white(rng.normal(size=(2000, d))), 2.0 * white(rng.normal(size=(2500, d))) + 1.0
    assert frechet_distance(x, y) == pytest.approx(d * 1.0 + d * (1 - 2.0) ** 2, rel=1e-4)


def test_bad_feature_arrays_raise():
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def render(split: str, n: int, data: DataConfig | None = None) -> tuple[np.ndarray, list[dict]]:
    pairs = list(iter_shapes(data or DataConfig(), 3, split, n))
    return np.stack([image for image, _ in pairs]), [record for _, record in pairs]


@pytest.fixture(scope="module")
def shapes():
    """Renders of every pair (what train_evalnet trains on) and test images (half with held-out pairs)."""
    return render("train", 3000, DataConfig(holdout_pairs=())), render("test", 400)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_blur(shapes):
    (images, _), (test_images, _) = shapes
    images = np.concatenate([images[:800], test_images])
    torch.manual_seed(0)
    net = EvalNet(EvalNetConfig(), 32).eval()
    real = image_features(net, images[:800])
    assert abs(frechet_distance(real, real)) < 1e-6
    other = image_features(net, images[800:])
    distances = [frechet_distance(real, image_features(net, blur(images[800:], sigma))) for sigma in (0, 0.5, 1, 2)]
    assert distances[0] < distances[1] < distances[2] < distances[3], distances
    assert distances[0] == pytest.approx(frechet_distance(real, other))


def test_each_default_blur_radius_changes_8_bit_images_and_moves_fid(shapes):
    """``eval.blur_radii`` are pixels at 256 px scaled to data.image_size; each must change the uint8 images, and
    FID must grow with it (radii below MIN_BLUR_SIGMA at the working size are refused when params load)."""
    (images, _), (test_images, _) = shapes
    torch.manual_seed(0)
    net = EvalNet(EvalNetConfig(), 32).eval()
    real, test = image_features(net, images[:800]), test_images[:200]
    distances = []
    for radius in EvalConfig().blur_radii:
        sigma = radius * DataConfig().image_size / 256
        blurred = blur(test, sigma)
        assert radius == 0 or sigma >= MIN_BLUR_SIGMA and (blurred != test).mean() > 0.05, (radius, sigma)
        distances.append(frechet_distance(real, image_features(net, blurred)))
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    edge = np.zeros((1, 16, 16, 3), np.uint8)
    edge[:, :, 8:] = 255
    assert (blur(edge, 0.28) == edge).all() and (blur(edge, MIN_BLUR_SIGMA) != edge).any()


def test_blur_radii_too_small_for_the_image_size_are_refused():
    with pytest.raises(FieldError, match=r"eval\.blur_radii: \[1\.0, 2\.0\] blur by less than 0\.5 px.*radii >= 4"):
        Params(eval=EvalConfig(blur_radii=(0.0, 1.0, 2.0, 8.0)))
    assert Params(data=DataConfig(image_size=64), eval=EvalConfig(blur_radii=(0.0, 2.0))).eval.blur_radii[1] == 2.0


def test_evalnet_reads_real_images_attributes_including_held_out_pairs(shapes):
    (images, records), (test_images, test_records) = shapes
    cfg = EvalNetConfig(steps=250, batch_size=64)
    net = train_evalnet(cfg, 0, images, records, torch.device("cpu"), progress=False)
    held_out = np.array([r["held_out"] for r in test_records])
    for flag in (False, True):
        rows = np.flatnonzero(held_out == flag)
        accuracy = caption_accuracy(net, test_images[rows], [test_records[i] for i in rows])
        assert accuracy["all"] >= 0.99, (flag, accuracy)


def test_inception_features_need_the_weights_file(tmp_path):
    from dalle.fid import InceptionFeatures

    with pytest.raises(FileNotFoundError, match=r"eval.inception_weights: .*pt_inception.pth not found"):
        InceptionFeatures(tmp_path / "pt_inception.pth")
