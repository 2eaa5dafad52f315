"""Scale-out training of the prior (dalle/parallel.py): FSDP2 equals DDP equals one process on the whole batch,
gradient accumulation equals the whole batch, and a sharded checkpoint written by 2 ranks resumes on 1."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_prior_train import GEOMETRY, colour_tokens, tiny_cfg

from dalle.checkpoint import CheckpointMismatch, save_checkpoint
from dalle.config import PriorConfig
from dalle.parallel import load_sharded, read_progress
from dalle.prior import Prior
from dalle.prior_train import Callbacks, train_prior
from dalle.training import adamw

RUNS = {
    "ddp": {},
    "fsdp": {"parallel": "fsdp"},
    "fsdp_accumulated": {"parallel": "fsdp", "micro_batch_size": 2, "activation_checkpointing": True},
}


def base_cfg() -> PriorConfig:
    return tiny_cfg(steps=6, batch_size=8, log_every=2, val_every=3, sample_every=6, checkpoint_every=3)


def assert_same_weights(a: dict, b: dict, atol: float, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    script = str(Path(__file__).with_name("fsdp_steps.py"))
    result = subprocess.run([*command, script, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


class Logged(Callbacks):
    def __init__(self):
        self.steps = []

    def on_train_log(self, step, metrics):
        self.steps.append(step)


def one_process(cfg: PriorConfig) -> dict[str, torch.Tensor]:
    result = train_prior(cfg, 0, GEOMETRY, colour_tokens(64), colour_tokens(40, seed=1))
    return result.model.state_dict()


def test_fsdp_and_ddp_steps_equal_one_process_on_the_whole_batch(two_ranks):
    reference = one_process(base_cfg())
    for name in RUNS:
        assert_same_weights(load_file(str(two_ranks / f"{name}.safetensors")), reference, 1e-5, name)
    assert not (two_ranks / "fsdp.dcp").exists() or (two_ranks / "fsdp.dcp" / "progress.pt").is_file()


def test_accumulation_equals_the_whole_batch_in_one_process():
    whole = one_process(base_cfg())
    accumulated = one_process(dataclasses.replace(base_cfg(), micro_batch_size=3, activation_checkpointing=True))
    assert_same_weights(accumulated, whole, 1e-5, "micro-batches of 3 (3 + 3 + 2) against 8 at once")


def test_a_two_rank_checkpoint_loads_bit_exactly_and_continues_in_one_process(two_ranks, tmp_path):
    progress = read_progress(two_ranks / "step3.dcp")
    assert progress["step"] == 3
    prior = Prior(base_cfg(), GEOMETRY)
    optimizer = adamw(prior, 1e-3, 0.0)
    load_sharded(two_ranks / "step3.dcp", prior, optimizer)  # 2 shards → one whole model, no process group
    assert_same_weights(prior.state_dict(), load_file(str(two_ranks / "step3.safetensors")), 0.0, "step 3")
    assert len(optimizer.state) == len(list(prior.parameters()))  # AdamW moments came back too

    shutil.copytree(two_ranks / "step3.dcp", tmp_path / "last.dcp")
    cfg = dataclasses.replace(base_cfg(), parallel="fsdp")  # one process: FSDP is not used, the checkpoint still is
    logged = Logged()
    result = train_prior(
        cfg, 0, GEOMETRY, colour_tokens(64), colour_tokens(40, seed=1), tmp_path / "last.pt", "d", logged
    )
    assert logged.steps == [4, 6]  # resumed at step 3: steps 1-3 were not trained again
    assert [row["step"] for row in result.history] == [2, 4, 6] and result.history[0] == progress["history"][0]
    assert_same_weights(result.model.state_dict(), load_file(str(two_ranks / "fsdp.safetensors")), 1e-5, "step 6")
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "last.dcp").exists()  # one format at a time


def test_a_sharded_checkpoint_with_other_weights_shaping_params_is_refused(two_ranks, tmp_path):
    shutil.copytree(two_ranks / "step3.dcp", tmp_path / "last.dcp")
    cfg = dataclasses.replace(base_cfg(), lr=1e-2)
    with pytest.raises(CheckpointMismatch, match=r"last\.dcp .*prior\.lr: 0\.003 -> 0\.01.*prior\.resume: false"):
        train_prior(cfg, 0, GEOMETRY, colour_tokens(64), colour_tokens(40, seed=1), tmp_path / "last.pt", "d")


def test_a_half_swapped_sharded_checkpoint_resumes_from_its_old_copy(two_ranks, tmp_path):
    shutil.copytree(two_ranks / "step3.dcp", tmp_path / "last.dcp.old")  # killed between the two renames
    (tmp_path / "last.dcp.tmp").mkdir()
    save_checkpoint(tmp_path / "last.dcp.tmp" / "half.pt", {})
    progress = read_progress(tmp_path / "last.dcp")
    assert progress["step"] == 3 and progress["directory"].endswith("last.dcp.old")


def test_fsdp_in_a_group_of_one_shards_trains_without_a_checkpoint_and_resumes_after_a_kill(tmp_path):
    """One process still shards under ``parallel: fsdp`` (a single GPU gets the bf16 policy); training with no
    checkpoint path works, and a run killed right after its step-6 sharded checkpoint resumes to the same end."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    script = str(Path(__file__).with_name("fsdp_resume.py"))
    result = subprocess.run([*command, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "param_dtype=torch.float32 (unsharded one process: torch.float32)" in result.stdout
    assert "resumed from step 6" in result.stdout
    assert (tmp_path / "killed.dcp" / "progress.pt").is_file() and not list(tmp_path.glob("*.tmp*"))
