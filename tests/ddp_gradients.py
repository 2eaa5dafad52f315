"""Run by tests/test_prior_train.py under ``torchrun --nproc-per-node 2``: one data-parallel backward pass of the
prior on the shared test batch; every rank saves the gradients it holds after DDP's all-reduce."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_prior_train import STEP, ddp_setup  # noqa: E402

from dalle.prior_train import training_batch, training_losses, training_order  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    prior, tokens, batch_size = ddp_setup()
    model = DistributedDataParallel(prior)
    order = training_order(tokens, batch_size, seed=0)  # this rank's share of each global batch
    batch = training_batch(tokens, order, STEP, device=torch.device("cpu"))
    losses, _ = training_losses(model, prior, batch)
    losses.loss.backward()
    grads = {name: p.grad.contiguous() for name, p in prior.named_parameters()}
    save_file(grads, str(Path(out_dir) / f"rank{dist.get_rank()}.safetensors"))
    dist.barrier()  # both ranks done before teardown: a rank tearing down alone can leave the other hanging
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
