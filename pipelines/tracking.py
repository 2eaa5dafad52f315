"""MLflow for the stages: one run per stage execution, in one store shared by every run of this repo.

Default store: ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts`` (MLflow's own default
since 3.7, made absolute). ``dvc exp run --queue`` executes stages in a copy under ``<repo>/.dvc/tmp/exps/``;
the root is resolved past that copy so queued experiments land in the same store. ``MLFLOW_TRACKING_URI``
overrides it for a shared server, which is probed before any work starts.

Once a run is open, a server outage never stops the stage: records go through a bounded queue that a background
thread delivers (``RunLogger``, in ``pipelines/mlflow_outbox.py``); what is still undelivered when the stage ends
is written beside its reports and replayed later with ``python -m pipelines.tracking replay FILE``. A run whose
process was killed (SIGKILL, OOM) is marked KILLED by the next run of its stage on the same host.

Under DVC, the stage runs of one pipeline execution nest in one parent run (``pipelines/pipeline_runs.py``), and a
training stage logs the directories it reads as dataset inputs (``datasets=``, ``pipelines/mlflow_inputs.py``).
Experiments are created as classic ML ones, so that the UI opens on their runs: ``python -m pipelines.tracking
ui-url`` prints the address of the experiment's runs page (``make ui``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from dalle.config import Params
from pipelines import mlflow_outbox
from pipelines.mlflow_inputs import dataset_input
from pipelines.mlflow_outbox import FLUSH_WAIT_ENV as FLUSH_WAIT_ENV  # re-exported for callers of this module
from pipelines.mlflow_outbox import UNSENT, RunLogger, _flush_wait, _http_limits
from pipelines.params import load_params
from pipelines.pipeline_runs import PIPELINE, mark_killed, open_pipeline_run

# The UI opens an experiment on its training runs only when it is tagged as classic ML (MLflow 3 otherwise shows
# the GenAI overview); the values are the UI's ``ExperimentKind`` and ``WorkflowType`` enums.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
WORKFLOW_TYPE = "machine_learning"
UI_HOST, UI_PORT = "127.0.0.1", 5000  # where ``make ui`` serves a local store


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
    try:
        with _http_limits():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # any failure here means the store is unusable; say which store
        raise TrackingUnavailable(
            f"MLflow tracking store {uri} is unreachable ({type(err).__name__}: {str(err)[:300]}). "
            "Start the server, or unset MLFLOW_TRACKING_URI to use the local sqlite store."
        ) from None


def _experiment_id(name: str, uri: str) -> str:
    """The experiment ``name``, created if missing; tagged as classic ML unless someone chose another kind."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        return client.create_experiment(name, artifact_location=_artifact_location(uri), tags=tags)
    kind = experiment.tags.get(EXPERIMENT_KIND_TAG, "")
    if kind in ("", "no_inferred_type") or kind.endswith("_inferred"):  # the UI's guesses, not a choice
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def ui_base(uri: str) -> str:
    """The web address of the UI for a store: the server itself, or ``make ui``'s for a local store."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{UI_HOST}:{UI_PORT}"


def runs_url(uri: str, experiment_id: str) -> str:
    """The experiment's page of training runs (hash routes, as the UI's own links)."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?workflowType={WORKFLOW_TYPE}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the training layout (without ``workflowType`` MLflow 3 opens it in the GenAI one)."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?workflowType={WORKFLOW_TYPE}"


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
    """Standard tags; ``host`` and ``pid`` let a later run tell that this one's process died."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    tags = {"stage": stage, "git_commit": commit, "mlflow.source.git.commit": commit}
    tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    tags.update(host=socket.gethostname(), pid=str(os.getpid()))
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


_active: RunLogger | None = None  # the run of the stage executing now (``stage_run``)


def _target():
    """The open stage run (``stage_run``), else MLflow's fluent API and its active run (an Optuna trial)."""
    return mlflow if _active is None else _active


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    _target().log_metrics(metrics, step=step)


def log_params(params: dict[str, object]) -> None:
    _target().log_params(params)


def log_artifact(local_path: str | Path, artifact_path: str | None = None) -> None:
    _target().log_artifact(str(local_path), artifact_path)


def log_dict(dictionary: dict, artifact_file: str) -> None:
    _target().log_dict(dictionary, artifact_file)


def log_image(image, key: str, step: int) -> None:
    _target().log_image(image, key=key, step=step)


def mark_killed_runs(client: MlflowClient, experiment_id: str, stage: str, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of ``stage`` whose process on this host died without ending them. Runs of
    other hosts or live processes, ``keep``, runs a training checkpoint will continue (their run-id file still
    names them) and runs whose records await a replay are left alone. Returns the ids marked."""
    return mark_killed(client, experiment_id, f"tags.stage = '{stage}'", keep)


def pipeline_tags(params: Params) -> dict[str, str]:
    """Under DVC, tags nesting a run in this pipeline execution's run and owned by the DVC process (a run that
    lives across stages, the ablation's parent: marked KILLED if the pipeline is interrupted); else none."""
    uri = tracking_uri()
    with _http_limits():
        client = MlflowClient(uri)
        pipeline = open_pipeline_run(client, _experiment_id(params.mlflow.experiment, uri), params, _pipeline_tags)
    return {} if pipeline is None else pipeline.owned_tags()


def _pipeline_tags() -> dict[str, str]:
    """The standard tags of a pipeline execution's run (its host and pid are the DVC process's)."""
    return resolve_tags({k: v for k, v in run_tags(PIPELINE).items() if k not in ("host", "pid")})


def _original_checkout(folder: Path) -> Path:
    """``folder`` in the original checkout when it lies in a DVC experiment copy, which DVC deletes afterwards."""
    parts = folder.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i], *parts[i + 4 :])
    return folder.resolve()


