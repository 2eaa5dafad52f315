"""Text-to-image generation with reranking (§2.6): for each caption, draw N candidates from the prior, decode them
with the dVAE, score each against the caption with the contrastive reranker and keep the best K.

The output format written by ``write_outputs`` is a contract other tools read: ``<caption index>_<rank>.png``
per kept image, ``manifest.csv`` with columns ``caption,path,rank,score`` (path relative to the folder, rank 0 =
best, one row per kept image) and ``sheet.png``, a contact sheet with the captions under their images.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dalle.clip import Clip, load_clip
from dalle.dvae import DiscreteVAE, load_dvae
from dalle.pixels import to_float_images
from dalle.prior import Prior, load_prior
from dalle.sampling import sample_image_tokens
from dalle.text import TextTokenizer
from dalle.training import mixed_precision
from dalle.viz import contact_sheet

MANIFEST_COLUMNS = ("caption", "path", "rank", "score")
STAGES = {"dvae": "train_dvae", "prior": "train_prior", "clip": "train_clip"}


@dataclass
class Models:
    tokenizer: TextTokenizer
    dvae: DiscreteVAE
    prior: Prior
    clip: Clip

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def dvae_image_size(self) -> int:
        return self.prior.geometry.grid * self.dvae.cfg.downsample


def load_models(root: str | Path, device: torch.device | str = "cpu") -> Models:
    """The dVAE, prior (with its tokenizer) and reranker written by the pipeline under ``root``."""
    root = Path(root)
    for name, stage in STAGES.items():
        if not (root / name / "model.safetensors").is_file():
            raise FileNotFoundError(f"{root / name}/model.safetensors not found; run the {stage} stage first")
    models = Models(
        tokenizer=TextTokenizer.from_file(root / "prior" / "tokenizer.json"),
        dvae=load_dvae(root / "dvae", device),
        prior=load_prior(root / "prior", device),
        clip=load_clip(root / "clip", device),
    )
    check_compatible(models, root)
    return models


def check_compatible(models: Models, root: Path) -> None:
    """Models trained in different pipeline runs do not fit together; say which folders disagree and how."""
    dvae, prior, clip = models.dvae.cfg, models.prior.geometry, models.clip
    problems = []
    if dvae.codebook_size != prior.image_vocab:
        problems.append(
            f"{root / 'dvae'} has {dvae.codebook_size} codes "
            f"but {root / 'prior'} models {prior.image_vocab} image tokens"
        )
    image_size = json.loads((root / "dvae" / "config.json").read_text()).get("image_size")
    if image_size is not None and image_size // dvae.downsample != prior.grid:
        problems.append(
            f"{root / 'dvae'} turns {image_size} px images into a {image_size // dvae.downsample}² grid "
            f"but {root / 'prior'} models a {prior.grid}² grid"
        )
    if image_size is not None and clip.image_size != image_size:
        problems.append(f"{root / 'clip'} scores {clip.image_size} px images but {root / 'dvae'} makes {image_size} px")
    if clip.text_len != prior.text_len:
        problems.append(f"{root / 'clip'} reads {clip.text_len} text tokens but {root / 'prior'} {prior.text_len}")
    tokenizers = [root / name / "tokenizer.json" for name in ("prior", "clip")]
    if all(path.is_file() for path in tokenizers) and tokenizers[0].read_bytes() != tokenizers[1].read_bytes():
        problems.append(f"{tokenizers[1]} differs from {tokenizers[0]}: the two models read captions differently")
    if problems:
        raise ValueError("models from different pipeline runs: " + "; ".join(problems))


@dataclass(frozen=True)
class Candidates:
    caption: str
    images: np.ndarray  # (N, S, S, 3) uint8 in the order drawn
    scores: np.ndarray  # (N,) reranker score of each candidate against the caption

    def best(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best (images, scores), best first; ties keep the drawing order."""
        order = np.argsort(-self.scores, kind="stable")[:k]
        return self.images[order], self.scores[order]


def caption_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The random stream of caption ``index``: its candidates do not depend on the other captions or the batch."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return torch.Generator(device).manual_seed(state)


