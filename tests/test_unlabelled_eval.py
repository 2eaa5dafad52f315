"""train_evalnet → sample → evaluate → ablate → ablation_summary on a captioned folder dataset without attribute
labels: an independent contrastive scorer is trained, retrieval beats chance, the CLIP-score analogue is finite,
shapes-only measures are absent, every declared output exists."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from test_dvae_stages import stage_args
from test_generation_stages import late_params, prior_args

from dalle.clip_metrics import load_caption_scorer
from dalle.config import DataConfig
from dalle.data.shapes import iter_shapes
from dalle.data.store import load_split
from pipelines import (
    ablate,
    ablation_summary,
    encode,
    evaluate,
    prepare,
    sample,
    train_clip,
    train_dvae,
    train_evalnet,
    train_prior,
)

EXPERIMENT = "test-unlabelled"
SHAPES_ONLY = ("accuracy_", "real_accuracy_", "seen_", "held_out_")
# Enough reranker steps on this easy data for retrieval to beat chance by a wide margin.
CLIP = dict(steps=80, batch_size=32, lr=3e-3, warmup_steps=8, val_every=40, log_every=20, checkpoint_every=40)


def write_folder(root: Path, n: int) -> Path:
    """``n`` rendered shapes as PNG + same-stem .txt captions: to the pipeline, a plain captioned folder."""
    root.mkdir(parents=True)
    cfg = dataclasses.replace(DataConfig(), image_size=32, holdout_pairs=())
    for index, (image, record) in enumerate(iter_shapes(cfg, 1, "train", n)):
        Image.fromarray(image).save(root / f"{index:04d}.png")
        (root / f"{index:04d}.txt").write_text("\n".join(record["captions"]) + "\n")
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """Paths of every stage's outputs, run in DAG order on the folder dataset."""
    root = tmp_path_factory.mktemp("unlabelled")
    params = late_params(root, EXPERIMENT)
    raw = yaml.safe_load(params.read_text())
    folder = write_folder(root / "folder", 400)
    raw["data"].update(source="folder", path=str(folder), n_train=160, n_val=8, n_test=16)
    raw["clip"].update(CLIP)
    raw["sample"].update(n_captions=6)
    raw["eval"].update(n_captions=6, sheet_captions=4)
    raw["ablation"].update(schedules=["row"])
    params.write_text(yaml.safe_dump(raw))
    p = {"root": root, "params": params, "prepared": root / "prepared", "tokens": root / "tokens"}
    p["models"] = root / "models"
    common = ["--params", str(params), "--prepared", str(p["prepared"])]
    prepare.main(["--params", str(params), "--out", str(p["prepared"])])
    train_dvae.main(stage_args(root / "dvae", params, p["prepared"]))
    (p["models"]).mkdir()
    (p["models"] / "dvae").symlink_to(root / "dvae" / "models")
    encode.main(
        [*common, "--models", str(p["models"] / "dvae"), "--out", str(p["tokens"])]
        + ["--reports", str(root / "reports" / "encode")]
    )
    args = prior_args(root, params, root / "dvae")
    args[args.index("--prepared") + 1], args[args.index("--tokens") + 1] = str(p["prepared"]), str(p["tokens"])
    args[args.index("--models") + 1] = str(p["models"] / "prior")
    train_prior.main(args)
    with_tokens = [*common, "--tokens", str(p["tokens"])]
    train_clip.main(
        [*with_tokens, "--models", str(p["models"] / "clip"), "--reports", str(root / "reports" / "clip")]
        + ["--checkpoint", str(root / "ck" / "clip.pt")]
    )
    train_evalnet.main(
        [*with_tokens, "--models", str(p["models"] / "evalnet"), "--reports", str(root / "reports" / "evalnet")]
        + ["--checkpoint", str(root / "ck" / "evalnet.pt")]
    )
    sample.main(
        [*common, "--models", str(p["models"]), "--out", str(root / "samples")]
        + ["--reports", str(root / "reports" / "sample")]
    )
    evaluate.main([*with_tokens, "--models", str(p["models"]), "--reports", str(root / "reports" / "eval")])
    runs = root / "reports" / "ablation" / "runs"
    ablate.main(
        [*with_tokens, "--schedule", "row", "--models", str(p["models"]), "--reports", str(runs)]
        + ["--checkpoints", str(root / "ck" / "ablation")]
    )
    ablation_summary.main(["--params", str(params), "--runs", str(runs), "--out", str(runs.parent)])
    return p


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_no_shapes_keys(metrics: dict) -> None:
    assert not [k for k in metrics if k.startswith(SHAPES_ONLY)], metrics


