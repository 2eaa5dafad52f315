"""The contrastive reranker: shapes, padding ignored, retrieval against a brute-force rank, learning a toy pairing,
exact resume, weights round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dalle.checkpoint import load_checkpoint, save_weights
from dalle.clip import Clip, load_clip
from dalle.clip_train import Callbacks, recall_at, train_clip
from dalle.config import COLOURS, ClipConfig, LoaderConfig
from dalle.data.tokens import TokenSplit

CFG = ClipConfig(
    embed_dim=16,
    text_layers=1,
    text_width=32,
    text_heads=2,
    image_channels=8,
    image_stages=2,
    lr=3e-3,
    warmup_steps=5,
    batch_size=16,
    steps=10,
    val_images=32,
    log_every=5,
    val_every=5,
    checkpoint_every=2,
)
TEXT_LEN, VOCAB = 6, 20


def colour_data(n: int, seed: int = 0) -> tuple[np.ndarray, TokenSplit]:
    """Solid 16×16 images in one of 8 colours; one caption each whose first token names the colour."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 8, n)
    palette = np.array(list(COLOURS.values()), dtype=np.uint8)
    images = np.broadcast_to(palette[colours][:, None, None, :], (n, 16, 16, 3)).copy()
    lengths = rng.integers(1, TEXT_LEN + 1, n).astype(np.int32)
    ids = rng.integers(9, VOCAB, (n, TEXT_LEN)).astype(np.int32)
    ids[:, 0] = colours + 1
    ids[np.arange(TEXT_LEN)[None, :] >= lengths[:, None]] = 0
    return images, TokenSplit(colours.reshape(n, 1, 1).astype(np.uint16), ids, lengths, np.arange(n + 1))


def test_forward_shapes_and_symmetric_loss():
    torch.manual_seed(0)
    model = Clip(CFG, VOCAB, TEXT_LEN, 16)
    images, tokens = colour_data(5)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    text = torch.from_numpy(tokens.text_ids).long(), torch.from_numpy(tokens.text_lengths).long()
    logits, loss = model(pixels, *text)
    assert logits.shape == (5, 5)
    targets = torch.arange(5)
    cross_entropy = torch.nn.functional.cross_entropy
    expected = (cross_entropy(logits, targets) + cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.score(pixels, *text), logits.diagonal() / model.logit_scale.exp())
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, 16, 16\)"):
        model(pixels[:, :, :8], *text)


def test_text_past_the_caption_is_ignored():
    torch.manual_seed(0)
    model = Clip(CFG, VOCAB, TEXT_LEN, 16).eval()
    ids = torch.tensor([[3, 4, 0, 0, 0, 0]])
    noisy = torch.tensor([[3, 4, 7, 8, 9, 1]])
    lengths = torch.tensor([2])
    torch.testing.assert_close(model.encode_text(ids, lengths), model.encode_text(noisy, lengths))


def test_recall_matches_a_brute_force_rank():
    similarity = torch.randn(30, 30, generator=torch.Generator().manual_seed(0))
    for k in (1, 5):
        expected = np.mean([similarity[i, i] >= similarity[i].topk(k).values[-1] for i in range(30)])
        assert recall_at(similarity, k) == pytest.approx(expected)


def test_learns_to_pair_colours_with_their_names():
    images, tokens = colour_data(256)
    val_images, val_tokens = colour_data(32, seed=1)
    cfg = dataclasses.replace(CFG, steps=80, batch_size=32, lr=1e-2)
    result = train_clip(cfg, 0, VOCAB, images, tokens, val_images, val_tokens, device=torch.device("cpu"))
    # Same-colour images are identical and tie, and ties count as found: reading the colour word retrieves
    # perfectly. The other way, same-colour captions differ in their filler words and compete with the own one.
    assert result.final["val_text_to_image_top1"] == 1.0
    assert result.final["val_image_to_text_top5"] >= 0.8


class Stop(Callbacks):
    def on_train_log(self, step, metrics):
        if step == 5:
            raise KeyboardInterrupt


@pytest.mark.parametrize("loader", [LoaderConfig(), LoaderConfig(order="stream", shuffle_block=12)])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, loader):
    images, tokens = colour_data(64)
    tokens = dataclasses.replace(tokens, shard_lengths=(30, 34))
    val = colour_data(32, seed=1)
    reference = train_clip(CFG, 0, VOCAB, images, tokens, *val, tmp_path / "a.pt", loader=loader)
    with pytest.raises(KeyboardInterrupt):
        train_clip(CFG, 0, VOCAB, images, tokens, *val, tmp_path / "b.pt", callbacks=Stop(), loader=loader)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 4
    resumed = train_clip(CFG, 0, VOCAB, images, tokens, *val, tmp_path / "b.pt", loader=loader)
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match=r"clip.lr: 0.003 -> 0.01.*clip.resume: false"):
        train_clip(dataclasses.replace(CFG, lr=0.01), 0, VOCAB, images, tokens, *val, tmp_path / "b.pt")


def test_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Clip(CFG, VOCAB, TEXT_LEN, 16).eval()
    geometry = {"text_vocab": VOCAB, "text_len": TEXT_LEN, "image_size": 16}
    save_weights(model, tmp_path, {**dataclasses.asdict(CFG), **geometry})
    loaded = load_clip(tmp_path)
    images, tokens = colour_data(4)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    text = torch.from_numpy(tokens.text_ids).long(), torch.from_numpy(tokens.text_lengths).long()
    torch.testing.assert_close(loaded.score(pixels, *text), model.score(pixels, *text), rtol=0, atol=0)
