"""MLflow for the stages: one run per stage execution, in one store shared by every run of this repo.

Default store: ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts`` (MLflow's own default
since 3.7, made absolute). ``dvc exp run --queue`` executes stages in a copy under ``<repo>/.dvc/tmp/exps/``;
the root is resolved past that copy so queued experiments land in the same store. ``MLFLOW_TRACKING_URI``
overrides it for a shared server, which is probed before any work starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from dalle.config import Params

PROBE_TIMEOUT_S = "10"


def repo_root(checkout: Path | None = None) -> Path:
    """The repository that owns this checkout (the original one when run inside a DVC experiment copy)."""
    root = checkout or Path(__file__).resolve().parents[1]
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


class TrackingUnavailable(RuntimeError):
    pass


def check_reachable(uri: str) -> None:
    """Fail now, not after training, if the tracking store cannot be used."""
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": PROBE_TIMEOUT_S}
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # any failure here means the store is unusable; say which store
        raise TrackingUnavailable(
            f"MLflow tracking store {uri} is unreachable ({type(err).__name__}: {str(err)[:300]}). "
            "Start the server, or unset MLFLOW_TRACKING_URI to use the local sqlite store."
        ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _experiment_id(name: str, uri: str) -> str:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(uri))


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file; a server chooses its own."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    except FileNotFoundError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run_tags(stage: str) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD") or "unknown"
    tags = {"stage": stage, "git_commit": commit, "mlflow.source.git.commit": commit}
    tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


@contextmanager
def stage_run(
    stage: str, params: Params, resume_file: Path | None = None, tags: dict[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one stage execution, with every param logged and the standard tags set.

    With ``resume_file`` (kept beside a training checkpoint), a stage resumed after a kill continues the
    MLflow run it started instead of opening a second one; the caller deletes the file when training ends.
    ``tags`` are added to the standard ones (e.g. ``mlflow.parentRunId`` to nest the run under another).
    """
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(params.mlflow.experiment, uri)
    run_id = _resumable_run(resume_file, uri, experiment_id)
    all_tags = {**run_tags(stage), **(tags or {})}
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=stage, tags=all_tags) as run:
        if run_id is None:
            mlflow.log_params({key: str(value) for key, value in params.flat().items()})
        if resume_file is not None:
            resume_file.parent.mkdir(parents=True, exist_ok=True)
            resume_file.write_text(run.info.run_id)
        yield run


@contextmanager
def training_run(
    stage: str, params: Params, checkpoint: Path, resume: bool, tags: dict[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """``stage_run`` for a resumable training stage with its checkpoint at ``checkpoint``.

    The MLflow run id is kept beside the checkpoint so that a run resumed after a kill continues its MLflow run.
    ``resume: false`` deletes both first (a fresh start opens a fresh run); a finished run deletes both, so a
    later run with other params starts fresh.
    """
    run_id_file = checkpoint.with_name("mlflow_run_id")
    if not resume:
        remove_checkpoint(checkpoint)
        run_id_file.unlink(missing_ok=True)
    with stage_run(stage, params, resume_file=run_id_file, tags=tags) as run:
        yield run
    remove_checkpoint(checkpoint)
    run_id_file.unlink(missing_ok=True)


def remove_checkpoint(checkpoint: Path) -> None:
    """The checkpoint file and, for the prior under FSDP, its sharded directory (``last.dcp``, see
    ``dalle/parallel.py``) with any copy a kill mid-write left behind."""
    checkpoint.unlink(missing_ok=True)
    for suffix in (".dcp", ".dcp.tmp", ".dcp.old"):
        shutil.rmtree(checkpoint.with_suffix(suffix), ignore_errors=True)


def _resumable_run(resume_file: Path | None, uri: str, experiment_id: str) -> str | None:
    """The run id saved beside a checkpoint, if that run exists in this store and experiment."""
    if resume_file is None or not resume_file.is_file():
        return None
    run_id = resume_file.read_text().strip()
    try:
        run = MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return run_id if run.info.experiment_id == experiment_id else None


class MlflowCurves:
    """Training-loop callbacks that log to the active MLflow run: training rows as ``train_<name>``, validation
    rows as they are. Stages mix it in before their trainer's ``Callbacks``, which supplies the other hooks."""

    def on_train_log(self, step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({f"train_{k}": v for k, v in metrics.items()}, step=step)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=step)


def flat_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``{"a.b": value}`` for ``mlflow.log_metrics``."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out
