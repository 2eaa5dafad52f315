"""Run by tests/test_parallel.py under ``torchrun --nproc-per-node 2``: the same 6-step prior training with DDP,
with FSDP2, and with FSDP2 plus gradient accumulation and activation checkpointing. Rank 0 writes each run's
final weights to ``DIR/<run>.safetensors``; the FSDP run also keeps a copy of its step-3 sharded checkpoint
(``DIR/step3.dcp``) and the whole weights at that step (``DIR/step3.safetensors``)."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_parallel import RUNS, base_cfg  # noqa: E402
from test_prior_train import GEOMETRY, colour_tokens  # noqa: E402

from dalle import prior_train  # noqa: E402
from dalle.parallel import full_state  # noqa: E402


def main(out_dir: str) -> None:
    out = Path(out_dir)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    save_sharded = prior_train.save_sharded

    def keep_step_3(directory, model, optimizer, progress):
        save_sharded(directory, model, optimizer, progress)
        whole = full_state(model)  # a collective: every rank takes part
        if progress["step"] == 3 and rank == 0 and not (out / "step3.dcp").exists():  # the first FSDP run
            shutil.copytree(directory, out / "step3.dcp")
            save_file(whole, str(out / "step3.safetensors"))
        dist.barrier()

    prior_train.save_sharded = keep_step_3
    train, val = colour_tokens(64), colour_tokens(40, seed=1)
    for name, overrides in RUNS.items():
        cfg = dataclasses.replace(base_cfg(), **overrides)
        result = prior_train.train_prior(cfg, 0, GEOMETRY, train, val, out / f"{name}.pt", "d")
        if rank == 0:
            weights = {k: v.contiguous() for k, v in result.model.state_dict().items()}
            save_file(weights, str(out / f"{name}.safetensors"))
    dist.barrier()  # both ranks done before teardown: a rank tearing down alone can leave the other hanging
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
