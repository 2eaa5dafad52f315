"""The order training reads samples in: which images (and which of their captions) make up batch ``step`` on each
data-parallel rank. Both orders are pure functions of (seed, step) and of the world size where it matters, so a
resumed run reads exactly the batches an uninterrupted one would, and a checkpoint needs no loader state.

- :class:`RandomOrder` (``loader.order: random``): epochs of seeded permutations of the whole split. Global batch
  ``step`` is the same set of pairs at every world size; rank ``r`` of ``W`` takes every ``W``-th pair of it. Every
  rank reads from every shard, so it suits data that fits the page cache or the in-memory cache.
- :class:`StreamOrder` (``loader.order: stream``, mosaicml/streaming's block shuffle, webdataset's shuffle
  buffer): each epoch deals the shards, in a seeded order, to the ranks in turn, and each rank reads only its own
  shards, front to back, through a shuffle window of ``shuffle_block`` samples. Ranks read disjoint shards and
  touch a bounded set of them at a time, which is what data far larger than memory needs; the price is that the
  batches depend on the world size (a checkpoint resumes only at the same world size).

Caption choice (§2.2: one of an image's captions at a time) comes with the order: a uniform draw per pair, turned
into a caption row by :func:`caption_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from dalle.config import LoaderConfig

DEFAULT_LOADER = LoaderConfig()  # random order


def epoch_of(step: int, n_items: int, batch_size: int) -> tuple[int, int]:
    """(epoch, batch position within it) of training batch ``step``; a partial last batch is dropped."""
    return divmod(step, max(n_items // batch_size, 1))


class Picks(NamedTuple):
    images: np.ndarray  # (b,) int64 image rows of this rank's share of the batch, sorted (sequential reads)
    caption_draws: np.ndarray  # (b,) float64 in [0, 1): which of each image's captions it is paired with


@lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, n_items: int) -> np.ndarray:
    """Cached: at 10⁷ images a permutation takes ~0.2 s, far too slow to redraw at every step."""
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    order.setflags(write=False)
    return order


@lru_cache(maxsize=2)
def epoch_caption_draws(seed: int, epoch: int, n_items: int) -> np.ndarray:
    draws = np.random.default_rng([seed, epoch, 1]).random(n_items)
    draws.setflags(write=False)
    return draws


def batch_indices(step: int, n_items: int, batch_size: int, seed: int) -> np.ndarray:
    """Image rows of global batch ``step`` in :class:`RandomOrder`, sorted (sequential reads)."""
    return RandomOrder(n_items, batch_size, seed).global_batch(step)


def caption_rows(picks: Picks, offsets: np.ndarray) -> np.ndarray:
    """Rows of ``text_ids`` paired with ``picks.images``; ``offsets`` is the split's ``caption_offsets``."""
    counts = offsets[picks.images + 1] - offsets[picks.images]
    return offsets[picks.images] + np.floor(picks.caption_draws * counts).astype(np.int64)


class RandomOrder:
    """Epochs of seeded permutations of all ``n_items``; the global batch does not depend on the world size."""

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n_items, self.batch_size, self.seed, self.rank, self.world = n_items, batch_size, seed, rank, world

    def global_batch(self, step: int) -> np.ndarray:
        """Image rows of global batch ``step``, sorted; a partial last batch of an epoch is dropped."""
        epoch, position = epoch_of(step, self.n_items, self.batch_size)
        perm = epoch_permutation(self.seed, epoch, self.n_items)
        return np.sort(perm[position * self.batch_size : (position + 1) * self.batch_size])

    def batch(self, step: int) -> Picks:
        images = self.global_batch(step)
        epoch, _ = epoch_of(step, self.n_items, self.batch_size)
        draws = epoch_caption_draws(self.seed, epoch, self.n_items)[images]  # the whole epoch's draw, indexed
        return Picks(images[self.rank :: self.world], draws[self.rank :: self.world])

    def pair_draws(self, step: int, stream: int) -> np.ndarray:
        """Uniforms for this rank's pairs at ``step`` from the independent stream ``stream`` (e.g. caption
        dropout), drawn for the global batch and sliced like it."""
        size = min(self.batch_size, self.n_items)
        return np.random.default_rng([self.seed, step, stream]).random(size)[self.rank :: self.world]


