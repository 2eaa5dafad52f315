"""MLflow outages and killed stages, with real ``mlflow server`` processes on 127.0.0.1: a server killed mid-run
and restarted (training goes on, the run ends complete), a server still down when the stage ends (unsent file,
``replay``), a host that accepts and never answers (fails at start), and a SIGKILLed stage's run marked KILLED."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from test_dvae_stages import REPO, stage_args, tiny_params
from test_tracking import assert_fails_at_start, free_port

from dalle.checkpoint import load_checkpoint
from dalle.config import MlflowConfig, Params
from pipelines import mlflow_inputs, mlflow_outbox, prepare, tracking, train_dvae


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    prepare.main(["--params", str(tiny_params(root, "test-outage-prepare")), "--out", str(root / "prepared")])
    return root / "prepared"


class Server:
    """``mlflow server`` on one port and one store, that can be killed and started again."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'db'}"]
        command += ["--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", "1"]
        log = (self.root / "server.log").open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server on {self.uri} did not start; see {log.name}") from None
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL to the server and its workers (one process group): no clean shutdown."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()


def only_run(client: MlflowClient, experiment: str, stage: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([experiment_id], f"tags.stage = '{stage}'")
    return run


def assert_complete(client: MlflowClient, run_id: str) -> None:
    """Every step train_dvae logs at tiny_params (log every 2 of 8 steps, validation every 4), its params and
    its images, in a run that ended FINISHED."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in ("train_loss", "val_psnr")}
    assert steps == {"train_loss": [2, 4, 6, 8], "val_psnr": [4, 8]}
    assert "train_seconds_this_run" in run.data.metrics and run.data.params["dvae.steps"] == "8"
    assert {"metrics.json", "history.csv", "model", "images"} <= {a.path for a in client.list_artifacts(run_id)}
    assert len(client.list_artifacts(run_id, "images")) >= 2  # reconstruction grids of steps 4 and 8


def test_training_goes_on_through_a_server_outage(tmp_path, prepared, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    args = stage_args(tmp_path, tiny_params(tmp_path, "test-outage"), prepared)
    original = train_dvae.MlflowCallbacks.on_train_log
    checkpoint_steps = []

    def outage(self, step, metrics):
        original(self, step, metrics)
        if step > 2:  # the checkpoint of the previous logged step was written while the server was down
            checkpoint_steps.append(load_checkpoint(tmp_path / "ckpt" / "last.pt")["step"])
        if step == 2:
            server.kill()
        if step == 4:
            server.start()  # ~20 s in which the records of steps 2-4 wait

    monkeypatch.setattr(train_dvae.MlflowCallbacks, "on_train_log", outage)
    with pytest.warns(UserWarning) as caught:
        train_dvae.main(args)
    failures = [w for w in caught if f"MLflow tracking store {server.uri} failed" in str(w.message)]
    assert len(failures) == 1, [str(w.message) for w in caught]  # warned once
    assert checkpoint_steps == [2, 4, 6]
    run = only_run(MlflowClient(server.uri), "test-outage", "train_dvae")
    assert_complete(MlflowClient(server.uri), run.info.run_id)
    assert not list((tmp_path / "reports").glob("mlflow_unsent_*"))


def test_server_down_at_the_end_leaves_a_file_that_replays(tmp_path, prepared, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv(tracking.FLUSH_WAIT_ENV, "2")
    args = stage_args(tmp_path, tiny_params(tmp_path, "test-outage-end"), prepared)
    original = train_dvae.MlflowCallbacks.on_train_log

    def outage(self, step, metrics):
        original(self, step, metrics)
        if step == 2:
            server.kill()

    monkeypatch.setattr(train_dvae.MlflowCallbacks, "on_train_log", outage)
    started = time.monotonic()
    with pytest.warns(UserWarning, match="did not take every record") as caught:
        train_dvae.main(args)  # returns: the stage succeeds
    assert time.monotonic() - started < 30
    (unsent,) = (tmp_path / "reports").glob("mlflow_unsent_*.jsonl")
    assert f"python -m pipelines.tracking replay {unsent}" in str(caught[-1].message)
    assert (tmp_path / "models" / "model.safetensors").is_file()

    server.start()
    client = MlflowClient(server.uri)
    run = only_run(client, "test-outage-end", "train_dvae")
    assert run.info.status == "RUNNING"  # its end is in the file too
    replay = [sys.executable, "-m", "pipelines.tracking", "replay", str(unsent)]
    result = subprocess.run(replay, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_complete(client, run.info.run_id)
    assert not unsent.exists() and not unsent.with_suffix("").exists()


def test_records_past_the_queue_bound_spill_to_the_file_and_replay(tmp_path, mlflow_store, monkeypatch):
    monkeypatch.setattr(mlflow_outbox, "MAX_QUEUED", 3)
    monkeypatch.setenv(tracking.FLUSH_WAIT_ENV, "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store = MlflowClient(mlflow_store)
    run = store.create_run(tracking._experiment_id("test-spill", mlflow_store))
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every delivery fails
    unsent = tmp_path / "mlflow_unsent.jsonl"
    logger = tracking.RunLogger(MlflowClient(down), down, run, "spill", unsent)
    for step in range(1, 11):
        logger.log_metrics({"loss": 1 / step}, step=step)
    logger.log_image(np.full((8, 8, 3), 200, np.uint8), key="grid", step=10)
    gone = tmp_path / "gone.csv"
    gone.write_text("a\n")
    logger.log_artifact(gone)
    assert unsent.is_file(), "past MAX_QUEUED the oldest records go to the file at once"
    with pytest.warns(UserWarning, match=f"python -m pipelines.tracking replay {unsent}"):
        logger.close("FINISHED")

    header, *records = [json.loads(line) for line in unsent.read_text().splitlines()]
    assert header == {"kind": "run", "run_id": run.info.run_id, "tracking_uri": down, "stage": "spill"}
    assert sorted(row[3] for r in records if r["kind"] == "batch" for row in r["metrics"]) == list(range(1, 11))
    assert [r["kind"] for r in records].count("image") == 1 and records[-1]["kind"] == "end"
    gone.unlink()  # a record the store cannot take is skipped, not the end of the replay
    with pytest.warns(UserWarning, match=f"refused artifact {gone}.*skipped"):
        tracking.main(["replay", str(unsent), "--tracking-uri", mlflow_store])
    assert not unsent.exists()
    assert [m.step for m in store.get_metric_history(run.info.run_id, "loss")] == list(range(1, 11))
    assert store.get_run(run.info.run_id).info.status == "FINISHED"
    assert [a.path for a in store.list_artifacts(run.info.run_id, "images")]


def test_a_host_that_never_answers_fails_at_start(monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))
    held = []  # connections accepted and never answered

    def accept_forever():
        while True:
            held.append(listener.accept()[0])

    threading.Thread(target=accept_forever, daemon=True).start()
    assert_fails_at_start(monkeypatch, f"http://127.0.0.1:{listener.getsockname()[1]}")
    assert held, "the probe connected: it was the silence that failed it"
    listener.close()


OPEN_A_RUN_AND_WAIT = """
import sys, time
from pathlib import Path
from dalle.config import MlflowConfig, Params
from pipelines.tracking import stage_run
with stage_run("orphan", Params(mlflow=MlflowConfig(sys.argv[1])), reports=Path(sys.argv[2])) as run:
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


def test_a_killed_stage_run_is_marked_killed_by_the_next(tmp_path, mlflow_store):
    experiment = "test-killed-runs"
    params = Params(mlflow=MlflowConfig(experiment))
    command = [sys.executable, "-c", OPEN_A_RUN_AND_WAIT, experiment, str(tmp_path)]
    stage = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    killed = stage.stdout.readline().strip()
    stage.send_signal(signal.SIGKILL)
    stage.wait()

    client = MlflowClient(mlflow_store)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    assert client.get_run(killed).info.status == "RUNNING"
    here, dead = socket.gethostname(), str(stage.pid)
    live = client.create_run(experiment_id, tags={"stage": "orphan", "host": here, "pid": str(os.getpid())})
    elsewhere = client.create_run(experiment_id, tags={"stage": "orphan", "host": "another-host", "pid": dead})
    resume_file = tmp_path / "mlflow_run_id"  # a training run its checkpoint will continue
    paused = client.create_run(
        experiment_id, tags={"stage": "orphan", "host": here, "pid": dead, "mlflow_resume_file": str(resume_file)}
    )
    resume_file.write_text(paused.info.run_id)

    with tracking.stage_run("orphan", params, reports=tmp_path) as run:
        pass
    status = {run_id: client.get_run(run_id).info.status for run_id in (killed, run.info.run_id)}
    assert status == {killed: "KILLED", run.info.run_id: "FINISHED"}
    for untouched in (live, elsewhere, paused):
        assert client.get_run(untouched.info.run_id).info.status == "RUNNING"


def test_dataset_inputs_and_records_for_the_pipeline_run_spill_and_replay(tmp_path, mlflow_store, monkeypatch):
    monkeypatch.setenv(tracking.FLUSH_WAIT_ENV, "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store = MlflowClient(mlflow_store)
    experiment_id = tracking._experiment_id("test-spill-inputs", mlflow_store)
    pipeline = store.create_run(experiment_id).info.run_id
    run = store.create_run(experiment_id, tags={"mlflow.parentRunId": pipeline})
    data = tmp_path / "data"
    (data / "shard").mkdir(parents=True)
    (data / "shard" / "a.bin").write_bytes(b"abc")
    entry = mlflow_inputs.dataset_input(Params(), data)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every delivery fails
    unsent = tmp_path / "mlflow_unsent.jsonl"
    logger = tracking.RunLogger(MlflowClient(down), down, run, "spill", unsent)
    logger.log_inputs([entry])
    logger.log_inputs([entry], run_id=pipeline)
    logger.log_metrics({"val_psnr": 30.0}, step=4)
    logger.log_metrics({"val_psnr": 31.0}, step=8)
    logger.log_metrics({"val_psnr": 31.0}, run_id=pipeline)
    logger.end_run(pipeline, "FAILED")
    assert logger.latest == {"val_psnr": 31.0}  # this run's own metrics only, the last value of each
    with pytest.warns(UserWarning, match=f"python -m pipelines.tracking replay {unsent}"):
        logger.close("FINISHED")
    assert [json.loads(line)["kind"] for line in unsent.read_text().splitlines()][1:3] == ["inputs", "inputs"]

    tracking.main(["replay", str(unsent), "--tracking-uri", mlflow_store])
    for run_id, status in ((run.info.run_id, "FINISHED"), (pipeline, "FAILED")):
        replayed = store.get_run(run_id)
        (dataset,) = [d.dataset for d in replayed.inputs.dataset_inputs]
        assert (dataset.name, dataset.digest) == (data.as_posix(), mlflow_inputs.directory_md5(data))
        assert replayed.data.metrics == {"val_psnr": 31.0} and replayed.info.status == status
    assert [m.step for m in store.get_metric_history(run.info.run_id, "val_psnr")] == [4, 8]
