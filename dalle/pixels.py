"""Pixel mapping and reconstruction likelihoods of the dVAE (Ramesh et al. 2021, §A.3).

The logit-Laplace density lives on (0, 1), so pixels are squeezed into [ε, 1 − ε] first; ``map_pixels`` and
``unmap_pixels`` are the pure functions of openai/DALL-E beside their constant.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] → [ε, 1 − ε]."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[ε, 1 − ε] → [0, 1], clamped."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def logit_laplace_nll(x_mapped: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise −ln f(x | μ, b), f(x) = exp(−|logit x − μ| / b) / (2 b x (1 − x)), for x in (0, 1)."""
    logit_x = torch.log(x_mapped) - torch.log1p(-x_mapped)
    return (
        math.log(2.0)
        + log_b
        + torch.log(x_mapped)
        + torch.log1p(-x_mapped)
        + torch.abs(logit_x - mu) * torch.exp(-log_b)
    )


def dequantize(images: torch.Tensor, noise: bool) -> torch.Tensor:
    """8-bit images in [0, 1] → continuous values (k + u) / 256, u ~ U[0, 1) (or u = ½ without noise).

    A continuous density on exactly repeated values (the shapes' black background) is unbounded: b → 0
    sends the NLL to −∞ and training chases that instead of the objects. Uniform dequantisation bounds it
    and makes the NLL an upper bound on the discrete 8-bit NLL (Theis et al. 2016).
    """
    levels = torch.round(images * 255)
    offset = torch.rand_like(images) if noise else torch.full_like(images, 0.5)
    return (levels + offset) / 256


def reconstruction(kind: str, decoder_out: torch.Tensor) -> torch.Tensor:
    """The image in [0, 1] a decoder output stands for: unmap(sigmoid(μ)) for logit-Laplace, else clamped."""
    if kind == "logit_laplace":
        return unmap_pixels(torch.sigmoid(decoder_out[:, :3]))
    return decoder_out.clamp(0, 1)


def recon_nll(
    kind: str, decoder_out: torch.Tensor, images: torch.Tensor, noise: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element reconstruction loss and the reconstruction in [0, 1] for ``images`` (B, 3, H, W) in [0, 1].

    ``logit_laplace``: the decoder emits 6 channels (μ, ln b); the loss is the NLL of the dequantised, mapped
    pixels and the reconstruction is unmap(sigmoid(μ)). ``mse`` / ``smooth_l1``: 3 channels compared with the
    pixels directly, reconstruction clamped to [0, 1]. No sigmoid there: on mostly black images it saturates
    within tens of steps (outputs → −∞) and the gradient that would teach the objects vanishes.
    """
    if kind == "logit_laplace":
        mu, log_b = decoder_out[:, :3], decoder_out[:, 3:]
        targets = map_pixels(dequantize(images, noise))
        return logit_laplace_nll(targets, mu, log_b), reconstruction(kind, decoder_out)
    recon = reconstruction(kind, decoder_out)
    if kind == "mse":
        return F.mse_loss(decoder_out, images, reduction="none"), recon
    if kind == "smooth_l1":
        return F.smooth_l1_loss(decoder_out, images, reduction="none", beta=0.1), recon
    raise ValueError(f"unknown recon_loss {kind!r}; expected logit_laplace, mse or smooth_l1")


def unit_interval_nll(kind: str, mean_nll: float, mse: float, eps: float = LOGIT_LAPLACE_EPS) -> float:
    """Per-dim NLL in nats of a pixel density on [0, 1], from the validation NLL (logit-Laplace) or MSE.

    logit-Laplace: the loss is a density on mapped pixels; on [0, 1] it is that times the Jacobian (1 − 2ε).
    mse / smooth_l1 define no density; we report the Gaussian decoder with σ² fitted to the MSE,
    ½ ln(2πe σ²), so runs with different losses share one (upper-bound) scale.
    """
    if kind == "logit_laplace":
        return mean_nll - math.log(1 - 2 * eps)
    return 0.5 * math.log(2 * math.pi * math.e * max(mse, 1e-12))


def bits_per_dim(nll_nats: float, kl_nats_per_dim: float) -> float:
    """Negative ELBO in bits per 8-bit subpixel: on dequantised pixels an 8-bit value has probability
    ≥ density × bin width 1/256, hence + log2(256) = 8 bits."""
    return (nll_nats + kl_nats_per_dim) / math.log(2) + 8.0


def to_float_images(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [0, 1] on ``device``."""
    return torch.from_numpy(np.array(batch)).to(device).permute(0, 3, 1, 2).float().div_(255)
