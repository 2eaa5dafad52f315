"""The prior's training loop: caption draws, a toy mapping learnt to ~zero loss, exact resume, refusals, non-finite
loss, compiled flex attention trains like dense, and data-parallel gradients equal to one process on the batch."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dalle import prior_train
from dalle.checkpoint import CheckpointMismatch, load_checkpoint, save_weights
from dalle.config import LoaderConfig, PriorConfig
from dalle.data.order import RandomOrder, StreamOrder
from dalle.data.tokens import FORMAT, INDEX_FILE, TokenSplit, load_tokens
from dalle.prior import Prior, PriorGeometry, load_prior, text_targets
from dalle.prior_train import Callbacks, train_prior, training_batch, training_losses

GEOMETRY = PriorGeometry(text_vocab=12, text_len=5, image_vocab=8, grid=3)
STEP = 5  # the batch the data-parallel gradient test compares


def colour_tokens(n_images: int, seed: int = 0) -> TokenSplit:
    """A toy mapping: every image is one code repeated, named by the first word of each of its 1-3 captions
    (word ids 1..8 → code - 1); the rest of a caption is filler of random length."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, GEOMETRY.image_vocab, n_images)
    image_tokens = np.repeat(codes, GEOMETRY.grid**2).reshape(n_images, GEOMETRY.grid, GEOMETRY.grid)
    counts = rng.integers(1, 4, n_images)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    lengths = rng.integers(1, GEOMETRY.text_len + 1, offsets[-1]).astype(np.int32)
    text_ids = np.zeros((offsets[-1], GEOMETRY.text_len), dtype=np.int32)
    for image in range(n_images):
        for row in range(offsets[image], offsets[image + 1]):
            text_ids[row, : lengths[row]] = rng.integers(9, GEOMETRY.text_vocab, lengths[row])
            text_ids[row, 0] = codes[image] + 1
    return TokenSplit(image_tokens.astype(np.uint16), text_ids, lengths, offsets)


def write_token_shards(root: Path, split: str, tokens: TokenSplit, lengths: list[int]) -> None:
    """``tokens`` as the encode stage publishes them: one directory of arrays per shard of ``lengths`` images."""
    shards, start = [], 0
    for number, length in enumerate(lengths):
        name, stop = f"shard-{number:05d}", start + length
        first, last = tokens.caption_offsets[start], tokens.caption_offsets[stop]
        arrays = {
            "image_tokens": tokens.image_tokens[start:stop],
            "text_ids": tokens.text_ids[first:last],
            "text_lengths": tokens.text_lengths[first:last],
            "caption_offsets": tokens.caption_offsets[start : stop + 1] - first,
        }
        (root / split / name).mkdir(parents=True)
        for array_name, array in arrays.items():
            np.save(root / split / name / f"{array_name}.npy", array)
        shards.append({"name": name, "images": length, "captions": int(last - first), "truncated": 0})
        start = stop
    index = {"format": FORMAT, "grid": GEOMETRY.grid, "text_len": GEOMETRY.text_len, "image_dtype": "uint16"}
    index.update(images=start, captions=int(tokens.caption_offsets[start]), truncated=0, shards=shards)
    (root / split / INDEX_FILE).write_text(json.dumps(index))


def tiny_cfg(**overrides) -> PriorConfig:
    values = dict(
        n_layers=2,
        n_heads=2,
        d_model=32,
        schedule="paper",  # the sparse masks, as the tests were written for
        dropout=0.0,  # equality across processes, micro-batches and resumes needs the same dropout masks
        conv_kernel=3,
        lr=3e-3,
        warmup_steps=5,
        batch_size=16,
        steps=12,
        val_images=40,
        log_every=4,
        val_every=6,
        sample_every=6,
        samples=2,
        checkpoint_every=2,
    )
    return PriorConfig(**{**values, **overrides})


