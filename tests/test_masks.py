"""Attention masks (dalle/masks.py) against brute-force loops written from the paper's verbal rules."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle.masks import (
    MASK_KINDS,
    attention_mask,
    block_density,
    block_mask,
    block_occupancy,
    draw_mask,
    layer_kinds,
    mask_density,
)

KINDS_WITH_KERNELS = [("full", 11), ("row", 11), ("column", 11), ("conv", 3), ("conv", 5), ("conv", 11)]


def brute_force_mask(kind: str, text_len: int, grid: int, kernel: int) -> torch.Tensor:
    """One (query, key) pair at a time, straight from the verbal rules; shares no code with dalle.masks."""
    seq_len = text_len + grid * grid
    mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for query in range(seq_len):
        for key in range(seq_len):
            if query < text_len:  # text query: causal over text, never an image key
                allowed = key < text_len and key <= query
            elif key < text_len:  # image query sees every text key
                allowed = True
            else:
                q_img, k_img = query - text_len, key - text_len
                q_row, q_col = divmod(q_img, grid)
                k_row, k_col = divmod(k_img, grid)
                if kind == "full":
                    allowed = k_img <= q_img
                elif kind == "row":
                    allowed = q_img - grid <= k_img <= q_img
                elif kind == "column":
                    allowed = k_col == q_col and k_row <= q_row
                else:
                    half = kernel // 2
                    in_window = abs(q_row - k_row) <= half and abs(q_col - k_col) <= half
                    allowed = in_window and k_img <= q_img
            mask[query, key] = allowed
    return mask


@pytest.mark.parametrize("kind,kernel", KINDS_WITH_KERNELS)
@pytest.mark.parametrize("text_len", [0, 1, 5])
@pytest.mark.parametrize("grid", [3, 4, 6])
def test_matches_brute_force(kind, kernel, text_len, grid):
    expected = brute_force_mask(kind, text_len, grid, kernel)
    assert torch.equal(attention_mask(kind, text_len, grid, kernel), expected)


@pytest.mark.parametrize("kind,kernel", KINDS_WITH_KERNELS)
def test_invariants(kind, kernel):
    text_len, grid = 5, 6
    mask = attention_mask(kind, text_len, grid, kernel)
    seq_len = text_len + grid * grid
    assert mask.shape == (seq_len, seq_len) and mask.dtype == torch.bool
    assert not mask.triu(diagonal=1).any(), "a key after its query is visible"
    assert not mask[:text_len, text_len:].any(), "text sees image"
    assert mask[text_len:, :text_len].all(), "image misses some text"
    assert mask.diagonal().all(), "a query cannot see itself"


def _visible_image_tokens(kind: str, image_token: int, grid: int = 4, kernel: int = 11, text_len: int = 2) -> list[int]:
    row = attention_mask(kind, text_len, grid, kernel)[text_len + image_token, text_len:]
    return row.nonzero().flatten().tolist()


def test_hand_checked_examples():
    # grid 4: token 5 is (row 1, col 1), token 9 is (row 2, col 1).
    assert _visible_image_tokens("row", 5) == [1, 2, 3, 4, 5]
    assert _visible_image_tokens("column", 9) == [1, 5, 9]
    assert _visible_image_tokens("conv", 5, kernel=3) == [0, 1, 2, 4, 5]
    # Token 4 starts row 1: the conv window must not wrap to token 3 at the end of row 0.
    assert _visible_image_tokens("conv", 4, kernel=3) == [0, 1, 4]
    assert _visible_image_tokens("row", 0) == [0]
    assert _visible_image_tokens("full", 3) == [0, 1, 2, 3]


def _flex_eager(q, k, v, mask):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        # Eager CPU flex_attention warns that it is the unfused reference implementation; that is what we want.
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=mask)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("text_len,grid", [(16, 8), (16, 16)])  # T = 80 and 272, neither a multiple of 128
def test_flex_matches_sdpa(kind, text_len, grid):
    torch.manual_seed(0)
    seq_len = text_len + grid * grid
    q, k, v = (torch.randn(1, 2, seq_len, 16) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(kind, text_len, grid))
    torch.testing.assert_close(_flex_eager(q, k, v, block_mask(kind, text_len, grid)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,kernel", KINDS_WITH_KERNELS)
@pytest.mark.parametrize("block_size", [16, 128])
def test_block_mask_tiles(kind, kernel, block_size):
    # Eager flex re-evaluates mask_mod densely, so check the tiles the compiled kernel relies on separately.
    text_len, grid = 16, 16
    blocks = block_mask(kind, text_len, grid, kernel, block_size=block_size)
    occupancy = block_occupancy(attention_mask(kind, text_len, grid, kernel), block_size)
    assert torch.equal(blocks.to_dense()[0, 0].bool(), occupancy)
    # block_density comes from the dense mask; the BlockMask counts its partial and full tiles on its own.
    tiles = blocks.kv_num_blocks.sum() + (0 if blocks.full_kv_num_blocks is None else blocks.full_kv_num_blocks.sum())
    assert block_density(kind, text_len, grid, kernel, block_size) == pytest.approx(tiles.item() / occupancy.numel())


def test_paper_schedule():
    # Paper, 1-indexed layer i: column if (i - 2) mod 4 == 0, conv in the last layer, row otherwise.
    expected = {1: "row", 2: "column", 3: "row", 4: "row", 5: "row", 6: "column", 7: "row", 8: "conv"}
    assert layer_kinds("paper", 8) == [expected[i] for i in range(1, 9)]
    assert layer_kinds("paper", 1) == ["conv"]


def test_named_and_explicit_schedules():
    assert layer_kinds("axial", 5) == ["row", "column", "row", "column", "row"]
    assert layer_kinds("conv", 3) == ["conv"] * 3
    explicit = ["full", "conv", "row"]
    assert layer_kinds(explicit, 3) == explicit
    assert layer_kinds(("row", "column"), 2) == ["row", "column"]


def test_schedule_errors_name_the_culprit():
    with pytest.raises(ValueError, match="diagonal"):
        layer_kinds(["row", "diagonal"], 2)
    with pytest.raises(ValueError, match="strided"):
        layer_kinds("strided", 4)
    with pytest.raises(ValueError, match="n_layers=3"):
        layer_kinds(["row", "column"], 3)
    with pytest.raises(ValueError, match="kernel"):
        attention_mask("conv", 2, 4, kernel=4)
    with pytest.raises(ValueError, match="dense"):
        attention_mask("dense", 2, 4)


def test_densities():
    text_len, grid = 16, 32
    full = block_density("full", text_len, grid, block_size=128)
    row = block_density("row", text_len, grid, block_size=128)
    assert full < 1
    assert row < full
    for kind in MASK_KINDS:
        assert 0 < block_density(kind, text_len, grid, block_size=128) <= full
    # Full is plain causal: T(T + 1) / 2 allowed pairs out of T².
    small_len = 5 + 4 * 4
    assert mask_density("full", 5, 4) == pytest.approx((small_len + 1) / (2 * small_len))


def test_draw_mask(tmp_path):
    mask = attention_mask("row", 3, 4)
    path = draw_mask(mask, tmp_path / "masks" / "row.png", text_len=3, scale=4)
    with Image.open(path) as image:
        assert image.size == (19 * 4, 19 * 4)
        assert image.getpixel((0, 0)) == (255, 255, 255)  # query 0 sees key 0
        assert image.getpixel((4 * 18, 0)) == (0, 0, 0)  # query 0 never sees the last key
        assert image.getpixel((3 * 4, 1)) != (0, 0, 0)  # boundary line crosses a masked region
    with pytest.raises(ValueError, match="bool"):
        draw_mask(mask.float(), tmp_path / "bad.png")
