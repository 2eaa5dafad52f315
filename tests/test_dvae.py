"""The discrete VAE: pixel mapping, logit-Laplace likelihood, schedules, shapes, training, exact resume."""

from __future__ import annotations

import argparse
import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
from scipy import integrate

from dalle.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint, save_weights
from dalle.config import DataConfig, DvaeConfig, LoaderConfig
from dalle.data.order import batch_indices
from dalle.data.shapes import iter_shapes
from dalle.dvae import DiscreteVAE, load_dvae
from dalle.dvae_train import Callbacks, evaluate, train_dvae
from dalle.pixels import LOGIT_LAPLACE_EPS, logit_laplace_nll, map_pixels, unmap_pixels
from dalle.schedules import cosine, warmup_cosine

TINY = DvaeConfig(
    recon_loss="logit_laplace",
    kl_weight=6.6,
    downsample=4,
    codebook_size=16,
    hidden=8,
    codebook_dim=16,
    batch_size=8,
    steps=12,
    tau_steps=8,
    kl_warmup_steps=4,
    warmup_steps=2,
    val_images=8,
    log_every=2,
    val_every=4,
    image_every=6,
    checkpoint_every=4,
)


@pytest.fixture(scope="module")
def shapes16() -> tuple[np.ndarray, np.ndarray]:
    data = DataConfig(image_size=16)
    train = np.stack([image for image, _ in iter_shapes(data, 0, "train", 48)])
    val = np.stack([image for image, _ in iter_shapes(data, 0, "val", 8)])
    return train, val


def test_map_unmap_round_trip_and_range():
    x = torch.rand(1000, dtype=torch.float64)
    mapped = map_pixels(x)
    assert mapped.min() >= LOGIT_LAPLACE_EPS and mapped.max() <= 1 - LOGIT_LAPLACE_EPS
    assert torch.allclose(unmap_pixels(mapped), x, atol=1e-12)
    assert map_pixels(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.1, 0.9])


