"""Pipeline executions in MLflow, through real DVC: one parent run per ``dvc repro`` / ``dvc exp run`` with a child
run per stage it executes (none for the stages it skips), the headline metrics and params on the parent, a per-seed
chain under its own parent, the ablation's parent nested, nothing left RUNNING, an interrupted pipeline's runs
marked KILLED by the next one, two queued experiments run side by side never cross-linked, and the data a stage
reads logged as dataset inputs whose digest is DVC's hash. Stages are a small script on the real ``stage_run``."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_dvc import REPO, run, stage_repo

from pipelines import mlflow_inputs, tracking

EXPERIMENT = "test-pipeline-runs"

# Each stage logs through stage_run as the real ones do. ``KILL_EVALUATE`` (a file DVC does not track) makes
# evaluate SIGKILL itself mid-run.
STAGE_SCRIPT = """
import os, signal, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from pipelines.params import load_params
from pipelines.tracking import log_metrics, stage_run, tracking_uri

stage, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None
params = load_params("params.yaml", seed)
n = params.data.n_train
Path("out").mkdir(exist_ok=True)
if stage == "make_data":
    with stage_run(stage, params):
        Path("data/tokens/sub").mkdir(parents=True, exist_ok=True)
        Path("data/tokens/a.bin").write_bytes(bytes(range(n)))
        Path("data/tokens/sub/b.bin").write_text(str(n))
elif stage == "train_dvae":
    with stage_run(stage, params, datasets=[Path("data/tokens"), Path("data/raw")]):
        log_metrics({"val_psnr": 20.0 + params.seed + n / 100, "val_mse": 0.5})
        Path(f"out/dvae{seed or ''}.txt").write_text(str(n))
elif stage == "evaluate":
    with stage_run(stage, params):
        log_metrics({"accuracy_seen_n1": 0.5, "accuracy_held_out_n16": 0.25, "fid_evalnet": 3.0})
        log_metrics({"fid_evalnet_low": 1.0, "captions": 4.0})
        if Path("KILL_EVALUATE").exists():
            os.kill(os.getpid(), signal.SIGKILL)
        Path("out/eval.txt").write_text(str(n))
elif stage == "ablate":
    from pipelines.ablate import parent_run
    parent = parent_run(params, "ablation-key")
    with stage_run("ablate@paper", params, tags={"mlflow.parentRunId": parent}):
        Path("out/ablate.txt").write_text(parent)
elif stage == "ablation_summary":
    MlflowClient(tracking_uri()).set_terminated(Path("out/ablate.txt").read_text())
    Path("out/summary.txt").write_text("done")
"""

DVC_YAML = {
    "stages": {
        "make_data": {"cmd": "python stage.py make_data", "deps": ["stage.py"], "params": ["data.n_train"]}
        | {"outs": ["data/tokens"]},
        "train_dvae": {"cmd": "python stage.py train_dvae", "deps": ["data/tokens", "data/raw"]}
        | {"params": ["eval.n_captions"], "outs": ["out/dvae.txt"]},
        "evaluate": {"cmd": "python stage.py evaluate", "deps": ["out/dvae.txt"], "params": ["eval.n_captions"]}
        | {"outs": ["out/eval.txt"]},
        "ablate": {"cmd": "python stage.py ablate", "deps": ["data/tokens"], "outs": ["out/ablate.txt"]},
        "ablation_summary": {"cmd": "python stage.py ablation_summary", "deps": ["out/ablate.txt"]}
        | {"outs": ["out/summary.txt"]},
        "train_dvae_seed1": {"cmd": "python stage.py train_dvae 1", "deps": ["data/tokens", "data/raw"]}
        | {"outs": ["out/dvae1.txt"]},
    }
}
STAGES = ("make_data", "train_dvae", "evaluate", "ablate@paper")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repository with the stages above and the workbench's params.yaml, committed."""
    files = {"data/raw/x.txt": "x\n", "data/raw/nested/y.txt": "y\n"}
    return stage_repo(tmp_path_factory.mktemp("pipeline"), EXPERIMENT, DVC_YAML, STAGE_SCRIPT, files)


