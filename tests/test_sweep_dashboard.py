"""What optuna-dashboard shows of a sweep: objectives by name (not "Objective 0") and, on each trial, its MLflow
run's id and address."""

from __future__ import annotations

import optuna
from mlflow.tracking import MlflowClient
from test_generation_stages import upstream  # noqa: F401  (module fixture reused here)
from test_sweep import run_sweep, sweep_params

from pipelines import sweep


def test_objectives_are_named_and_each_trial_links_its_mlflow_run(tmp_path, upstream, mlflow_store):  # noqa: F811
    params = sweep_params(tmp_path, "test-sweep-dashboard", {"lr": ["float", 0.001, 0.01, "log"]})
    run_sweep(tmp_path, params, upstream, "--trials", "2", "--study", "named", "--objectives", "loss,seconds")
    study = optuna.load_study(study_name="named", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.metric_names == ["val_image_bits", "seconds"]
    client = MlflowClient(mlflow_store)
    assert len(study.trials) == 2
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna_trial"] == str(trial.number)
        link = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
        assert trial.user_attrs["mlflow_run_url"] == link
    assert sweep.metric_names("dvae", ["loss"]) == ["val_bits_per_dim"]
