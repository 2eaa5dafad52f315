"""The token dataset the prior trains on: per split, dVAE image tokens and the BPE ids of every caption.

``image_tokens.npy``  (N, grid, grid) uint16 (int32 when the codebook exceeds 65536)
``text_ids.npy``      (M, text_len) int32, zero past each caption's end; M = captions over all images
``text_lengths.npy``  (M,) int32, tokens kept per caption (pads are positions, not ids: see dalle/text.py)
``caption_offsets.npy`` (N + 1,) int64: captions of image i are rows offsets[i]:offsets[i+1]
All arrays open with ``np.load(mmap_mode="r")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dalle.data.store import Split
from dalle.dvae import DiscreteVAE
from dalle.pixels import to_float_images
from dalle.text import TextTokenizer
from dalle.training import epoch_of, mixed_precision

FILES = ("image_tokens.npy", "text_ids.npy", "text_lengths.npy", "caption_offsets.npy")


@dataclass(frozen=True)
class TokenSplit:
    image_tokens: np.ndarray
    text_ids: np.ndarray
    text_lengths: np.ndarray
    caption_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.image_tokens)


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 2**16 else np.dtype(np.int32)


@torch.no_grad()
def encode_images(model: DiscreteVAE, images: np.ndarray, batch_size: int, desc: str) -> np.ndarray:
    """uint8 (N, S, S, 3) → token grids (N, S/d, S/d), batched, argmax codes."""
    device = next(model.parameters()).device
    grid = images.shape[1] // model.cfg.downsample
    tokens = np.empty((len(images), grid, grid), dtype=token_dtype(model.cfg.codebook_size))
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch = to_float_images(images[start : start + batch_size], device)
        with mixed_precision(device):
            tokens[start : start + len(batch)] = model.encode(batch).cpu().numpy()
    return tokens


def encode_split(
    model: DiscreteVAE,
    tokenizer: TextTokenizer,
    split: Split,
    text_len: int,
    out_dir: Path,
    batch_size: int = 256,
    desc: str = "encode",
) -> dict:
    """Write one split's token files to ``out_dir``; returns caption / truncation counts and how often each
    code occurs (``code_counts``, length codebook_size)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image_tokens = encode_images(model, split.images, batch_size, desc)
    np.save(out_dir / "image_tokens.npy", image_tokens)
    captions = [caption for caps in split.records["captions"] for caption in caps]
    encoded = tokenizer.encode(captions, text_len)
    offsets = np.concatenate([[0], np.cumsum(split.records["captions"].map(len).to_numpy())]).astype(np.int64)
    np.save(out_dir / "text_ids.npy", encoded.ids)
    np.save(out_dir / "text_lengths.npy", encoded.lengths)
    np.save(out_dir / "caption_offsets.npy", offsets)
    code_counts = np.bincount(image_tokens.ravel().astype(np.int64), minlength=model.cfg.codebook_size)
    return {"captions": len(captions), "truncated": int(encoded.truncated.sum()), "code_counts": code_counts}


def load_tokens(root: str | Path, split: str) -> TokenSplit:
    directory = Path(root) / split
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}; run the encode stage")
    arrays = {name[:-4]: np.load(directory / name, mmap_mode="r") for name in FILES}
    return TokenSplit(**arrays)


def caption_rows(step: int, images: np.ndarray, offsets: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
    """Rows of ``text_ids`` paired with ``images`` at batch ``step``: one caption per image per epoch."""
    n_images = len(offsets) - 1
    epoch, _ = epoch_of(step, n_images, batch_size)
    draws = np.random.default_rng([seed, epoch, 1]).random(n_images)[images]  # the whole epoch's draw, indexed
    counts = offsets[images + 1] - offsets[images]
    return offsets[images] + np.floor(draws * counts).astype(np.int64)
