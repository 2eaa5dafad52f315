"""Checkpoint and weight files: written atomically (fsynced, then renamed; a real SIGKILL between write and
rename keeps the old file), and damaged files fail with a message that names them and the way out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_prior_train import GEOMETRY as TOY
from test_prior_train import colour_tokens

from dalle import checkpoint
from dalle.checkpoint import CorruptFile, load_checkpoint, save_checkpoint, save_weights
from dalle.config import PriorConfig
from dalle.prior import Prior, PriorGeometry, load_prior
from dalle.prior_train import train_prior

REPO = Path(__file__).resolve().parents[1]
GEOMETRY = PriorGeometry(text_vocab=12, text_len=5, image_vocab=8, grid=3)
CFG = PriorConfig(n_layers=2, n_heads=2, d_model=16, conv_kernel=3, schedule="paper")

# Saves a prior's weights, but SIGKILLs itself at the rename that would publish model.safetensors.
KILLED_SAVE = """
import os, signal, sys, torch
from dalle import checkpoint
from dalle.config import PriorConfig
from dalle.prior import Prior, PriorGeometry
rename = os.replace
def kill_at_rename(source, target):
    if str(target).endswith("model.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)
    rename(source, target)
checkpoint.os.replace = kill_at_rename
torch.manual_seed(1)
cfg = PriorConfig(n_layers=2, n_heads=2, d_model=16, conv_kernel=3, schedule="paper")
geometry = PriorGeometry(text_vocab=12, text_len=5, image_vocab=8, grid=3)
checkpoint.save_weights(Prior(cfg, geometry), sys.argv[1], {"marker": "new"})
"""


def saved_prior(directory: Path, seed: int = 0) -> Prior:
    torch.manual_seed(seed)
    prior = Prior(CFG, GEOMETRY)
    config = {**{k: v for k, v in vars(CFG).items()}, "geometry": vars(GEOMETRY)}
    save_weights(prior, directory, config)
    return prior


def test_a_kill_between_write_and_rename_keeps_the_old_weights(tmp_path):
    old = saved_prior(tmp_path / "model")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "model")], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / "model" / "model.safetensors.tmp").is_file()  # written, never published
    loaded = load_prior(tmp_path / "model")
    for name, tensor in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert "marker" not in json.loads((tmp_path / "model" / "config.json").read_text())
    saved_prior(tmp_path / "model", seed=2)  # the next save replaces the leftover
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]


def test_files_are_fsynced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        checkpoint.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))
    )
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (events.append(("replace", str(a))), replace(a, b)))
    save_checkpoint(tmp_path / "last.pt", {"step": 3})
    saved_prior(tmp_path / "model")
    tmps = [name for kind, name in events if kind == "replace"]
    assert len(tmps) == 3  # the checkpoint, model.safetensors, config.json
    for tmp in tmps:
        assert events.index(("fsync", tmp)) < events.index(("replace", tmp))


def test_a_truncated_checkpoint_names_the_file_and_resume_false(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"step": 3, "weights": torch.ones(1000)})
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match=r"last\.pt is damaged.*set prior\.resume: false"):
        load_checkpoint(tmp_path / "last.pt", "prior")
    cfg = PriorConfig(n_layers=2, n_heads=2, d_model=16, conv_kernel=3, schedule="paper", steps=2)

    with pytest.raises(CorruptFile, match=r"last\.pt is damaged.*prior\.resume: false"):
        train_prior(cfg, 0, TOY, colour_tokens(16), colour_tokens(8, seed=1), tmp_path / "last.pt")


def test_damaged_weights_and_configs_name_the_file(tmp_path):
    saved_prior(tmp_path / "model")
    weights, config_path = tmp_path / "model" / "model.safetensors", tmp_path / "model" / "config.json"
    good_weights, good_config = weights.read_bytes(), config_path.read_text()

    weights.write_bytes(good_weights[: len(good_weights) // 3])
    with pytest.raises(CorruptFile, match=r"model\.safetensors is damaged"):
        load_prior(tmp_path / "model")
    weights.write_bytes(good_weights)

    config = json.loads(good_config)
    del config["d_model"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CorruptFile, match=r"config\.json lacks d_model"):
        load_prior(tmp_path / "model")
    del config["geometry"]["grid"]
    config_path.write_text(json.dumps({**config, "d_model": 16}))
    with pytest.raises(CorruptFile, match=r"config\.json lacks grid"):
        load_prior(tmp_path / "model")
    config_path.write_text(json.dumps({**json.loads(good_config), "d_model": 32}))
    with pytest.raises(CorruptFile, match=r"model\.safetensors does not fit the model .*config\.json describes"):
        load_prior(tmp_path / "model")
    config_path.write_text(good_config[:-20])
    with pytest.raises(CorruptFile, match=r"config\.json is not valid JSON"):
        load_prior(tmp_path / "model")
