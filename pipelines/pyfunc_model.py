"""The text-to-image model as an MLflow pyfunc, what ``mlflow models serve`` runs: generation with reranking (§2.6),
N candidates per caption drawn by the prior, decoded by the dVAE, scored by the contrastive reranker, best K kept.

Input: a DataFrame with a ``caption`` column and, optionally, per row ``candidates`` (N), ``top`` (K <= N),
``seed`` and ``temperature``; a missing column or value takes the registered default (N and temperature from the
``sample`` section of the registering run's params, the seed from its ``seed``, K = 1). Output: one row per kept
image, in input order and best first per row: ``caption``, ``rank`` (0 = best), ``score`` (the reranker's) and
``image`` (base64 PNG). A row's images depend on that row alone: the same row gives the same images alone or in any
request.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from numbers import Real

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from PIL import Image

from dalle.config import Params
from dalle.generate import generate, load_models
from dalle.training import default_device

MODELS_ARTIFACT = "models"  # the artifact holding dvae/, prior/ and clip/ as ``load_models`` reads them
OPTIONAL_COLUMNS = {
    "candidates": DataType.long,
    "top": DataType.long,
    "seed": DataType.long,
    "temperature": DataType.double,
}
INPUT_COLUMNS = ("caption", *OPTIONAL_COLUMNS)
OUTPUT_COLUMNS = ("caption", "rank", "score", "image")
SIGNATURE = ModelSignature(
    inputs=Schema(
        [ColSpec(DataType.string, "caption")]
        + [ColSpec(kind, name, required=False) for name, kind in OPTIONAL_COLUMNS.items()]
    ),
    outputs=Schema(
        [
            ColSpec(DataType.string, "caption"),
            ColSpec(DataType.long, "rank"),
            ColSpec(DataType.double, "score"),
            ColSpec(DataType.string, "image"),
        ]
    ),
)


@dataclass(frozen=True)
class Defaults:
    """What a request row leaves out, and the sampling settings no row can change."""

    candidates: int = 16
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    batch_size: int = 256

    @classmethod
    def from_params(cls, params: Params) -> Defaults:
        sample = params.sample
        return cls(
            candidates=sample.candidates,
            seed=params.seed,
            temperature=sample.temperature,
            top_k=sample.top_k,
            top_p=sample.top_p,
            guidance_scale=sample.guidance_scale,
            batch_size=sample.batch_size,
        )


@dataclass(frozen=True)
class Request:
    """One input row, checked and with its defaults filled in."""

    caption: str
    candidates: int
    top: int
    seed: int
    temperature: float


def _missing(value) -> bool:
    """An empty cell: None, NaN or pandas' NA."""
    return pd.api.types.is_scalar(value) and bool(pd.isna(value))


def _cell(cells: dict, column: str, default):
    """A row's value in ``column``, or ``default`` when the column or the value is missing."""
    value = cells.get(column)
    return default if _missing(value) else value


def _integer(value, column: str, row: int) -> int:
    """An integer cell; whole floats pass (pandas makes a column float when one of its cells is empty)."""
    if isinstance(value, Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{column} in row {row} must be an integer, got {value!r}")


def parse_requests(frame: pd.DataFrame, defaults: Defaults) -> list[Request]:
    """The rows of a request, each checked; a bad one raises ``ValueError`` naming its column, row and value."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"expected a DataFrame with a 'caption' column, got {type(frame).__name__}")
    unknown = [str(name) for name in frame.columns if name not in INPUT_COLUMNS]
    if unknown:
        raise ValueError(
            f"unknown column {unknown[0]!r}; expected caption and optionally {', '.join(INPUT_COLUMNS[1:])}"
        )
    if "caption" not in frame.columns:
        raise ValueError(f"the input has no 'caption' column (columns: {', '.join(map(str, frame.columns)) or 'none'})")
    if frame.empty:
        raise ValueError("the input has no rows: send one row per caption")
    requests = []
    for row, cells in enumerate(frame.to_dict("records")):
        caption = cells["caption"]
        if not isinstance(caption, str):
            raise ValueError(f"caption in row {row} must be a string, got {caption!r}")
        if not caption.strip():
            raise ValueError(f"caption in row {row} is empty ({caption!r})")
        candidates = _integer(_cell(cells, "candidates", defaults.candidates), "candidates", row)
        if candidates < 1:
            raise ValueError(f"candidates in row {row} must be >= 1, got {candidates}")
        top = _integer(_cell(cells, "top", 1), "top", row)
        if not 1 <= top <= candidates:
            raise ValueError(f"top in row {row} must be in 1..candidates ({candidates}), got {top}")
        seed = _integer(_cell(cells, "seed", defaults.seed), "seed", row)
        if seed < 0:
            raise ValueError(f"seed in row {row} must be >= 0, got {seed}")
        temperature = _cell(cells, "temperature", defaults.temperature)
        if isinstance(temperature, bool) or not isinstance(temperature, Real) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature in row {row} must be a number > 0, got {temperature!r}")
        requests.append(Request(caption.strip(), candidates, top, seed, float(temperature)))
    return requests


def png_base64(image: np.ndarray) -> str:
    """A uint8 (S, S, 3) image as base64 PNG text."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str) -> np.ndarray:
    """The inverse of ``png_base64``: uint8 (S, S, 3)."""
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.asarray(image.convert("RGB"))


class TextToImage(mlflow.pyfunc.PythonModel):
    """The pyfunc: ``load_context`` loads the models from the ``models`` artifact on ``default_device()`` and the
    ``Defaults`` from the model config; ``predict`` draws, reranks and keeps each row's best ``top`` images."""

    def load_context(self, context) -> None:
        self.defaults = Defaults(**context.model_config)
        self.models = load_models(context.artifacts[MODELS_ARTIFACT], default_device())

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows, settings = [], self.defaults
        for request in parse_requests(model_input, settings):
            (result,) = generate(
                self.models,
                [request.caption],
                request.candidates,
                request.temperature,
                settings.top_k,
                settings.top_p,
                settings.guidance_scale,
                request.seed,
                settings.batch_size,
                progress=False,
            )
            images, scores = result.best(request.top)
            for rank, (image, score) in enumerate(zip(images, scores)):
                rows.append((request.caption, rank, float(score), png_base64(image)))
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


# MLflow loads the model by running this file (a "model from code": no pickle) and takes what it sets here.
mlflow.models.set_model(TextToImage())
