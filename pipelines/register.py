"""DVC stage ``register``: the text-to-image model (dVAE + prior + reranker + tokenizer, what
``dalle.generate.load_models`` loads) logged as an MLflow pyfunc (``pipelines/pyfunc_model.py``) and registered as
``register.model_name``, one version per run of the stage, so that

    mlflow models serve -m models:/dalle-workbench/latest --env-manager local

answers captions with images. The model carries its weights and the ``dalle`` and ``pipelines`` code it runs, so a
fresh process loads it without this checkout. The headline numbers of ``reports/eval/metrics.json`` (caption
accuracy seen / held-out at N = 1 and at the headline N, FID, CLIP-score where measured, each with its interval)
become the version's tags and the logged model's metrics. Output: ``reports/register/metrics.json`` naming the
version. One MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.entities import LoggedModelOutput
from mlflow.tracking import MlflowClient

import dalle
import pipelines
from dalle.generate import STAGES, load_models
from dalle.training import default_device
from pipelines import pyfunc_model
from pipelines.params import load_params
from pipelines.pyfunc_model import MODELS_ARTIFACT, SIGNATURE, Defaults
from pipelines.reports import write_json
from pipelines.sample import MODELS
from pipelines.tracking import log_artifact, stage_run

EVAL_METRICS = Path("reports/eval/metrics.json")
REPORT_DIR = Path("reports/register")
# What the served model imports; pinned at the versions it was registered with, for env managers that build one.
SERVING_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pillow", "tokenizers", "safetensors", "tqdm")
EXAMPLE = pd.DataFrame({"caption": ["a small red circle in the center"], "candidates": [2], "top": [1], "seed": [0]})
INTERVAL = ("", "_low", "_high")


def headline_metrics(evaluation: dict) -> dict[str, float]:
    """The evaluation's headline numbers with their intervals: caption accuracy (seen, held-out) at N = 1 and at the
    headline N, FID (``fid_<features>``, whichever feature network measured it) and CLIP-score. Measures the dataset
    could not give (absent or null) are left out."""
    n = evaluation.get("headline_n")
    names = [f"accuracy_{group}_n{at}" for at in (1, n) for group in ("seen", "held_out")]
    names += [k for k in evaluation if k.startswith("fid_") and f"{k}_low" in evaluation and "reconstruction" not in k]
    keys = [name + end for name in dict.fromkeys(names) for end in INTERVAL]
    keys += ["headline_n", "clip_score", "clip_score_n1"]
    return {key: float(evaluation[key]) for key in keys if evaluation.get(key) is not None}


def pip_requirements() -> list[str]:
    """``SERVING_PACKAGES`` at their installed versions, without local labels (``+cpu``) that indexes lack."""
    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def stage_models(models: Path, folder: Path) -> Path:
    """A copy of just the folders ``load_models`` reads (dvae/, prior/, clip/), to log as one artifact."""
    staged = folder / MODELS_ARTIFACT
    for name in STAGES:
        shutil.copytree(models / name, staged / name)
    return staged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--eval", type=Path, default=EVAL_METRICS, help="the evaluate stage's metrics.json")
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    name = params.register.model_name
    if not args.eval.is_file():
        raise FileNotFoundError(f"{args.eval} not found; run the evaluate stage first")
    metrics = headline_metrics(json.loads(args.eval.read_text()))
    # Missing or mismatched model folders fail here, before a run opens.
    image_size = load_models(args.models, default_device()).dvae_image_size
    tags = {key: f"{value:g}" for key, value in metrics.items()}
    with stage_run("register", params, reports=args.reports) as run, tempfile.TemporaryDirectory() as tmp:
        # A stage run is not MLflow's active run: the logged model is created in the run's experiment and linked
        # to it here, or it would land in the default experiment without a source run.
        logged = mlflow.initialize_logged_model(
            name="model",
            source_run_id=run.run_id,
            experiment_id=run.info.experiment_id,
            params={key: str(value) for key, value in params.flat().items()},
            tags=tags,
        )
        MlflowClient().log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        info = mlflow.pyfunc.log_model(
            model_id=logged.model_id,
            registered_model_name=name,
            python_model=pyfunc_model.__file__,  # a model from code: loading runs the file, unpickles nothing
            model_config=dataclasses.asdict(Defaults.from_params(params)),
            artifacts={MODELS_ARTIFACT: str(stage_models(args.models, Path(tmp)))},
            code_paths=[str(Path(dalle.__file__).parent), str(Path(pipelines.__file__).parent)],
            signature=SIGNATURE,
            input_example=EXAMPLE,
            pip_requirements=pip_requirements(),
            tags=tags,  # become the version's tags
        )
        # Synchronous: the version exists already, so a store that fails now should fail the stage.
        mlflow.log_metrics(metrics, run_id=run.run_id, model_id=info.model_id, synchronous=True)
        log_artifact(args.eval, "evaluation")
        registered = {
            "model_name": name,
            "version": int(info.registered_model_version),
            "model_uri": f"models:/{name}/{info.registered_model_version}",
            "model_id": info.model_id,
            "run_id": run.run_id,
            "image_size": image_size,
        }
        write_json(args.reports / "metrics.json", registered)
    print(f"register: {registered['model_uri']} (run {run.run_id}); serve it with")
    print(f"  mlflow models serve -m models:/{name}/latest --env-manager local")


if __name__ == "__main__":
    main()
