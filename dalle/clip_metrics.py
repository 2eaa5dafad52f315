"""Text-image agreement read by a contrastive model (``dalle.clip``): retrieval recall@k and a CLIP-score analogue,
the measures left when captions carry no attribute labels to check samples against.

Recall@k, text → image (CLIP, Radford et al. 2021, §3.1): each caption ranks every candidate image by cosine
similarity; it scores a hit when its own image is among the first k. Ties with the own image are broken uniformly at
random, in expectation, so a model whose embeddings collapsed scores the chance level k/N rather than 1.

CLIP-score (Hessel et al. 2021, as torchmetrics' ``CLIPScore``): 100 · max(cos(image, caption), 0), averaged over
the pairs. The embeddings here come from a scorer trained in this workbench, not OpenAI's CLIP: compare values
within the workbench, not with papers. The scorer must not be the reranker that chose the samples, or the score
measures that choice rather than the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dalle.clip import Clip, load_clip
from dalle.pixels import to_float_images
from dalle.text import TextTokenizer

TOKENIZER_FILE = "tokenizer.json"
RECALL_K = (1, 5, 10)  # the k of the recall@k the stages report


def expected_hits(similarity: Tensor, targets: Tensor, k: int) -> Tensor:
    """(Q,) probability that query i's target column ``targets[i]`` is among the k most similar of row i of
    ``similarity`` (Q, N), ties broken uniformly at random: with g columns above it and t others tied, its rank
    is uniform on g..g+t, so the probability is clamp((k − g) / (t + 1), 0, 1)."""
    own = similarity.gather(1, targets[:, None])  # (Q, 1)
    above = (similarity > own).sum(dim=1)
    tied = (similarity == own).sum(dim=1) - 1  # other columns as similar as the target
    return ((k - above).double() / (tied + 1)).clamp(0, 1)


def recall_at_k(similarity: Tensor, ks: Sequence[int], targets: Tensor | None = None) -> dict[int, float]:
    """Recall@k for each k of queries (rows) against candidates (columns); query i's match is column
    ``targets[i]`` (default: column i)."""
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (queries, candidates), got {tuple(similarity.shape)}")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    if targets is None:
        targets = torch.arange(len(similarity), device=similarity.device)
    return {k: expected_hits(similarity, targets, k).mean().item() for k in ks}


def chance_recall(n_candidates: int, k: int) -> float:
    """Recall@k of a ranking that ignores the query: k of the n candidates."""
    return min(k, n_candidates) / n_candidates


@torch.no_grad()
def text_to_image_recall(
    text_embeddings: Tensor, image_embeddings: Tensor, ks: Sequence[int], chunk: int = 1024
) -> dict[int, float]:
    """Recall@k where caption i's own image is image i, among all images; similarities are computed ``chunk``
    captions at a time, so N×N is never held at once."""
    if text_embeddings.ndim != 2 or text_embeddings.shape != image_embeddings.shape:
        raise ValueError(
            f"need (N, d) caption and image embeddings of one shape, got {tuple(text_embeddings.shape)} "
            f"and {tuple(image_embeddings.shape)}"
        )
    hits = dict.fromkeys(ks, 0.0)
    for start in range(0, len(text_embeddings), chunk):
        similarity = text_embeddings[start : start + chunk] @ image_embeddings.T  # (chunk, N)
        targets = torch.arange(start, start + len(similarity), device=similarity.device)
        for k in ks:
            hits[k] += expected_hits(similarity, targets, k).sum().item()
    return {k: total / len(text_embeddings) for k, total in hits.items()}


def clip_score(image_embeddings: Tensor, text_embeddings: Tensor) -> float:
    """Mean over pairs (row i of each) of 100 · max(cos(image, caption), 0)."""
    if image_embeddings.ndim != 2 or image_embeddings.shape != text_embeddings.shape:
        raise ValueError(
            f"need (N, d) image and caption embeddings of one shape, got {tuple(image_embeddings.shape)} "
            f"and {tuple(text_embeddings.shape)}"
        )
    cosine = F.cosine_similarity(image_embeddings.double(), text_embeddings.double(), dim=-1)
    return (100 * cosine.clamp(min=0)).mean().item()


@dataclass(frozen=True)
class CaptionScorer:
    """A trained contrastive model and its tokenizer used as an instrument: batched embeddings (CPU, float32)."""

    model: Clip
    tokenizer: TextTokenizer
    batch_size: int = 250

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> Tensor:
        """uint8 (N, S, S, 3), or any array-like sliced into such batches (memory-mapped, shards) → (N, embed_dim)
        unit vectors."""
        size = self.model.image_size
        self.model.eval()
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = np.asarray(images[start : start + self.batch_size])
            if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
                raise ValueError(f"images must be (N, {size}, {size}, 3) for this scorer, got (N, *{batch.shape[1:]})")
            chunks.append(self.model.encode_image(to_float_images(batch, self.device)).cpu())
        if not chunks:
            raise ValueError("no images to embed")
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_captions(self, captions: Sequence[str]) -> Tensor:
        """Captions (truncated to the model's text length) → (N, embed_dim) unit vectors."""
        self.model.eval()
        encoded = self.tokenizer.encode(list(captions), self.model.text_len)
        chunks = []
        for start in range(0, len(captions), self.batch_size):
            stop = start + self.batch_size
            ids = torch.from_numpy(encoded.ids[start:stop].astype(np.int64)).to(self.device)
            lengths = torch.from_numpy(encoded.lengths[start:stop].astype(np.int64)).to(self.device)
            chunks.append(self.model.encode_text(ids, lengths).cpu())
        return torch.cat(chunks)

    def clip_score(self, images: np.ndarray, captions: Sequence[str]) -> float:
        """CLIP-score analogue of image i with caption i."""
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        return clip_score(self.embed_images(images), self.embed_captions(captions))


def load_caption_scorer(directory: str | Path, device: torch.device | str = "cpu") -> CaptionScorer:
    """A contrastive model saved with its tokenizer (``model.safetensors``, ``config.json``, ``tokenizer.json``)."""
    directory = Path(directory)
    return CaptionScorer(load_clip(directory, device), TextTokenizer.from_file(directory / TOKENIZER_FILE))
