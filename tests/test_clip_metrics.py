"""Retrieval recall@k and the CLIP-score analogue against brute force and hand computations; the scorer's batched
embeddings against the reranker's own scoring."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from dalle.checkpoint import save_weights
from dalle.clip import Clip
from dalle.clip_metrics import (
    CaptionScorer,
    chance_recall,
    clip_score,
    load_caption_scorer,
    recall_at_k,
    text_to_image_recall,
)
from dalle.config import ClipConfig
from dalle.text import TextTokenizer


def brute_force_recall(similarity: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Every order of the columns is a tie-breaker, all equally likely: average the hit over all of them."""
    n_queries, n_candidates = similarity.shape
    hits = 0.0
    orders = list(itertools.permutations(range(n_candidates)))
    for query in range(n_queries):
        for order in orders:
            ranking = sorted(range(n_candidates), key=lambda c: (-similarity[query, c], order[c]))
            hits += ranking.index(targets[query]) < k
    return hits / (n_queries * len(orders))


def test_recall_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    similarity = rng.integers(0, 3, (7, 5)).astype(np.float32)  # few values: many ties
    targets = rng.integers(0, 5, 7)
    recall = recall_at_k(torch.from_numpy(similarity), [1, 2, 3, 5], torch.from_numpy(targets))
    for k, value in recall.items():
        assert value == pytest.approx(brute_force_recall(similarity, targets, k), abs=1e-12), k


def test_recall_by_hand():
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.0],  # own image first
            [0.5, 0.4, 0.3, 0.6],  # own (0.4) third
            [0.1, 0.1, 0.1, 0.1],  # all tied: rank uniform on 0..3
            [0.4, 0.2, 0.3, 0.1],  # own last
        ]
    )
    recall = recall_at_k(similarity, [1, 2, 3, 4])
    assert recall[1] == pytest.approx((1 + 0 + 1 / 4 + 0) / 4)
    assert recall[2] == pytest.approx((1 + 0 + 2 / 4 + 0) / 4)
    assert recall[3] == pytest.approx((1 + 1 + 3 / 4 + 0) / 4)
    assert recall[4] == 1.0


def test_collapsed_embeddings_score_chance_not_one():
    similarity = torch.ones(10, 10)
    recall = recall_at_k(similarity, [1, 5, 10])
    assert recall == {k: pytest.approx(chance_recall(10, k)) for k in (1, 5, 10)}
    assert chance_recall(10, 1) == 0.1 and chance_recall(4, 10) == 1.0


def test_chunked_text_to_image_recall_equals_the_whole_matrix():
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(11, 4, generator=generator), dim=1)
    images = torch.nn.functional.normalize(text + 0.8 * torch.randn(11, 4, generator=generator), dim=1)
    whole = recall_at_k(text @ images.T, [1, 5, 10])
    assert text_to_image_recall(text, images, [1, 5, 10], chunk=3) == pytest.approx(whole)
    assert text_to_image_recall(images, images, [1]) == {1: 1.0}
    with pytest.raises(ValueError, match="one shape"):
        text_to_image_recall(text, images[:5], [1])


def test_clip_score_by_hand():
    images = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    captions = torch.tensor(
        [
            [1.0, 0.0],  # cos 1 -> 100
            [0.5, math.sqrt(3) / 2],  # cos 0.5 -> 50 (unnormalised image)
            [-1.0, 0.0],  # cos -1 -> clipped to 0
            [1.0, 1.0],  # cos 1/sqrt(2)
        ]
    )
    expected = (100 + 50 + 0 + 100 / math.sqrt(2)) / 4
    assert clip_score(images, captions) == pytest.approx(expected)
    with pytest.raises(ValueError, match="one shape"):
        clip_score(images, captions[:2])


CFG = ClipConfig(embed_dim=8, text_layers=1, text_width=16, text_heads=2, image_channels=8, image_stages=2)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> tuple[CaptionScorer, str]:
    captions = ["a red circle", "a blue square at the top", "two green triangles", "an orange thing"] * 5
    tokenizer = TextTokenizer.train(captions, 300)
    torch.manual_seed(0)
    model = Clip(CFG, tokenizer.vocab_size, 8, 16).eval()
    root = tmp_path_factory.mktemp("scorer")
    save_weights(
        model, root, {**dataclasses.asdict(CFG), "text_vocab": tokenizer.vocab_size, "text_len": 8, "image_size": 16}
    )
    tokenizer.save(root / "tokenizer.json")
    return CaptionScorer(model, tokenizer, batch_size=3), root


def test_scorer_clip_score_is_the_models_own_cosine(scorer):
    scorer, root = scorer
    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square at the top", "two green triangles", "x", "", "an orange thing", "y"]
    encoded = scorer.tokenizer.encode(captions, 8)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ids, lengths = torch.from_numpy(encoded.ids).long(), torch.from_numpy(encoded.lengths).long()
    cosine = scorer.model.score(pixels, ids, lengths)  # one batch, no chunking
    assert scorer.clip_score(images, captions) == pytest.approx((100 * cosine.clamp(min=0)).mean().item(), abs=1e-4)
    reloaded = load_caption_scorer(root)
    assert torch.allclose(reloaded.embed_images(images), scorer.embed_images(images), atol=1e-6)
    assert torch.allclose(reloaded.embed_captions(captions), scorer.embed_captions(captions), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 16, 16, 3\)"):
        scorer.embed_images(images[:, :8])
