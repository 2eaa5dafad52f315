"""Read ``params.yaml`` into the typed :class:`dalle.config.Params` (the only place that reads the file)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from dalle.config import Params, ParamsError

DEFAULT_PATH = Path("params.yaml")


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (plain YAML keeps the last one silently,
    so an edit lower in the file would quietly win over the line a user is looking at)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key] + 1}, "
                    f"again on line {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path):
    """Parse a YAML params file strictly (no duplicate keys); errors name the file."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None


def load_params(path: str | Path = DEFAULT_PATH, seed: int | None = None) -> Params:
    """The validated params in ``path``; ``seed``, when given, replaces the training seed (``seed``) only: the
    data, its splits and the test captions follow ``data.seed`` and stay the same."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path.resolve()}")
    params = Params.from_dict(read_yaml(path), source=str(path))
    if seed is None:
        return params
    if seed < 0:
        raise ParamsError(f"--seed: must be >= 0, got {seed}")
    return dataclasses.replace(params, seed=seed)


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    """``--seed N``: train, sample or evaluate with training seed N instead of params.yaml's ``seed`` (the
    per-seed chains of ``pipelines/seeds/dvc.yaml``)."""
    parser.add_argument("--seed", type=int, default=None, help="training seed instead of params.yaml's seed")
