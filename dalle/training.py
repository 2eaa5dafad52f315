"""Plumbing shared by the training loops (dVAE, prior, reranker): device choice, AdamW parameter groups, RNG
state, and checkpoints that save and restore a run, resumed only when made with the same weight-shaping config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dalle.checkpoint import CheckpointMismatch, config_diff, load_checkpoint, save_checkpoint


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mixed_precision(device: torch.device):
    """The project's precision policy: bf16 autocast on CUDA, full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and kernels only (no decay on biases and norm gains)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)


def resumable_state(checkpoint_path: Path | None, config: dict[str, Any], section: str) -> dict[str, Any] | None:
    """The checkpoint at ``checkpoint_path`` if there is one; it must have been made with ``config``."""
    if checkpoint_path is None or not checkpoint_path.is_file():
        return None
    return check_same_config(load_checkpoint(checkpoint_path, section), config, checkpoint_path, section)


def check_same_config(state: dict[str, Any], config: dict[str, Any], where: Path, section: str) -> dict[str, Any]:
    """``state`` (a checkpoint read from ``where``), if it was made with ``config``; else the keys that differ."""
    diff = config_diff(state["config"], config)
    if diff:
        raise CheckpointMismatch(
            f"checkpoint {where} was made with a different config: {'; '.join(diff)}. "
            f"Restore those values, or set {section}.resume: false to start fresh."
        )
    return state


def save_training_state(
    checkpoint_path: Path | None,
    config: dict[str, Any],
    parts: dict[str, Any],
    device: torch.device,
    **progress: Any,
) -> None:
    """Write one checkpoint: the state dict of each of ``parts`` (model, optimizer, EMA copy, ...) under its name,
    the ``config`` it must be resumed with, the loop's ``progress`` (step, histories, log window, ...) and the RNG."""
    if checkpoint_path is None:
        return
    state = {name: part.state_dict() for name, part in parts.items()}
    save_checkpoint(checkpoint_path, {**state, "config": config, **progress, **rng_state(device)})


def restore_training_state(
    checkpoint_path: Path | None, config: dict[str, Any], section: str, parts: dict[str, Any], device: torch.device
) -> dict[str, Any] | None:
    """Load ``parts`` and the RNG from the checkpoint at ``checkpoint_path``, if there is one made with ``config``;
    returns the checkpoint for the loop's own progress values, or None to start fresh."""
    state = resumable_state(checkpoint_path, config, section)
    if state is None:
        return None
    for name, part in parts.items():
        part.load_state_dict(state[name])
    restore_rng(state, device)
    return state
