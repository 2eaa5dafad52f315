"""Sparse attention of the DALL-E prior computed block-locally (Ramesh et al. 2021, §2.2 and Appendix B.1).

``blocked_attention(q, k, v, kind, text_len, grid, kernel)`` returns what
``F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(kind, text_len, grid, kernel))`` returns, forward
and backward, but computes only the (query, key) blocks the mask can allow. Why: the row, column and convolutional
masks keep a few percent of the image×image pairs, yet dense masked SDPA computes all ``T²``; flex attention would
skip the empty tiles, but on CPU torch has no eager flex backward (the eager kernel is an unfused reference) and
compiling it costs seconds per shape. Everything here is ordinary differentiable torch ops (matmul, softmax, SDPA).

Layout of the stream ``[text (text_len)] [image (grid², raster order)]``:

- text queries (every kind): one causal SDPA over the text keys; text never sees the image;
- ``full``: one causal SDPA over the whole stream;
- ``row``: blocks of raster rows; a block sees every text key and its rows plus the row above;
- ``column``: the image transposed to column-major (the paper's layout), blocks of columns; a block sees every text
  key and its own columns (causal within a column);
- ``conv``: blocks of raster rows; a block sees every text key and its rows plus the ``kernel // 2`` rows above.

A block's window is a run of whole rows (or columns) clamped inside the image, so it needs no padding keys and
never repeats a key. Which of a block's keys each query may see is the ``dalle.masks`` predicate evaluated on their
stream positions, so the blocks agree with the dense mask by construction. Image queries take one of two routes:

- split (row and column while ``text_len <= 2 · grid``): one row or column per block; the scores against the text
  keys are one matmul shared by all blocks, the window scores a batched matmul, one softmax runs over both;
- gather (conv, and row and column with longer text): blocks of several lines (``GATHER_BLOCK_QUERIES``); each
  block's ``[text ; window]`` keys are gathered and all blocks go through one fused SDPA call as extra heads.

The split route keeps the image queries' probabilities for backward (``(B, nh, grid², text_len + window)``, like an
unfused attention), where dense SDPA's fused kernel keeps O(T) per head; the gather route keeps copies of the keys.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle.masks import mask_predicate

# Queries per block on the gather route: big enough that the fused SDPA kernel runs near its dense speed, small
# enough that the window keys (and the text keys copied into every block) stay few. Measured best on CPU at 32 × 32:
# 4 rows or columns, and 8 rows for conv, whose window reaches 5 rows above the block.
GATHER_BLOCK_QUERIES = {"row": 128, "column": 128, "conv": 256}


class BlockLayout(NamedTuple):
    """Which keys the image queries of one mask kind and geometry see, block by block."""

    queries: Tensor  # (n_blocks, block_queries) image positions (0 .. grid² − 1) of each block's queries
    window: Tensor  # (n_blocks, window) image positions of each block's non-text keys
    keys: Tensor  # (n_blocks, text_len + window) stream positions of each block's keys: text, then window
    mask: Tensor  # (n_blocks, block_queries, text_len + window) bool: the predicate on (query, key)
    raster: bool  # True: ``queries`` is the image in raster order (blocks are a reshape); False: column-major
    gather: bool  # True: gather [text ; window] keys per block into one SDPA; False: split text and window scores


def gathers(kind: str, text_len: int, grid: int) -> bool:
    """Whether a sparse kind takes the gather route: always for conv; for row and column once the text keys outnumber
    a row block's window (2 · grid), where the split route's text scores would dominate its cost."""
    return kind == "conv" or text_len > 2 * grid


def lines_per_block(kind: str, text_len: int, grid: int) -> int:
    """Raster rows (row, conv) or columns (column) per block: one on the split route; on the gather route the largest
    divisor of ``grid`` within ``GATHER_BLOCK_QUERIES``."""
    if not gathers(kind, text_len, grid):
        return 1
    budget = max(1, GATHER_BLOCK_QUERIES[kind] // grid)
    return max(lines for lines in range(1, grid + 1) if grid % lines == 0 and lines <= budget)


def _row_windows(grid: int, reach: int, rows: int) -> tuple[Tensor, Tensor]:
    """Blocks of ``rows`` raster rows; keys: the ``reach`` rows above the block's first row to its last, clamped."""
    n_blocks, span = grid // rows, min(reach + rows, grid)
    first = torch.arange(n_blocks) * rows
    # Shifting a window that would start above row 0 (or end below the last row) keeps it inside the image and
    # still covers every row the block needs; the extra rows are masked by the predicate (they are later in
    # raster order, or further than the kernel).
    start = (first - reach).clamp(0, grid - span)
    queries = first[:, None] * grid + torch.arange(rows * grid)  # (n_blocks, rows · grid)
    window = start[:, None] * grid + torch.arange(span * grid)  # (n_blocks, span · grid)
    return queries, window