@pytest.fixture(autouse=True)
def stages_import_the_workbench(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def runs_of(client: MlflowClient, query: str = "") -> list:
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    return client.search_runs([experiment_id], query, max_results=1000, order_by=["attributes.start_time ASC"])


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    return {r.data.tags["stage"]: r for r in runs_of(client, f"tags.pipeline_run_id = '{parent_id}'")}


def test_one_parent_per_repro_with_a_child_per_stage_run(repo, mlflow_store):
    client = MlflowClient(mlflow_store)
    run([sys.executable, "-m", "dvc", "repro"], repo)
    sha = run(["git", "rev-parse", "--short", "HEAD"], repo).strip()
    parents = {r.info.run_name: r for r in runs_of(client, "tags.stage = 'pipeline'")}
    assert set(parents) == {sha, f"{sha} seed=1"}  # the per-seed chain under its own parent
    main, seeded = parents[sha], parents[f"{sha} seed=1"]

    stages = children(client, main.info.run_id)
    assert set(stages) == {*STAGES, "ablation"}
    ablation = stages["ablation"]  # the ablation's parent, nested in the pipeline's run
    assert ablation.data.tags["mlflow.parentRunId"] == main.info.run_id
    assert stages["ablate@paper"].data.tags["mlflow.parentRunId"] == ablation.info.run_id
    for stage in STAGES:
        assert stages[stage].data.tags["mlflow.parentRunId"] in (main.info.run_id, ablation.info.run_id)
    assert [r.data.tags["stage"] for r in children(client, seeded.info.run_id).values()] == ["train_dvae"]
    assert children(client, seeded.info.run_id)["train_dvae"].data.params["seed"] == "1"
    assert not runs_of(client, "attributes.status != 'FINISHED'"), "a complete repro leaves nothing RUNNING"

    main = client.get_run(main.info.run_id)  # headline metrics copied, and nothing else; the params
    assert main.data.metrics == {"val_psnr": 20.1, "accuracy_seen_n1": 0.5, "accuracy_held_out_n16": 0.25} | {
        "fid_evalnet": 3.0
    }
    assert client.get_run(seeded.info.run_id).data.metrics == {"val_psnr": 21.1}
    assert main.data.params["data.n_train"] == "10" and main.data.tags["host"] and main.data.tags["pid"].isdigit()

    before = len(runs_of(client))
    run([sys.executable, "-m", "dvc", "repro"], repo)  # every stage up to date: nothing runs, nothing is added
    assert len(runs_of(client)) == before


def test_training_data_are_dataset_inputs_with_dvcs_hash(repo, mlflow_store):
    client = MlflowClient(mlflow_store)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    tokens_md5 = lock["make_data"]["outs"][0]["md5"]
    raw_md5 = next(dep["md5"] for dep in lock["train_dvae"]["deps"] if dep["path"] == "data/raw")
    assert mlflow_inputs.directory_md5(repo / "data/raw") == raw_md5  # computed exactly as DVC does
    assert mlflow_inputs.directory_md5(repo / "data/tokens") == tokens_md5

    (train,) = runs_of(client, "tags.stage = 'train_dvae' and params.seed = '0'")
    inputs = {d.dataset.name: d for d in train.inputs.dataset_inputs}
    assert {name: d.dataset.digest for name, d in inputs.items()} == {"data/tokens": tokens_md5, "data/raw": raw_md5}
    profiles = {name: json.loads(d.dataset.profile) for name, d in inputs.items()}
    assert profiles["data/tokens"] == {"data.source": "shapes", "data.path": None, "digest": "dvc.lock"}
    assert profiles["data/raw"]["digest"] == "computed"  # not a stage's output: hashed from its files
    assert inputs["data/tokens"].dataset.source_type == "code"  # the procedural shapes: no path to point at
    assert [(t.key, t.value) for t in inputs["data/tokens"].tags] == [("mlflow.data.context", "training")]
    parent = client.get_run(train.data.tags["pipeline_run_id"])  # the pipeline's run lists its data too
    assert {d.dataset.digest for d in parent.inputs.dataset_inputs} == {tokens_md5, raw_md5}


def test_an_interrupted_pipeline_is_marked_killed_by_the_next(repo, mlflow_store):
    client = MlflowClient(mlflow_store)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eval"]["n_captions"] += 1  # train_dvae and evaluate run again
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "KILL_EVALUATE").touch()
    with pytest.raises(AssertionError, match="failed"):
        run([sys.executable, "-m", "dvc", "repro"], repo)
    (interrupted,) = [r for r in runs_of(client, "tags.stage = 'pipeline'") if r.info.status == "RUNNING"]
    assert interrupted.info.run_name.endswith("+dirty")  # params.yaml differs from the commit
    stages = children(client, interrupted.info.run_id)
    assert {k: r.info.status for k, r in stages.items()} == {"train_dvae": "FINISHED", "evaluate": "RUNNING"}

    (repo / "KILL_EVALUATE").unlink()
    run([sys.executable, "-m", "dvc", "repro"], repo)
    assert client.get_run(interrupted.info.run_id).info.status == "KILLED"
    assert client.get_run(stages["evaluate"].info.run_id).info.status == "KILLED"
    latest = runs_of(client, "tags.stage = 'pipeline'")[-1]
    assert latest.info.status == "FINISHED" and set(children(client, latest.info.run_id)) == {"evaluate"}
    assert not runs_of(client, "attributes.status = 'RUNNING'")


