"""The team path (README, "Working as a team") against the services `make services` runs: PostgreSQL, the MLflow
server and the DVC remote. Three sweep workers share one Optuna study on PostgreSQL and one is SIGKILLed mid-trial:
heartbeats fail its trial and another worker retries it, and every trial is a child of the sweep's parent run on the
server. A stage run through `dvc repro` lands on the server with its artifacts; `dvc push` from that clone and
`dvc pull` in a second one give the same outputs and metrics, with nothing left to reproduce.

Skipped when the services are not running, unless DALLE_TEAM_TESTS is set (CI sets it), which makes that a failure.

Run as a script, this file is the sweep command of the test (``python tests/test_team.py <sweep args>``): there, and
in each worker process the sweep spawns (which imports this file as ``__mp_main__``), the heartbeat interval and
grace period are cut from 60 s / 180 s to seconds, so that the killed trial is retried while the others still run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from test_dvc import run, tiny_repo
from test_generation_stages import REPO, upstream  # noqa: F401  (module fixture reused here)
from test_sweep import first_started_trial, parent_run, sweep_args, sweep_params

from pipelines import services, sweep

HEARTBEAT_INTERVAL_S, GRACE_PERIOD_S = 1, 3
DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="module")
def team() -> services.Layout:
    """The running services, with this process (and what it starts) pointed at them as README says."""
    layout = services.default_layout()
    try:
        down = services.unavailable(layout)
    except services.ServicesError as err:
        down = [str(err)]
    if down:
        reason = f"team services not running: {'; '.join(down)}. `make services` starts them"
        if os.environ.get("DALLE_TEAM_TESTS"):
            pytest.fail(f"{reason} (DALLE_TEAM_TESTS is set, so this fails instead of skipping)")
        pytest.skip(f"{reason} (DALLE_TEAM_TESTS=1 turns this skip into a failure)")
    saved = {name: os.environ.get(name) for name in layout.environment()}
    os.environ.update(layout.environment())
    yield layout
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_a_stale_mlflow_pid_file_is_discarded(tmp_path):
    layout = services.Layout(tmp_path)
    layout.mlflow_pid.parent.mkdir(parents=True)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid in (int(finished.stdout), os.getpid()):  # a process that has exited; a live one that is no server
        layout.mlflow_pid.write_text(f"{pid}\n")
        assert services.mlflow_pid(layout) is None
        assert not layout.mlflow_pid.exists()


def test_starting_the_running_services_again_changes_nothing(team):
    postmaster = (team.pg_data / "postmaster.pid").read_text().split()[0]
    server = services.mlflow_pid(team)
    assert services.main(["start"]) == 0
    assert (team.pg_data / "postmaster.pid").read_text().split()[0] == postmaster
    assert services.mlflow_pid(team) == server and services.unavailable(team) == []


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_three_workers_share_a_postgres_study_and_a_killed_workers_trial_is_retried(
    team,
    upstream,  # noqa: F811
    tmp_path,
):
    study_name = f"team-{uuid.uuid4().hex[:8]}"
    storage = team.postgres_url("optuna")
    assert storage.startswith("postgresql+psycopg://") and ":" not in storage.split("@")[0].split("//")[1]
    space = {"lr": ["float", 0.001, 0.01, "log"], "text_loss_weight": ["float", 0.1, 0.2]}
    # 4 trials for each of the 2 survivors, 8 steps each: some start well after the grace period of the killed trial
    params = sweep_params(tmp_path, "test-team-sweep", space, pruner="none", prior_steps=8)
    optuna.create_study(study_name=study_name, storage=storage)  # created here so that polling cannot race it
    args = sweep_args(tmp_path, params, upstream, "--trials", "12", "--workers", "3")
    args += ["--study", study_name, "--storage", storage]  # the last --storage wins over sweep_args' sqlite one
    log_path = tmp_path / "sweep.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, __file__, *args], cwd=REPO, stdout=log, stderr=log)
        try:
            stale = first_started_trial(storage, study_name)
            worker_pid = int(stale.user_attrs["worker"].rsplit(":", 1)[1])
            assert worker_pid != process.pid  # a spawned worker, never the sweep's own process
            os.kill(worker_pid, signal.SIGKILL)
            process.wait(timeout=600)
        finally:
            process.kill()
    output = log_path.read_text()
    assert process.returncode == 1, output[-3000:]
    assert f"sweep {study_name} failed: worker " in output and " of 3 was killed by SIGKILL" in output, output[-3000:]

    study = optuna.load_study(study_name=study_name, storage=storage)
    killed = study.trials[stale.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == stale.number]
    assert len(retries) == 1, [(t.number, t.state, t.system_attrs) for t in study.trials]
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == killed.params
    assert retries[0].user_attrs["worker"] != killed.user_attrs["worker"]
    others = [t for t in study.trials if t.number != stale.number]
    assert all(t.state == TrialState.COMPLETE for t in others), [(t.state, t.user_attrs.get("error")) for t in others]
    assert len({t.user_attrs["worker"] for t in study.trials}) == 3

    client = MlflowClient(team.mlflow_url())
    parent = parent_run(client, "test-team-sweep", study_name)
    assert parent.info.status == "FAILED" and parent.data.tags["optuna_storage"] == storage
    experiment_id = client.get_experiment_by_name("test-team-sweep").experiment_id
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_id = {child.info.run_id: child for child in children}
    assert len(children) == len(study.trials)
    for trial in study.trials:  # the killed trial too: its run stays RUNNING, as its process died
        child = by_id[trial.user_attrs["mlflow_run_id"]]
        assert child.data.tags["optuna_trial"] == str(trial.number)
        assert child.info.status == ("RUNNING" if trial.number == stale.number else "FINISHED")


def test_a_stage_lands_on_the_server_and_dvc_push_then_pull_reproduces_nothing(team, tmp_path):
    experiment = f"test-team-dvc-{uuid.uuid4().hex[:8]}"
    first = tiny_repo(tmp_path / "first", experiment)
    run([*DVC, "remote", "add", "-d", "team", str(team.dvc_remote)], first)
    run([*DVC, "repro", "train_dvae"], first)  # prepare, then train_dvae, both logging to the server
    run(["git", "add", "-A"], first)
    run(["git", "commit", "-qm", "trained"], first)
    run([*DVC, "push", "--with-deps", "train_dvae"], first)  # the pipeline has more stages, not run here

    client = MlflowClient(team.mlflow_url())
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    logged = {r.info.run_id: r for r in client.search_runs([experiment_id])}
    stages = {r.data.tags["stage"]: r for r in logged.values() if r.data.tags["stage"] in ("prepare", "train_dvae")}
    assert len(stages) == 2 and all(r.info.status == "FINISHED" for r in stages.values())
    prepare = stages["prepare"].info.run_id
    assert {a.path for a in client.list_artifacts(prepare)} >= {"contact_sheet.png", "stats.json"}
    assert client.list_artifacts(stages["train_dvae"].info.run_id)  # the reconstruction grids

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    run([*DVC, "pull", "--with-deps", "train_dvae"], second)
    assert "Data and pipelines are up to date." in run([*DVC, "status", "--with-deps", "train_dvae"], second)
    reproduced = run([*DVC, "repro", "train_dvae"], second)
    assert "Running stage" not in reproduced, reproduced
    assert {r.info.run_id for r in client.search_runs([experiment_id])} == set(logged)  # nothing ran, nothing logged
    metrics = [json.loads(run([*DVC, "metrics", "show", "--json"], clone)) for clone in (first, second)]
    assert metrics[0] == metrics[1]
    assert metrics[1][""]["data"]["reports/dvae/metrics.json"]["data"]["steps"] == 4  # this run's, from git
    for out in ("models/dvae/model.safetensors", "data/prepared/contact_sheet.png", "data/prepared/tokenizer.json"):
        assert (second / out).read_bytes() == (first / out).read_bytes(), out
    sheet = client.download_artifacts(prepare, "contact_sheet.png", str(tmp_path))
    assert Path(sheet).read_bytes() == (second / "data/prepared/contact_sheet.png").read_bytes()


def retry_within_seconds() -> None:
    sweep.HEARTBEAT_INTERVAL_S, sweep.GRACE_PERIOD_S = HEARTBEAT_INTERVAL_S, GRACE_PERIOD_S


if __name__ == "__mp_main__":  # a worker spawned by the sweep below
    retry_within_seconds()
if __name__ == "__main__":  # the sweep command of the test above
    retry_within_seconds()
    sweep.main(sys.argv[1:])
