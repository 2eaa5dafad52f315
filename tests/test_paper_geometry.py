"""Smoke test at the paper's geometry with tiny widths (Ramesh et al. 2021, §2 and Appendix A-B): 256 px images, an
8× downsampling dVAE with K = 8192 codes, 256 text tokens from a 16384-token vocabulary and a 32 × 32 image grid,
so T = 1280; the paper's schedule with an 11 × 11 conv window. A few training steps of each model and a sample,
checking shapes, the masks at T = 1280 and that the KV cache still reproduces the full forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalle.config import DvaeConfig, PriorConfig
from dalle.data.tokens import TokenSplit
from dalle.dvae_train import train_dvae
from dalle.masks import attention_mask
from dalle.prior import PriorGeometry
from dalle.prior_train import train_prior
from dalle.sampling import sample_image_tokens

IMAGE, DOWNSAMPLE, CODES, TEXT_LEN, TEXT_VOCAB, KERNEL = 256, 8, 8192, 256, 16384, 11
GRID = IMAGE // DOWNSAMPLE
GEOMETRY = PriorGeometry(text_vocab=TEXT_VOCAB, text_len=TEXT_LEN, image_vocab=CODES, grid=GRID)
PRIOR = PriorConfig(
    n_layers=4, n_heads=2, d_model=32, schedule="paper", conv_kernel=KERNEL, batch_size=2, steps=2, warmup_steps=1,
    val_images=2, log_every=1, val_every=2, sample_every=2, samples=1, checkpoint_every=2,
)  # fmt: skip


def random_tokens(n: int, seed: int = 0) -> TokenSplit:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, TEXT_LEN + 1, n).astype(np.int32)
    ids = np.where(np.arange(TEXT_LEN) < lengths[:, None], rng.integers(1, TEXT_VOCAB, (n, TEXT_LEN)), 0)
    grids = rng.integers(0, CODES, (n, GRID, GRID)).astype(np.uint16)
    return TokenSplit(grids, ids.astype(np.int32), lengths, np.arange(n + 1, dtype=np.int64))


def test_dvae_trains_and_codes_256px_images_as_a_32x32_grid_of_8192():
    cfg = DvaeConfig(
        downsample=DOWNSAMPLE, codebook_size=CODES, hidden=8, codebook_dim=16, batch_size=2, steps=2,
        warmup_steps=1, val_images=2, log_every=1, val_every=2, image_every=2, checkpoint_every=2,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, IMAGE, IMAGE, 3), dtype=np.uint8)
    result = train_dvae(cfg, 0, images, images[:2])
    assert np.isfinite(result.final["val_mse"]) and np.isfinite(result.final["val_kl"])
    with torch.no_grad():
        codes = result.model.encode(torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 255)
        pixels = result.model.decode(codes)
    assert codes.shape == (2, GRID, GRID) and 0 <= codes.min() and codes.max() < CODES
    assert pixels.shape == (2, 3, IMAGE, IMAGE)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_masks_at_t_1280_allow_the_pairs_the_paper_describes(kind):
    mask = attention_mask(kind, TEXT_LEN, GRID, KERNEL)
    assert mask.shape == (1280, 1280)
    image = mask[TEXT_LEN:]  # (1024 image queries, 1280 keys)
    assert image[:, :TEXT_LEN].all() and not mask[:TEXT_LEN, TEXT_LEN:].any()  # all text; text never sees image
    seen = image[:, TEXT_LEN:].sum(dim=1)
    query = torch.arange(GRID * GRID)
    row, column = query // GRID, query % GRID
    if kind == "row":  # itself and the previous grid tokens
        expected = torch.clamp(query, max=GRID) + 1
    elif kind == "column":  # itself and every token above it
        expected = row + 1
    else:  # the causal part of the 11 x 11 window, clipped at the image's edges
        radius = KERNEL // 2
        width = torch.clamp(column + radius, max=GRID - 1) - torch.clamp(column - radius, min=0) + 1
        earlier_rows = torch.clamp(row, max=radius)
        expected = earlier_rows * width + (column - torch.clamp(column - radius, min=0)) + 1
    torch.testing.assert_close(seen, expected)


def test_prior_trains_samples_and_its_cache_holds_at_t_1280():
    train, val = random_tokens(4), random_tokens(2, seed=1)
    result = train_prior(PRIOR, 0, GEOMETRY, train, val)
    prior = result.model
    assert GEOMETRY.seq_len == 1280 and np.isfinite(result.final["val_image_nll"])
    assert [layer.kind for layer in prior.blocks] == ["row", "column", "row", "conv"]
    text_ids = torch.from_numpy(val.text_ids[:1]).long()
    text_lengths = torch.from_numpy(val.text_lengths[:1]).long()
    image_tokens = torch.from_numpy(val.image_tokens[:1].reshape(1, -1).astype(np.int64))
    with torch.no_grad():
        full, _ = prior(text_ids, text_lengths, image_tokens)
        logits, cache = prior.prefill(text_ids, text_lengths)
        stepped = [logits]
        for index in range(GRID * GRID - 1):
            logits, cache = prior.step(cache, image_tokens[:, index])
            stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, dim=1), full.image, rtol=0, atol=1e-4)
    sampled = sample_image_tokens(prior, text_ids, text_lengths, top_k=64, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, GRID * GRID) and 0 <= sampled.min() and sampled.max() < CODES
