"""Fréchet distance between image sets in a feature space (FID, Heusel et al. 2017; DALL-E §3.2, Fig. 9), and the
Gaussian blur the paper applies to both sets before measuring it.

The distance comes from torchmetrics' ``FrechetInceptionDistance`` (mean and covariance accumulated in float64,
the matrix square root through the eigenvalues of Σ₁Σ₂), fed precomputed features through an identity module so
that any feature network can be used: the evaluation network by default (``fid_evalnet``) or the standard FID
Inception-v3, loaded from a weights file the user has (``fid_inception``, needs the ``torch-fidelity`` package).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance


class _Precomputed(nn.Module):
    """Passes features through: torchmetrics calls its feature network on whatever ``update`` receives."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, d) feature sets (N >= 2 each)."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"need two (N, d) feature arrays of one width, got {features_a.shape} and {features_b.shape}")
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(features_a)} and {len(features_b)}")
    metric = FrechetInceptionDistance(feature=_Precomputed(features_a.shape[1]), reset_real_features=True)
    metric.update(torch.from_numpy(np.asarray(features_a, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(features_b, dtype=np.float64)), real=False)
    return float(metric.compute())


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of uint8 (N, S, S, 3) images with standard deviation ``sigma`` pixels (0: unchanged)."""
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return np.asarray(images)
    blurred = ndimage.gaussian_filter(np.asarray(images, dtype=np.float32), sigma=(0, sigma, sigma, 0), mode="reflect")
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


class InceptionFeatures:
    """The standard FID Inception-v3 pool features (2048-d), weights from a local file (never downloaded)."""

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu"):
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"eval.inception_weights: {weights} not found")
        try:
            import torch_fidelity  # noqa: F401  (the extractor torchmetrics wraps)
        except ImportError:
            raise ImportError(
                "eval.fid_features: inception needs the torch-fidelity package: pip install -e '.[inception]'"
            ) from None
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
        self.network = metric.inception.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.asarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
            chunks.append(self.network(batch.to(self.device)).double().cpu().numpy())
        return np.concatenate(chunks)