@torch.no_grad()
def generate(
    models: Models,
    captions: Sequence[str],
    candidates: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    prime_tokens: torch.Tensor | None = None,
) -> Iterator[Candidates]:
    """Draw and score ``candidates`` images per caption; yields one ``Candidates`` per caption, in order.
    ``prime_tokens`` (1, n) fixes the first n image tokens of every candidate (see ``prime_tokens_from_image``)."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, text_len = models.device, models.prior.geometry.text_len
    encoded = models.tokenizer.encode(list(captions), text_len)
    for index in np.flatnonzero(encoded.truncated):
        warnings.warn(
            f"caption {index} ({captions[index][:40]!r}...) has {encoded.full_lengths[index]} tokens; "
            f"truncated to text_len={text_len}",
            stacklevel=2,
        )
    grid = models.prior.geometry.grid
    for index in tqdm(range(len(captions)), desc="generate", unit="caption", disable=not progress):
        generator = caption_generator(seed, index, device)
        ids = torch.from_numpy(np.asarray(encoded.ids[index], dtype=np.int64)).to(device)
        length = torch.tensor(int(encoded.lengths[index]), device=device)
        images, scores = [], []
        for start in range(0, candidates, batch_size):
            n = min(batch_size, candidates - start)
            text_ids, text_lengths = ids.expand(n, -1), length.expand(n)
            with mixed_precision(device):
                prime = None if prime_tokens is None else prime_tokens.to(device).expand(n, -1)
                tokens = sample_image_tokens(
                    models.prior,
                    text_ids,
                    text_lengths,
                    temperature,
                    top_k,
                    top_p,
                    guidance_scale,
                    prime_tokens=prime,
                    generator=generator,
                )
                pixels = models.dvae.decode(tokens.view(n, grid, grid)).float().clamp(0, 1)
                scores.append(models.clip.score(pixels, text_ids, text_lengths).float().cpu().numpy())
            images.append((pixels.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy())
        yield Candidates(captions[index], np.concatenate(images), np.concatenate(scores))


@torch.no_grad()
def draw_one_each(
    models: Models,
    captions: Sequence[str],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> np.ndarray:
    """One image per caption, no reranking (the prior alone), sampled ``batch_size`` captions at a time →
    uint8 (len(captions), S, S, 3)."""
    device, grid = models.device, models.prior.geometry.grid
    encoded = models.tokenizer.encode(list(captions), models.prior.geometry.text_len)
    generator = torch.Generator(device).manual_seed(seed)
    images = []
    for start in range(0, len(captions), batch_size):
        ids = torch.from_numpy(encoded.ids[start : start + batch_size].astype(np.int64)).to(device)
        lengths = torch.from_numpy(encoded.lengths[start : start + batch_size].astype(np.int64)).to(device)
        with mixed_precision(device):
            tokens = sample_image_tokens(models.prior, ids, lengths, temperature, top_k, top_p, generator=generator)
            pixels = models.dvae.decode(tokens.view(len(ids), grid, grid)).float().clamp(0, 1)
        images.append((pixels.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy())
    return np.concatenate(images)


@torch.no_grad()
def prime_tokens_from_image(models: Models, image: np.ndarray, prime_rows: int) -> torch.Tensor:
    """The dVAE tokens of the top ``prime_rows`` rows of a uint8 (S, S, 3) image, as (1, prime_rows × grid)."""
    size, grid = models.dvae_image_size, models.prior.geometry.grid
    if image.shape != (size, size, 3) or image.dtype != np.uint8:
        raise ValueError(f"the priming image must be uint8 ({size}, {size}, 3), got {image.dtype} {image.shape}")
    if not 0 < prime_rows < grid:
        raise ValueError(f"prime_rows must be in 1..{grid - 1} (the token grid has {grid} rows), got {prime_rows}")
    tokens = models.dvae.encode(to_float_images(image[None], models.device))  # (1, grid, grid)
    return tokens[:, :prime_rows].reshape(1, -1)


class OutputWriter:
    """Writes each caption's kept images and manifest rows as soon as it is given them, so a crash at caption 90
    of 100 leaves 89 captions' images and rows on disk. Memory holds one caption's candidates, plus the first
    ``sheet_limit`` kept images for ``sheet.png`` (all of them with None).

    ``manifest.csv`` is started afresh (header only) on opening; each caption's rows are appended in one write
    and flushed to disk before the next caption, after its images: a row never names an image not yet written."""

    def __init__(self, out: str | Path, top: int, sheet_limit: int | None = None):
        self.out, self.top, self.sheet_limit, self.captions = Path(out), top, sheet_limit, 0
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest = self.out / "manifest.csv"
        tmp = self.manifest.with_name(f".manifest.csv.tmp-{os.getpid()}")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS).writeheader()
        os.replace(tmp, self.manifest)  # an older manifest never mixes with this run's rows
        self.handle = self.manifest.open("a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.handle, fieldnames=MANIFEST_COLUMNS)
        self.sheet_images: list[np.ndarray] = []
        self.sheet_captions: list[str] = []

    def add(self, result: Candidates) -> None:
        index, rows = self.captions, []
        images, scores = result.best(self.top)
        for rank, (image, score) in enumerate(zip(images, scores)):
            name = f"{index}_{rank}.png"
            Image.fromarray(image).save(self.out / name)
            rows.append({"caption": result.caption, "path": name, "rank": rank, "score": f"{score:.6f}"})
            if self.sheet_limit is None or len(self.sheet_images) < self.sheet_limit:
                self.sheet_images.append(image)
                self.sheet_captions.append(result.caption if self.top == 1 else f"{result.caption} (#{rank})")
        self.writer.writerows(rows)
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.captions += 1

    def close(self) -> Path:
        """Finish: close the manifest and write ``sheet.png``; returns the manifest path."""
        self.handle.close()
        if self.sheet_images:
            columns = min(8, len(self.sheet_images))
            contact_sheet(self.sheet_images, self.sheet_captions, columns=columns).save(self.out / "sheet.png")
        return self.manifest

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self.handle.closed:
            self.handle.close()  # on an error: what was written stays, no sheet


def write_outputs(out: str | Path, results: Iterable[Candidates], top: int, sheet_limit: int | None = None) -> Path:
    """Write the kept images, ``manifest.csv`` and ``sheet.png`` into ``out`` caption by caption as ``results``
    yields them (see ``OutputWriter``); returns the manifest path."""
    with OutputWriter(out, top, sheet_limit) as writer:
        for result in results:
            writer.add(result)
            del result  # freed before the next caption is drawn, not when the loop rebinds the name
        return writer.close()
