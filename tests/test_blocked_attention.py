"""Block-local sparse attention (dalle/blocked_attention.py) against dense masked SDPA, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dalle.blocked_attention as blocked
from dalle.blocked_attention import block_layout, blocked_attention, gathers, lines_per_block
from dalle.masks import MASK_KINDS, attention_mask

KINDS_WITH_KERNELS = [("full", 11), ("row", 11), ("column", 11), ("conv", 1), ("conv", 3), ("conv", 5), ("conv", 11)]


def _qkv(seq_len, batch=2, heads=3, head_size=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Laid out as the prior makes them, (B, T, nh, hs) transposed to (B, nh, T, hs): not contiguous.
    q, k, v = (
        torch.randn(batch, seq_len, heads, head_size, generator=generator, dtype=dtype).transpose(1, 2)
        for _ in range(3)
    )
    upstream = torch.randn(batch, heads, seq_len, head_size, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)], upstream


def _output_and_grads(attend, qkv, upstream):
    out = attend(*qkv)
    return (out, *torch.autograd.grad(out, qkv, upstream))


def _assert_matches_dense(kind, kernel, text_len, grid, dtype=torch.float32, tol=1e-5, **sizes):
    qkv, upstream = _qkv(text_len + grid * grid, dtype=dtype, **sizes)
    mask = attention_mask(kind, text_len, grid, kernel)
    expected = _output_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), qkv, upstream)
    actual = _output_and_grads(lambda q, k, v: blocked_attention(q, k, v, kind, text_len, grid, kernel), qkv, upstream)
    for name, got, want in zip(("output", "grad q", "grad k", "grad v"), actual, expected):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind,kernel", KINDS_WITH_KERNELS)
@pytest.mark.parametrize("text_len", [0, 1, 3, 5])
@pytest.mark.parametrize("grid", [1, 2, 3, 4, 5, 6])
def test_matches_dense_sdpa(kind, kernel, text_len, grid):
    _assert_matches_dense(kind, kernel, text_len, grid)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_matches_dense_sdpa_float64(kind):
    _assert_matches_dense(kind, 3, 5, 6, dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize("kind,kernel", [("row", 11), ("column", 11), ("conv", 11), ("conv", 3)])
@pytest.mark.parametrize("text_len", [7, 70])
def test_matches_dense_sdpa_paper_grid(kind, kernel, text_len):
    # At 32 × 32, text_len 7 puts row and column on the split route and 70 on the gather route in blocks of 4 lines;
    # conv always gathers, in blocks of 8 rows.
    assert lines_per_block(kind, text_len, 32) == (8 if kind == "conv" else 4 if text_len == 70 else 1)
    _assert_matches_dense(kind, kernel, text_len, 32, batch=1, heads=1)


@pytest.fixture
def small_gather_blocks(monkeypatch):
    """Blocks of a few queries on the gather route, so small grids get several lines per block."""

    def use(queries):
        for kind in ("row", "column", "conv"):
            monkeypatch.setitem(blocked.GATHER_BLOCK_QUERIES, kind, queries)
        block_layout.cache_clear()
        blocked._additive_mask.cache_clear()

    yield use
    monkeypatch.undo()
    block_layout.cache_clear()
    blocked._additive_mask.cache_clear()


@pytest.mark.parametrize("queries", [1, 8, 12])
@pytest.mark.parametrize("kind,kernel", [("row", 11), ("column", 11), ("conv", 1), ("conv", 3), ("conv", 5)])
def test_gather_blocks_of_several_lines(small_gather_blocks, queries, kind, kernel):
    # Includes conv windows clamped at both image edges; text_len 13 > 2 · grid sends row and column to gather too.
    small_gather_blocks(queries)
    for text_len, grid in ((3, 4), (13, 4), (13, 6)):
        assert gathers(kind, text_len, grid) == (kind == "conv" or text_len == 13)
        _assert_matches_dense(kind, kernel, text_len, grid)


@pytest.mark.parametrize("kind,kernel", KINDS_WITH_KERNELS[1:])
@pytest.mark.parametrize("text_len,grid", [(0, 1), (3, 4), (5, 6), (13, 4), (2, 32), (70, 32)])
def test_layout_covers_each_allowed_pair_once(kind, kernel, text_len, grid):
    layout = block_layout(kind, text_len, grid, kernel)
    seq_len = text_len + grid * grid
    counts = torch.zeros(seq_len, seq_len, dtype=torch.long)
    query_positions = (text_len + layout.queries)[:, :, None].expand_as(layout.mask)
    key_positions = layout.keys[:, None, :].expand_as(layout.mask)
    counts.index_put_((query_positions[layout.mask], key_positions[layout.mask]), torch.tensor(1), accumulate=True)
    expected = attention_mask(kind, text_len, grid, kernel)
    assert torch.equal(counts[text_len:], expected[text_len:].long())
    assert torch.equal(layout.queries.flatten().sort().values, torch.arange(grid * grid))
    for block_keys in layout.keys:
        assert block_keys.unique().numel() == block_keys.numel(), "a key repeats within a block"


def test_lines_per_block():
    assert lines_per_block("row", 64, 32) == 1  # split route
    assert lines_per_block("row", 65, 32) == 4  # gather route, 128 queries
    assert lines_per_block("column", 256, 32) == 4
    assert lines_per_block("conv", 0, 32) == 8  # 256 queries
    assert lines_per_block("conv", 0, 5) == 5  # the whole image fits the budget
    assert lines_per_block("conv", 0, 48) == 4  # 5 rows would fit, but 48 = 4 · 12 has no divisor 5


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_batch_and_heads_are_independent(kind):
    text_len, grid = 3, 5
    (q, k, v), _ = _qkv(text_len + grid * grid, batch=2, heads=3)
    out = blocked_attention(q, k, v, kind, text_len, grid, kernel=3)
    for b in range(2):
        for h in range(3):
            one = [t[b : b + 1, h : h + 1] for t in (q, k, v)]
            torch.testing.assert_close(out[b, h], blocked_attention(*one, kind, text_len, grid, kernel=3)[0, 0])


def test_refusals_name_the_culprit():
    text_len, grid = 2, 4
    (q, k, v), _ = _qkv(text_len + grid * grid, batch=1, heads=1)
    with pytest.raises(ValueError, match="diagonal"):
        blocked_attention(q, k, v, "diagonal", text_len, grid)
    with pytest.raises(ValueError, match="got 4"):
        blocked_attention(q, k, v, "conv", text_len, grid, kernel=4)
    with pytest.raises(ValueError, match="T = text_len \\+ grid² = 19"):
        blocked_attention(q, k, v, "row", text_len + 1, grid)
    with pytest.raises(ValueError, match=r"\(1, 1, 18, 8\)"):
        blocked_attention(q, k[:, :, :-1], v, "row", text_len, grid)
    with pytest.raises(ValueError, match="full"):
        block_layout("full", text_len, grid)