class StreamOrder:
    """Rank-disjoint shards read front to back through a shuffle window.

    Each rank's samples form one endless stream: epoch after epoch, the rows of the shards it is dealt, cut into
    blocks of ``shuffle_block`` consecutive samples, each block permuted. Batch ``step`` is positions
    ``[step·b, (step+1)·b)`` of this rank's stream, ``b = batch_size / world``. Epochs are per rank (a rank dealt
    less data starts its next epoch sooner; the next deal evens it out), so no rank waits for another.
    """

    def __init__(
        self,
        shard_lengths: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle_block: int = 65536,
    ):
        lengths = np.asarray(shard_lengths, dtype=np.int64)
        self.shards = np.flatnonzero(lengths)  # an empty shard has nothing to deal
        if len(self.shards) < world:
            raise ValueError(
                f"loader.order: stream deals each of the {world} data-parallel ranks its own shards, but the split "
                f"has {len(self.shards)} non-empty shards; use a smaller data.shard_size or loader.order: random"
            )
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world} data-parallel ranks")
        self.lengths, self.starts = lengths, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.local_batch, self.seed, self.rank, self.world = batch_size // world, seed, rank, world
        self.shuffle_block = shuffle_block
        self._epoch_starts = [0]  # position in this rank's stream where each epoch begins (grown on demand)
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def rank_shards(self, epoch: int, rank: int | None = None) -> np.ndarray:
        """The shards ``rank`` (default: this one) reads in ``epoch``, in reading order."""
        dealt = np.random.default_rng([self.seed, epoch, 3]).permutation(self.shards)
        return dealt[self.rank if rank is None else rank :: self.world]

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset within it) of ``position`` in this rank's stream."""
        while self._epoch_starts[-1] <= position:
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + int(self.lengths[self.rank_shards(epoch)].sum()))
        epoch = int(np.searchsorted(self._epoch_starts, position, side="right")) - 1
        return epoch, position - self._epoch_starts[epoch]

    def _block(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Image rows and caption draws of one shuffle block, in stream order."""
        key = (epoch, block)
        if key not in self._blocks:
            shards = self.rank_shards(epoch)
            ends = np.cumsum(self.lengths[shards])
            first, last = block * self.shuffle_block, min((block + 1) * self.shuffle_block, int(ends[-1]))
            positions = np.arange(first, last)
            which = np.searchsorted(ends, positions, side="right")  # index into ``shards``
            rows = self.starts[shards[which]] + positions - (ends[which] - self.lengths[shards[which]])
            rng = np.random.default_rng([self.seed, epoch, 4, self.rank, block])
            self._blocks = {key: (rows[rng.permutation(len(rows))], rng.random(len(rows)))}  # keep one block
        return self._blocks[key]

    def batch(self, step: int) -> Picks:
        images, draws, position, stop = [], [], step * self.local_batch, (step + 1) * self.local_batch
        while position < stop:
            epoch, offset = self._locate(position)
            block, within = divmod(offset, self.shuffle_block)
            rows, block_draws = self._block(epoch, block)
            take = min(stop - position, len(rows) - within)
            images.append(rows[within : within + take])
            draws.append(block_draws[within : within + take])
            position += take
        images, draws = np.concatenate(images), np.concatenate(draws)
        order = np.argsort(images, kind="stable")
        return Picks(images[order], draws[order])

    def pair_draws(self, step: int, stream: int) -> np.ndarray:
        size = self.local_batch * self.world
        return np.random.default_rng([self.seed, step, stream]).random(size)[self.rank :: self.world]


def make_order(
    loader: LoaderConfig, shard_lengths: Sequence[int], batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> RandomOrder | StreamOrder:
    """The order ``loader.order`` names over a split of shards holding ``shard_lengths`` images, in row order."""
    if loader.order == "stream":
        return StreamOrder(shard_lengths, batch_size, seed, rank, world, loader.shuffle_block)
    return RandomOrder(int(np.sum(shard_lengths)), batch_size, seed, rank, world)


def first_rows(shard_lengths: Sequence[int], n: int) -> list[int]:
    """Shard lengths of the first ``n`` rows of a split (e.g. ``dvae.train_images``)."""
    ends = np.minimum(np.cumsum(shard_lengths), n)
    return [int(length) for length in np.diff(ends, prepend=0) if length > 0]


def loader_resume_config(loader: LoaderConfig, world_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on for the batches to continue as they were, beyond seed and data: nothing
    for ``random``; for ``stream``, its window and the world size (ranks are dealt shards)."""
    if loader.order == "random":
        return {}
    return {"loader.order": loader.order, "loader.shuffle_block": loader.shuffle_block, "world_size": world_size}
