"""Read ``params.yaml`` into the typed :class:`dalle.config.Params` (the only place that reads the file)."""

from __future__ import annotations

from pathlib import Path

import yaml

from dalle.config import Params, ParamsError

DEFAULT_PATH = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PATH) -> Params:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path.resolve()}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return Params.from_dict(raw, source=str(path))
