"""The MLflow UI in headless Chromium (``pipelines/ui_check.py``, ``make ui-check``), on a store made by real DVC
executions: a two-stage pipeline whose stages log through the real ``stage_run``, run by ``dvc repro`` and by ``dvc
exp run -S data.n_train=12 -n ui-exp``, so the store holds two pipeline runs (named after the commit and the
experiment) with the headline metrics their stages copied to them. A real ``mlflow server`` serves it on 127.0.0.1.

Skipped when /usr/bin/chromium is missing, unless DALLE_UI_TESTS is set (CI sets it: there a missing browser fails).
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_dvc import REPO, run, stage_repo

from pipelines import chromium, ui_check

EXPERIMENT = "test-ui"

pytestmark = [
    pytest.mark.skipif(shutil.which("git") is None, reason="needs git"),
    pytest.mark.skipif(
        not chromium.CHROMIUM.is_file() and not os.environ.get("DALLE_UI_TESTS"),
        reason=f"needs {chromium.CHROMIUM} (apt-get install -y chromium); DALLE_UI_TESTS=1 makes its absence fail",
    ),
]

STAGE_SCRIPT = """
import sys
from pathlib import Path
from pipelines.params import load_params
from pipelines.tracking import log_metrics, stage_run

stage, params = sys.argv[1], load_params("params.yaml")
n = params.data.n_train
with stage_run(stage, params):
    if stage == "train_dvae":
        log_metrics({"val_psnr": 20 + n / 100, "val_mse": 0.5})
    else:
        log_metrics({"accuracy_seen_n1": n / 40, "accuracy_held_out_n16": n / 80, "fid_evalnet": 3.5})
    Path(f"{stage}.txt").write_text(str(n))
"""
DVC_YAML = {
    "stages": {
        "train_dvae": {"cmd": "python stage.py train_dvae", "deps": ["stage.py"], "params": ["data.n_train"]}
        | {"outs": ["train_dvae.txt"]},
        "evaluate": {"cmd": "python stage.py evaluate", "deps": ["train_dvae.txt"], "outs": ["evaluate.txt"]},
    }
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store) -> dict[str, object]:
    """The pipeline runs of a ``dvc repro`` (n_train=10) and a ``dvc exp run`` (n_train=12), by n_train."""
    root = stage_repo(tmp_path_factory.mktemp("ui-repo"), EXPERIMENT, DVC_YAML, STAGE_SCRIPT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(REPO))  # the stages import the workbench
        run([sys.executable, "-m", "dvc", "repro"], root)
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-qm", "lock"], root)
        run([sys.executable, "-m", "dvc", "exp", "run", "-S", "data.n_train=12", "-n", "ui-exp"], root)
    client = MlflowClient(mlflow_store)
    _, runs = ui_check.executions(client, EXPERIMENT)
    return {run.data.params["data.n_train"]: run for run in runs}


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_the_ui_lists_the_pipeline_runs_with_their_headline_metrics(store, mlflow_store, tmp_path):
    first, second = store["10"], store["12"]
    assert second.info.run_name == "ui-exp" and len(first.info.run_name) >= 7  # the commit's short hash
    assert first.data.metrics == {"val_psnr": 20.1, "accuracy_seen_n1": 0.25, "accuracy_held_out_n16": 0.125} | {
        "fid_evalnet": 3.5
    }

    shown = ui_check.check(mlflow_store, tmp_path / "ui", EXPERIMENT)

    # The runs page (what `make ui` opens): the training runs table, a row per pipeline run, their stages nested.
    runs_page = shown["runs"]
    assert set(runs_page.table) == {first.info.run_id, second.info.run_id}
    assert "ui-exp" in runs_page.text and first.info.run_name in runs_page.text
    assert "Traces" in runs_page.text and "Evaluation runs" not in runs_page.text  # not the GenAI layout

    # The pipeline view: each run's row shows its headline metrics and the param that differs.
    table = shown["pipelines"].table
    for pipeline, n_train in ((first, "10"), (second, "12")):
        row = table[pipeline.info.run_id]
        n = int(n_train)
        assert row["metrics.`val_psnr`"] == ui_check.shown_number(20 + n / 100)
        assert row["metrics.`accuracy_seen_n1`"] == ui_check.shown_number(n / 40)
        assert row["metrics.`accuracy_held_out_n16`"] == ui_check.shown_number(n / 80)
        assert row["metrics.`fid_evalnet`"] == "3.5"
        assert row["params.`data.n_train`"] == n_train
        assert "metrics.`val_mse`" not in row  # not a headline metric
    assert ["20.12", "20.1"] == [table[r.info.run_id]["metrics.`val_psnr`"] for r in (second, first)]

    # The newest execution's run page: its metrics and its stages' runs.
    run_page = shown["pipeline_run"].text
    assert "ui-exp" in run_page and "Child runs" in run_page
    for text in ("accuracy_held_out_n16", "0.15", "val_psnr", "20.12", "train_dvae", "evaluate"):
        assert text in run_page, text

    for name in ("runs", "pipelines", "pipeline_run"):
        assert png_size(tmp_path / "ui" / f"{name}.png") == chromium.WINDOW


def test_an_experiment_without_pipeline_runs_fails_in_one_line(tmp_path, mlflow_store):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["mlflow"]["experiment"] = "test-ui-none"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_:
        ui_check.main(
            ["--tracking-uri", mlflow_store, "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path)]
        )
    assert "no pipeline execution in experiment 'test-ui-none'" in str(exit_.value)
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y chromium"):
        chromium.Browser(tmp_path / "profile", tmp_path / "no-chromium")