def test_prepared_data_has_no_labels(pipeline):
    records = load_split(pipeline["prepared"], "test").records
    assert len(records) == 16 and not {"colour", "shape", "held_out", "n_objects"} & set(records.columns)


def test_evalnet_is_a_second_contrastive_model_not_the_reranker(pipeline):
    config = read(pipeline["models"] / "evalnet" / "config.json")
    assert config["kind"] == "clip" and config["seed"] == 0 + train_evalnet.EVALNET_SEED_OFFSET
    assert {p.name for p in (pipeline["models"] / "evalnet").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    scorer = train_evalnet.load_evaluator(pipeline["models"] / "evalnet")
    reranker = load_caption_scorer(pipeline["models"] / "clip")
    evalnet_weights = scorer.model.image.proj.weight
    assert not evalnet_weights.allclose(reranker.model.image.proj.weight)
    metrics = read(pipeline["root"] / "reports" / "evalnet" / "metrics.json")
    assert metrics["test_text_to_image_r1"] > metrics["test_chance_r1"] == 1 / 16


def test_sample_gives_clip_scores_and_no_accuracy(pipeline):
    metrics = read(pipeline["root"] / "reports" / "sample" / "metrics.json")
    assert_no_shapes_keys(metrics)
    for key in ("clip_score_n1", "clip_score_n3"):
        assert 0 <= metrics[key] <= 100, key


def test_evaluate_metrics_without_labels(pipeline, mlflow_store):
    out = pipeline["root"] / "reports" / "eval"
    metrics = read(out / "metrics.json")
    assert_no_shapes_keys(metrics)
    expected = {"fid_reranker", "fid_reranker_reconstruction", "test_text_nll", "test_image_nll", "test_image_bits"}
    expected |= {"clip_score", "clip_score_n1", "clip_score_real", "retrieval_images"}
    expected |= {f"retrieval_{kind}_r{k}" for kind in ("text_to_image", "chance") for k in (1, 5, 10)}
    assert expected <= set(metrics), expected - set(metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["retrieval_images"] == 16 and metrics["retrieval_chance_r1"] == 1 / 16
    assert metrics["retrieval_text_to_image_r1"] > 2 * metrics["retrieval_chance_r1"]
    assert metrics["retrieval_text_to_image_r5"] > metrics["retrieval_chance_r5"] == 5 / 16
    assert 0 <= metrics["clip_score_n1"] <= 100 and 0 <= metrics["clip_score"] <= 100
    assert metrics["clip_score_real"] > 0  # real pairs agree in the scorer's eyes

    with (out / "fid_vs_n.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["n"]) for r in rows] == [1, 2, 3]
    assert {r["accuracy_seen"] for r in rows} == {""} and all(float(r["clip_score"]) >= 0 for r in rows)
    assert float(rows[0]["clip_score"]) == pytest.approx(metrics["clip_score_n1"])
    with (out / "accuracy_by_attribute.csv").open() as handle:
        header = "attribute,group,accuracy,accuracy_low,accuracy_high,captions"
        assert handle.read().strip() == header  # declared by DVC, so present but empty
    for name in ("accuracy_by_attribute.png", "fid_vs_n.png", "fid_vs_blur.png", "fid_vs_blur.csv"):
        assert (out / name).is_file(), name
    sheets = sorted(p.name for p in (out / "sheets").iterdir())
    assert sheets == ["captions.csv", "sheet_n1.png", "sheet_n2.png", "sheet_n3.png"]
    assert Image.open(out / "sheets" / "sheet_n3.png").width == 4 * 128  # sheet_captions=4, one row

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment], "tags.stage = 'evaluate'")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "sheets")} >= {"sheets/sheet_n3.png"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "clip_score_vs_n")] == [1, 2, 3]
    assert "accuracy_seen_vs_n" not in run.data.metrics


def test_ablation_without_labels(pipeline):
    runs = pipeline["root"] / "reports" / "ablation"
    metrics = read(runs / "runs" / "row" / "metrics.json")
    assert_no_shapes_keys(metrics)
    assert math.isfinite(metrics["fid_reranker"]) and 0 <= metrics["clip_score"] <= 100
    with (runs / "summary.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert set(row) == {
        "schedule",
        "fid_reranker",
        "fid_reranker_low",
        "fid_reranker_high",
        "clip_score",
        "test_image_bits",
        "test_image_bits_low",
        "test_image_bits_high",
        "test_text_nll",
        "tokens_per_s",
        "peak_memory_mb",
    }
    assert (runs / "summary.png").is_file()
