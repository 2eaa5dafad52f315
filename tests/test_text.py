"""Caption BPE: exact round trip, padding that is not a token id, counted truncation, reproducible training."""

from __future__ import annotations

import numpy as np
import pytest

from dalle.text import TextTokenizer

CAPTIONS = [
    "a small red circle in the top left",
    "A LARGE blue square in the center",
    "there is a tiny green triangle at the bottom right of the image",
    "a big orange disc to the left of a little white box",
] * 5


def test_round_trip_is_exact_after_lowercasing():
    tokenizer = TextTokenizer.train(CAPTIONS, vocab_size=300)
    for caption in CAPTIONS + ["Unseen wörds, punctuation! and emoji 🙂"]:
        encoded = tokenizer.encode([caption], text_len=200)
        ids = encoded.ids[0, : encoded.lengths[0]]
        assert tokenizer.decode(ids) == caption.lower() == tokenizer.normalize(caption)


def test_padding_is_a_length_not_a_token():
    tokenizer = TextTokenizer.train(CAPTIONS, vocab_size=300)
    encoded = tokenizer.encode(["a red circle", CAPTIONS[2]], text_len=10)
    assert encoded.ids.shape == (2, 10) and encoded.ids.dtype == np.int32
    short = tokenizer.tokenizer.encode("a red circle", add_special_tokens=False).ids
    assert encoded.lengths[0] == len(short) < 10
    assert encoded.ids[0, : len(short)].tolist() == short
    assert (encoded.ids[0, len(short) :] == 0).all()
    assert encoded.mask[0].tolist() == [True] * len(short) + [False] * (10 - len(short))
    # The long caption is cut at text_len and flagged.
    assert encoded.lengths[1] == 10 and encoded.full_lengths[1] > 10
    assert encoded.truncated.tolist() == [False, True]


def test_training_is_reproducible_and_saves(tmp_path):
    first, second = TextTokenizer.train(CAPTIONS, 300), TextTokenizer.train(CAPTIONS, 300)
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    loaded = TextTokenizer.from_file(tmp_path / "a.json")
    assert np.array_equal(loaded.encode(CAPTIONS, 16).ids, first.encode(CAPTIONS, 16).ids)
    assert 256 < first.vocab_size <= 300


def test_missing_tokenizer_file_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        TextTokenizer.from_file(tmp_path / "tokenizer.json")
