"""Drawing image tokens from the prior (§2.2): batched autoregressive sampling over the image positions with the
key/value cache; the caption is given and run once through ``Prior.prefill``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle.prior import Prior


@torch.no_grad()
def sample_image_tokens(
    prior: Prior,
    text_ids: Tensor,
    text_lengths: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample (B, grid²) image tokens for the captions, one token per cached step."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits, kv = prior.prefill(text_ids, text_lengths)
    n_tokens = prior.geometry.grid**2
    tokens = torch.empty(text_ids.shape[0], n_tokens, dtype=torch.long, device=text_ids.device)
    for index in range(n_tokens):
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        tokens[:, index] = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
        if index < n_tokens - 1:
            logits, kv = prior.step(kv, tokens[:, index])
    return tokens
