"""The DALL-E transformer prior (Ramesh et al. 2021, §2.2 and Appendix B).

A decoder-only transformer over the stream ``[text (text_len)] [image (grid², raster order)]`` that models text
and image tokens autoregressively: the input at position t predicts the token at t + 1. Text positions past a
caption's end hold a learned pad embedding per position (pads are inputs, never targets); image tokens get a
token embedding plus broadcast row and column embeddings. Each layer uses the attention mask that
``dalle.masks.layer_kinds`` assigns it (Appendix B.1), through dense SDPA, flex attention, or the block-local kernel
of ``dalle/blocked_attention.py`` that computes only the blocks a sparse mask allows; all are built from the same
predicate. Separate heads give logits over the text vocabulary at text positions and over the image
vocabulary at image positions. The loss weights the two modalities' mean cross-entropies (§B.1: 1/8 text).

On CPU, eager flex attention is an unfused reference that warns and has no backward (use it for checks, or train
with "dense"); ``Prior.use_compiled_flex()`` opts in to the compiled kernel.

Incremental decoding (``prefill`` then ``step``) keeps a preallocated key/value cache and attends with row t of each
layer's dense mask, so it reproduces the full forward pass for every mask kind, whatever ``attn_impl`` is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from dalle.blocked_attention import blocked_attention
from dalle.checkpoint import config_values, load_state, load_weights
from dalle.config import PriorConfig
from dalle.masks import attention_mask, block_mask, layer_kinds


@dataclass(frozen=True)
class PriorGeometry:
    """Sizes that come from the data (tokenizer and dVAE), not from the prior's params."""

    text_vocab: int
    text_len: int
    image_vocab: int
    grid: int

    def __post_init__(self):
        for key in ("text_vocab", "text_len", "image_vocab", "grid"):
            if getattr(self, key) < 1:
                raise ValueError(f"PriorGeometry.{key} must be >= 1, got {getattr(self, key)}")

    @property
    def seq_len(self) -> int:
        return self.text_len + self.grid**2


class PriorLogits(NamedTuple):
    text: Tensor  # (B, text_len - 1, text_vocab): predictions of text tokens 1..text_len-1
    image: Tensor  # (B, grid², image_vocab): predictions of every image token, the first from the last text slot


class PriorLosses(NamedTuple):
    loss: Tensor  # text_loss_weight × text_nll + (1 − text_loss_weight) × image_nll
    text_nll: Tensor  # nats per counted caption token
    image_nll: Tensor  # nats per image token
    image_bits: Tensor  # image_nll in bits per image token


@dataclass
class KVCache:
    """Keys and values of every layer for positions ``0..length-1``, preallocated for the whole stream."""

    keys: Tensor  # (n_layers, B, nh, seq_len, hs)
    values: Tensor  # (n_layers, B, nh, seq_len, hs)
    length: int = 0


# Compiled graphs of flex attention one process may hold: one per (mask kind, batch shape). Dynamo's default (8)
# is below what a paper-schedule prior needs (3 kinds × training, validation and last-validation batches), and
# past it dynamo silently runs the unfused eager kernel, ~5× slower (measured by the benchmark stage).
FLEX_RECOMPILE_LIMIT = 64


@cache
def compiled_flex_attention():
    """``flex_attention`` compiled once per process. ``dynamic=False``: dynamic shapes fail to build on CPU for
    the sparse masks (see ``dalle.masks.block_mask``), so each new shape compiles anew; the recompile limit is
    raised to ``FLEX_RECOMPILE_LIMIT`` for that. Opt in with ``Prior.use_compiled_flex()``."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the second is the older name (torch < 2.7)
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), FLEX_RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


class BlockedMask(NamedTuple):
    """What ``attn_impl: blocked`` needs to compute a layer's mask block-locally (``dalle/blocked_attention.py``)."""

    kind: str
    text_len: int
    grid: int
    kernel: int


