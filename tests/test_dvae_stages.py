"""train_dvae and encode stages on a tiny config: files, MLflow run, resume after a kill, token arrays."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dalle.data.tokens import load_tokens
from pipelines import encode, prepare, train_dvae

REPO = Path(__file__).resolve().parents[1]


def tiny_params(tmp_path: Path, experiment: str, **dvae) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["mlflow"]["experiment"] = experiment
    raw["data"].update(n_train=48, n_val=8, n_test=8, image_size=16)
    raw["eval"]["blur_radii"] = [0, 8, 16]  # >= 0.5 px at 16 px
    raw["dvae"].update(
        codebook_size=16,
        hidden=8,
        codebook_dim=16,
        batch_size=8,
        steps=8,
        tau_steps=4,
        kl_warmup_steps=4,
        warmup_steps=2,
        val_images=8,
        log_every=2,
        val_every=4,
        image_every=4,
        checkpoint_every=2,
        **dvae,
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    prepare.main(["--params", str(tiny_params(root, "test-dvae-stages")), "--out", str(root / "prepared")])
    return root / "prepared"


def stage_args(tmp_path: Path, params: Path, prepared: Path) -> list[str]:
    return [
        "--params",
        str(params),
        "--prepared",
        str(prepared),
        "--models",
        str(tmp_path / "models"),
        "--reports",
        str(tmp_path / "reports"),
        "--checkpoint",
        str(tmp_path / "ckpt" / "last.pt"),
    ]


def test_train_dvae_then_encode(tmp_path, prepared, mlflow_store):
    params = tiny_params(tmp_path, "test-dvae-stages")
    train_dvae.main(stage_args(tmp_path, params, prepared))
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["config.json", "model.safetensors"]
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["steps"] == 8 and 0 < metrics["val_psnr"] < 100
    with (tmp_path / "reports" / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    assert {"loss", "recon", "kl", "tau", "beta", "lr", "perplexity", "used_fraction", "dead_codes"} <= set(rows[0])
    assert not (tmp_path / "ckpt" / "last.pt").exists()  # finished runs leave no checkpoint behind

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-dvae-stages")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'train_dvae'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")] == [4, 8]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.csv", "model", "images"} <= artifacts
    assert client.list_artifacts(run.info.run_id, "images"), "reconstruction grids are logged with log_image"

    encode.main(
        [
            "--params",
            str(params),
            "--prepared",
            str(prepared),
            "--models",
            str(tmp_path / "models"),
            "--out",
            str(tmp_path / "tokens"),
            "--reports",
            str(tmp_path / "enc"),
        ]
    )
    tokens = load_tokens(tmp_path / "tokens", "train")
    assert tokens.image_tokens.shape == (48, 4, 4) and tokens.image_tokens.dtype == np.uint16
    assert int(tokens.image_tokens.max()) < 16
    assert tokens.caption_offsets[-1] == len(tokens.text_ids) == 48 * 3
    assert tokens.text_ids.shape[1] == 32 and (tokens.text_lengths > 0).all()
    report = json.loads((tmp_path / "enc" / "metrics.json").read_text())
    assert 0 < report["train_used_fraction"] <= 1 and report["grid"] == 4


def test_stage_resumes_after_a_kill_into_the_same_mlflow_run(tmp_path, prepared, mlflow_store, monkeypatch):
    params = tiny_params(tmp_path, "test-dvae-resume")
    args = stage_args(tmp_path, params, prepared)
    original = train_dvae.MlflowCallbacks.on_train_log

    def killed(self, step, metrics):
        original(self, step, metrics)
        if step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_dvae.MlflowCallbacks, "on_train_log", killed)
    with pytest.raises(KeyboardInterrupt):
        train_dvae.main(args)
    assert (tmp_path / "ckpt" / "last.pt").is_file() and not (tmp_path / "models").exists()
    monkeypatch.setattr(train_dvae.MlflowCallbacks, "on_train_log", original)
    train_dvae.main(args)

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-dvae-resume")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'train_dvae'")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")] == [4, 8]


def test_refuses_a_changed_config_after_a_kill(tmp_path, prepared, monkeypatch):
    params = tiny_params(tmp_path, "test-dvae-mismatch")
    monkeypatch.setattr(
        train_dvae.MlflowCallbacks,
        "on_train_log",
        lambda self, step, metrics: (_ for _ in ()).throw(KeyboardInterrupt) if step == 4 else None,
    )
    with pytest.raises(KeyboardInterrupt):
        train_dvae.main(stage_args(tmp_path, params, prepared))
    monkeypatch.undo()
    changed = tiny_params(tmp_path, "test-dvae-mismatch", kl_weight=1.0)
    with pytest.raises(ValueError, match=r"dvae.kl_weight: 0.05 -> 1.0.*dvae.resume: false"):
        train_dvae.main(stage_args(tmp_path, changed, prepared))


def test_encode_without_a_model_names_the_stage(tmp_path, prepared):
    with pytest.raises(FileNotFoundError, match="run the train_dvae stage first"):
        encode.main(
            [
                "--params",
                str(tiny_params(tmp_path, "x")),
                "--prepared",
                str(prepared),
                "--models",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "t"),
                "--reports",
                str(tmp_path / "r"),
            ]
        )
