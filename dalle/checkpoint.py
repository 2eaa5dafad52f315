"""Training checkpoints that survive a kill, and final weights in safetensors.

A checkpoint is a plain dict of tensors, numbers, strings and lists (model, EMA and optimiser state dicts,
step, RNG states, the flat config, history), written to a temp file and renamed into place, and read back with
``torch.load(weights_only=True)``: nothing is ever unpickled as an object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class CheckpointMismatch(ValueError):
    """The checkpoint on disk was made with a different configuration."""


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)  # atomic: a kill leaves either the old checkpoint or the new one


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ (or exist on one side only), as ``key: saved -> current`` lines."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, "<absent>") != current.get(k, "<absent>")
    ]


def save_weights(model: torch.nn.Module, directory: str | Path, config: Mapping[str, Any]) -> None:
    """``model.safetensors`` + ``config.json`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")


def load_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    for name in ("model.safetensors", "config.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found")
    return load_file(str(directory / "model.safetensors")), json.loads((directory / "config.json").read_text())
