"""Drawing image tokens from the prior (§2.2, §2.6): batched autoregressive sampling over the image positions.

The caption runs once through ``Prior.prefill``; each image token is then one cached ``Prior.step``. Filters
(temperature, top-k, top-p) act on the image vocabulary only: the image head has no text logits, so no text
token can take part in a threshold. Classifier-free guidance (Ho & Salimans 2022; not in the DALL-E paper)
mixes the conditional stream with an unconditional one fed the all-pad caption, which the prior learns from
``prior.null_text_prob``: logits = uncond + s · (cond − uncond). The two streams have their own caches and
only ever share the sampled tokens. Priming fixes the first image tokens (the paper's image-to-image examples
prime the top rows) and samples the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle.prior import KVCache, Prior


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """(B, V) logits → temperature-scaled logits with tokens outside the top-k and the nucleus set to -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = F.softmax(ordered, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


class GuidedStreams:
    """The conditional decoding stream of a batch of captions and, when ``guidance_scale != 1``, the
    unconditional one (empty captions), each with its own cache."""

    def __init__(self, prior: Prior, text_ids: Tensor, text_lengths: Tensor, guidance_scale: float = 1.0):
        self.prior, self.guidance_scale = prior, guidance_scale
        self.cond_logits, self.cond_cache = prior.prefill(text_ids, text_lengths)
        self.uncond_logits: Tensor | None = None
        self.uncond_cache: KVCache | None = None
        if guidance_scale != 1:
            empty = torch.zeros_like(text_lengths)
            self.uncond_logits, self.uncond_cache = prior.prefill(torch.zeros_like(text_ids), empty)

    def logits(self) -> Tensor:
        """(B, image_vocab) guided logits of the next image token."""
        if self.uncond_logits is None:
            return self.cond_logits
        cond, uncond = self.cond_logits.float(), self.uncond_logits.float()
        return uncond + self.guidance_scale * (cond - uncond)

    def feed(self, image_tokens: Tensor) -> None:
        """Append image tokens (B,) or (B, L) to both streams."""
        self.cond_logits, _ = self.prior.step(self.cond_cache, image_tokens)
        if self.uncond_cache is not None:
            self.uncond_logits, _ = self.prior.step(self.uncond_cache, image_tokens)


@torch.no_grad()
def sample_image_tokens(
    prior: Prior,
    text_ids: Tensor,
    text_lengths: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 1.0,
    prime_tokens: Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Sample (B, grid²) image tokens for the captions.

    ``prime_tokens`` (B, n), n < grid², fixes the first n tokens in raster order (``prime_rows × grid`` for
    whole rows). ``use_cache=False`` recomputes the whole prefix at every position (the reference the cache is
    measured against; guidance is not supported there).
    """
    prior.eval()
    n_tokens = prior.geometry.grid**2
    batch = text_ids.shape[0]
    tokens = torch.empty(batch, n_tokens, dtype=torch.long, device=text_ids.device)
    n_prime = 0 if prime_tokens is None else prime_tokens.shape[1]
    if prime_tokens is not None:
        if prime_tokens.shape[0] != batch or not 0 < n_prime < n_tokens:
            raise ValueError(
                f"prime_tokens must be (B={batch}, n) with 0 < n < grid²={n_tokens}, got {tuple(prime_tokens.shape)}"
            )
        tokens[:, :n_prime] = prime_tokens
    if not use_cache:
        if guidance_scale != 1:
            raise ValueError("guidance needs the cached sampler (use_cache=True)")
        for index in range(n_prime, n_tokens):
            logits = prior(
                text_ids, text_lengths, tokens.masked_fill(torch.arange(n_tokens, device=tokens.device) >= index, 0)
            )[0].image[:, index]
            logits = filter_logits(logits, temperature, top_k, top_p)
            tokens[:, index] = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
        return tokens
    streams = GuidedStreams(prior, text_ids, text_lengths, guidance_scale)
    if n_prime:
        streams.feed(tokens[:, :n_prime])
    for index in range(n_prime, n_tokens):
        logits = filter_logits(streams.logits(), temperature, top_k, top_p)
        tokens[:, index] = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
        if index < n_tokens - 1:
            streams.feed(tokens[:, index])
    return tokens