def ddp_setup() -> tuple[Prior, TokenSplit, int]:
    """The model and data of the data-parallel gradient test (shared with tests/ddp_gradients.py)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(schedule="paper", n_layers=3)
    return Prior(cfg, GEOMETRY), colour_tokens(64, seed=5), 8


def test_null_text_drops_captions_at_the_given_rate_reproducibly():
    tokens, cpu = colour_tokens(2000), torch.device("cpu")
    order = RandomOrder(len(tokens), 1000, seed=0)
    batch = training_batch(tokens, order, 2, device=cpu, null_text_prob=0.25)
    plain = training_batch(tokens, order, 2, device=cpu)
    dropped = batch.text_lengths == 0
    assert 0.21 < dropped.float().mean().item() < 0.29 and (plain.text_lengths > 0).all()
    torch.testing.assert_close(batch.text_lengths[~dropped], plain.text_lengths[~dropped])
    torch.testing.assert_close(batch.image_tokens, plain.image_tokens)
    again = training_batch(tokens, order, 2, device=cpu, null_text_prob=0.25)
    torch.testing.assert_close(again.text_lengths, batch.text_lengths)


def test_learns_a_toy_mapping_to_near_zero_image_loss():
    tokens = colour_tokens(256)
    cfg = tiny_cfg(steps=150, batch_size=32, lr=1e-2, warmup_steps=10, log_every=5, val_every=150, sample_every=150)
    result = train_prior(cfg, 0, GEOMETRY, tokens, colour_tokens(40, seed=1), device=torch.device("cpu"))
    first = result.history[0]
    assert first["image_nll"] > 1.0
    assert result.final["val_image_nll"] < 0.05, result.final  # the caption's first word fixes all nine codes


def test_initial_loss_is_uniform_over_each_vocabulary():
    cfg = tiny_cfg(steps=1, lr=1e-9, lr_min=0.0, warmup_steps=0, log_every=1, val_every=1, sample_every=1)
    result = train_prior(cfg, 0, GEOMETRY, colour_tokens(64), colour_tokens(40, seed=1), device=torch.device("cpu"))
    assert result.final["val_image_nll"] == pytest.approx(math.log(GEOMETRY.image_vocab), rel=0.02)
    assert result.final["val_text_nll"] == pytest.approx(math.log(GEOMETRY.text_vocab), rel=0.02)


class Recorder(Callbacks):
    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.rows, self.samples = stop_at, [], []

    def on_train_log(self, step, metrics):
        self.rows.append((step, metrics))
        if step == self.stop_at:
            raise KeyboardInterrupt

    def on_samples(self, step, image_tokens):
        self.samples.append((step, image_tokens))


STREAM = LoaderConfig(order="stream", shuffle_block=10)


@pytest.mark.parametrize("loader", [LoaderConfig(), STREAM], ids=["random", "stream"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, loader):
    train, val = dataclasses.replace(colour_tokens(64), shard_lengths=(20, 20, 24)), colour_tokens(40, seed=1)
    sample_text = (torch.tensor(val.text_ids[:2], dtype=torch.long), torch.tensor(val.text_lengths[:2]).long())
    whole = Recorder()
    reference = train_prior(
        tiny_cfg(), 0, GEOMETRY, train, val, tmp_path / "a.pt", "d", whole, sample_text, loader=loader
    )
    with pytest.raises(KeyboardInterrupt):
        train_prior(tiny_cfg(), 0, GEOMETRY, train, val, tmp_path / "b.pt", "d", Recorder(stop_at=8), loader=loader)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 6  # killed at the step-8 log, before its checkpoint
    resumed = train_prior(
        tiny_cfg(), 0, GEOMETRY, train, val, tmp_path / "b.pt", "d", Recorder(), sample_text, loader=loader
    )
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert [r["step"] for r in resumed.history] == [4, 8, 12]
    assert resumed.val_history == reference.val_history
    assert [step for step, _ in whole.samples] == [6, 12] and whole.samples[0][1].shape == (2, 3, 3)


def test_a_stream_checkpoint_resumes_only_in_the_same_order(tmp_path):
    train, val = dataclasses.replace(colour_tokens(64), shard_lengths=(20, 20, 24)), colour_tokens(40, seed=1)
    with pytest.raises(KeyboardInterrupt):
        train_prior(tiny_cfg(), 0, GEOMETRY, train, val, tmp_path / "s.pt", "d", Recorder(stop_at=4), loader=STREAM)
    with pytest.raises(CheckpointMismatch, match=r"loader\.order.*prior\.resume: false"):
        train_prior(tiny_cfg(), 0, GEOMETRY, train, val, tmp_path / "s.pt", "d")


def test_refuses_a_checkpoint_made_with_other_weights_shaping_params(tmp_path):
    train, val = colour_tokens(64), colour_tokens(40, seed=1)
    with pytest.raises(KeyboardInterrupt):
        train_prior(tiny_cfg(), 0, GEOMETRY, train, val, tmp_path / "c.pt", "d", Recorder(stop_at=4))
    with pytest.raises(CheckpointMismatch, match=r"prior.lr: 0.003 -> 0.001.*prior.resume: false"):
        train_prior(tiny_cfg(lr=1e-3), 0, GEOMETRY, train, val, tmp_path / "c.pt", "d")
    # Cadence keys may change: the run resumes and finishes.
    result = train_prior(tiny_cfg(log_every=3), 0, GEOMETRY, train, val, tmp_path / "c.pt", "d")
    assert result.history[-1]["step"] == 12


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original = prior_train.training_losses
    calls = []

    def poisoned(model, prior, batch, *args):
        losses, count = original(model, prior, batch, *args)
        calls.append(1)
        if len(calls) == 6:  # the sixth step, after the step-4 checkpoint
            losses = losses._replace(loss=losses.loss * float("nan"))
        return losses, count

    monkeypatch.setattr(prior_train, "training_losses", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite prior loss at step 5 .*kept at .*d.pt"):
        train_prior(tiny_cfg(), 0, GEOMETRY, colour_tokens(64), colour_tokens(40, seed=1), tmp_path / "d.pt", "x")
    assert load_checkpoint(tmp_path / "d.pt")["step"] == 4


def test_weights_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    prior = Prior(tiny_cfg(schedule=("row", "conv")), GEOMETRY).eval()
    save_weights(prior, tmp_path, {**dataclasses.asdict(prior.cfg), "geometry": dataclasses.asdict(GEOMETRY)})
    loaded = load_prior(tmp_path)
    assert loaded.kinds == ["row", "conv"] and loaded.geometry == GEOMETRY
    batch = prior_train.to_batch(colour_tokens(4), np.arange(4), np.arange(4), torch.device("cpu"))
    torch.testing.assert_close(loaded(*batch)[1], prior(*batch)[1], rtol=0, atol=0)


def test_flex_refuses_to_train_on_cpu_and_evaluates_like_dense():
    train, val = colour_tokens(64), colour_tokens(40, seed=1)
    cfg = tiny_cfg(steps=3, log_every=1, val_every=3, sample_every=3, schedule=("row", "column"), attn_impl="flex")
    with pytest.raises(ValueError, match="prior.attn_impl: flex cannot train on CPU"):
        train_prior(cfg, 0, GEOMETRY, train, val, device=torch.device("cpu"))
    cpu = torch.device("cpu")
    dense = train_prior(dataclasses.replace(cfg, attn_impl="dense"), 0, GEOMETRY, train, val, device=cpu)
    flex = load_prior_like(dense.model, attn_impl="flex")
    flex.use_compiled_flex()
    expected = prior_train.evaluate_prior(dense.model, val, 40, torch.device("cpu"))
    assert prior_train.evaluate_prior(flex, val, 40, torch.device("cpu")) == pytest.approx(expected, rel=1e-5)


def load_prior_like(prior: Prior, **overrides) -> Prior:
    copy = Prior(dataclasses.replace(prior.cfg, **overrides), prior.geometry)
    copy.load_state_dict(prior.state_dict())
    return copy.eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention has a backward on CUDA only")
def test_flex_trains_like_dense_on_cuda():
    train, val = colour_tokens(64), colour_tokens(40, seed=1)
    cfg = tiny_cfg(steps=3, log_every=1, val_every=3, sample_every=3, schedule=("row", "column"))
    cuda = torch.device("cuda")
    dense = train_prior(cfg, 0, GEOMETRY, train, val, device=cuda)
    flex = train_prior(dataclasses.replace(cfg, attn_impl="flex"), 0, GEOMETRY, train, val, device=cuda)
    for a, b in zip(dense.history, flex.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)  # bf16 autocast on CUDA


def test_data_parallel_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    prior, tokens, batch_size = ddp_setup()
    batch = training_batch(tokens, RandomOrder(len(tokens), batch_size, seed=0), STEP, device=torch.device("cpu"))
    # The shards have different numbers of text targets: a plain per-rank mean would weight them wrongly.
    halves = [text_targets(batch.text_lengths[rank::2]).item() for rank in range(2)]
    assert halves[0] != halves[1], halves
    losses, _ = training_losses(prior, prior, batch)
    losses.loss.backward()

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    script = str(Path(__file__).with_name("ddp_gradients.py"))
    result = subprocess.run([*command, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        grads = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for name, param in prior.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}")


def test_streaming_ranks_read_disjoint_shards_while_training(tmp_path):
    """Two gloo processes train with ``loader.order: stream`` on token shards memory-mapped from disk (no
    in-memory cache); each records the shards it opened."""
    write_token_shards(tmp_path / "tokens", "train", colour_tokens(60), [10] * 6)
    write_token_shards(tmp_path / "tokens", "val", colour_tokens(40, seed=1), [40])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    script = str(Path(__file__).with_name("stream_ranks.py"))
    result = subprocess.run([*command, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    read = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank in range(2):
        dealt = StreamOrder([10] * 6, 8, seed=0, rank=rank, world=2).rank_shards(0).tolist()  # 30 images each
        # 4 steps x 4 pairs stay in epoch 0: a rank opens only shards dealt to it, image and caption arrays alike.
        assert read[rank]["image_tokens"] and set(read[rank]["image_tokens"]) <= set(dealt)
        assert read[rank]["text_ids"] == read[rank]["image_tokens"]
    assert not set(read[0]["image_tokens"]) & set(read[1]["image_tokens"])
    # The order depends on the world size, so a single process refuses the two-process checkpoint.
    train, val = load_tokens(tmp_path / "tokens", "train"), load_tokens(tmp_path / "tokens", "val")
    cfg = tiny_cfg(steps=6, batch_size=8)
    with pytest.raises(CheckpointMismatch, match="world_size: 2 -> 1"):
        train_prior(cfg, 0, GEOMETRY, train, val, tmp_path / "last.pt", "d", loader=STREAM)
