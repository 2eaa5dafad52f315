"""Sampling from the prior: filters over the image vocabulary, cached = uncached draws, classifier-free guidance
against a brute-force reference, separate guidance streams, priming."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_prior import GEOMETRY, make_batch, make_prior

from dalle.sampling import GuidedStreams, filter_logits, sample_image_tokens

SCHEDULES = ("paper", "full", "row", "column", "axial", "conv")


def brute_force_sample(prior, text_ids, text_lengths, guidance_scale=1.0, prime=None, seed=0, **filters):
    """Recompute the whole stream at every position, conditional and (for guidance) unconditional."""
    generator = torch.Generator().manual_seed(seed)
    n_tokens = GEOMETRY.grid**2
    tokens = torch.zeros(text_ids.shape[0], n_tokens, dtype=torch.long)
    start = 0 if prime is None else prime.shape[1]
    if prime is not None:
        tokens[:, :start] = prime
    empty = torch.zeros_like(text_lengths)
    with torch.no_grad():
        for index in range(start, n_tokens):
            cond = prior(text_ids, text_lengths, tokens)[0].image[:, index]
            uncond = prior(torch.zeros_like(text_ids), empty, tokens)[0].image[:, index]
            logits = uncond + guidance_scale * (cond - uncond) if guidance_scale != 1 else cond
            probs = F.softmax(filter_logits(logits, **filters), dim=-1)
            tokens[:, index] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens


def test_top_k_keeps_the_k_largest_and_temperature_scales():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.5]])
    kept = filter_logits(logits, temperature=2.0, top_k=2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, False, True]]
    assert kept[0, 1].item() == pytest.approx(1.5)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 16, generator=generator) * 2
    for top_p in (0.1, 0.5, 0.9, 0.999):
        kept = torch.isfinite(filter_logits(logits, top_p=top_p))
        probs = F.softmax(logits, dim=-1)
        for row in range(len(logits)):  # brute force: add tokens from the most likely until the mass reaches p
            order, mass, expected = probs[row].argsort(descending=True), 0.0, set()
            for token in order.tolist():
                expected.add(token)
                mass += probs[row, token].item()
                if mass >= top_p:
                    break
            assert set(torch.nonzero(kept[row])[:, 0].tolist()) == expected, (top_p, row)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_filters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        filter_logits(torch.zeros(1, 4), **kwargs)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cached_sampling_draws_what_recomputing_the_prefix_draws(schedule):
    prior = make_prior(schedule)
    text_ids, text_lengths, _ = make_batch()
    expected = brute_force_sample(prior, text_ids, text_lengths, top_k=8, temperature=0.9)
    generator = torch.Generator().manual_seed(0)
    cached = sample_image_tokens(prior, text_ids, text_lengths, 0.9, top_k=8, generator=generator)
    generator = torch.Generator().manual_seed(0)
    uncached = sample_image_tokens(prior, text_ids, text_lengths, 0.9, top_k=8, generator=generator, use_cache=False)
    torch.testing.assert_close(cached, expected, rtol=0, atol=0)
    torch.testing.assert_close(uncached, expected, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.0, 3.0, 0.0])
def test_guidance_matches_the_brute_force_mix(scale):
    prior = make_prior("paper")
    text_ids, text_lengths, _ = make_batch()
    expected = brute_force_sample(prior, text_ids, text_lengths, guidance_scale=scale, top_p=0.95)
    generator = torch.Generator().manual_seed(0)
    tokens = sample_image_tokens(prior, text_ids, text_lengths, guidance_scale=scale, top_p=0.95, generator=generator)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_guidance_streams_stay_apart():
    prior = make_prior("paper")
    text_ids, text_lengths, image_tokens = make_batch()
    with torch.no_grad():
        streams = GuidedStreams(prior, text_ids, text_lengths, guidance_scale=2.0)
        assert streams.cond_cache.keys.data_ptr() != streams.uncond_cache.keys.data_ptr()
        for index in range(GEOMETRY.grid**2 - 1):
            assert not torch.allclose(streams.cond_logits, streams.uncond_logits), f"streams agree at step {index}"
            streams.feed(image_tokens[:, index])
        # Each stream is exactly the prior run on its own text: the caption, or the empty caption.
        cond = prior(text_ids, text_lengths, image_tokens)[0].image[:, -1]
        uncond = prior(torch.zeros_like(text_ids), torch.zeros_like(text_lengths), image_tokens)[0].image[:, -1]
    torch.testing.assert_close(streams.cond_logits, cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streams.uncond_logits, uncond, rtol=1e-5, atol=1e-5)


def test_scale_one_runs_no_unconditional_stream():
    prior = make_prior("paper")
    text_ids, text_lengths, _ = make_batch()
    with torch.no_grad():
        assert GuidedStreams(prior, text_ids, text_lengths, guidance_scale=1.0).uncond_cache is None


def test_priming_fixes_the_first_rows_and_samples_the_rest():
    prior = make_prior("paper")
    text_ids, text_lengths, image_tokens = make_batch()
    prime = image_tokens[:, : 2 * GEOMETRY.grid]  # the top two rows
    expected = brute_force_sample(prior, text_ids, text_lengths, prime=prime, guidance_scale=2.0)
    generator = torch.Generator().manual_seed(0)
    tokens = sample_image_tokens(
        prior, text_ids, text_lengths, guidance_scale=2.0, prime_tokens=prime, generator=generator
    )
    torch.testing.assert_close(tokens[:, : prime.shape[1]], prime, rtol=0, atol=0)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prime_tokens must be"):
        sample_image_tokens(prior, text_ids, text_lengths, prime_tokens=image_tokens)
