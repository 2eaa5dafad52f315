"""One MLflow parent run per pipeline execution (``dvc repro``, ``dvc exp run``, one queued experiment), with a child
run per stage it executes; and runs whose process died, marked KILLED.

DVC runs each stage as a child process of the one DVC process executing the pipeline (``dvc repro``, ``dvc exp run``
or, for a queued experiment, its ``dvc exp exec-run``), and puts ``DVC_STAGE`` in the stage's environment only. That
process (host, pid, start time), the experiment's name (``DVC_EXP_NAME``) and the training seed when it is not
params.yaml's (a per-seed chain, ``pipelines/seeds/dvc.yaml``) make the ``pipeline_key`` tag by which the stages of
one execution find their parent: nothing else shares it, so experiments run side by side from the queue never
cross-link, and a stage DVC skips never starts, so it adds nothing. The parent is named after the experiment, else
the commit (``+dirty`` when tracked files differ), with `` seed=N`` for a per-seed chain, and carries the params.

The parent is RUNNING while one of its stages runs and ends with each stage, with the worst status of its stages so
far (FINISHED < KILLED < FAILED), so a complete pipeline leaves nothing RUNNING. Each finished stage copies its
headline metrics (``HEADLINE``) to it, so executions compare side by side. A parent left RUNNING because its DVC
process is gone (an interrupted pipeline) is marked KILLED, with the runs nested in it, by the next pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from dalle.config import Params, ParamsError
from pipelines.mlflow_outbox import UNSENT, RunLogger
from pipelines.params import DEFAULT_PATH, read_yaml

PIPELINE = "pipeline"  # the ``stage`` tag of a pipeline execution's run
HEADLINE = {  # stage -> the metrics (full match) it copies to its pipeline's run when it finishes
    "train_dvae": r"val_psnr",
    "train_prior": r"val_(text_nll|image_nll|image_bits)",
    "evaluate": r"accuracy_(seen|held_out)_n\d+|fid_[a-z]+|clip_score(_n1)?",
}
SEVERITY = {"FINISHED": 0, "KILLED": 1, "FAILED": 2}


def host_process_gone(tags: dict[str, str]) -> bool:
    """The run's process ran on this host and has exited (a pid reused since then reads as alive)."""
    if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
        return False
    try:
        os.kill(int(tags["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _names_run(path: str | None, run_id: str) -> bool:
    return bool(path) and Path(path).is_file() and Path(path).read_text().strip() == run_id


def _awaits_delivery(tags: dict[str, str], run_id: str) -> bool:
    """A training checkpoint will continue the run (its run-id file names it), or its records await a replay."""
    unsent = Path(tags.get("mlflow_unsent_dir", "/nonexistent")) / UNSENT.format(run_id=run_id)
    return _names_run(tags.get("mlflow_resume_file"), run_id) or unsent.is_file()


def mark_killed(client: MlflowClient, experiment_id: str, where: str, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs matching ``where`` (an MLflow filter) whose process on this host died without
    ending them. Runs of other hosts or live processes, ``keep``, runs a training checkpoint will continue and runs
    whose records await a replay are left alone. Returns the ids marked."""
    query = f"{where} and attributes.status = 'RUNNING' and tags.host = '{socket.gethostname()}'"
    marked = []
    for run in client.search_runs([experiment_id], query, max_results=1000):
        tags, run_id = run.data.tags, run.info.run_id
        if run_id == keep or not host_process_gone(tags) or _awaits_delivery(tags, run_id):
            continue
        client.set_terminated(run_id, "KILLED")
        name = tags.get("stage", "run")
        print(f"MLflow run {run_id} of {name}: process {tags['pid']} is gone, marked KILLED", file=sys.stderr)
        marked.append(run_id)
    return marked


@dataclass(frozen=True)
class Driver:
    """The DVC process executing the pipeline."""

    host: str
    pid: int
    started: float


def dvc_driver() -> Driver | None:
    """The DVC process running this stage: the nearest ancestor without ``DVC_STAGE`` in its environment (a shell or
    ``torchrun`` between them inherits it). None outside DVC."""
    if "DVC_STAGE" not in os.environ:
        return None
    for process in psutil.Process().parents():
        try:
            if "DVC_STAGE" not in process.environ():
                return Driver(socket.gethostname(), process.pid, process.create_time())
        except psutil.Error:  # gone, or not ours to read: look further up
            continue
    return None


def chain_seed(params: Params, defaults: Path = DEFAULT_PATH) -> int | None:
    """``params.seed`` when the stage trains at another seed than ``defaults`` (params.yaml) holds, else None."""
    try:
        seed = read_yaml(defaults).get("seed")
    except (OSError, ParamsError, AttributeError):  # no readable params.yaml here: nothing to differ from
        return None
    return None if params.seed == seed else params.seed


def _git(*args: str) -> str:
    """Git in the repository being reproduced (the stage's working directory)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True)
    except FileNotFoundError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def execution_name(seed: int | None) -> str:
    name = os.environ.get("DVC_EXP_NAME") or _git("rev-parse", "--short", "HEAD") or PIPELINE
    if "DVC_EXP_NAME" not in os.environ and _git("status", "--porcelain", "--untracked-files=no"):
        name += "+dirty"
    return name if seed is None else f"{name} seed={seed}"


def worst(*statuses: str) -> str:
    return max(statuses, key=SEVERITY.__getitem__)


def headline(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    pattern = HEADLINE.get(stage)
    return {k: v for k, v in metrics.items() if pattern and re.fullmatch(pattern, k)}


@dataclass
class PipelineRun:
    """The open parent run of this pipeline execution, and how its stages so far ended."""

    run_id: str
    key: str
    driver: Driver
    status: str  # the worst status of its stages that ended

    def child_tags(self) -> dict[str, str]:
        """Tags of a stage's run: nested under this run."""
        return {"mlflow.parentRunId": self.run_id, "pipeline_run_id": self.run_id}

    def owned_tags(self) -> dict[str, str]:
        """Tags of a run nested here that lives as long as the DVC process (the ablation's parent), so that it is
        marked KILLED if the pipeline is interrupted before something ends it."""
        return {**self.child_tags(), "host": self.driver.host, "pid": str(self.driver.pid)}

    def end_stage(self, logger: RunLogger, stage: str, status: str) -> None:
        """Through the stage's outbox: the stage's headline metrics (when it finished), then this run's end."""
        if status == "FINISHED" and (chosen := headline(stage, logger.latest)):
            logger.log_metrics(chosen, run_id=self.run_id)
        self.status = worst(self.status, status)
        logger.end_run(self.run_id, self.status)
        _open.pop(self.key, None)


_open: dict[str, PipelineRun] = {}  # by key: a stage's run and the ablation's parent, opened in one process


def _stage_status(run) -> str | None:
    """How a stage's run ended; a RUNNING one whose process died without a pending delivery counts as KILLED."""
    status, tags = run.info.status, run.data.tags
    if status in SEVERITY:
        return status
    gone = host_process_gone(tags) and not _awaits_delivery(tags, run.info.run_id)
    return "KILLED" if status == "RUNNING" and gone else None


def open_pipeline_run(
    client: MlflowClient, experiment_id: str, params: Params, tags: Callable[[], dict[str, str]]
) -> PipelineRun | None:
    """This pipeline execution's run, RUNNING: found by its key, or created (after marking KILLED the runs of
    interrupted pipelines) with the params and ``tags()``. None outside DVC."""
    driver = dvc_driver()
    if driver is None:
        return None
    seed = chain_seed(params)
    experiment = os.environ.get("DVC_EXP_NAME", "")
    identity = json.dumps([driver.host, driver.pid, driver.started, experiment, seed])
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    if key in _open:
        return _open[key]
    found = client.search_runs([experiment_id], f"tags.pipeline_key = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        stages = client.search_runs([experiment_id], f"tags.pipeline_run_id = '{run_id}'", max_results=1000)
        status = worst("FINISHED", *filter(None, map(_stage_status, stages)))
        client.update_run(run_id, status="RUNNING")
    else:
        mark_killed(client, experiment_id, f"tags.stage = '{PIPELINE}'")
        mark_killed(client, experiment_id, "tags.pipeline_run_id IS NOT NULL")
        tags = {**tags(), "stage": PIPELINE, "pipeline_key": key, "host": driver.host, "pid": str(driver.pid)}
        if seed is not None:
            tags["pipeline_seed"] = str(seed)
        run_id = client.create_run(experiment_id, run_name=execution_name(seed), tags=tags).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.flat().items()], synchronous=True)
        status = "FINISHED"
    _open[key] = PipelineRun(run_id, key, driver, status)
    return _open[key]