@contextmanager
def stage_run(
    stage: str,
    params: Params,
    resume_file: Path | None = None,
    tags: dict[str, str] | None = None,
    reports: Path | None = None,
    datasets: Sequence[Path] = (),
) -> Iterator[RunLogger]:
    """Open the MLflow run of one stage execution, with every param logged and the standard tags set; log
    through the yielded ``RunLogger`` (or ``log_metrics`` / ``log_image``), which survives a server outage.

    With ``resume_file`` (kept beside a training checkpoint), a stage resumed after a kill continues the
    MLflow run it started instead of opening a second one; the caller deletes the file when training ends.
    ``tags`` are added to the standard ones (e.g. ``mlflow.parentRunId`` to nest the run under another).
    Records the server has not taken when the stage ends go to ``reports/mlflow_unsent_<run id>.jsonl``
    (``reports`` defaults to ``reports/<stage>``). Killed earlier runs of the stage are marked KILLED first.

    ``datasets``: the directories the stage reads, logged as the run's dataset inputs (``mlflow_inputs``). Under
    DVC the run nests in its pipeline execution's run, which it ends (``pipeline_runs``).
    """
    global _active
    _flush_wait()  # a bad DALLE_MLFLOW_FLUSH_WAIT_S fails before the run opens
    inputs = [dataset_input(params, Path(directory)) for directory in datasets]  # a missing one fails here
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with _http_limits():
        client = MlflowClient(uri)
        experiment_id = _experiment_id(params.mlflow.experiment, uri)
        run_id = _resumable_run(resume_file, uri, experiment_id)
        mark_killed_runs(client, experiment_id, stage, keep=run_id)
        pipeline = open_pipeline_run(client, experiment_id, params, _pipeline_tags)
        folder = _original_checkout(reports if reports is not None else Path("reports") / stage)
        nesting = {} if pipeline is None else pipeline.child_tags()
        all_tags = {**run_tags(stage), **nesting, **(tags or {}), "mlflow_unsent_dir": str(folder)}
        if resume_file is not None:
            all_tags["mlflow_resume_file"] = str(resume_file.resolve())
        if run_id is None:
            run = client.create_run(experiment_id, run_name=stage, tags=resolve_tags(all_tags))
        else:  # this process's host and pid replace the killed one's
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()], synchronous=True)
            client.update_run(run_id, status="RUNNING")
            run = client.get_run(run_id)
        if resume_file is not None:
            resume_file.parent.mkdir(parents=True, exist_ok=True)
            resume_file.write_text(run.info.run_id)
        logger = RunLogger(client, uri, run, stage, folder / UNSENT.format(run_id=run.info.run_id))
        if run_id is None:
            logger.log_params(params.flat())
        if inputs:
            logger.log_inputs(inputs)
            if pipeline is not None:
                logger.log_inputs(inputs, run_id=pipeline.run_id)
        status = "FAILED"
        _active = logger
        try:
            yield logger
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            _active = None
            if pipeline is not None:
                pipeline.end_stage(logger, stage, status)
            logger.close(status)


@contextmanager
def training_run(
    stage: str,
    params: Params,
    checkpoint: Path,
    resume: bool,
    tags: dict[str, str] | None = None,
    reports: Path | None = None,
    datasets: Sequence[Path] = (),
) -> Iterator[RunLogger]:
    """``stage_run`` for a resumable training stage with its checkpoint at ``checkpoint``.

    The MLflow run id is kept beside the checkpoint so that a run resumed after a kill continues its MLflow run.
    ``resume: false`` deletes both first (a fresh start opens a fresh run); a finished run deletes both, so a
    later run with other params starts fresh.
    """
    run_id_file = checkpoint.with_name("mlflow_run_id")
    if not resume:
        remove_checkpoint(checkpoint)
        run_id_file.unlink(missing_ok=True)
    with stage_run(stage, params, resume_file=run_id_file, tags=tags, reports=reports, datasets=datasets) as run:
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
    """Training-loop callbacks that log to the stage's MLflow run: training rows as ``train_<name>``, validation
    rows as they are. Stages mix it in before their trainer's ``Callbacks``, which supplies the other hooks."""

    def on_train_log(self, step: int, metrics: dict[str, float]) -> None:
        log_metrics({f"train_{k}": v for k, v in metrics.items()}, step=step)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        log_metrics(metrics, step=step)


def flat_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``{"a.b": value}`` for ``mlflow.log_metrics``."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.tracking", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    replayer = commands.add_parser("replay", help="deliver a stage's mlflow_unsent_<run id>.jsonl into its run")
    replayer.add_argument("file", type=Path)
    replayer.add_argument("--tracking-uri", help="the store to deliver to (default: the one the stage used)")
    lister = commands.add_parser("ui-url", help="the address of the experiment's runs page (created if missing)")
    lister.add_argument("--tracking-uri", help="the store the UI serves (default: the stages' store)")
    lister.add_argument("--params", default="params.yaml", help="whose mlflow.experiment to open")
    args = parser.parse_args(argv)
    if args.command == "ui-url":
        uri = args.tracking_uri or tracking_uri()
        check_reachable(uri)
        experiment = load_params(args.params).mlflow.experiment
        print(f"MLflow UI, experiment {experiment}: {runs_url(uri, _experiment_id(experiment, uri))}")
        return
    count = mlflow_outbox.replay(args.file, args.tracking_uri, check=check_reachable)
    print(f"replayed {count} records from {args.file} into their MLflow run; removed the file")


if __name__ == "__main__":
    main()