def _column_windows(grid: int, columns: int) -> tuple[Tensor, Tensor]:
    """Blocks of ``columns`` image columns in column-major order; keys: the same columns."""
    positions = torch.arange(grid)
    column_major = (positions[None, :] * grid + positions[:, None]).flatten()  # (column, row) flattened
    queries = column_major.view(grid // columns, columns * grid)
    return queries, queries


@lru_cache(maxsize=64)
def block_layout(kind: str, text_len: int, grid: int, kernel: int = 11, device: str = "cpu") -> BlockLayout:
    """The (cached) ``BlockLayout`` of a sparse kind: ``row``, ``column`` or ``conv``."""
    predicate = mask_predicate(kind, text_len, grid, kernel)  # validates the kind and geometry
    if kind == "full":
        raise ValueError("the 'full' mask has no block layout: it is one causal SDPA")
    lines = lines_per_block(kind, text_len, grid)
    if kind == "column":
        queries, window = _column_windows(grid, lines)
    else:
        queries, window = _row_windows(grid, 1 if kind == "row" else kernel // 2, lines)
    n_blocks = queries.shape[0]
    keys = torch.cat([torch.arange(text_len).expand(n_blocks, text_len), text_len + window], dim=1)
    mask = predicate(text_len + queries[:, :, None], keys[:, None, :])
    assert mask[:, :, :text_len].all(), "an image query misses a text key"  # the split route relies on it
    assert mask.any(dim=2).all(), "a query sees no key"
    tensors = (t.to(device) for t in (queries, window, keys, mask))
    return BlockLayout(*tensors, raster=kind != "column", gather=gathers(kind, text_len, grid))


@lru_cache(maxsize=64)
def _additive_mask(kind: str, text_len: int, grid: int, kernel: int, device: str, dtype: torch.dtype) -> Tensor:
    """The layout's mask as 0 / −inf scores; the split route adds only its window part."""
    mask = block_layout(kind, text_len, grid, kernel, device).mask
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias if gathers(kind, text_len, grid) else bias[:, :, text_len:]


def _split_route(
    q_img: Tensor, k: tuple[Tensor, Tensor], v: tuple[Tensor, Tensor], layout: BlockLayout, bias: Tensor
) -> Tensor:
    """Image queries in block order ``(B, nh, N, hs)`` → outputs in block order, text and window scores apart.

    ``k`` and ``v`` are (text part, image part) pairs.
    """
    B, nh, N, hs = q_img.shape
    n_blocks, block_queries = layout.queries.shape
    (k_text, k_img), (v_text, v_img) = k, v
    text_len = k_text.shape[2]
    window = layout.window.flatten()
    k_win, v_win = (t.index_select(2, window).view(B, nh, n_blocks, -1, hs) for t in (k_img, v_img))
    q_img = q_img * hs**-0.5
    scores = (q_img.reshape(B, nh, n_blocks, block_queries, hs) @ k_win.transpose(-1, -2)).add_(bias)
    if not text_len:
        return (torch.softmax(scores, dim=-1) @ v_win).view(B, nh, N, hs)
    # Every image query sees every text key, so the text scores are one matmul for all blocks.
    text_scores = (q_img @ k_text.transpose(-1, -2)).view(B, nh, n_blocks, block_queries, text_len)
    probs = torch.softmax(torch.cat([text_scores, scores], dim=-1), dim=-1)
    p_text, p_win = probs.split([text_len, scores.shape[-1]], dim=-1)
    y_win = (p_win @ v_win).view(B * nh, N, hs)
    y = torch.baddbmm(y_win, p_text.reshape(B * nh, N, text_len), v_text.reshape(B * nh, text_len, hs))
    return y.view(B, nh, N, hs)


def _gather_route(q_img: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, bias: Tensor) -> Tensor:
    """Image queries in block order → outputs in block order, one SDPA over each block's gathered keys."""
    B, nh, N, hs = q_img.shape
    n_blocks, block_queries = layout.queries.shape
    keys = layout.keys.flatten()
    k_blocks, v_blocks = (t.index_select(2, keys).view(B * nh, n_blocks, -1, hs) for t in (k, v))
    q_blocks = q_img.reshape(B * nh, n_blocks, block_queries, hs)
    # A 4-D mask keeps SDPA on its fused CPU kernel; a 3-D one sends it to the unfused math path.
    y = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=bias[None])
    return y.reshape(B, nh, N, hs)


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, kind: str, text_len: int, grid: int, kernel: int = 11) -> Tensor:
    """Masked attention of the DALL-E prior: ``(B, nh, T, hs)`` in and out, ``T = text_len + grid²``.

    Equal, forward and backward (to float rounding), to ``F.scaled_dot_product_attention`` with
    ``attn_mask=attention_mask(kind, text_len, grid, kernel)``; ``kernel`` only matters for ``conv``.
    """
    mask_predicate(kind, text_len, grid, kernel)  # validates the kind, geometry and kernel
    seq_len = text_len + grid * grid
    if q.ndim != 4 or q.shape[2] != seq_len or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have one shape (B, nh, T, hs) with T = text_len + grid² = {seq_len}; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if kind == "full":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    kernel = kernel if kind == "conv" else 11  # one cache entry per geometry for the kinds that ignore it
    geometry = (kind, text_len, grid, kernel, str(q.device))
    layout, bias = block_layout(*geometry), _additive_mask(*geometry, q.dtype)
    # Splitting (not slicing) keeps the backward a concatenation instead of zero-filled sums.
    (q_text, q_img), (k_text, k_img), (v_text, v_img) = (t.split([text_len, grid * grid], dim=2) for t in (q, k, v))
    if not layout.raster:
        q_img = q_img.index_select(2, layout.queries.flatten())  # (B, nh, grid², hs) in block order
    if layout.gather:
        y_img = _gather_route(q_img, k, v, layout, bias)
    else:
        y_img = _split_route(q_img, (k_text, k_img), (v_text, v_img), layout, bias)
    if not layout.raster:  # column-major back to raster
        B, nh, _, hs = y_img.shape
        y_img = y_img.reshape(B, nh, grid, grid, hs).transpose(2, 3).reshape(B, nh, grid * grid, hs)
    if not text_len:
        return y_img
    y_text = F.scaled_dot_product_attention(q_text, k_text, v_text, is_causal=True)  # text never sees the image
    return torch.cat([y_text, y_img], dim=2)
