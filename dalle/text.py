"""Caption tokenizer: lower-cased byte-level BPE (Ramesh et al. 2021, §2.2: "lowercased BPE"), via HF tokenizers.

Padding is deliberately not a token id. The prior learns one pad embedding per text position, as the paper
does, so an encoded batch is ``ids`` (zeros past the caption) plus ``lengths`` saying where each caption ends.
Byte-level BPE never needs an unknown token and round-trips any lower-cased text exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers


@dataclass(frozen=True)
class EncodedText:
    ids: np.ndarray  # (N, text_len) int32, zero past each caption's end
    lengths: np.ndarray  # (N,) int32, tokens kept per caption (<= text_len)
    full_lengths: np.ndarray  # (N,) int32, tokens before truncation

    @property
    def truncated(self) -> np.ndarray:
        return self.full_lengths > self.lengths

    @property
    def mask(self) -> np.ndarray:
        """(N, text_len) bool, True on caption tokens, False on pad positions."""
        return np.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int) -> TextTokenizer:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(captions, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (run the prepare stage)")
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, captions: Sequence[str], text_len: int) -> EncodedText:
        encodings = self.tokenizer.encode_batch(list(captions), add_special_tokens=False)
        ids = np.zeros((len(encodings), text_len), dtype=np.int32)
        full_lengths = np.array([len(e.ids) for e in encodings], dtype=np.int32)
        lengths = np.minimum(full_lengths, text_len)
        for row, (encoding, length) in enumerate(zip(encodings, lengths)):
            ids[row, :length] = encoding.ids[:length]
        return EncodedText(ids=ids, lengths=lengths, full_lengths=full_lengths)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def normalize(self, caption: str) -> str:
        """The text a caption is encoded as (what ``decode(encode(caption))`` gives back)."""
        return self.tokenizer.normalizer.normalize_str(caption)
