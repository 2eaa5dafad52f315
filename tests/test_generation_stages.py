"""train_prior, train_clip and sample stages on a tiny config: files, MLflow runs, resume after a kill, torchrun DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from test_dvae_stages import stage_args, tiny_params

from dalle import __main__ as cli
from dalle.data.shapes import canonical_caption, canonical_relation_caption
from dalle.data.store import load_split
from dalle.prior import load_prior
from pipelines import (
    ablate,
    ablation_study,
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

REPO = Path(__file__).resolve().parents[1]
PRIOR = dict(
    n_layers=2,
    n_heads=2,
    d_model=32,
    batch_size=8,
    steps=6,
    warmup_steps=2,
    val_images=8,
    log_every=2,
    val_every=3,
    sample_every=3,
    samples=4,
    checkpoint_every=2,
)


def prior_params(tmp_path: Path, experiment: str, **prior) -> Path:
    path = tiny_params(tmp_path, experiment)
    raw = yaml.safe_load(path.read_text())
    raw["prior"].update({**PRIOR, **prior})
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """prepared data, a dVAE and its tokens, as the stages before train_prior leave them."""
    root = tmp_path_factory.mktemp("upstream")
    params = str(prior_params(root, "test-prior-upstream"))
    prepare.main(["--params", params, "--out", str(root / "prepared")])
    train_dvae.main(stage_args(root, Path(params), root / "prepared"))
    encode.main(
        ["--params", params, "--prepared", str(root / "prepared"), "--models", str(root / "models")]
        + ["--out", str(root / "tokens"), "--reports", str(root / "enc")]
    )
    return root


def prior_args(tmp_path: Path, params: Path, upstream: Path) -> list[str]:
    return [
        "--params",
        str(params),
        "--prepared",
        str(upstream / "prepared"),
        "--tokens",
        str(upstream / "tokens"),
        "--dvae",
        str(upstream / "models"),
        "--models",
        str(tmp_path / "prior"),
        "--reports",
        str(tmp_path / "reports"),
        "--checkpoint",
        str(tmp_path / "ckpt" / "last.pt"),
    ]


def runs(client: MlflowClient, experiment: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], "tags.stage = 'train_prior'")


def test_train_prior_writes_model_reports_and_mlflow_run(tmp_path, upstream, mlflow_store):
    params = prior_params(tmp_path, "test-prior-stage", schedule="paper")  # the paper's sparse masks, not the default
    train_prior.main(prior_args(tmp_path, params, upstream))
    assert sorted(p.name for p in (tmp_path / "prior").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    prior = load_prior(tmp_path / "prior")
    assert prior.geometry.grid == 4 and prior.geometry.text_len == 32 and prior.geometry.image_vocab == 16
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["world_size"] == 1 and metrics["tokens_per_s"] > 0
    assert 0 < metrics["val_image_bits"] < 8 and metrics["val_text_nll"] > 0 and metrics["peak_memory_mb"] > 0
    with (tmp_path / "reports" / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert {"loss", "text_nll", "image_nll", "image_bits", "grad_norm", "lr", "tokens_per_s"} <= set(rows[0])
    assert (tmp_path / "reports" / "samples.png").is_file()
    assert not (tmp_path / "ckpt" / "last.pt").exists()

    client = MlflowClient(mlflow_store)
    (run,) = runs(client, "test-prior-stage")
    history = {key: client.get_metric_history(run.info.run_id, key) for key in ("train_image_bits", "val_text_nll")}
    assert [m.step for m in history["train_image_bits"]] == [2, 4, 6]
    assert [m.step for m in history["val_text_nll"]] == [3, 6]
    assert run.data.params["prior.schedule"] == "paper"
    assert len(client.list_artifacts(run.info.run_id, "images")) >= 2, "a sample grid at steps 3 and 6"


def test_train_prior_reads_in_the_configured_loader_order(tmp_path, upstream, mlflow_store):
    params = prior_params(tmp_path, "test-prior-stream")
    raw = yaml.safe_load(params.read_text())
    raw["loader"].update(order="stream", shuffle_block=16)
    params.write_text(yaml.safe_dump(raw))
    args = prior_args(tmp_path, params, upstream)
    args[args.index("--checkpoint") + 1] = str(tmp_path / "ckpt" / "stream.pt")
    train_prior.main(args)
    (run,) = runs(MlflowClient(mlflow_store), "test-prior-stream")
    assert run.data.params["loader.order"] == "stream" and run.data.params["loader.shuffle_block"] == "16"
    streamed = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    (tmp_path / "random").mkdir()
    train_prior.main(prior_args(tmp_path / "random", prior_params(tmp_path / "random", "x"), upstream))
    shuffled = json.loads((tmp_path / "random" / "reports" / "metrics.json").read_text())
    assert math.isfinite(streamed["val_image_bits"]) and streamed["val_image_bits"] != shuffled["val_image_bits"]


def test_resumes_after_a_kill_into_the_same_mlflow_run(tmp_path, upstream, mlflow_store, monkeypatch):
    params = prior_params(tmp_path, "test-prior-resume")
    original = train_prior.MlflowCallbacks.on_train_log

    def killed(self, step, metrics):
        original(self, step, metrics)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_prior.MlflowCallbacks, "on_train_log", killed)
    with pytest.raises(KeyboardInterrupt):
        train_prior.main(prior_args(tmp_path, params, upstream))
    assert (tmp_path / "ckpt" / "last.pt").is_file() and not (tmp_path / "prior").exists()
    monkeypatch.undo()
    train_prior.main(prior_args(tmp_path, params, upstream))
    (run,) = runs(MlflowClient(mlflow_store), "test-prior-resume")
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, upstream, mlflow_store, parallel):
    # No dropout: its masks are drawn per process, so two processes cannot draw the one process's masks.
    params = prior_params(tmp_path, f"test-prior-{parallel}", parallel=parallel, dropout=0.0)
    train_prior.main(prior_args(tmp_path / "one", params, upstream))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = prior_args(tmp_path / "two", params, upstream)
    result = subprocess.run(
        [*command, "-m", "pipelines.train_prior", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "reports" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "reports" / "metrics.json").read_text())
    assert two["world_size"] == 2
    for key in ("val_text_nll", "val_image_nll"):
        assert two[key] == pytest.approx(one[key], rel=1e-4)
    assert len(runs(MlflowClient(mlflow_store), f"test-prior-{parallel}")) == 2  # one per execution, rank 0 only
    # The exported weights are one whole state (gathered on rank 0 under FSDP) that load_prior reads as usual.
    whole, sharded = load_prior(tmp_path / "one" / "prior"), load_prior(tmp_path / "two" / "prior")
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert not list((tmp_path / "two" / "ckpt").glob("last.*"))  # no checkpoint file or sharded directory left


def test_without_a_dvae_names_the_stage_to_run(tmp_path, upstream):
    args = prior_args(tmp_path, prior_params(tmp_path, "x"), upstream)
    args[args.index("--dvae") + 1] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="run the train_dvae stage first"):
        train_prior.main(args)


def late_params(tmp_path: Path, experiment: str) -> Path:
    """Tiny params for the stages after train_prior."""
    params = prior_params(tmp_path, experiment)
    raw = yaml.safe_load(params.read_text())
    raw["clip"].update(batch_size=8, steps=6, warmup_steps=2, val_images=8, log_every=2, val_every=3)
    raw["clip"].update(text_width=32, text_heads=2, image_channels=8, image_stages=2, checkpoint_every=2)
    raw["sample"].update(n_captions=4, candidates=3, top=2, batch_size=2)
    raw["evalnet"].update(n_images=64, steps=4, batch_size=16)
    raw["eval"].update(n_captions=4, rerank_n=[1, 2, 3], blur_radii=[0, 8, 16])
    raw["ablation"].update(schedules=["paper", "row"], steps=3, n_captions=4)
    params.write_text(yaml.safe_dump(raw))
    return params


@pytest.fixture(scope="module")
def trained(tmp_path_factory, upstream) -> tuple[Path, Path]:
    """(params, models/) with a tiny prior, reranker and evaluation network beside the upstream dVAE."""
    root = tmp_path_factory.mktemp("trained")
    params = late_params(root, "test-late-stages")
    models = root / "models"
    args = prior_args(root, params, upstream)
    args[args.index("--models") + 1] = str(models / "prior")
    train_prior.main(args)
    train_clip.main(
        ["--params", str(params), "--prepared", str(upstream / "prepared"), "--tokens", str(upstream / "tokens")]
        + ["--models", str(models / "clip"), "--reports", str(root / "clip"), "--checkpoint", str(root / "c")]
    )
    train_evalnet.main(
        ["--params", str(params), "--prepared", str(upstream / "prepared")]
        + ["--models", str(models / "evalnet"), "--reports", str(root / "evalnet")]
    )
    (models / "dvae").symlink_to(upstream / "models")
    return params, models


def test_train_clip_then_sample_and_generate(tmp_path, upstream, trained, mlflow_store):
    params, models = trained
    assert {p.name for p in (models / "clip").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    clip_metrics = json.loads((models.parent / "clip" / "metrics.json").read_text())
    assert 0 <= clip_metrics["val_text_to_image_top1"] <= clip_metrics["val_text_to_image_top5"] <= 1

    sample.main(
        ["--params", str(params), "--prepared", str(upstream / "prepared"), "--models", str(models)]
        + ["--out", str(tmp_path / "samples"), "--reports", str(tmp_path / "sample")]
    )
    with (tmp_path / "samples" / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 2 and list(rows[0]) == ["caption", "path", "rank", "score"]
    assert all((tmp_path / "samples" / row["path"]).is_file() for row in rows)
    metrics = json.loads((tmp_path / "sample" / "metrics.json").read_text())
    for key in ("seen_all_n1", "seen_all_n3", "held_out_all_n1", "held_out_all_n3", "images_per_s", "cache_speedup"):
        assert key in metrics, key
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-late-stages").experiment_id
    (run,) = client.search_runs([experiment], "tags.stage = 'sample'")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"sheet.png", "manifest.csv"}
    (clip_run,) = client.search_runs([experiment], "tags.stage = 'train_clip'")
    assert [m.step for m in client.get_metric_history(clip_run.info.run_id, "val_text_to_image_top1")] == [3, 6]

    out = tmp_path / "cli"
    assert cli.main(["generate", "--caption", "a small red circle", "--out", str(out), "--models", str(models)]) == 0
    assert (out / "0_0.png").is_file() and (out / "sheet.png").is_file()


def test_evaluate_writes_every_metric_and_plot(tmp_path, upstream, trained, mlflow_store):
    params, models = trained
    evalnet_metrics = json.loads((models.parent / "evalnet" / "metrics.json").read_text())
    assert {"test_all_seen", "test_all_held_out"} <= set(evalnet_metrics)
    evaluate.main(
        ["--params", str(params), "--prepared", str(upstream / "prepared"), "--tokens", str(upstream / "tokens")]
        + ["--models", str(models), "--reports", str(tmp_path / "eval")]
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = {"fid_evalnet", "fid_evalnet_reconstruction", "headline_n", "reranker_score", "captions"}
    expected |= {"test_text_nll", "test_image_nll", "test_image_bits", "real_accuracy_all_seen"}
    attributes = ("colour", "shape", "size", "position", "all")
    expected |= {f"accuracy_{a}_{g}" for a in attributes for g in ("seen", "held_out")}
    expected |= {f"retrieval_{kind}_r{k}" for kind in ("text_to_image", "chance") for k in (1, 5, 10)}
    expected |= {f"judge_accuracy_{g}_n{n}{end}" for g in ("seen", "held_out") for n in (1, 2, 3) for end in JUDGED}
    assert expected <= set(metrics), expected - set(metrics)
    assert not [k for k in metrics if k.startswith("two_object")], "one object per image: no two-object captions"
    assert not [k for k in metrics if k.startswith("clip_score")], "the attribute network reads no CLIP-score"
    assert metrics["headline_n"] == 3 and metrics["fid_evalnet_reconstruction"] >= 0
    # Every value with its interval: bootstrap over images for FID, Wilson over captions for accuracies.
    for key in ("fid_evalnet", "fid_evalnet_reconstruction", "accuracy_all_seen", "real_accuracy_all_seen"):
        assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"], key
    assert metrics["accuracy_all_seen_low"] >= 0 and metrics["accuracy_all_seen_high"] <= 1
    assert {"accuracy_seen_n1", "accuracy_held_out_n3_high"} <= set(metrics)  # N=1 and the headline N
    assert metrics["fid_feature_dim"] == 64 and metrics["fid_generated_images"] == metrics["captions"] == 4
    assert metrics["fid_real_images"] == 8 and metrics["fid_bootstrap_resamples"] == 1000
    with (tmp_path / "eval" / "fid_vs_n.csv").open() as handle:
        assert [int(row["n"]) for row in csv.DictReader(handle)] == [1, 2, 3]
    with (tmp_path / "eval" / "fid_vs_blur.csv").open() as handle:
        blur_rows = list(csv.DictReader(handle))
    assert [float(r["sigma_px"]) for r in blur_rows] == [0.0, 0.5, 1.0]  # 16 px images: radii × 16/256
    assert all(
        float(r["fid_generated_low"]) <= float(r["fid_generated"]) <= float(r["fid_generated_high"]) for r in blur_rows
    )
    with (tmp_path / "eval" / "accuracy_by_attribute.csv").open() as handle:
        attribute_rows = list(csv.DictReader(handle))
    assert {"accuracy_low", "accuracy_high", "captions"} <= set(attribute_rows[0])
    for name in ("fid_vs_blur.png", "fid_vs_n.png", "accuracy_by_attribute.png", "accuracy_by_attribute.csv"):
        assert (tmp_path / "eval" / name).is_file(), name
    sheets = sorted(p.name for p in (tmp_path / "eval" / "sheets").iterdir())
    assert sheets == ["captions.csv", *(f"sheet_n{n}.png" for n in (1, 2, 3))]
    # Canonical captions of the chosen test images, each with the judge's verdict behind judge_accuracy_*_n3.
    test_records = load_split(upstream / "prepared", "test").records
    chosen = test_records.iloc[sample.caption_rows(test_records, 4)].to_dict("records")
    table = read_captions(tmp_path / "eval" / "sheets" / "captions.csv")
    assert [row["caption"] for row in table] == [
        canonical_caption(r["size"], r["colour"], r["shape"], r["position"]) for r in chosen
    ]
    for group, held_out in (("seen", "False"), ("held_out", "True")):
        verdicts = [row["judged_n3"] == "True" for row in table if row["held_out"] == held_out]
        assert len(verdicts) == 2 and metrics[f"judge_accuracy_{group}_n3"] == pytest.approx(np.mean(verdicts))
        assert metrics[f"judge_accuracy_{group}_n3_low"] <= metrics[f"judge_accuracy_{group}_n3"]
        # Every candidate judged: the pick is one of the 3, so a caption passed at N=3 has a right candidate.
        right = [int(row["right_of_n3"]) for row in table if row["held_out"] == held_out]
        assert all(0 <= r <= 3 for r in right) and all(r > 0 for r, v in zip(right, verdicts) if v)
        assert metrics[f"judge_candidates_{group}"] == pytest.approx(np.mean(right) / 3)
        assert metrics[f"judge_oracle_{group}_n3"] == pytest.approx(np.mean([r > 0 for r in right]))
        assert metrics[f"judge_oracle_{group}_n3"] >= metrics[f"judge_accuracy_{group}_n3"]
        low, high = metrics[f"judge_candidates_{group}_low"], metrics[f"judge_candidates_{group}_high"]
        assert low <= metrics[f"judge_candidates_{group}"] <= high
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-late-stages").experiment_id
    (run,) = client.search_runs([experiment], "tags.stage = 'evaluate'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fid_evalnet_vs_n")] == [1, 2, 3]


JUDGED = ("", "_low", "_high")


def read_captions(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_evaluate_two_object_scenes(tmp_path, upstream, trained, mlflow_store):
    """With data.max_objects 2, evaluate also generates canonical two-object captions and judges the scenes."""
    params, models = trained
    raw = yaml.safe_load(params.read_text())
    raw["mlflow"]["experiment"] = "test-two-object-eval"
    raw["data"].update(max_objects=2, n_test=32)  # 16 px holds two small shapes apart; ~16 two-object test images
    raw["eval"].update(rerank_n=[1, 3], blur_radii=[0])  # fewer bootstrapped FIDs: they are not what is checked
    two_params = tmp_path / "params.yaml"
    two_params.write_text(yaml.safe_dump(raw))
    prepare.main(["--params", str(two_params), "--out", str(tmp_path / "prepared")])
    # The models are the single-object ones: what is checked here is the two-object caption set and its judging.
    # The prior's NLL is read from the upstream test tokens, which these images were never encoded into.
    evaluate.main(
        ["--params", str(two_params), "--prepared", str(tmp_path / "prepared"), "--tokens", str(upstream / "tokens")]
        + ["--models", str(models), "--reports", str(tmp_path / "eval")]
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["two_object_captions_seen"] == metrics["two_object_captions_held_out"] == 2
    keys = [f"two_object_exact_{g}_n{n}" for g in ("seen", "held_out") for n in (1, 3)]
    keys += [f"two_object_{part}_{g}_n3" for part in ("relation", "objects") for g in ("seen", "held_out")]
    for key in keys:
        assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"], key
        assert 0 <= metrics[f"{key}_low"] < metrics[f"{key}_high"] <= 1, key
    assert "two_object_relation_seen_n1" not in metrics  # parts at the headline N only
    assert {"judge_accuracy_seen_n1", "accuracy_seen_n3"} <= set(metrics)  # the single-object evaluation is intact

    test_records = load_split(tmp_path / "prepared", "test").records
    table = [row for row in read_captions(tmp_path / "eval" / "sheets" / "captions.csv") if row["objects"] == "2"]
    held = {tuple(pair) for pair in raw["data"]["holdout_pairs"]}
    chosen = test_records.iloc[evaluate.two_object_rows(test_records, 4, held)].to_dict("records")
    assert [row["caption"] for row in table] == [
        canonical_relation_caption(*(r[k] for k in RELATION_FIELDS)) for r in chosen
    ]
    assert [r["n_objects"] for r in chosen] == [2] * 4
    assert [str(r["held_out"]) for r in chosen] == [row["held_out"] for row in table] == ["False"] * 2 + ["True"] * 2
    assert [(r["colour"], r["shape"]) in held for r in chosen[2:]] == [True, False], "held out in either object"
    for group, held_out in (("seen", "False"), ("held_out", "True")):
        verdicts = [row["judged_n3"] == "True" for row in table if row["held_out"] == held_out]
        assert metrics[f"two_object_exact_{group}_n3"] == pytest.approx(np.mean(verdicts))
    sheets = {p.name for p in (tmp_path / "eval" / "sheets").iterdir()}
    assert {"two_object_n1.png", "two_object_n3.png", "sheet_n3.png"} <= sheets


RELATION_FIELDS = ("size", "colour", "shape", "relation", "size2", "colour2", "shape2")


def test_ablation_runs_are_children_of_one_parent(tmp_path, upstream, trained, mlflow_store):
    params, models = trained
    common = ["--params", str(params), "--prepared", str(upstream / "prepared"), "--tokens", str(upstream / "tokens")]
    runs_dir = tmp_path / "ablation" / "runs"
    for schedule in ("paper", "row"):
        ablate.main(
            [*common, "--schedule", schedule, "--models", str(models), "--reports", str(runs_dir)]
            + ["--checkpoints", str(tmp_path / "ck")]
        )
    ablation_summary.main(["--params", str(params), "--runs", str(runs_dir), "--out", str(tmp_path / "ablation")])
    with (tmp_path / "ablation" / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["schedule"] for r in rows] == ["paper", "row"]
    assert {"fid_evalnet", "test_image_bits", "accuracy_all_held_out", "tokens_per_s", "peak_memory_mb"} <= set(rows[0])
    assert (tmp_path / "ablation" / "summary.png").is_file()

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test-late-stages").experiment_id
    (parent,) = client.search_runs([experiment], "tags.stage = 'ablation'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["ablation_schedule"] for c in children) == ["paper", "row"]
    assert parent.info.status == "FINISHED" and "paper.test_image_bits" in parent.data.metrics
    with pytest.raises(ValueError, match="not in ablation.schedules"):
        ablate.main([*common, "--schedule", "column", "--models", str(models), "--reports", str(runs_dir)])


def test_ablation_study_compares_each_schedule_with_full_over_seeds(tmp_path, upstream, trained, mlflow_store):
    params, models = trained
    raw = yaml.safe_load(params.read_text())
    raw["ablation"].update(schedules=["full", "row"], study_steps=3, study_captions=8, study_seeds=[0, 1])
    study_params = tmp_path / "params.yaml"
    study_params.write_text(yaml.safe_dump(raw))
    common = ["--params", str(study_params), "--prepared", str(upstream / "prepared")]
    common += ["--tokens", str(upstream / "tokens"), "--models", str(models), "--study"]
    runs_dir, checkpoints = tmp_path / "study" / "runs", tmp_path / "ck"
    for schedule in ("full", "row"):
        for seed in (0, 1):
            ablate.main(
                [*common, "--schedule", schedule, "--seed", str(seed), "--reports", str(runs_dir)]
                + ["--checkpoints", str(checkpoints)]
            )
    assert sorted(p.name for p in runs_dir.iterdir()) == [f"{s}-seed{n}" for s in ("full", "row") for n in (0, 1)]
    run = runs_dir / "row-seed1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["seed"], metrics["steps"], metrics["captions"]) == (1, 3, 8)
    # The per-image NLLs are the ones whose mean the stage reports, with a t-interval around it.
    bits = np.load(run / "test_image_bits.npy")
    assert bits.shape == (8,) and float(bits.mean()) == pytest.approx(metrics["test_image_bits"], rel=1e-5)
    assert metrics["test_image_bits_low"] < metrics["test_image_bits"] < metrics["test_image_bits_high"]
    assert np.load(run / "features.npy").shape == np.load(run / "real_features.npy").shape == (8, 64)
    with (run / "captions.csv").open() as handle:
        captions = list(csv.DictReader(handle))
    assert len(captions) == 8 and sum(row["held_out"] == "True" for row in captions) == 4
    assert np.mean([row["correct_all"] == "True" for row in captions if row["held_out"] == "False"]) == pytest.approx(
        metrics["accuracy_all_seen"]
    )
    with pytest.raises(ValueError, match=r"--seed 2 is not in ablation.study_seeds \[0, 1\]"):
        ablate.main([*common, "--schedule", "row", "--seed", "2"])

    ablation_study.main(["--params", str(study_params), "--runs", str(runs_dir), "--out", str(tmp_path / "study")])
    with (tmp_path / "study" / "summary.csv").open() as handle:
        summary = {row["schedule"]: row for row in csv.DictReader(handle)}
    assert list(summary) == ["full", "row"]
    assert summary["row"]["accuracy_seen_n"] == "8" and summary["row"]["fid_generated_images"] == "16"
    with (tmp_path / "study" / "differences.csv").open() as handle:
        diffs = {row["measure"]: row for row in csv.DictReader(handle)}
    assert list(diffs) == ["accuracy_seen", "accuracy_held_out", "fid", "test_image_bits"]
    for measure, row in diffs.items():  # paired differences: the difference of the two pooled values
        expected = float(summary["row"][measure]) - float(summary["full"][measure])
        assert float(row["difference"]) == pytest.approx(expected, abs=1e-6), measure
        assert float(row["low"]) <= float(row["difference"]) <= float(row["high"]), measure
        assert row["verdict"] == ablation_study.verdict(float(row["low"]), float(row["high"]), TIE[measure])
    flat = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert flat["row_minus_full.fid"] == pytest.approx(float(diffs["fid"]["difference"]))
    assert (tmp_path / "study" / "summary.png").is_file()


TIE = ablation_study.TIE_MARGIN


def test_verdict_names_differences_ties_and_the_rest():
    assert ablation_study.verdict(0.01, 0.2, 0.05) == "difference"
    assert ablation_study.verdict(-0.3, -0.01, 0.05) == "difference"
    assert ablation_study.verdict(-0.04, 0.05, 0.05) == "tie"
    assert ablation_study.verdict(-0.08, 0.03, 0.05) == "inconclusive"
