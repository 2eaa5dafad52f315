"""The discrete VAE that turns images into a grid of tokens (Ramesh et al. 2021, §2.1 and Appendix A).

Encoder and decoder follow openai/DALL-E: groups of bottleneck residual blocks whose residual branch is scaled
by 1 / n_layers², max-pooling between encoder groups and nearest upsampling between decoder groups, and 1×1
convolutions on both sides of the relaxation (encoder → codebook logits, soft one-hot → decoder). Training
relaxes the discrete code with Gumbel-softmax at temperature τ; the loss is the reconstruction NLL plus β times
KL(q(z|x) ‖ uniform), both normalised per image dimension (see ``DiscreteVAE.forward``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle.checkpoint import config_values, load_state, load_weights
from dalle.config import DvaeConfig
from dalle.pixels import recon_nll, reconstruction


class BottleneckBlock(nn.Module):
    """id_path(x) + res_path(x) / n_layers²; the residual branch narrows to n_out / 4 channels.

    Encoder blocks use kernels (3, 3, 3, 1), decoder blocks (1, 3, 3, 3), as in openai/DALL-E.
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, k in enumerate(kernels, start=1):
            conv = nn.Conv2d(widths[i - 1], widths[i], k, padding=k // 2)
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", conv)]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


def _group_widths(cfg: DvaeConfig) -> list[int]:
    # One group per resolution: log2(downsample) poolings separate log2(downsample) + 1 groups, widths doubling.
    n_groups = int(math.log2(cfg.downsample)) + 1
    return [cfg.hidden * 2**i for i in range(n_groups)]


def _groups(cfg: DvaeConfig, widths: list[int], n_in: int, kernels: tuple[int, ...], resample) -> list:
    """``group_1 … group_n`` of bottleneck blocks, with ``resample`` (pool or upsample) between resolutions."""
    n_layers = len(widths) * cfg.blocks_per_group
    groups = []
    for g, width in enumerate(widths, start=1):
        group = []
        for b in range(cfg.blocks_per_group):
            group.append((f"block_{b + 1}", BottleneckBlock(n_in if b == 0 else width, width, n_layers, kernels)))
        if g < len(widths):
            name, module = resample
            group.append((name, module()))
        groups.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        n_in = width
    return groups


def _output(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(n_in, n_out, 1))]))


class Encoder(nn.Module):
    def __init__(self, cfg: DvaeConfig):
        super().__init__()
        widths = _group_widths(cfg)
        blocks = [
            ("input", nn.Conv2d(3, widths[0], 7, padding=3)),
            *_groups(cfg, widths, widths[0], ENCODER_KERNELS, ("pool", lambda: nn.MaxPool2d(2))),
            ("output", _output(widths[-1], cfg.codebook_size)),
        ]
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images)  # (B, K, H/d, W/d) codebook logits


class Decoder(nn.Module):
    def __init__(self, cfg: DvaeConfig):
        super().__init__()
        widths = _group_widths(cfg)[::-1]
        upsample = ("upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest"))
        blocks = [
            # The 1×1 input conv over a (soft) one-hot code is the codebook embedding.
            ("input", nn.Conv2d(cfg.codebook_size, cfg.codebook_dim, 1)),
            *_groups(cfg, widths, cfg.codebook_dim, DECODER_KERNELS, upsample),
            ("output", _output(widths[-1], 6 if cfg.recon_loss == "logit_laplace" else 3)),
        ]
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.blocks(codes)  # (B, 6 or 3, H, W)


def _kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) ‖ uniform over K codes) in nats, summed over latent positions: (B, K, h, w) → (B,)."""
    log_q = F.log_softmax(logits, dim=1)
    return (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(dim=(1, 2, 3))


class DiscreteVAE(nn.Module):
    def __init__(self, cfg: DvaeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % self.cfg.downsample or images.shape[3] % self.cfg.downsample:
            raise ValueError(f"image side {tuple(images.shape[2:])} not divisible by downsample {self.cfg.downsample}")

    def forward(self, images: torch.Tensor, tau: float, kl_weight: float) -> tuple[torch.Tensor, dict]:
        """Relaxed ELBO loss for float images (B, 3, H, W) in [0, 1]; returns (loss, parts for logging).

        Normalisation: the NLL is summed over the 3·H·W subpixels and KL over the latent positions, both
        divided by 3·H·W, so ``loss = (NLL + β·KL) / (3·H·W)`` per image, averaged over the batch.
        """
        self._check_images(images)
        logits = self.encoder(images).float()
        soft_codes = F.gumbel_softmax(logits, tau=tau, hard=self.cfg.hard, dim=1)
        nll, recon = recon_nll(self.cfg.recon_loss, self.decoder(soft_codes).float(), images)
        recon_loss = nll.mean()
        kl_per_dim = _kl_to_uniform(logits).mean() / images[0].numel()
        loss = recon_loss + kl_weight * kl_per_dim
        parts = {
            "recon": recon_loss.detach(),
            "kl": kl_per_dim.detach(),
            "codes": logits.argmax(1).detach(),
            "mse": F.mse_loss(recon.detach(), images),
        }
        return loss, parts

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] → token grid (B, H/d, W/d) int64 (argmax, no Gumbel noise)."""
        self._check_images(images)
        return self.encoder(images).argmax(dim=1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grid (B, h, w) → images (B, 3, h·d, w·d) in [0, 1]."""
        if tokens.ndim != 3:
            raise ValueError(f"expected a token grid of shape (B, h, w), got {tuple(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= self.cfg.codebook_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.codebook_size}), got {tokens.min()}..{tokens.max()}")
        return reconstruction(self.cfg.recon_loss, self.decoder(self._one_hot(tokens)).float())

    def _one_hot(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, self.cfg.codebook_size).permute(0, 3, 1, 2).float()  # (B, K, h, w)

    @torch.no_grad()
    def hard_elbo(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-dim NLL of the argmax code's reconstruction and KL(q ‖ uniform): what the prior will model."""
        self._check_images(images)
        logits = self.encoder(images).float()
        codes = logits.argmax(1)
        nll, recon = recon_nll(self.cfg.recon_loss, self.decoder(self._one_hot(codes)).float(), images, noise=False)
        return {
            "nll": nll.mean(dim=(1, 2, 3)),
            "kl_per_dim": _kl_to_uniform(logits) / images[0].numel(),
            "recon": recon,
            "codes": codes,
        }


def load_dvae(directory, device: torch.device | str = "cpu") -> DiscreteVAE:
    """Rebuild a trained dVAE from ``model.safetensors`` + ``config.json`` (as written by the train_dvae stage)."""
    state, config = load_weights(directory)
    config_values(config, ["downsample", "codebook_size", "hidden"], Path(directory) / "config.json")
    names = {f.name for f in dataclasses.fields(DvaeConfig)}
    model = DiscreteVAE(DvaeConfig(**{k: v for k, v in config.items() if k in names}))
    load_state(model, state, directory)
    return model.to(device).eval()