class SelfAttention(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.flex = flex_attention  # swapped for the compiled kernel by Prior.use_compiled_flex

    def forward(
        self, x: Tensor, mask: Tensor | BlockMask | BlockedMask, cache: KVCache | None = None, layer: int = 0
    ) -> Tensor:
        """``mask`` is a bool ``(L, start + L)`` mask for SDPA, or for the whole stream (uncached only) a BlockMask
        for flex or a BlockedMask for the block-local kernel.

        With ``cache``, ``x`` holds positions ``cache.length .. cache.length + L - 1``; their keys and values are
        written into the cache and the queries attend over every cached position so far.
        """
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, L, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        if cache is not None:
            start, end = cache.length, cache.length + L
            cache.keys[layer, :, :, start:end] = k
            cache.values[layer, :, :, start:end] = v
            k, v = cache.keys[layer, :, :, :end], cache.values[layer, :, :, :end]  # (B, nh, end, hs)
        if isinstance(mask, BlockMask):
            y = self.flex(q, k, v, block_mask=mask)
        elif isinstance(mask, BlockedMask):
            y = blocked_attention(q, k, v, *mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, L, hs)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: PriorConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, mask: Tensor | BlockMask | BlockedMask, cache: KVCache | None = None, layer: int = 0
    ) -> Tensor:
        x = x + self.dropout(self.attn(self.ln_attn(x), mask, cache, layer))
        return x + self.dropout(self.mlp(self.ln_mlp(x)))


