"""The evaluation network: an attribute classifier whose penultimate layer is the feature space of FID.

The paper reports FID with Inception-v3 features (§3.2). Those weights cannot be downloaded here, so by default
FID is computed in the features of a small CNN trained on the dataset's real training images to predict what
captions talk about (on shapes: colour, shape, size and position, one head each), and the same network reads
generated images back for caption accuracy. It is named honestly in outputs (``fid_evalnet``); a user with the
standard Inception weights file gets ``fid_inception`` instead (``dalle.fid``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dalle.checkpoint import config_values, load_state, load_weights
from dalle.config import COLOURS, SHAPES, EvalNetConfig
from dalle.data.order import batch_indices
from dalle.data.shapes import POSITIONS, SIZES
from dalle.pixels import to_float_images
from dalle.schedules import warmup_cosine
from dalle.training import adamw, set_lr

HEADS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}


class EvalNet(nn.Module):
    """Convolutions to a map at 1/4 resolution, then two summaries of it: a global max (what is there, wherever it
    is: colour, shape, size) and a 3×3 average (where it is), joined into the feature vector."""

    def __init__(self, cfg: EvalNetConfig, image_size: int):
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        width = cfg.width
        self.convs = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * width),
            nn.GELU(),
        )
        self.where = nn.AdaptiveAvgPool2d(3)
        self.project = nn.Sequential(nn.Linear(4 * width * (1 + 9), cfg.features), nn.GELU())
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.features, len(classes)) for name, classes in HEADS.items()})

    def features(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] → (B, features), the FID feature space."""
        grid = self.convs(pixels * 2 - 1)  # (B, 4w, S/4, S/4)
        return self.project(torch.cat([grid.amax(dim=(2, 3)), self.where(grid).flatten(1)], dim=1))

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def labels(records: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Class indices per head from shapes records."""
    return {name: np.array([classes.index(r[name]) for r in records]) for name, classes in HEADS.items()}


def train_evalnet(
    cfg: EvalNetConfig,
    seed: int,
    images: np.ndarray,
    records: Sequence[Mapping],
    device: torch.device,
    progress: bool = True,
) -> EvalNet:
    """Supervised training on single-object images and their attribute labels (cross-entropy summed over heads)."""
    torch.manual_seed(seed)
    model = EvalNet(cfg, images.shape[1]).to(device)
    optimizer = adamw(model, cfg.lr, weight_decay=1e-4)
    targets = {name: torch.from_numpy(values).to(device) for name, values in labels(records).items()}
    model.train()
    for step in tqdm(range(cfg.steps), desc="train_evalnet", unit="step", disable=not progress):
        set_lr(optimizer, warmup_cosine(step, cfg.steps, cfg.lr, cfg.lr / 100, min(50, cfg.steps // 10)))
        index = batch_indices(step, len(images), cfg.batch_size, seed)
        logits = model(to_float_images(images[index], device))
        loss = sum(F.cross_entropy(logits[name], targets[name][index]) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: EvalNet, images: np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Predicted class index per head for uint8 (N, S, S, 3) images."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {name: [] for name in HEADS}
    for start in range(0, len(images), batch_size):
        logits = model(to_float_images(images[start : start + batch_size], device))
        for name in HEADS:
            out[name].append(logits[name].argmax(dim=1).cpu().numpy())
    return {name: np.concatenate(values) for name, values in out.items()}


def caption_hits(model: EvalNet, images: np.ndarray, records: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Per image, whether its predicted attribute matches the caption's: one bool array per attribute and ``all``."""
    predicted, expected = predict(model, images), labels(records)
    hits = {name: predicted[name] == expected[name] for name in HEADS}
    return {**hits, "all": np.all(list(hits.values()), axis=0)}


def caption_accuracy(model: EvalNet, images: np.ndarray, records: Sequence[Mapping]) -> dict[str, float]:
    """Fraction of images whose predicted attribute matches the caption's, per attribute and all four (``all``)."""
    return {name: float(hit.mean()) for name, hit in caption_hits(model, images, records).items()}


@torch.no_grad()
def image_features(model: EvalNet, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    device = next(model.parameters()).device
    chunks = [
        model.features(to_float_images(images[start : start + batch_size], device)).double().cpu().numpy()
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks)


def load_evalnet(directory, device: torch.device | str = "cpu") -> EvalNet:
    state, config = load_weights(directory)
    size = config_values(config, ["image_size"], Path(directory) / "config.json")["image_size"]
    names = {f.name for f in dataclasses.fields(EvalNetConfig)}
    model = EvalNet(EvalNetConfig(**{k: v for k, v in config.items() if k in names}), size)
    load_state(model, state, directory)
    return model.to(device).eval()
