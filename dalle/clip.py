"""The contrastive text-image model that reranks samples (§2.6; CLIP, Radford et al. 2021), trained from scratch on
the dataset's own captions because no pretrained weights can be downloaded.

Text: a transformer encoder over the BPE ids (pre-LayerNorm, padding masked), mean-pooled over the caption's
tokens. Image: a small CNN whose last feature map is flattened rather than pooled, so the embedding keeps where
things are (captions name positions). Both are projected to ``embed_dim`` and L2-normalised; the loss is the
symmetric InfoNCE over the batch with a learned temperature (logit scale clamped at 100, as in CLIP).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle.checkpoint import config_values, load_state, load_weights
from dalle.config import ClipConfig


class TextEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig, text_vocab: int, text_len: int):
        super().__init__()
        self.token_embedding = nn.Embedding(text_vocab, cfg.text_width)
        self.position_embedding = nn.Embedding(text_len, cfg.text_width)
        layer = nn.TransformerEncoderLayer(
            cfg.text_width,
            cfg.text_heads,
            dim_feedforward=4 * cfg.text_width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)

    def forward(self, text_ids: Tensor, text_lengths: Tensor) -> Tensor:
        positions = torch.arange(text_ids.shape[1], device=text_ids.device)
        # An empty caption keeps its first slot so that attention has a key; it then encodes that slot.
        real = positions[None, :] < text_lengths.clamp(min=1)[:, None]  # (B, text_len)
        x = self.token_embedding(text_ids.masked_fill(~real, 0)) + self.position_embedding(positions)
        x = self.ln_final(self.transformer(x, src_key_padding_mask=~real))
        pooled = (x * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True)
        return self.proj(pooled)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig, image_size: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.image_channels, 3, padding=1), nn.GELU()]
        channels = cfg.image_channels
        for _ in range(cfg.image_stages):  # each stage halves the resolution and doubles the width
            layers += [
                nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
                nn.GroupNorm(8, 2 * channels),
                nn.GELU(),
                nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
                nn.GELU(),
            ]
            channels *= 2
        self.features = nn.Sequential(*layers)
        side = image_size // 2**cfg.image_stages
        self.proj = nn.Linear(channels * side * side, cfg.embed_dim, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:
        """``pixels`` (B, 3, S, S) in [0, 1]."""
        return self.proj(self.features(pixels * 2 - 1).flatten(1))


class Clip(nn.Module):
    def __init__(self, cfg: ClipConfig, text_vocab: int, text_len: int, image_size: int):
        super().__init__()
        if image_size % 2**cfg.image_stages:
            raise ValueError(f"image_size {image_size} is not divisible by 2**image_stages={2**cfg.image_stages}")
        self.cfg, self.text_vocab, self.text_len, self.image_size = cfg, text_vocab, text_len, image_size
        self.text = TextEncoder(cfg, text_vocab, text_len)
        self.image = ImageEncoder(cfg, image_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, text_ids: Tensor, text_lengths: Tensor) -> Tensor:
        return F.normalize(self.text(text_ids, text_lengths).float(), dim=-1)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.image(pixels).float(), dim=-1)

    def forward(self, pixels: Tensor, text_ids: Tensor, text_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Pairs (image i, caption i) → (logits (B images, B captions), symmetric InfoNCE loss)."""
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"pixels must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(pixels.shape)}")
        if text_ids.shape != (pixels.shape[0], self.text_len):
            raise ValueError(f"text_ids must be (B={pixels.shape[0]}, {self.text_len}), got {tuple(text_ids.shape)}")
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * self.encode_image(pixels) @ self.encode_text(text_ids, text_lengths).T  # (B, B)
        targets = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        return logits, loss

    @torch.no_grad()
    def score(self, pixels: Tensor, text_ids: Tensor, text_lengths: Tensor) -> Tensor:
        """Cosine similarity of each image with its own caption (B,): the reranking score."""
        return (self.encode_image(pixels) * self.encode_text(text_ids, text_lengths)).sum(dim=-1)


def load_clip(directory, device: torch.device | str = "cpu") -> Clip:
    """Rebuild a trained reranker from ``model.safetensors`` + ``config.json`` (as written by train_clip)."""
    state, config = load_weights(directory)
    dims = config_values(config, ["text_vocab", "text_len", "image_size"], Path(directory) / "config.json")
    names = {f.name for f in dataclasses.fields(ClipConfig)}
    model = Clip(ClipConfig(**{k: v for k, v in config.items() if k in names}), **dims)
    load_state(model, state, directory)
    return model.to(device).eval()