def test_logit_laplace_nll_matches_direct_formula_and_normalises():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(500, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    mu, log_b = (
        torch.randn(500, generator=gen, dtype=torch.float64),
        torch.randn(500, generator=gen, dtype=torch.float64) * 0.5,
    )
    b = log_b.exp()
    density = torch.exp(-torch.abs(torch.log(x / (1 - x)) - mu) / b) / (2 * b * x * (1 - x))
    assert torch.allclose(logit_laplace_nll(x, mu, log_b), -torch.log(density), rtol=1e-10)

    def pdf(value: float, m: float = 0.3, lb: float = -0.4) -> float:
        return math.exp(
            -logit_laplace_nll(torch.tensor(value, dtype=torch.float64), torch.tensor(m), torch.tensor(lb)).item()
        )

    total, _ = integrate.quad(pdf, 0, 1, points=[1 / (1 + math.exp(-0.3))], limit=200)
    assert total == pytest.approx(1.0, abs=1e-6)


def test_bits_per_dim_scales():
    from scipy import stats

    from dalle.pixels import bits_per_dim, unit_interval_nll

    # MSE runs report the Gaussian decoder with sigma^2 = MSE: its differential entropy.
    assert unit_interval_nll("mse", float("nan"), 0.01) == pytest.approx(stats.norm(scale=0.1).entropy())
    # logit-Laplace: density on mapped pixels -> density on [0, 1] via the Jacobian 1 - 2 eps.
    assert unit_interval_nll("logit_laplace", -1.0, 0.5) == pytest.approx(-1.0 - math.log(0.8))
    # A uniform density on [0, 1] with no KL costs exactly 8 bits per subpixel.
    assert bits_per_dim(0.0, 0.0) == 8.0
    assert bits_per_dim(math.log(2), 0.0) == pytest.approx(9.0)


def test_schedules_hit_their_end_points():
    assert cosine(0, 100, 1.0, 1 / 16) == 1.0
    assert cosine(100, 100, 1.0, 1 / 16) == 1 / 16 and cosine(10**6, 100, 1.0, 1 / 16) == 1 / 16
    assert cosine(50, 100, 0.0, 6.6) == pytest.approx(3.3)
    values = [cosine(s, 100, 1.0, 0.0) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert warmup_cosine(0, 100, 1e-3, 1e-5, 10) == pytest.approx(1e-4)
    assert warmup_cosine(10, 100, 1e-3, 1e-5, 10) == pytest.approx(1e-3)
    assert warmup_cosine(100, 100, 1e-3, 1e-5, 10) == pytest.approx(1e-5)


def test_encode_decode_shapes_and_input_checks():
    model = DiscreteVAE(TINY)
    images = torch.rand(3, 3, 16, 16)
    tokens = model.encode(images)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == torch.int64
    assert int(tokens.max()) < 16
    assert model.decode(tokens).shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        model.encode(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="not divisible by downsample 4"):
        model.encode(torch.rand(1, 3, 18, 18))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\)"):
        model.decode(torch.full((1, 4, 4), 16))


def test_mse_decoder_has_three_channels_and_logit_laplace_six():
    assert DiscreteVAE(TINY).decoder.blocks.output.conv.out_channels == 6
    assert DiscreteVAE(dataclasses.replace(TINY, recon_loss="mse")).decoder.blocks.output.conv.out_channels == 3


def test_kl_to_uniform_prior_is_zero_for_flat_logits():
    model = DiscreteVAE(TINY)
    with torch.no_grad():
        model.encoder.blocks.output.conv.weight.zero_()
        model.encoder.blocks.output.conv.bias.zero_()
    _, parts = model(torch.rand(2, 3, 16, 16), tau=1.0, kl_weight=1.0)
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_batches_are_a_function_of_the_step():
    first = [batch_indices(s, 50, 8, seed=1) for s in range(6)]  # one epoch of 6 batches
    assert len(np.unique(np.concatenate(first))) == 48
    assert np.array_equal(batch_indices(3, 50, 8, 1), first[3])
    assert not np.array_equal(batch_indices(6, 50, 8, 1), first[0])  # next epoch, new permutation


@pytest.mark.parametrize("recon_loss", ["logit_laplace", "mse"])
def test_tiny_training_reduces_the_loss(shapes16, recon_loss):
    train, val = shapes16
    kl_weight = 6.6 if recon_loss == "logit_laplace" else 0.02
    cfg = dataclasses.replace(TINY, recon_loss=recon_loss, kl_weight=kl_weight, steps=60, log_every=10,
                              val_every=60, image_every=60, tau_steps=40, kl_warmup_steps=20, lr=3e-3)  # fmt: skip
    result = train_dvae(cfg, 0, train, val)
    losses = [row["loss"] for row in result.history]
    if recon_loss == "logit_laplace":
        assert losses[-1] < losses[0] - 0.5, losses  # nats per subpixel
    else:
        assert losses[-1] < 0.6 * losses[0], losses  # squared error
    assert result.history[-1]["tau"] == pytest.approx(cfg.tau_end)
    assert result.history[-1]["beta"] == pytest.approx(cfg.kl_weight)
    assert {"val_psnr", "val_mse", "val_bits_per_dim", "val_used_fraction"} <= set(result.final)


class KillAt(Callbacks):
    def __init__(self, step: int):
        self.step = step

    def on_train_log(self, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt(f"killed at {step}")


def test_kill_and_resume_gives_the_same_weights(shapes16, tmp_path):
    train, val = shapes16
    straight = train_dvae(TINY, 0, train, val, tmp_path / "a.pt")
    with pytest.raises(KeyboardInterrupt):
        train_dvae(TINY, 0, train, val, tmp_path / "b.pt", callbacks=KillAt(6))
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 4  # the last checkpoint before the kill
    resumed = train_dvae(TINY, 0, train, val, tmp_path / "b.pt")
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.history == resumed.history
    assert straight.val_history == resumed.val_history


def test_resume_refuses_a_different_config_and_names_the_keys(shapes16, tmp_path):
    train, val = shapes16
    with pytest.raises(KeyboardInterrupt):
        train_dvae(TINY, 0, train, val, tmp_path / "c.pt", callbacks=KillAt(6))
    changed = dataclasses.replace(TINY, lr=5e-3, codebook_size=32)
    with pytest.raises(CheckpointMismatch, match=r"dvae.codebook_size: 16 -> 32; dvae.lr: 0.003 -> 0.005"):
        train_dvae(changed, 0, train, val, tmp_path / "c.pt")
    with pytest.raises(CheckpointMismatch, match="seed: 0 -> 1"):
        train_dvae(TINY, 1, train, val, tmp_path / "c.pt")
    # Logging cadence may change; resume: false starts from scratch.
    train_dvae(dataclasses.replace(TINY, log_every=3), 0, train, val, tmp_path / "c.pt")
    fresh = train_dvae(dataclasses.replace(changed, resume=False), 0, train, val, tmp_path / "c.pt")
    assert fresh.history[0]["step"] == TINY.log_every


class RecordedRows:
    """Training images that remember which rows the trainer asked for."""

    def __init__(self, images: np.ndarray):
        self.images, self.rows = images, set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows):
        self.rows.update(np.atleast_1d(np.arange(len(self.images))[rows]).tolist())
        return self.images[rows]


def test_train_images_trains_on_the_first_n_only(shapes16):
    train, val = shapes16
    recorded = RecordedRows(train)
    train_dvae(dataclasses.replace(TINY, train_images=16, steps=8), 0, recorded, val)
    assert recorded.rows == set(range(16))  # 8 steps of 8 = four epochs of the first 16 images
    recorded = RecordedRows(train)
    train_dvae(dataclasses.replace(TINY, steps=6), 0, recorded, val)
    assert max(recorded.rows) >= 16 and len(recorded.rows) == 48  # null: all 48
    with pytest.raises(ValueError, match="dvae.train_images is 49 but there are only 48 training images"):
        train_dvae(dataclasses.replace(TINY, train_images=49), 0, train, val)


def test_stream_order_reads_one_shuffle_window_of_one_shard_at_a_time(shapes16):
    train, val = shapes16
    stream = LoaderConfig(order="stream", shuffle_block=8)
    recorded = RecordedRows(train)
    recorded.shard_lengths = (10, 10, 28)  # as prepared ImageShards report them
    train_dvae(dataclasses.replace(TINY, steps=1), 0, recorded, val, loader=stream)
    rows = sorted(recorded.rows)
    assert len(rows) == 8 and rows[-1] - rows[0] == 7  # the first 8 rows of the first shard dealt
    assert rows[0] in (0, 10, 20)
    recorded = RecordedRows(train)
    recorded.shard_lengths = (10, 10, 28)
    train_dvae(dataclasses.replace(TINY, train_images=16, steps=2), 0, recorded, val, loader=stream)
    assert recorded.rows == set(range(16))  # the prefix only: shards cut to (10, 6)


def test_checkpoints_load_weights_only(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", {"step": 3, "weights": torch.ones(2), "history": [{"loss": 1.0}]})
    assert load_checkpoint(tmp_path / "ok.pt")["step"] == 3
    assert not (tmp_path / "ok.pt.tmp").exists()
    torch.save({"step": 3, "evil": argparse.Namespace(command="rm -rf /")}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(tmp_path / "evil.pt")


def test_non_finite_loss_stops_with_step_and_parts_and_keeps_checkpoint(shapes16, tmp_path, monkeypatch):
    train, val = shapes16
    original = DiscreteVAE.forward
    calls = {"n": 0}

    def poisoned(self, images, tau, kl_weight):
        loss, parts = original(self, images, tau, kl_weight)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 5 else loss), parts

    monkeypatch.setattr(DiscreteVAE, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite dVAE loss at step 5: loss=nan, recon=.*, kl="):
        train_dvae(TINY, 0, train, val, tmp_path / "d.pt")
    assert load_checkpoint(tmp_path / "d.pt")["step"] == 4


def test_safetensors_export_round_trip(shapes16, tmp_path):
    train, val = shapes16
    model = DiscreteVAE(TINY)
    save_weights(model, tmp_path / "dvae", dataclasses.asdict(TINY))
    loaded = load_dvae(tmp_path / "dvae")
    images = torch.from_numpy(val).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert evaluate(loaded, val, torch.device("cpu")) == evaluate(model, val, torch.device("cpu"))
