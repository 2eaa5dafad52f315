"""Attention masks of the DALL-E transformer prior (Ramesh et al. 2021, §2.2 and Appendix B.1, Fig. 11).

The stream is ``[text tokens (text_len)] [image tokens (grid × grid, raster order)]``, ``T = text_len + grid²``.
Every layer uses the standard causal mask among text tokens, lets every image token see all text tokens, and
never lets a text token see an image token. Among image tokens each layer uses one of four patterns:

- ``full``: causal;
- ``row``: the previous ``grid`` image tokens and itself, i.e. back to and including the same column of the
  previous row (``q_img - grid <= k_img <= q_img``);
- ``column``: the image tokens above it in its own column, and itself;
- ``conv``: a causal ``kernel × kernel`` neighbourhood centred on the query (kernel 11 in the paper), without
  wrap-around across rows.

Each kind is one predicate on integer position tensors ``(q_idx, kv_idx)``; the dense ``(T, T)`` boolean mask
(for ``F.scaled_dot_product_attention``) and the flex-attention ``BlockMask`` are both built from it, so the
two kernels cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

MASK_KINDS = ("full", "row", "column", "conv")
SCHEDULES = (*MASK_KINDS, "axial", "paper")

Predicate = Callable[[Tensor, Tensor], Tensor]


def _with_text_rules(q_idx: Tensor, kv_idx: Tensor, text_len: int, image_rule: Tensor) -> Tensor:
    """Combine the rule shared by every kind with the kind's rule for (image query, image key) pairs."""
    # Causality alone already gives text→text causal, text never sees image (image keys come after every text
    # query) and image sees all text (text keys come before every image query); the image rule only has to
    # thin out the image→image block.
    causal = kv_idx <= q_idx
    return causal & ((kv_idx < text_len) | image_rule)


def full_predicate(q_idx: Tensor, kv_idx: Tensor, text_len: int, grid: int) -> Tensor:
    """Dense causal attention over the whole stream (geometry unused; same signature as the other kinds)."""
    return kv_idx <= q_idx


def row_predicate(q_idx: Tensor, kv_idx: Tensor, text_len: int, grid: int) -> Tensor:
    """Row mask: ``grid + 1`` image tokens in raster order, back to the same column of the previous row."""
    return _with_text_rules(q_idx, kv_idx, text_len, kv_idx >= q_idx - grid)


def column_predicate(q_idx: Tensor, kv_idx: Tensor, text_len: int, grid: int) -> Tensor:
    """Column mask: the image tokens above the query in its column, and itself."""
    # Offsets are the same in stream and image coordinates, so no need to subtract text_len first; torch's
    # remainder takes the divisor's sign, so negative differences (masked anyway by causality) are harmless.
    return _with_text_rules(q_idx, kv_idx, text_len, (q_idx - kv_idx) % grid == 0)


