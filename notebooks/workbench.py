"""Shared by the notebooks: the repository root, a one-line stop when a pipeline output is missing, and MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "dvc.yaml").is_file())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from pipelines.params import load_params  # noqa: E402
from pipelines.pipeline_runs import PIPELINE  # noqa: E402
from pipelines.tracking import tracking_uri  # noqa: E402

PARAMS = load_params(ROOT / "params.yaml")


class Missing(Exception):
    """Shown by IPython as its message alone: what to run first, not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def require(*paths: str, run: str = "make repro") -> None:
    absent = [p for p in paths if not (ROOT / p).exists()]
    if absent:
        raise Missing(f"Run `{run}` first: {', '.join(absent)} not found under {ROOT}.")


def latest_run(stage: str) -> pd.Series:
    """The newest MLflow run of a stage in the params' experiment."""
    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(
        experiment_names=[PARAMS.mlflow.experiment],
        filter_string=f"tags.stage = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs.empty:
        raise Missing(f"Run `make repro` first: no MLflow run of stage {stage} in {tracking_uri()}.")
    return runs.iloc[0]


def history(run_id: str, *keys: str) -> pd.DataFrame:
    """Step-indexed metric histories of one run, a column per key."""
    client = mlflow.MlflowClient(tracking_uri())
    columns = {key: pd.Series({m.step: m.value for m in client.get_metric_history(run_id, key)}) for key in keys}
    return pd.DataFrame(columns).sort_index()


def pipeline_runs() -> pd.DataFrame:
    """The pipeline executions (``dvc repro``, ``dvc exp run``: MLflow parent runs tagged stage=pipeline) in the
    params' experiment, oldest first, with their params and headline metrics."""
    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(
        experiment_names=[PARAMS.mlflow.experiment],
        filter_string=f"tags.stage = '{PIPELINE}'",
        order_by=["attributes.start_time ASC"],
    )
    if runs.empty:
        raise Missing(f"Run `make repro` first: no pipeline run (MLflow tag stage={PIPELINE}) in {tracking_uri()}.")
    return runs.reset_index(drop=True)


def stage_run(parent_id: str, stage: str) -> pd.Series | None:
    """The run of ``stage`` nested in a pipeline execution's run; None when DVC skipped the stage that time."""
    runs = mlflow.search_runs(
        experiment_names=[PARAMS.mlflow.experiment],
        filter_string=f"tags.pipeline_run_id = '{parent_id}' and tags.stage = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return None if runs.empty else runs.iloc[0]


def dvc_experiments(commits: int = 10) -> pd.DataFrame:
    """``dvc exp show --json`` for the last ``commits`` commits as a table: one row per commit and per experiment
    (name, rev, baseline commit, timestamp). Empty when DVC is missing or fails: the MLflow runs stand alone."""
    columns = ["name", "rev", "baseline", "timestamp", "kind"]
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "show", "--json", "--num", str(commits)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        rows = json.loads(shown.stdout) if shown.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        rows = []
    table = []
    for commit in rows:
        if commit.get("rev") == "workspace":
            continue
        timestamp = (commit.get("data") or {}).get("timestamp")
        table.append((commit.get("name"), commit["rev"], commit["rev"], timestamp, "commit"))
        for experiment in commit.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                stamp = (rev.get("data") or {}).get("timestamp")
                table.append(
                    (rev.get("name") or experiment.get("name"), rev["rev"], commit["rev"], stamp, "experiment")
                )
    return pd.DataFrame(table, columns=columns)