def test_queued_experiments_side_by_side_never_cross_link(repo, mlflow_store):
    client = MlflowClient(mlflow_store)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "lock"], repo)
    for name, n_train in (("exp-a", 21), ("exp-b", 22)):
        run([sys.executable, "-m", "dvc", "exp", "run", "--queue", "-S", f"data.n_train={n_train}", "-n", name], repo)
    run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], repo)
    try:
        deadline = time.monotonic() + 600
        while True:  # each experiment: its pipeline's run and its seed chain's
            done = runs_of(client, "tags.dvc_exp_name LIKE 'exp-%' and tags.stage = 'pipeline'")
            if len(done) == 4 and all(r.info.status != "RUNNING" for r in done):
                status = run([sys.executable, "-m", "dvc", "queue", "status"], repo)
                if not re.search(r"\b(Running|Queued)\b", status):
                    break
            assert time.monotonic() < deadline, run([sys.executable, "-m", "dvc", "queue", "status"], repo)
            time.sleep(2)
    finally:
        run([sys.executable, "-m", "dvc", "queue", "stop"], repo)
    parents = {r.info.run_name: r for r in done}
    assert set(parents) == {"exp-a", "exp-b", "exp-a seed=1", "exp-b seed=1"}
    for name, n_train in (("exp-a", "21"), ("exp-b", "22")):
        parent = client.get_run(parents[name].info.run_id)
        assert parent.info.status == "FINISHED" and parent.data.params["data.n_train"] == n_train
        stages = children(client, parent.info.run_id)
        assert set(stages) == {*STAGES, "ablation"}
        for stage in STAGES:
            tags, stage_params = stages[stage].data.tags, stages[stage].data.params
            assert stage_params["data.n_train"] == n_train and tags["dvc_exp_name"] == name
        assert parent.data.metrics["val_psnr"] == 20 + int(n_train) / 100
    a, b = (parents[name].info for name in ("exp-a", "exp-b"))
    assert a.start_time < b.end_time and b.start_time < a.end_time, "the two ran side by side"
    assert not runs_of(client, "attributes.status = 'RUNNING'")


def test_experiments_open_on_their_training_runs(tmp_path, mlflow_store, capsys):
    experiment_id = tracking._experiment_id("test-ui-kind", mlflow_store)
    client = MlflowClient(mlflow_store)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "genai_development_inferred")  # the UI's guess
    tracking._experiment_id("test-ui-kind", mlflow_store)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = client.create_experiment("test-ui-genai", tags={"mlflow.experimentKind": "genai_development"})
    tracking._experiment_id("test-ui-genai", mlflow_store)  # someone's choice is kept
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["mlflow"]["experiment"] = "test-ui-url"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    tracking.main(["ui-url", "--tracking-uri", mlflow_store, "--params", str(tmp_path / "params.yaml")])
    created = client.get_experiment_by_name("test-ui-url")  # created for a first-time user, as a classic one
    assert created.tags["mlflow.experimentKind"] == "custom_model_development"
    expected = f"http://127.0.0.1:5000/#/experiments/{created.experiment_id}/runs?workflowType=machine_learning"
    assert capsys.readouterr().out.strip().endswith(expected)
    assert tracking.run_url("http://mlflow.team:5000/", "3", "abc") == (
        "http://mlflow.team:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )

    # What the URL relies on, in the installed UI: the kind, the workflow type and the route.
    build = Path(tracking.mlflow.__file__).parent / "server/js/build"
    bundle = "".join(path.read_text() for path in build.rglob("main.*.js"))
    expected_texts = ('"custom_model_development"', '"machine_learning"', '"workflowType"')
    for text in (*expected_texts, "/experiments/:experimentId/runs"):
        assert text in bundle, text
