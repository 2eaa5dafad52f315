"""The transformer prior: shapes, causality per mask schedule, pads, dense vs flex, cached vs uncached, learning."""

from __future__ import annotations

import math

import pytest
import torch

from dalle.config import PriorConfig
from dalle.prior import Prior, PriorGeometry
from dalle.sampling import sample_image_tokens

GEOMETRY = PriorGeometry(text_vocab=20, text_len=6, image_vocab=16, grid=4)
SCHEDULES = ("paper", "full", "row", "column", "axial", "conv")
# On CPU, eager flex_attention warns that it falls back to an unfused reference; that is what the test wants.
quiet_flex = pytest.mark.filterwarnings("ignore:.*flex.?attention.*:UserWarning")


def make_prior(schedule: str = "paper", attn_impl: str = "dense", n_layers: int = 3, seed: int = 0) -> Prior:
    torch.manual_seed(seed)
    cfg = PriorConfig(
        n_layers=n_layers, n_heads=2, d_model=32, schedule=schedule, conv_kernel=3, attn_impl=attn_impl, dropout=0.0
    )  # no dropout: the tests compare kernels, caches and gradients in train mode
    return Prior(cfg, GEOMETRY).eval()


def make_batch(batch_size: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(0, GEOMETRY.text_vocab, (batch_size, GEOMETRY.text_len), generator=generator)
    text_lengths = torch.tensor([2, GEOMETRY.text_len, 4, 1, 3][:batch_size])
    text_ids = text_ids.masked_fill(torch.arange(GEOMETRY.text_len)[None] >= text_lengths[:, None], 0)
    image_tokens = torch.randint(0, GEOMETRY.image_vocab, (batch_size, GEOMETRY.grid**2), generator=generator)
    return text_ids, text_lengths, image_tokens


def stream_logits(prior: Prior, *batch: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) logits of every predicting position, text and image parts side by side (padded to one width)."""
    logits, _ = prior(*batch)
    width = max(GEOMETRY.text_vocab, GEOMETRY.image_vocab)
    text = torch.nn.functional.pad(logits.text, (0, width - GEOMETRY.text_vocab))
    image = torch.nn.functional.pad(logits.image, (0, width - GEOMETRY.image_vocab))
    return torch.cat([text, image], dim=1)  # (B, T - 1, width): row t predicts stream position t + 1


def test_shapes_and_loss_parts():
    prior = make_prior()
    batch = make_batch()
    logits, loss = prior(*batch)
    assert logits.text.shape == (3, GEOMETRY.text_len - 1, GEOMETRY.text_vocab)
    assert logits.image.shape == (3, GEOMETRY.grid**2, GEOMETRY.image_vocab)
    assert loss.shape == ()
    parts = prior.losses(logits, *batch)
    w = prior.cfg.text_loss_weight
    assert torch.allclose(parts.loss, loss)
    assert torch.allclose(loss, w * parts.text_nll + (1 - w) * parts.image_nll)
    assert torch.allclose(parts.image_bits, parts.image_nll / math.log(2))


def test_masks_are_not_in_the_state_dict():
    prior = make_prior("paper")
    assert not any(key.startswith("mask_") for key in prior.state_dict())
    assert {name for name, _ in prior.named_buffers()} == {"mask_row", "mask_column", "mask_conv"}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_no_leakage_from_later_positions(schedule):
    prior = make_prior(schedule)
    text_ids, text_lengths, image_tokens = make_batch(batch_size=2)
    text_lengths = torch.full((2,), GEOMETRY.text_len)  # every text position is a real token, so changes show
    text_ids = torch.randint(1, GEOMETRY.text_vocab, text_ids.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = stream_logits(prior, text_ids, text_lengths, image_tokens)
        for t in (2, GEOMETRY.text_len - 1, GEOMETRY.text_len, GEOMETRY.text_len + 5, GEOMETRY.seq_len - 2):
            changed_text, changed_image = text_ids.clone(), image_tokens.clone()
            if t < GEOMETRY.text_len:
                changed_text[:, t] = (changed_text[:, t] + 1) % GEOMETRY.text_vocab
            else:
                changed_image[:, t - GEOMETRY.text_len] = (changed_image[:, t - GEOMETRY.text_len] + 1) % 16
            after = stream_logits(prior, changed_text, text_lengths, changed_image)
            # Row r of stream_logits is computed at stream position r: positions < t must not move ...
            torch.testing.assert_close(after[:, :t], base[:, :t], rtol=0, atol=0)
            # ... and position t must (else the check above would be vacuous).
            assert not torch.allclose(after[:, t], base[:, t])


@pytest.mark.parametrize("schedule", ("paper", "full"))
def test_text_logits_ignore_image_tokens(schedule):
    prior = make_prior(schedule)
    text_ids, text_lengths, image_tokens = make_batch()
    with torch.no_grad():
        before, _ = prior(text_ids, text_lengths, image_tokens)
        after, _ = prior(text_ids, text_lengths, (image_tokens + 7) % GEOMETRY.image_vocab)
    torch.testing.assert_close(after.text, before.text, rtol=0, atol=0)


def test_pads_are_neither_inputs_nor_targets():
    prior = make_prior()
    text_ids, text_lengths, image_tokens = make_batch()
    garbage = text_ids.clone()
    pad = torch.arange(GEOMETRY.text_len)[None] >= text_lengths[:, None]
    garbage[pad] = torch.randint(0, GEOMETRY.text_vocab, (int(pad.sum()),))
    garbage[0, -1] = 10_000  # out of vocabulary past the caption's end is fine: it is never looked up
    with torch.no_grad():
        clean_logits, clean_loss = prior(text_ids, text_lengths, image_tokens)
        garbage_logits, garbage_loss = prior(garbage, text_lengths, image_tokens)
    torch.testing.assert_close(garbage_logits.text, clean_logits.text, rtol=0, atol=0)
    torch.testing.assert_close(garbage_logits.image, clean_logits.image, rtol=0, atol=0)
    torch.testing.assert_close(garbage_loss, clean_loss, rtol=0, atol=0)


def test_text_loss_counts_only_caption_tokens():
    prior = make_prior()
    text_ids, _, image_tokens = make_batch(batch_size=2)
    text_lengths = torch.tensor([1, 3])  # caption 0 has no target; caption 1 has targets at text positions 1, 2
    with torch.no_grad():
        logits, _ = prior(text_ids, text_lengths, image_tokens)
        text_nll = prior.losses(logits, text_ids, text_lengths, image_tokens).text_nll
    log_probs = logits.text[1].log_softmax(-1)  # (text_len - 1, V), row j predicts text token j + 1
    expected = -(log_probs[0, text_ids[1, 1]] + log_probs[1, text_ids[1, 2]]) / 2
    torch.testing.assert_close(text_nll, expected)


@quiet_flex
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dense_and_flex_agree(schedule):
    dense, flex = make_prior(schedule, "dense"), make_prior(schedule, "flex")
    batch = make_batch()
    with torch.no_grad():  # eager flex attention on CPU has no backward
        dense_logits, dense_loss = dense(*batch)
        flex_logits, flex_loss = flex(*batch)
    torch.testing.assert_close(flex_logits.text, dense_logits.text, rtol=0, atol=1e-5)
    torch.testing.assert_close(flex_logits.image, dense_logits.image, rtol=0, atol=1e-5)
    torch.testing.assert_close(flex_loss, dense_loss, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_blocked_attention_trains_like_dense(schedule):
    """Same weights, same batch: the block-local kernel gives dense SDPA's logits, loss and every gradient."""
    dense, blocked = make_prior(schedule, "dense").train(), make_prior(schedule, "blocked").train()
    batch = make_batch()
    dense_logits, dense_loss = dense(*batch)
    blocked_logits, blocked_loss = blocked(*batch)
    torch.testing.assert_close(blocked_logits.image, dense_logits.image, rtol=0, atol=1e-5)
    torch.testing.assert_close(blocked_loss, dense_loss, rtol=0, atol=1e-5)
    dense_loss.backward()
    blocked_loss.backward()
    for (name, a), b in zip(dense.named_parameters(), blocked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # cached decoding attends with dense mask rows, whatever attn_impl is
        logits, cache = blocked.eval().prefill(*batch[:2])
        stepped = [logits] + [blocked.step(cache, batch[2][:, i])[0] for i in range(GEOMETRY.grid**2 - 1)]
        torch.testing.assert_close(torch.stack(stepped, dim=1), blocked(*batch)[0].image, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cached_decoding_matches_full_forward(schedule):
    prior = make_prior(schedule)
    text_ids, text_lengths, image_tokens = make_batch()
    with torch.no_grad():
        full, _ = prior(text_ids, text_lengths, image_tokens)
        logits, cache = prior.prefill(text_ids, text_lengths)
        keys = cache.keys
        stepped = [logits]
        for index in range(GEOMETRY.grid**2 - 1):
            logits, cache = prior.step(cache, image_tokens[:, index])
            stepped.append(logits)
    assert cache.keys is keys and cache.length == GEOMETRY.seq_len - 1  # filled in place, never reallocated
    torch.testing.assert_close(torch.stack(stepped, dim=1), full.image, rtol=0, atol=1e-5)


def test_step_past_the_image_raises():
    prior = make_prior()
    text_ids, text_lengths, image_tokens = make_batch()
    with torch.no_grad():
        _, cache = prior.prefill(text_ids, text_lengths)
        for index in range(GEOMETRY.grid**2 - 1):
            _, cache = prior.step(cache, image_tokens[:, index])
        with pytest.raises(ValueError, match="step feeds image tokens"):
            prior.step(cache, image_tokens[:, -1])


def test_sampling_gives_valid_tokens():
    prior = make_prior()
    text_ids, text_lengths, _ = make_batch()
    tokens = sample_image_tokens(prior, text_ids, text_lengths, top_k=4, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, GEOMETRY.grid**2)
    assert tokens.min() >= 0 and tokens.max() < GEOMETRY.image_vocab


def test_loss_at_init_is_log_vocab():
    prior = make_prior(n_layers=2)
    text_ids, text_lengths, image_tokens = make_batch(batch_size=5)
    with torch.no_grad():
        parts = prior.losses(prior(text_ids, text_lengths, image_tokens)[0], text_ids, text_lengths, image_tokens)
    assert abs(parts.text_nll.item() - math.log(GEOMETRY.text_vocab)) < 0.1
    assert abs(parts.image_nll.item() - math.log(GEOMETRY.image_vocab)) < 0.1


def test_learns_a_toy_caption_to_image_mapping():
    torch.manual_seed(0)
    prior = make_prior(n_layers=2).train()
    lengths = torch.tensor([1, 2, 3, 4, 5, 6, 2, 3])
    text_ids = torch.randint(1, GEOMETRY.text_vocab, (8, GEOMETRY.text_len))
    text_ids[:, 0] = torch.arange(8) + 1  # distinct first tokens
    text_ids = text_ids.masked_fill(torch.arange(GEOMETRY.text_len)[None] >= lengths[:, None], 0)
    codes = (text_ids[:, 0] * 5) % GEOMETRY.image_vocab  # the whole image is one code chosen by the caption
    image_tokens = codes[:, None].expand(8, GEOMETRY.grid**2).contiguous()
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    for _ in range(200):
        _, loss = prior(text_ids, lengths, image_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        parts = prior.eval().losses(prior(text_ids, lengths, image_tokens)[0], text_ids, lengths, image_tokens)
    assert parts.image_nll.item() < 0.05


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, n, i: (t[:, :-1], n, i), r"text_ids must be integer \(B, text_len=6\)"),
        (lambda t, n, i: (t.float(), n, i), r"text_ids must be integer"),
        (lambda t, n, i: (t, n[:-1], i), r"text_lengths must be integer \(B=3,\)"),
        (lambda t, n, i: (t, n + 6, i), r"text_lengths must be in 0..text_len=6"),
        (lambda t, n, i: (t.index_fill(1, torch.tensor([0]), 20), n, i), r"text_ids must be in 0..text_vocab-1=19"),
        (lambda t, n, i: (t, n, i.view(3, 4, 4)), r"image_tokens must be integer \(B=3, grid²=16\)"),
        (lambda t, n, i: (t, n, i[:2]), r"image_tokens must be integer \(B=3, grid²=16\)"),
        (
            lambda t, n, i: (t, n, i.index_fill(1, torch.tensor([3]), 16)),
            r"image_tokens must be in 0..image_vocab-1=15",
        ),
        (
            lambda t, n, i: (t, n, i.index_fill(1, torch.tensor([3]), -1)),
            r"image_tokens must be in 0..image_vocab-1=15",
        ),
    ],
)
def test_bad_inputs_raise(change, message):
    prior = make_prior()
    with pytest.raises(ValueError, match=message):
        prior(*change(*make_batch()))


def test_bad_geometry_raises():
    with pytest.raises(ValueError, match="PriorGeometry.grid must be >= 1"):
        PriorGeometry(text_vocab=20, text_len=6, image_vocab=16, grid=0)