def conv_predicate(q_idx: Tensor, kv_idx: Tensor, text_len: int, grid: int, kernel: int) -> Tensor:
    """Convolutional mask: the causal part of the ``kernel × kernel`` window centred on the query."""
    radius = kernel // 2
    q_img, kv_img = q_idx - text_len, kv_idx - text_len
    # Floor division keeps rows and columns well defined for text keys (negative kv_img); those pairs are
    # decided by the text rule anyway. Comparing columns explicitly is what stops wrap-around: raster
    # distance alone would let the end of one row see the start of the next.
    near_rows = (q_img // grid - kv_img // grid).abs() <= radius
    near_cols = (q_img % grid - kv_img % grid).abs() <= radius
    return _with_text_rules(q_idx, kv_idx, text_len, near_rows & near_cols)


def _check_geometry(kind: str, text_len: int, grid: int, kernel: int) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    if text_len < 0:
        raise ValueError(f"text_len must be >= 0, got {text_len}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if kind == "conv" and (kernel < 1 or kernel % 2 == 0):
        raise ValueError(f"kernel must be a positive odd integer (the window is centred on the query), got {kernel}")


def mask_predicate(kind: str, text_len: int, grid: int, kernel: int = 11) -> Predicate:
    """The predicate ``(q_idx, kv_idx) -> bool tensor`` of one mask kind with its geometry bound."""
    _check_geometry(kind, text_len, grid, kernel)
    if kind == "conv":
        return partial(conv_predicate, text_len=text_len, grid=grid, kernel=kernel)
    predicate = {"full": full_predicate, "row": row_predicate, "column": column_predicate}[kind]
    return partial(predicate, text_len=text_len, grid=grid)


def attention_mask(kind: str, text_len: int, grid: int, kernel: int = 11) -> Tensor:
    """Boolean ``(T, T)`` mask, True where query (row) may attend to key (column); for SDPA's ``attn_mask``."""
    predicate = mask_predicate(kind, text_len, grid, kernel)
    positions = torch.arange(text_len + grid * grid)
    return predicate(positions[:, None], positions[None, :])  # (T, T)


def block_mask(
    kind: str, text_len: int, grid: int, kernel: int = 11, block_size: int = 128, device: str | torch.device = "cpu"
) -> BlockMask:
    """The same mask as a flex-attention ``BlockMask`` with ``block_size`` tiles (T need not be a multiple).

    On CPU with torch 2.13, ``flex_attention(q, k, v, block_mask=...)`` runs eagerly: it warns and falls back to
    an unfused reference that evaluates ``mask_mod`` on the full score matrix (so it ignores the tiles, and is
    only good for checking). ``torch.compile(flex_attention, dynamic=False)`` also matches SDPA on CPU and does
    use the tiles; a cold compile takes ~8-17 s on 2 cores, then ~4-5 s per new (mask, shape). Keep
    ``dynamic=False`` there: with the default, the recompile for a second sequence length goes dynamic and
    inductor's CPU flex template fails to build (C++ error, ``cur_kvSplitSize`` undeclared) for row, column and
    conv masks.
    """
    predicate = mask_predicate(kind, text_len, grid, kernel)
    seq_len = text_len + grid * grid

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return predicate(q_idx, kv_idx)

    # create_block_mask pads the last partial tile itself; the predicate is pure arithmetic, so it is also safe
    # on the padded positions a compiled kernel may evaluate before discarding them.
    return create_block_mask(
        mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device, BLOCK_SIZE=block_size
    )


def block_occupancy(mask: Tensor, block_size: int) -> Tensor:
    """Boolean ``(n_q_blocks, n_kv_blocks)``: True where a tile of ``mask`` has any allowed pair."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    seq_q, seq_kv = mask.shape
    n_q, n_kv = -(-seq_q // block_size), -(-seq_kv // block_size)
    padded = mask.new_zeros(n_q * block_size, n_kv * block_size)
    padded[:seq_q, :seq_kv] = mask
    return padded.view(n_q, block_size, n_kv, block_size).any(dim=3).any(dim=1)


def block_density(kind: str, text_len: int, grid: int, kernel: int = 11, block_size: int = 128) -> float:
    """Fraction of (q-block, kv-block) tiles with at least one allowed pair; flex can skip ``1 - density``."""
    return block_occupancy(attention_mask(kind, text_len, grid, kernel), block_size).float().mean().item()


def mask_density(kind: str, text_len: int, grid: int, kernel: int = 11) -> float:
    """Fraction of the ``T²`` (query, key) pairs that are allowed."""
    return attention_mask(kind, text_len, grid, kernel).float().mean().item()


def _paper_kind(layer: int, n_layers: int) -> str:
    # The paper counts layers from 1: column if (i - 2) mod 4 == 0. With 0-indexed layer = i - 1 this is
    # (layer - 1) mod 4 == 0, i.e. layers 1, 5, 9, ... here (2, 6, 10, ... in the paper).
    if layer == n_layers - 1:
        return "conv"
    return "column" if (layer - 1) % 4 == 0 else "row"


def layer_kinds(schedule: str | Sequence[str], n_layers: int) -> list[str]:
    """Which mask each of ``n_layers`` layers uses: a named schedule or an explicit list of kinds.

    Named schedules: ``full``, ``row``, ``column``, ``conv`` (every layer), ``axial`` (row, column, row, ...)
    and ``paper`` (Appendix B.1, Fig. 11): in 1-indexed layer i the column mask if (i − 2) mod 4 == 0, the
    convolutional mask in the last layer, the row mask otherwise. With 0-indexed layer j = i − 1 that reads
    column if (j − 1) mod 4 == 0, conv last, row otherwise, so the paper's rule and the 0-indexed rule
    proposed in the issue agree; e.g. 8 layers give row, column, row, row, row, column, row, conv.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if isinstance(schedule, str):
        if schedule in MASK_KINDS:
            return [schedule] * n_layers
        if schedule == "axial":
            return ["row" if layer % 2 == 0 else "column" for layer in range(n_layers)]
        if schedule == "paper":
            return [_paper_kind(layer, n_layers) for layer in range(n_layers)]
        raise ValueError(f"unknown attention schedule {schedule!r}; expected one of {SCHEDULES} or a list of kinds")
    kinds = list(schedule)
    for layer, kind in enumerate(kinds):
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {kind!r} for layer {layer}; expected one of {MASK_KINDS}")
    if len(kinds) != n_layers:
        raise ValueError(f"attention schedule lists {len(kinds)} kinds but the model has n_layers={n_layers}")
    return kinds


def draw_mask(mask: Tensor, path: str | Path, text_len: int | None = None, scale: int = 4) -> Path:
    """Save ``mask`` as a PNG (allowed white, masked black), ``scale`` px per pair, text/image boundary in red."""
    from PIL import Image, ImageDraw

    if mask.ndim != 2 or mask.shape[0] != mask.shape[1] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a square 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    pixels = mask.cpu().numpy().astype(np.uint8) * 255
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    image = Image.fromarray(pixels).convert("RGB")
    if text_len is not None and 0 < text_len < mask.shape[0]:
        # The line sits on the first pixel of the image region, so query rows and key columns meet on it.
        edge, size = text_len * scale, image.width
        draw = ImageDraw.Draw(image)
        draw.line([(edge, 0), (edge, size - 1)], fill=(230, 30, 30))
        draw.line([(0, edge), (size - 1, edge)], fill=(230, 30, 30))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
