"""The prepare stage end to end on tiny shapes configs: files, stats, determinism, atomicity, MLflow run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dalle.config import DataConfig, EvalConfig, Params, TokenizerConfig
from dalle.data.prepare import prepare_dataset
from dalle.data.store import ImageShards, load_split
from pipelines import prepare as prepare_stage

SPLIT_FILES = ("index.json", "members.npy", "records.parquet", "shard-00000.tar")
TINY = Params(
    seed=3,
    data=DataConfig(image_size=16, n_train=40, n_val=8, n_test=16, captions_per_image=2),
    tokenizer=TokenizerConfig(vocab_size=300, text_len=32),
    eval=EvalConfig(blur_radii=(0.0, 8.0, 16.0)),  # >= 0.5 px at 16 px
)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_writes_every_output(tmp_path):
    out = tmp_path / "prepared"
    stats = prepare_dataset(TINY, out)
    assert sorted(files(out)) == [
        "contact_sheet.png",
        "stats.json",
        *[f"{split}/{name}" for split in ("test",) for name in SPLIT_FILES],
        "tokenizer.json",
        *[f"{split}/{name}" for split in ("train", "val") for name in SPLIT_FILES],
    ]
    assert json.loads((out / "stats.json").read_text()) == stats
    assert stats["n_images"] == {"train": 40, "val": 8, "test": 16}
    assert stats["n_captions"] == {"train": 80, "val": 16, "test": 32}
    assert stats["n_test_held_out"] == 8
    tokens = stats["caption_tokens"]
    assert 0 < tokens["p50"] <= tokens["p90"] <= tokens["p99"] <= tokens["max"]
    assert stats["truncation_rate"] == pytest.approx(stats["n_truncated"] / 128, abs=1e-6)
    assert stats["skipped"] == {}
    train = load_split(out, "train")
    assert train.images.shape == (40, 16, 16, 3) and train.images.dtype == np.uint8
    assert isinstance(train.images, ImageShards)
    assert 0 < stats["bytes_per_image"]["train"] < 16 * 16 * 3 + 1024  # a PNG and its record, tar headers included
    assert {"captions", "shape", "colour", "size", "position", "held_out"} <= set(train.records.columns)
    assert all(len(caps) == 2 for caps in train.records["captions"])
    assert not train.records["held_out"].any()
    assert not (tmp_path / ".prepared.tmp").exists() and len(list(tmp_path.iterdir())) == 1


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    prepare_dataset(TINY, tmp_path / "a")
    prepare_dataset(TINY, tmp_path / "b")
    prepare_dataset(dataclasses.replace(TINY, data=dataclasses.replace(TINY.data, seed=4)), tmp_path / "c")
    prepare_dataset(dataclasses.replace(TINY, seed=4), tmp_path / "d")  # the training seed: the same data
    assert files(tmp_path / "a") == files(tmp_path / "b") == files(tmp_path / "d")
    assert files(tmp_path / "a")["train/shard-00000.tar"] != files(tmp_path / "c")["train/shard-00000.tar"]


def test_default_text_len_fits_every_shapes_caption(tmp_path):
    params = Params(data=DataConfig(n_train=1500, n_val=50, n_test=300, max_objects=2))
    stats = prepare_dataset(params, tmp_path / "prepared")
    assert stats["n_truncated"] == 0
    assert stats["caption_tokens"]["max"] <= params.tokenizer.text_len


def test_failed_run_keeps_the_previous_outputs(tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(TINY, out)
    before = files(out)
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(30):  # enough to fill every split, but none decodes
        (junk / f"{i}.png").write_bytes(b"not an image")
        (junk / f"{i}.txt").write_text("a caption\n")
    bad = dataclasses.replace(TINY, data=dataclasses.replace(TINY.data, source="folder", path=str(junk)))
    with pytest.raises(ValueError, match=r"data\.path.*no usable images.*'unreadable_image': 30"):
        prepare_dataset(bad, out)
    assert files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk", "prepared"]


def test_stage_logs_an_mlflow_run_with_params_tags_and_contact_sheet(tmp_path, monkeypatch, mlflow_store):
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["data"].update(n_train=24, n_val=4, n_test=8, image_size=16)
    raw["eval"]["blur_radii"] = [0, 8, 16]  # >= 0.5 px at 16 px
    raw["mlflow"]["experiment"] = "test-prepare"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-exp")
    prepare_stage.main(["--params", str(params_file), "--out", str(tmp_path / "prepared")])

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-prepare")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.n_train"] == "24" and run.data.params["seed"] == "0"
    assert run.data.tags["stage"] == "prepare" and run.data.tags["dvc_exp_name"] == "tiny-exp"
    assert "git_commit" in run.data.tags
    assert run.data.metrics["n_images.train"] == 24.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"contact_sheet.png", "stats.json"} <= artifacts
    sheet = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="contact_sheet.png", dst_path=str(tmp_path / "dl")
    )
    assert Path(sheet).read_bytes() == (tmp_path / "prepared" / "contact_sheet.png").read_bytes()
