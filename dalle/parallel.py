"""How the prior is spread over the processes of ``torchrun``: DDP (every rank holds the whole model and optimizer)
or FSDP2 (``torch.distributed.fsdp.fully_shard`` per transformer block, then the root: each rank holds 1/world of
the weights, gradients and AdamW state, and gathers a block's weights just for its forward and backward). The
paper's 12B model is in the second situation.

Sharded checkpoints go through ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards into one
directory, and DCP re-shards on load, so a checkpoint written by 2 ranks resumes on 1 or 4. A checkpoint directory
holds the DCP files plus ``progress.pt`` (step, histories, config, RNG: a plain weights-only dict, as in
``dalle.checkpoint``), written into ``NAME.tmp`` and renamed into place once every rank has finished, so a kill
leaves the old checkpoint or the new one.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from dalle.checkpoint import load_checkpoint, save_checkpoint

PROGRESS_FILE = "progress.pt"


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def wrap(model: nn.Module, blocks: nn.ModuleList, parallel: str, device: torch.device) -> nn.Module:
    """The module to train: ``model`` itself in one process; under torchrun DDP around it, or ``model`` sharded in
    place by FSDP2 (each of ``blocks``, then the root), with bf16 compute and fp32 gradient reduction on CUDA.
    FSDP also shards in a process group of one (a single GPU then trains with the same bf16 policy and sharded
    checkpoints as a cluster); DDP over one process would only add a copy of the gradients."""
    _, size = world()
    if not (dist.is_available() and dist.is_initialized()) or (parallel == "ddp" and size == 1):
        return model
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()  # full precision on CPU, as the rest of the project
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a collective under FSDP); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gradient_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: reduce gradients over ranks only when ``enabled`` (the last
    micro-batch of an accumulated step)."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict on CPU: on rank 0 under FSDP (gathered: call on every rank), empty on the
    other ranks; the model's own state dict otherwise."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def sharded_path(checkpoint_path: Path) -> Path:
    """The DCP directory that goes with the single-file checkpoint ``checkpoint_path`` (``last.pt`` → ``last.dcp``)."""
    return checkpoint_path.with_suffix(".dcp")


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """Every rank writes its shards of model and optimizer; rank 0 adds ``progress`` and swaps the directory in."""
    rank, _ = world()
    tmp = directory.with_name(directory.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    if rank == 0:
        save_checkpoint(tmp / PROGRESS_FILE, progress)
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)  # a kill before this line keeps the old checkpoint (restored from .old on load)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def read_progress(directory: Path) -> dict[str, Any] | None:
    """``progress.pt`` of the sharded checkpoint at ``directory`` (or of its ``.old`` copy that a kill mid-swap
    left behind), or None when there is none."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / PROGRESS_FILE).is_file():
            return {**load_checkpoint(candidate / PROGRESS_FILE, "prior"), "directory": str(candidate)}
    return None


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model and optimizer state from the DCP checkpoint at ``directory``, re-sharded to this world size
    (a plain model in one process works too)."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
