"""The ``register`` stage and the served model: a registered pyfunc of tiny untrained models, one version per run,
answering captions in process and behind a real ``mlflow models serve`` with the same images, and bad requests
with their message."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from dalle.checkpoint import save_weights
from dalle.clip import Clip
from dalle.config import ClipConfig, DvaeConfig, ParamsError, PriorConfig
from dalle.dvae import DiscreteVAE
from dalle.generate import generate, load_models
from dalle.prior import Prior, PriorGeometry
from dalle.text import TextTokenizer
from pipelines import register
from pipelines.params import load_params
from pipelines.pyfunc_model import Defaults, decode_image, parse_requests

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "test-serve"  # not the default name: tests/test_dvc.py registers that one in the same session store
IMAGE_SIZE, TEXT_LEN = 16, 8
CAPTION = "a small red circle in the center"
EVALUATION = {  # the keys evaluate writes on shapes, trimmed
    "fid_evalnet": 43.8,
    "fid_evalnet_low": 26.4,
    "fid_evalnet_high": 67.1,
    "fid_evalnet_reconstruction": 34.7,
    "fid_evalnet_reconstruction_low": 19.1,
    "fid_evalnet_reconstruction_high": 55.9,
    "fid_feature_dim": 64,
    "headline_n": 16,
    "accuracy_all_seen": 0.9,
    **{
        f"accuracy_{group}_n{n}{end}": value
        for group in ("seen", "held_out")
        for n in (1, 16)
        for end, value in (("", 0.8), ("_low", 0.7), ("_high", 0.9))
    },
}


def tiny_models(root: Path) -> Path:
    """dvae/, prior/ and clip/ (each model's tokenizer beside it) as the pipeline writes them, randomly initialised."""
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train([CAPTION, "a big blue square at the top"] * 20, vocab_size=300)
    dvae_cfg = DvaeConfig(codebook_size=16, hidden=8, codebook_dim=16)
    save_weights(DiscreteVAE(dvae_cfg), root / "dvae", {**dataclasses.asdict(dvae_cfg), "image_size": IMAGE_SIZE})
    geometry = PriorGeometry(text_vocab=tokenizer.vocab_size, text_len=TEXT_LEN, image_vocab=16, grid=4)
    prior_cfg = PriorConfig(n_layers=2, n_heads=2, d_model=32, conv_kernel=3, schedule="paper")
    save_weights(
        Prior(prior_cfg, geometry),
        root / "prior",
        {**dataclasses.asdict(prior_cfg), "geometry": dataclasses.asdict(geometry)},
    )
    clip_cfg = ClipConfig(embed_dim=16, text_layers=1, text_width=32, text_heads=2, image_channels=8, image_stages=2)
    clip_geometry = {"text_vocab": tokenizer.vocab_size, "text_len": TEXT_LEN, "image_size": IMAGE_SIZE}
    clip = Clip(clip_cfg, tokenizer.vocab_size, TEXT_LEN, IMAGE_SIZE)
    save_weights(clip, root / "clip", {**dataclasses.asdict(clip_cfg), **clip_geometry})
    for name in ("prior", "clip"):
        tokenizer.save(root / name / "tokenizer.json")
    return root


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    """Models, evaluation metrics and params as the register stage finds them; the stage run once."""
    root = tmp_path_factory.mktemp("register")
    tiny_models(root / "models")
    (root / "eval.json").write_text(json.dumps(EVALUATION))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["mlflow"]["experiment"] = "test-register"
    raw["register"]["model_name"] = MODEL_NAME
    raw["sample"].update(candidates=3, batch_size=2)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    register.main(stage_args(root))
    return root


def stage_args(root: Path) -> list[str]:
    return ["--params", str(root / "params.yaml"), "--models", str(root / "models")] + [
        "--eval",
        str(root / "eval.json"),
        "--reports",
        str(root / "reports"),
    ]


def test_each_run_registers_a_version_with_the_headline_metrics(stage, mlflow_store):
    client = MlflowClient(mlflow_store)
    first = json.loads((stage / "reports" / "metrics.json").read_text())
    assert first["model_uri"] == f"models:/{MODEL_NAME}/{first['version']}" and first["image_size"] == IMAGE_SIZE
    version = client.get_model_version(MODEL_NAME, str(first["version"]))
    assert version.run_id == first["run_id"]
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "register"
    assert run.data.params["register.model_name"] == MODEL_NAME
    expected = {key: value for key, value in EVALUATION.items() if key.startswith(("accuracy_seen_n", "accuracy_held"))}
    expected |= {"fid_evalnet": 43.8, "fid_evalnet_low": 26.4, "fid_evalnet_high": 67.1, "headline_n": 16}
    assert {k: float(v) for k, v in version.tags.items() if k in EVALUATION} == expected
    logged = client.get_logged_model(first["model_id"])
    assert {m.key: m.value for m in logged.metrics} == expected
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run.info.run_id
    assert [output.model_id for output in run.outputs.model_outputs] == [logged.model_id]
    assert str(logged.status) == "READY", logged.status
    assert run.data.metrics == expected

    register.main(stage_args(stage))
    second = json.loads((stage / "reports" / "metrics.json").read_text())
    assert second["version"] == first["version"] + 1 and second["run_id"] != first["run_id"]
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert max(int(v.version) for v in versions) == second["version"]


def test_headline_metrics_leave_out_what_the_dataset_cannot_measure():
    unlabelled = {"fid_reranker": 5.0, "fid_reranker_low": 4.0, "fid_reranker_high": 6.0, "headline_n": 2}
    unlabelled |= {"fid_reranker_reconstruction": 3.0, "fid_reranker_reconstruction_low": 2.0, "clip_score": 21.5}
    unlabelled |= {"clip_score_n1": 20.0, "accuracy_seen_n1": None}
    assert register.headline_metrics(unlabelled) == {
        "fid_reranker": 5.0,
        "fid_reranker_low": 4.0,
        "fid_reranker_high": 6.0,
        "headline_n": 2.0,
        "clip_score": 21.5,
        "clip_score_n1": 20.0,
    }


def request(rows: list[list], columns=("caption", "candidates", "top", "seed")) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))


