"""The training sample order: random epochs whose global batch ignores the world size, and the streaming order in
which ranks read disjoint shards through a bounded shuffle window; both pure functions of (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest

from dalle.config import LoaderConfig
from dalle.data.order import RandomOrder, StreamOrder, caption_rows, first_rows, make_order

LENGTHS = [7, 0, 5, 9, 3, 6, 8, 4]  # images per shard; shard 1 is empty
STARTS = np.concatenate([[0], np.cumsum(LENGTHS)])


def shard_of(rows: np.ndarray) -> np.ndarray:
    return np.searchsorted(STARTS, rows, side="right") - 1


def epoch_rows(order: StreamOrder, epoch: int) -> np.ndarray:
    """This rank's rows of ``epoch`` in stream order (local batch 1: step = position in the stream)."""
    assert order.local_batch == 1
    begin = sum(int(np.take(LENGTHS, order.rank_shards(e)).sum()) for e in range(epoch))
    size = int(np.take(LENGTHS, order.rank_shards(epoch)).sum())
    return np.concatenate([order.batch(step).images for step in range(begin, begin + size)])


def test_random_caption_draws_pick_one_of_each_images_captions_per_epoch():
    offsets = np.concatenate([[0], np.cumsum(np.random.default_rng(0).integers(1, 4, 50))])
    order = RandomOrder(50, 10, seed=0)
    epoch = [order.batch(step) for step in range(5)]  # 5 batches of 10: one epoch
    images = np.concatenate([p.images for p in epoch])
    rows = np.concatenate([caption_rows(p, offsets) for p in epoch])
    assert sorted(images) == list(range(50))
    assert ((rows >= offsets[images]) & (rows < offsets[images + 1])).all()
    later = {}
    for step in range(150):  # 30 epochs
        picks = order.batch(step)
        for image, row in zip(picks.images, caption_rows(picks, offsets)):
            later.setdefault(int(image), set()).add(int(row))
    several = np.flatnonzero(np.diff(offsets) > 1)
    assert all(len(later[int(image)]) > 1 for image in several)  # other captions in other epochs


def test_random_ranks_take_every_world_th_pair_of_one_global_batch():
    whole = RandomOrder(40, 8, seed=3).batch(6)
    shares = [RandomOrder(40, 8, seed=3, rank=rank, world=2).batch(6) for rank in range(2)]
    for rank, share in enumerate(shares):
        np.testing.assert_array_equal(share.images, whole.images[rank::2])
        np.testing.assert_array_equal(share.caption_draws, whole.caption_draws[rank::2])


def test_stream_ranks_read_disjoint_shards_that_cover_the_split_each_epoch():
    orders = [StreamOrder(LENGTHS, 3, seed=1, rank=rank, world=3) for rank in range(3)]
    dealt = []
    for epoch in range(3):
        rows = [epoch_rows(order, epoch) for order in orders]
        for order, rank_rows in zip(orders, rows):
            assert len(np.unique(rank_rows)) == len(rank_rows)  # each row once per epoch
            assert set(shard_of(rank_rows)) == set(order.rank_shards(epoch).tolist())
        assert sorted(np.concatenate(rows)) == list(range(STARTS[-1]))  # every row, empty shard 1 never dealt
        shards = [set(order.rank_shards(epoch).tolist()) for order in orders]
        assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
        dealt.append(shards[0])
    assert dealt[0] != dealt[1] or dealt[1] != dealt[2]  # the deal changes with the epoch


def test_stream_shuffles_within_a_bounded_window_of_its_shards():
    order = StreamOrder(LENGTHS, 1, seed=2, shuffle_block=6)
    rows = epoch_rows(order, 0)
    sequence = np.concatenate([np.arange(STARTS[s], STARTS[s + 1]) for s in order.rank_shards(0)])
    for start in range(0, len(rows), 6):  # window k holds exactly stream positions 6k..6k+5, permuted
        assert sorted(rows[start : start + 6]) == sorted(sequence[start : start + 6])
    assert not np.array_equal(rows, sequence)
    whole_epoch = StreamOrder(LENGTHS, 1, seed=2, shuffle_block=10**6)
    assert sorted(epoch_rows(whole_epoch, 0)) == sorted(sequence)


def test_stream_batches_are_a_pure_function_of_the_step():
    walked = StreamOrder(LENGTHS, 8, seed=4, rank=1, world=2, shuffle_block=5)
    history = [walked.batch(step) for step in range(40)]  # several epochs and windows per rank
    fresh = StreamOrder(LENGTHS, 8, seed=4, rank=1, world=2, shuffle_block=5)
    for step in (37, 3, 22, 0):  # any order, as a resumed run asks
        picks = fresh.batch(step)
        np.testing.assert_array_equal(picks.images, history[step].images)
        np.testing.assert_array_equal(picks.caption_draws, history[step].caption_draws)
        assert len(picks.images) == 4 and (np.diff(picks.images) >= 0).all()  # local share, sorted reads
        assert ((picks.caption_draws >= 0) & (picks.caption_draws < 1)).all()
    other_seed = StreamOrder(LENGTHS, 8, seed=5, rank=1, world=2, shuffle_block=5)
    assert any(not np.array_equal(other_seed.batch(s).images, history[s].images) for s in range(5))


def test_stream_pair_draws_slice_one_global_draw():
    shares = [StreamOrder(LENGTHS, 6, seed=0, rank=rank, world=2).pair_draws(3, stream=2) for rank in range(2)]
    whole = StreamOrder(LENGTHS, 6, seed=0).pair_draws(3, stream=2)
    np.testing.assert_array_equal(np.concatenate([shares[0], shares[1]]), np.concatenate([whole[0::2], whole[1::2]]))


def test_stream_refuses_fewer_shards_than_ranks():
    with pytest.raises(ValueError, match=r"stream deals each of the 4 .* 3 non-empty shards.*data\.shard_size"):
        StreamOrder([5, 0, 4, 2], 8, seed=0, world=4)
    with pytest.raises(ValueError, match="batch size 9 is not divisible by the 2"):
        StreamOrder(LENGTHS, 9, seed=0, world=2)


def test_make_order_follows_the_loader_config():
    assert isinstance(make_order(LoaderConfig(), LENGTHS, 4, 0), RandomOrder)
    stream = make_order(LoaderConfig(order="stream", shuffle_block=7), LENGTHS, 4, 0, rank=1, world=2)
    assert isinstance(stream, StreamOrder) and stream.shuffle_block == 7 and stream.local_batch == 2


def test_first_rows_cuts_the_shards_at_a_prefix():
    assert first_rows([4, 4, 3], 6) == [4, 2]
    assert first_rows([4, 0, 3], 11) == [4, 3]
    assert first_rows([4, 4], 4) == [4]
