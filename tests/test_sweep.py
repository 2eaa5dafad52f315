"""Optuna sweeps: trials shared by worker processes in one sqlite study, MLflow parent and child runs linked both
ways, best params valid as params.yaml, pruning of a bad region, refusals before any trial runs."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_generation_stages import prior_params, upstream  # noqa: F401  (module fixture reused here)

from dalle.config import Params
from pipelines import sweep


def sweep_params(tmp_path: Path, experiment: str, space: dict, **sweep_keys) -> Path:
    path = prior_params(tmp_path, experiment)
    raw = yaml.safe_load(path.read_text())
    raw["sweep"].update(prior_steps=4, pruner_startup_trials=1, prior=space, **sweep_keys)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_sweep(tmp_path: Path, params: Path, upstream: Path, *extra: str) -> Path:  # noqa: F811
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep.main(
        ["--target", "prior", "--params", str(params), "--storage", storage, "--out", str(tmp_path / "sweeps")]
        + ["--prepared", str(upstream / "prepared"), "--tokens", str(upstream / "tokens")]
        + ["--dvae", str(upstream / "models"), *extra]
    )
    return tmp_path / "sweeps"


def test_two_workers_share_one_study_and_log_linked_runs(tmp_path, upstream, mlflow_store):  # noqa: F811
    space = {"lr": ["float", 0.001, 0.01, "log"], "text_loss_weight": ["float", 0.1, 0.2]}
    params = sweep_params(tmp_path, "test-sweep", space)
    out = run_sweep(tmp_path, params, upstream, "--trials", "4", "--workers", "2", "--study", "s1")
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-sweep").experiment_id
    (parent,) = client.search_runs([experiment], "tags.optuna_study = 's1'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] >= 1
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
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
