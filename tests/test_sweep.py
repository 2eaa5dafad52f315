"""Optuna sweeps: trials shared by worker processes in one sqlite study, MLflow parent and child runs linked both
ways, best params valid as params.yaml, pruning of a bad region, refusals before any trial runs, search spaces
checked against their keys' types, a failed sweep exiting non-zero, a killed worker's trial retried."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from test_generation_stages import REPO, prior_params, upstream  # noqa: F401  (module fixture reused here)

from dalle.config import Params, ParamsError
from pipelines import sweep
from pipelines.params import load_params


def sweep_params(tmp_path: Path, experiment: str, space: dict, **sweep_keys) -> Path:
    path = prior_params(tmp_path, experiment)
    raw = yaml.safe_load(path.read_text())
    raw["sweep"].update({"prior_steps": 4, "pruner_startup_trials": 1, "prior": space, **sweep_keys})
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_args(tmp_path: Path, params: Path, upstream: Path, *extra: str) -> list[str]:  # noqa: F811
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    return (
        ["--target", "prior", "--params", str(params), "--storage", storage, "--out", str(tmp_path / "sweeps")]
        + ["--prepared", str(upstream / "prepared"), "--tokens", str(upstream / "tokens")]
        + ["--dvae", str(upstream / "models"), *extra]
    )


def run_sweep(tmp_path: Path, params: Path, upstream: Path, *extra: str) -> Path:  # noqa: F811
    sweep.main(sweep_args(tmp_path, params, upstream, *extra))
    return tmp_path / "sweeps"


def parent_run(client: MlflowClient, experiment: str, study: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([experiment_id], f"tags.optuna_study = '{study}'")
    return parent


def first_started_trial(storage: str, study: str, timeout: float = 180.0) -> optuna.trial.FrozenTrial:
    """The first trial of ``study`` seen RUNNING with its objective under way (its worker attr set)."""
    rdb = RDBStorage(storage)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = optuna.load_study(study_name=study, storage=rdb).get_trials(states=(TrialState.RUNNING,))
        started = [t for t in running if "mlflow_run_id" in t.user_attrs]
        if started:
            return started[0]
        time.sleep(0.05)
    raise AssertionError(f"no trial of study {study} started within {timeout} s")


def test_four_workers_share_one_sqlite_study_lose_no_trial_and_log_linked_runs(
    tmp_path,
    upstream,  # noqa: F811
    mlflow_store,
):
    storage = sweep.storage_for(f"sqlite:///{tmp_path / 'optuna.db'}")
    with storage.engine.connect() as connection:  # each worker waits for another's write lock instead of failing
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == sweep.SQLITE_TIMEOUT_S * 1000

    space = {"lr": ["float", 0.001, 0.01, "log"], "text_loss_weight": ["float", 0.1, 0.2]}
    params = sweep_params(tmp_path, "test-sweep", space)
    out = run_sweep(tmp_path, params, upstream, "--trials", "8", "--workers", "4", "--study", "s1")
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 8, [(t.number, t.state) for t in study.trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials), [
        (t.state, t.user_attrs.get("error")) for t in study.trials
    ]
    assert len({t.user_attrs["worker"] for t in study.trials}) == 4

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-sweep").experiment_id
    parent = parent_run(client, "test-sweep", "s1")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] >= 1
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 8
    by_id = {c.info.run_id: c for c in children}
    for trial in study.trials:  # trial → run, and run → trial
        child = by_id[trial.user_attrs["mlflow_run_id"]]
        assert child.data.tags["optuna_trial"] == str(trial.number)
        assert float(child.data.params["prior.lr"]) == pytest.approx(trial.params["lr"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts >= {"best_params.yaml", "optimization_history.png"}

    best = yaml.safe_load((out / "s1" / "best_params.yaml").read_text())
    assert set(best) == {"prior"} and set(best["prior"]) == {"lr", "text_loss_weight"}
    raw = copy.deepcopy(yaml.safe_load(params.read_text()))
    raw["prior"].update(best["prior"])
    assert Params.from_dict(raw).prior.lr == pytest.approx(study.best_trial.params["lr"])


def test_a_bad_region_gets_pruned(tmp_path, upstream, mlflow_store):  # noqa: F811
    space = {"lr": ["categorical", 0.003, 0.0000001]}  # the second choice cannot learn in 4 steps
    params = sweep_params(tmp_path, "test-sweep-prune", space)
    run_sweep(tmp_path, params, upstream, "--trials", "6", "--study", "s2")
    study = optuna.load_study(study_name="s2", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = {t.state for t in study.trials}
    assert optuna.trial.TrialState.PRUNED in states, [(t.params, t.state) for t in study.trials]
    assert optuna.trial.TrialState.FAIL not in states, [t.user_attrs.get("error") for t in study.trials]
    assert study.best_trial.params["lr"] == 0.003


def test_unusable_storage_fails_before_any_trial(tmp_path, upstream):  # noqa: F811
    params = sweep_params(tmp_path, "test-sweep-bad", {"lr": ["float", 0.001, 0.01]})
    with pytest.raises(sweep.SweepError, match="Optuna storage sqlite:////nonexistent/dir/o.db is unusable"):
        sweep.main(["--target", "prior", "--params", str(params), "--storage", "sqlite:////nonexistent/dir/o.db"])
    assert not (tmp_path / "sweeps").exists()


def test_a_sweep_without_a_completed_trial_exits_non_zero_and_fails_its_parent_run(
    tmp_path,
    upstream,  # noqa: F811
    mlflow_store,
):
    params = sweep_params(tmp_path, "test-sweep-none", {"n_heads": ["categorical", 3, 5]})  # d_model 32: invalid
    with pytest.raises(SystemExit) as info:
        run_sweep(tmp_path, params, upstream, "--trials", "2", "--study", "s4")
    message = info.value.code
    parent = parent_run(MlflowClient(mlflow_store), "test-sweep-none", "s4")
    assert isinstance(message, str) and "\n" not in message  # Python prints it as one line and exits with 1
    assert message.startswith("sweep s4 failed: none of its 2 trials completed (2 fail), first error: trial 0: ")
    assert "FieldError: d_model: 32 is not divisible by n_heads=" in message, message
    assert message.endswith(f"; MLflow parent run {parent.info.run_id} marked FAILED")
    assert parent.info.status == "FAILED" and parent.data.tags["error"] == message
    assert parent.data.metrics["trials_fail"] == 2
    assert not (tmp_path / "sweeps" / "s4" / "best_params.yaml").exists()


def test_a_killed_worker_fails_the_sweep_even_when_trials_completed(tmp_path, upstream, mlflow_store):  # noqa: F811
    params = sweep_params(tmp_path, "test-sweep-killed", {"lr": ["float", 0.001, 0.01, "log"]})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s3", storage=storage)  # created here so that polling it cannot race its creation
    killed: list[int] = []

    def kill_the_worker_of_the_first_trial():
        worker_pid = int(first_started_trial(storage, "s3").user_attrs["worker"].rsplit(":", 1)[1])
        assert worker_pid != os.getpid()  # a spawned worker, never this process
        os.kill(worker_pid, signal.SIGKILL)
        killed.append(worker_pid)

    killer = threading.Thread(target=kill_the_worker_of_the_first_trial, daemon=True)
    killer.start()
    with pytest.raises(SystemExit) as info:
        run_sweep(tmp_path, params, upstream, "--trials", "2", "--workers", "2", "--study", "s3")
    killer.join(timeout=5)
    assert killed, "the killer thread never found a running trial"

    parent = parent_run(MlflowClient(mlflow_store), "test-sweep-killed", "s3")
    expected = rf"sweep s3 failed: worker [01] of 2 was killed by SIGKILL; MLflow parent run {parent.info.run_id} "
    assert re.fullmatch(expected + "marked FAILED", info.value.code), info.value.code
    assert parent.info.status == "FAILED"
    study = optuna.load_study(study_name="s3", storage=storage)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "RUNNING"], states  # the other worker's trial counts; the killed one is left
    assert parent.data.metrics["trials_complete"] == 1


def test_a_sigkilled_workers_trial_is_failed_and_retried_by_the_next_worker(
    tmp_path,
    upstream,  # noqa: F811
    mlflow_store,
    monkeypatch,
):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s5", storage=storage)
    space = {"lr": ["float", 0.001, 0.01, "log"], "text_loss_weight": ["float", 0.1, 0.2]}
    (tmp_path / "long").mkdir()
    endless = sweep_params(tmp_path / "long", "test-sweep-retry", space, prior_steps=10**5)  # runs until killed
    log = (tmp_path / "worker.log").open("w")
    args = sweep_args(tmp_path, endless, upstream, "--trials", "1", "--study", "s5")
    process = subprocess.Popen([sys.executable, "-m", "pipelines.sweep", *args], cwd=REPO, stdout=log, stderr=log)
    try:
        stale = first_started_trial(storage, "s5")
    finally:
        process.kill()  # SIGKILL: no Python cleanup, its trial stays RUNNING with its last heartbeat
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert stale.state == TrialState.RUNNING
    time.sleep(2)  # heartbeats have a one-second resolution on SQLite; now the last one is over a second old

    monkeypatch.setattr(sweep, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(sweep, "GRACE_PERIOD_S", 1)
    params = sweep_params(tmp_path, "test-sweep-retry", space)  # the retry trains for 4 steps
    run_sweep(tmp_path, params, upstream, "--trials", "2", "--study", "s5")

    study = optuna.load_study(study_name="s5", storage=storage)
    failed, retried = study.trials
    assert (failed.number, failed.state) == (stale.number, TrialState.FAIL)
    assert retried.state == TrialState.COMPLETE, retried.user_attrs.get("error")
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retried) == failed.number
    assert RetryHeartbeatStaleTrialCallback.retry_history(retried) == [failed.number]
    assert retried.params == failed.params


def test_hyperband_max_resource_is_the_targets_step_budget(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sweep"].update(pruner="hyperband", dvae_steps=40, prior_steps=8)
    params = Params.from_dict(raw)
    assert sweep.make_pruner(params, "dvae")._max_resource == 40
    assert sweep.make_pruner(params, "prior")._max_resource == 8


def space_params(tmp_path: Path, target: str, space_yaml: str) -> Path:
    """params.yaml with ``sweep.<target>`` written as YAML text (so YAML's own reading of it is tested)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sweep"][target] = yaml.safe_load(space_yaml)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("target", "space", "key", "words"),
    [
        ("prior", "{lr: [categorical, 1e-3, 3e-3]}", "prior.lr", "choice '1e-3' (str) is not a number; YAML reads"),
        ("prior", "{lr: [float, 1e-4, 1.0e-2, log]}", "prior.lr", "YAML reads 1e-4 as a string, write 0.0001"),
        ("prior", "{lr: [int, 1, 3]}", "prior.lr", "takes a number: use [float, low, high]"),
        ("prior", "{lr: [float, 0.001, 1, 1]}", "prior.lr", "the optional fourth item must be 'log'"),
        ("prior", "{n_layers: [float, 2.0, 6.0]}", "prior.n_layers", "takes an integer: use [int, low, high]"),
        ("prior", "{n_layers: [int, 2, 6.5]}", "prior.n_layers", "int bounds must be integers, got [2, 6.5]"),
        ("prior", "{n_layers: [categorical, 2, 4.0]}", "prior.n_layers", "choice 4.0 (float) is not an integer"),
        ("prior", "{n_layers: [categorical, 2, true]}", "prior.n_layers", "choice True (bool) is not an integer"),
        ("prior", "{n_layers: [categorical, 2, null]}", "prior.n_layers", "choice None (NoneType) is not an integer"),
        (
            "prior",
            "{attn_impl: [categorical, dense, sparse]}",
            "prior.attn_impl",
            "choice 'sparse' (str) is not one of",
        ),
        ("prior", "{attn_impl: [float, 0.1, 0.2]}", "prior.attn_impl", "a float range cannot sample it, use [categ"),
        ("prior", "{n_layer: [int, 2, 6]}", "prior.n_layer", "unknown parameter of the prior section"),
        ("prior", "{n_layers: [int, 6, 2]}", "prior.n_layers", "empty range: low 6 must be below high 2"),
        ("prior", "{lr: [float, 0.0, 0.01, log]}", "prior.lr", "a log range needs low > 0, got 0.0"),
        ("dvae", "{hard: [categorical, true, 1]}", "dvae.hard", "choice 1 (int) is not true or false"),
        ("dvae", "{kl_weight: [categorical, 0.1, '0.2']}", "dvae.kl_weight", "choice '0.2' (str) is not a number"),
    ],
)
def test_a_space_that_does_not_fit_its_key_fails_when_params_load(tmp_path, target, space, key, words):
    path = space_params(tmp_path, target, space)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"{path}: sweep.{key}: "), message
    assert words in message, message


@pytest.mark.parametrize(
    ("target", "space"),
    [
        ("prior", "{n_layers: [categorical, 2, 4], d_model: [int, 32, 64, log]}"),
        ("prior", "{lr: [categorical, 0.001, 1.0e-3, 1], text_loss_weight: [float, 0, 1]}"),
        ("prior", "{schedule: [categorical, paper, full], attn_impl: [categorical, dense, blocked]}"),
        ("prior", "{micro_batch_size: [categorical, null, 4], activation_checkpointing: [categorical, true, false]}"),
        ("dvae", "{hard: [categorical, true, false], recon_loss: [categorical, mse, smooth_l1], hidden: [int, 8, 32]}"),
    ],
)
def test_a_space_of_the_keys_type_loads(tmp_path, target, space):
    params = load_params(space_params(tmp_path, target, space))
    assert getattr(params.sweep, target) == {k: tuple(v) for k, v in yaml.safe_load(space).items()}
