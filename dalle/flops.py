"""Counting the floating-point work of the transformer prior, for model FLOP utilisation (MFU).

Convention (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, Appendix B): a multiply-add is 2 FLOPs, a training
step costs 3× the forward pass (the backward pass computes gradients of both activations and weights), and only
matrix products count (embeddings are lookups; norms, GELU and softmax are ignored). Unlike ``6·N·tokens`` this
counts what the prior actually multiplies:

- per layer and token, the four weight matrices (qkv ``d×3d``, out ``d×d``, MLP ``d×4d`` and ``4d×d``): 24·d²;
- the text head only at the ``text_len − 1`` positions that predict text, the image head only at the ``grid²``
  positions that predict image tokens;
- attention only over the (query, key) pairs the layer's mask allows (``QKᵀ`` and ``AV``: 4·d per pair), so a
  sparse mask's model FLOPs are what a kernel that skips masked pairs would have to do. A dense kernel that
  computes the masked pairs and throws them away does more hardware work than this count.
"""

from __future__ import annotations

from dataclasses import dataclass

from dalle.config import PriorConfig
from dalle.masks import attention_mask, layer_kinds
from dalle.prior import PriorGeometry


@dataclass(frozen=True)
class PriorFlops:
    """Forward FLOPs of one sequence, split by where they are spent."""

    layers: int  # weight matrices of the transformer blocks
    heads: int  # text and image output heads
    attention: int  # QKᵀ and AV over the allowed pairs

    @property
    def forward(self) -> int:
        return self.layers + self.heads + self.attention

    @property
    def training(self) -> int:
        """Forward + backward of one sequence."""
        return 3 * self.forward


def allowed_pairs(kind: str, text_len: int, grid: int, kernel: int = 11) -> int:
    """Number of (query, key) pairs that mask ``kind`` lets attend, over the whole ``T × T`` matrix."""
    return int(attention_mask(kind, text_len, grid, kernel).sum())


def prior_flops(cfg: PriorConfig, geometry: PriorGeometry) -> PriorFlops:
    d, g = cfg.d_model, geometry
    layers = 2 * 12 * d * d * g.seq_len * cfg.n_layers
    heads = 2 * d * (g.text_vocab * (g.text_len - 1) + g.image_vocab * g.grid**2)
    kinds = layer_kinds(cfg.schedule, cfg.n_layers)
    pairs = {kind: allowed_pairs(kind, g.text_len, g.grid, cfg.conv_kernel) for kind in set(kinds)}
    attention = sum(4 * d * pairs[kind] for kind in kinds)
    return PriorFlops(layers=layers, heads=heads, attention=attention)


def attention_flops(n_heads: int, head_dim: int, pairs: int) -> int:
    """Forward FLOPs of one attention call (batch 1) over ``pairs`` allowed (query, key) pairs."""
    return 4 * n_heads * head_dim * pairs


def matmul_flops(n: int) -> int:
    """FLOPs of one ``n × n`` by ``n × n`` matrix product."""
    return 2 * n**3