def test_the_registered_model_keeps_the_reranked_best_of_each_row(stage):
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    out = model.predict(request([[CAPTION, 4, 2, 7], ["a big blue square at the top", 2, 1, 0]]))
    assert list(out.columns) == ["caption", "rank", "score", "image"]
    assert list(out["caption"]) == [CAPTION, CAPTION, "a big blue square at the top"]
    assert list(out["rank"]) == [0, 1, 0]
    models = load_models(stage / "models")
    (result,) = generate(models, [CAPTION], candidates=4, seed=7, batch_size=2, progress=False)
    images, scores = result.best(2)
    np.testing.assert_allclose(out["score"][:2], scores, rtol=1e-6)
    for row, image in enumerate(images):
        np.testing.assert_array_equal(decode_image(out["image"][row]), image)
    # A row's images do not depend on the other rows; the defaults are the params' (candidates 3, batch 2, seed 0).
    alone = model.predict(request([["a big blue square at the top", 2, 1, 0]]))
    assert alone["image"][0] == out["image"][2]
    defaults = model.predict(pd.DataFrame({"caption": [CAPTION]}))
    (default_result,) = generate(models, [CAPTION], candidates=3, seed=0, batch_size=2, progress=False)
    np.testing.assert_array_equal(decode_image(defaults["image"][0]), default_result.best(1)[0][0])


@pytest.mark.parametrize(
    "frame, message",
    [
        (request([[CAPTION, 2, 3, 0]]), "top in row 0 must be in 1..candidates (2), got 3"),
        (request([[CAPTION, 0, 1, 0]]), "candidates in row 0 must be >= 1, got 0"),
        (request([[CAPTION, 2, 1, 0], ["  ", 2, 1, 0]]), "caption in row 1 is empty ('  ')"),
        (request([[CAPTION, 2, 1, -1]]), "seed in row 0 must be >= 0, got -1"),
        (request([[CAPTION, 0.0]], ("caption", "temperature")), "temperature in row 0 must be a number > 0, got 0.0"),
        (request([[CAPTION, 2.5]], ("caption", "candidates")), "candidates in row 0 must be an integer, got 2.5"),
        (request([["x"]], ("prompt",)), "unknown column 'prompt'; expected caption and optionally candidates"),
        (request([[2]], ("candidates",)), "the input has no 'caption' column (columns: candidates)"),
        (request([], ("caption",)), "the input has no rows"),
    ],
)
def test_a_bad_request_names_its_column_row_and_value(frame, message):
    with pytest.raises(ValueError) as info:
        parse_requests(frame, Defaults())
    assert str(info.value).startswith(message), str(info.value)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_answers_a_caption_with_the_same_images(stage, mlflow_store, tmp_path):
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_store)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the server execs the venv's uvicorn
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}/latest"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"mlflow models serve did not answer /ping on port {port}:\n{log.read()[-3000:]}")
            time.sleep(1)

        columns = ["caption", "candidates", "top", "seed"]
        answer = post(f"{url}/invocations", {"dataframe_split": {"columns": columns, "data": [[CAPTION, 2, 1, 0]]}})
        (row,) = answer["predictions"]
        served = decode_image(row["image"])
        assert served.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and served.dtype == np.uint8
        local = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/latest").predict(request([[CAPTION, 2, 1, 0]]))
        np.testing.assert_array_equal(served, decode_image(local["image"][0]))
        assert row["caption"] == CAPTION and row["rank"] == 0 and row["score"] == pytest.approx(local["score"][0])

        with pytest.raises(urllib.error.HTTPError) as info:
            post(f"{url}/invocations", {"dataframe_split": {"columns": columns, "data": [[CAPTION, 2, 3, 0]]}})
        assert info.value.code == 400  # MLflow's answer to an error raised by predict
        assert "top in row 0 must be in 1..candidates (2), got 3" in info.value.read().decode()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.mark.parametrize(
    "name, words",
    [
        ("", "must be a non-empty registered model name"),
        ("team/dalle", "cannot be part of a models:/<name>/<version> URI"),
    ],
)
def test_a_bad_model_name_is_refused_with_the_key(tmp_path, name, words):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["register"]["model_name"] = name
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=f"^{path}: register.model_name: .*{words}"):
        load_params(path)