class Prior(nn.Module):
    def __init__(self, cfg: PriorConfig, geometry: PriorGeometry):
        super().__init__()
        self.cfg, self.geometry = cfg, geometry
        d, g = cfg.d_model, geometry
        self.kinds = layer_kinds(cfg.schedule, cfg.n_layers)
        self.text_embedding = nn.Embedding(g.text_vocab, d)
        self.pad_embedding = nn.Embedding(g.text_len, d)  # one learned pad per text position
        self.text_position = nn.Embedding(g.text_len, d)
        self.image_embedding = nn.Embedding(g.image_vocab, d)
        self.image_row = nn.Embedding(g.grid, d)
        self.image_column = nn.Embedding(g.grid, d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in self.kinds)
        self.ln_final = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, g.text_vocab, bias=False)
        self.image_head = nn.Linear(d, g.image_vocab, bias=False)
        # Dense masks are static: built once per kind, moved with the module, kept out of the state dict.
        for kind in sorted(set(self.kinds)):
            mask = attention_mask(kind, g.text_len, g.grid, cfg.conv_kernel)
            self.register_buffer(f"mask_{kind}", mask, persistent=False)  # (T, T)
        self._block_masks: dict[tuple[str, str], BlockMask] = {}
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 · n_layers).
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def use_compiled_flex(self) -> None:
        """Run flex attention through ``torch.compile`` (the eager kernel is an unfused reference)."""
        for block in self.blocks:
            block.attn.flex = compiled_flex_attention()

    def _check_inputs(self, text_ids: Tensor, text_lengths: Tensor, image_tokens: Tensor | None = None) -> None:
        g = self.geometry
        if text_ids.ndim != 2 or text_ids.shape[1] != g.text_len or text_ids.is_floating_point():
            raise ValueError(f"text_ids must be integer (B, text_len={g.text_len}), got {tuple(text_ids.shape)}")
        B = text_ids.shape[0]
        if text_lengths.shape != (B,) or text_lengths.is_floating_point():
            raise ValueError(f"text_lengths must be integer (B={B},), got {tuple(text_lengths.shape)}")
        if image_tokens is not None and (image_tokens.shape != (B, g.grid**2) or image_tokens.is_floating_point()):
            raise ValueError(
                f"image_tokens must be integer (B={B}, grid²={g.grid**2}), got {tuple(image_tokens.shape)}"
            )
        # The value checks reduce on the device and meet the host once (every sync stalls a GPU's queue). Only
        # caption tokens are checked: whatever lies past a caption's end is replaced by pad embeddings.
        checks = [
            ((text_lengths < 0) | (text_lengths > g.text_len)).any(),
            (((text_ids < 0) | (text_ids >= g.text_vocab)) & self._caption_mask(text_lengths)).any(),
        ]
        if image_tokens is not None:
            checks.append(((image_tokens < 0) | (image_tokens >= g.image_vocab)).any())
        bad = torch.stack(checks).tolist()
        if bad[0]:
            raise ValueError(f"text_lengths must be in 0..text_len={g.text_len}, got {text_lengths.tolist()}")
        if bad[1]:
            raise ValueError(f"text_ids must be in 0..text_vocab-1={g.text_vocab - 1} within each caption")
        if image_tokens is not None and bad[2]:
            raise ValueError(f"image_tokens must be in 0..image_vocab-1={g.image_vocab - 1}")

    def _caption_mask(self, text_lengths: Tensor) -> Tensor:
        positions = torch.arange(self.geometry.text_len, device=text_lengths.device)
        return positions[None, :] < text_lengths[:, None]  # (B, text_len)

    def _embed_text(self, text_ids: Tensor, text_lengths: Tensor) -> Tensor:
        real = self._caption_mask(text_lengths)  # (B, text_len)
        tokens = self.text_embedding(text_ids.masked_fill(~real, 0))  # (B, text_len, d)
        positions = torch.arange(self.geometry.text_len, device=text_ids.device)
        tokens = torch.where(real[..., None], tokens, self.pad_embedding(positions))
        return tokens + self.text_position(positions)

    def _embed_image(self, image_tokens: Tensor, start: int) -> Tensor:
        """Embed image tokens ``start .. start + L - 1`` (raster indices) of the grid."""
        grid = self.geometry.grid
        index = torch.arange(start, start + image_tokens.shape[1], device=image_tokens.device)
        return self.image_embedding(image_tokens) + self.image_row(index // grid) + self.image_column(index % grid)

    def _mask(self, kind: str, device: torch.device) -> Tensor | BlockMask | BlockedMask:
        if self.cfg.attn_impl == "dense":
            return getattr(self, f"mask_{kind}")
        if self.cfg.attn_impl == "blocked":
            return BlockedMask(kind, self.geometry.text_len, self.geometry.grid, self.cfg.conv_kernel)
        key = (kind, str(device))
        if key not in self._block_masks:
            g = self.geometry
            self._block_masks[key] = block_mask(kind, g.text_len, g.grid, self.cfg.conv_kernel, device=device)
        return self._block_masks[key]

    def _transformer(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Run the blocks on positions ``start .. start + L - 1`` (start = cache.length, else 0); final LN."""
        start, end = (cache.length, cache.length + x.shape[1]) if cache is not None else (0, x.shape[1])
        x = self.dropout(x)
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if cache is None:
                mask = self._mask(block.kind, x.device)
            else:  # one row of the layer's mask per new query, over every key so far
                mask = getattr(self, f"mask_{block.kind}")[start:end, :end]  # (L, end)
            if recompute and cache is None:  # keep only the block's input; rerun it in backward
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache, layer)
        if cache is not None:
            cache.length = end
        return self.ln_final(x)

    def forward(self, text_ids: Tensor, text_lengths: Tensor, image_tokens: Tensor) -> tuple[PriorLogits, Tensor]:
        """``text_ids`` (B, text_len), ``text_lengths`` (B,), ``image_tokens`` (B, grid²) → (logits, loss).

        ``loss`` is the scalar training loss; ``self.losses(logits, ...)`` gives it with its per-modality parts.
        """
        self._check_inputs(text_ids, text_lengths, image_tokens)
        text_len = self.geometry.text_len
        x = torch.cat([self._embed_text(text_ids, text_lengths), self._embed_image(image_tokens, 0)], dim=1)
        h = self._transformer(x)  # (B, T, d)
        # The last image position predicts nothing; the last text position predicts the first image token.
        logits = PriorLogits(text=self.text_head(h[:, : text_len - 1]), image=self.image_head(h[:, text_len - 1 : -1]))
        return logits, self.losses(logits, text_ids, text_lengths, image_tokens).loss

    def losses(
        self,
        logits: PriorLogits,
        text_ids: Tensor,
        text_lengths: Tensor,
        image_tokens: Tensor,
        text_count: Tensor | float | None = None,
    ) -> PriorLosses:
        """Cross-entropies of ``forward``'s logits; text targets are caption tokens 1..length-1, never pads.

        ``text_count`` divides the summed text cross-entropy (default: this batch's caption targets,
        ``text_targets(text_lengths)``). Data-parallel training passes the global count over the world size, so
        that averaging the ranks' gradients gives exactly the gradient of the whole batch's loss.
        """
        counted = self._caption_mask(text_lengths)[:, 1:]  # (B, text_len - 1)
        text_targets = text_ids[:, 1:].masked_fill(~counted, 0)  # pad slots may hold anything; never looked up
        text_ce = F.cross_entropy(logits.text.flatten(0, 1).float(), text_targets.flatten().long(), reduction="none")
        if text_count is None:
            text_count = counted.sum()
        # Captions of length <= 1 have no text target; the clamp keeps an all-empty batch at 0 rather than NaN.
        text_nll = (text_ce * counted.flatten()).sum() / torch.as_tensor(text_count).clamp(min=1)
        image_nll = F.cross_entropy(logits.image.flatten(0, 1).float(), image_tokens.flatten().long())
        w = self.cfg.text_loss_weight
        loss = w * text_nll + (1 - w) * image_nll
        return PriorLosses(loss=loss, text_nll=text_nll, image_nll=image_nll, image_bits=image_nll / math.log(2))

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> KVCache:
        cfg = self.cfg
        shape = (cfg.n_layers, batch_size, cfg.n_heads, self.geometry.seq_len, cfg.d_model // cfg.n_heads)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def prefill(self, text_ids: Tensor, text_lengths: Tensor) -> tuple[Tensor, KVCache]:
        """Run the caption into a fresh cache → (logits of the first image token (B, image_vocab), cache)."""
        self._check_inputs(text_ids, text_lengths)
        x = self._embed_text(text_ids, text_lengths)
        kv = self.new_cache(text_ids.shape[0], x.device, x.dtype)
        h = self._transformer(x, kv)
        return self.image_head(h[:, -1]), kv

    def step(self, cache: KVCache, image_tokens: Tensor) -> tuple[Tensor, KVCache]:
        """Feed the next image token (B,), or the next L tokens (B, L) at once (priming) → (logits of the token
        after the last one fed (B, image_vocab), cache updated in place)."""
        g = self.geometry
        index = cache.length - g.text_len  # raster index of the first token being fed
        B = cache.keys.shape[1]
        if image_tokens.ndim == 1:
            image_tokens = image_tokens[:, None]
        if image_tokens.ndim != 2 or image_tokens.shape[0] != B or image_tokens.is_floating_point():
            raise ValueError(f"image_tokens must be integer (B={B},) or (B, L), got {tuple(image_tokens.shape)}")
        if not (0 <= index and index + image_tokens.shape[1] <= g.grid**2 - 1):
            raise ValueError(
                f"step feeds image tokens 0..grid²-2={g.grid**2 - 2} after prefill; cache is at {index}, "
                f"feeding {image_tokens.shape[1]}"
            )
        if ((image_tokens < 0) | (image_tokens >= g.image_vocab)).any():
            raise ValueError(f"image_tokens must be in 0..image_vocab-1={g.image_vocab - 1}")
        h = self._transformer(self._embed_image(image_tokens, index), cache)
        return self.image_head(h[:, -1]), cache


def text_targets(text_lengths: Tensor) -> Tensor:
    """Number of text tokens that are targets: every caption token but the first (pads never are)."""
    return (text_lengths - 1).clamp(min=0).sum()


def load_prior(directory, device: torch.device | str = "cpu") -> Prior:
    """Rebuild a trained prior from ``model.safetensors`` + ``config.json`` (as written by train_prior)."""
    state, config = load_weights(directory)
    where = Path(directory) / "config.json"
    required = config_values(config, ["geometry", "n_layers", "n_heads", "d_model", "schedule", "conv_kernel"], where)
    geometry = PriorGeometry(
        **config_values(required["geometry"], [f.name for f in dataclasses.fields(PriorGeometry)], where)
    )
    names = {f.name for f in dataclasses.fields(PriorConfig)}
    values = {k: v for k, v in config.items() if k in names}
    if isinstance(values.get("schedule"), list):
        values["schedule"] = tuple(values["schedule"])
    model = Prior(PriorConfig(**values), geometry)
    load_state(model, state, directory)
    return model.to(device).eval()
