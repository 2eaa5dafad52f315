"""Training checkpoints that survive a kill, and final weights in safetensors.

A checkpoint is a plain dict of tensors, numbers, strings and lists (model, EMA and optimiser state dicts,
step, RNG states, the flat config, history), written to a temp file, fsynced and renamed into place, and read back
with ``torch.load(weights_only=True)``: nothing is ever unpickled as an object. Final weights (safetensors plus
``config.json``) are written the same way, so a kill leaves the old file or the new one, never half of one; a file
that is damaged anyway (a full disk, a copy cut short) fails to load with a message naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointMismatch(ValueError):
    """The checkpoint on disk was made with a different configuration."""


class CorruptFile(ValueError):
    """A checkpoint or weights file that exists but cannot be read."""


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync it, then rename it over ``path`` (atomic on POSIX):
    a kill at any point leaves either the old file or the new one, and at most a ``.tmp`` file that the next write
    replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())  # the data is on disk before the rename makes it the file
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    write_atomic(path, lambda tmp: torch.save(dict(state), tmp))


def load_checkpoint(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a checkpoint; a damaged one raises :class:`CorruptFile` naming it and the way out (``section``: the
    params section whose ``resume: false`` starts afresh)."""
    way_out = f"{section}.resume: false" if section else "the stage's resume: false"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError) or "Weights only load failed" in str(err):
            raise  # missing, or a file that would need unpickling objects: not ours to reinterpret
        raise CorruptFile(
            f"checkpoint {path} is damaged and cannot be read ({type(err).__name__}: {str(err)[:200]}); delete it, "
            f"or set {way_out} to start fresh"
        ) from err


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ (or exist on one side only), as ``key: saved -> current`` lines."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, "<absent>") != current.get(k, "<absent>")
    ]


def save_weights(model: torch.nn.Module, directory: str | Path, config: Mapping[str, Any]) -> None:
    """``model.safetensors`` + ``config.json`` in ``directory``, each written atomically."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(directory / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    text = json.dumps(dict(config), indent=2) + "\n"
    write_atomic(directory / "config.json", lambda tmp: tmp.write_text(text))


def load_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``model.safetensors`` and ``config.json`` of ``directory``; a damaged file raises :class:`CorruptFile`
    naming it."""
    directory = Path(directory)
    for name in ("model.safetensors", "config.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found")
    try:
        state = load_file(str(directory / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFile(f"{directory / 'model.safetensors'} is damaged and cannot be read: {err}") from err
    try:
        config = json.loads((directory / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{directory / 'config.json'} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CorruptFile(f"{directory / 'config.json'} must hold a JSON object, got {type(config).__name__}")
    return state, config


def config_values(config: Mapping[str, Any], fields: Iterable[str], where: str | Path) -> dict[str, Any]:
    """The values of ``fields`` from a saved ``config.json``; a missing one raises :class:`CorruptFile` naming
    the file and the keys (a model's shape cannot be guessed)."""
    fields = list(fields)
    missing = [name for name in fields if name not in config]
    if missing:
        raise CorruptFile(f"{where} lacks {', '.join(missing)}; it was not written by this version's training stage")
    return {name: config[name] for name in fields}


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], directory: str | Path) -> None:
    """``model.load_state_dict(state)``, where ``model`` was built from ``directory/config.json``: weights that do
    not fit it (a config edited or cut short, weights from another model) raise :class:`CorruptFile` naming both."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1:3]
        raise CorruptFile(
            f"{Path(directory) / 'model.safetensors'} does not fit the model {Path(directory) / 'config.json'} "
            f"describes: {' '.join(line.strip() for line in first)}"
        ) from err
