"""DVC stage ``ablate@<schedule>`` (a ``foreach`` over ``ablation.schedules``): the attention-mask ablation.

Trains the prior with one attention schedule under ``ablation.steps`` (the rest of ``prior`` unchanged, same seed),
then scores it like ``evaluate`` at N = 1 (no reranking: the prior alone): FID against the real test images, what
the evaluation instrument reads (caption accuracy seen / held-out on shapes, the CLIP-score analogue on datasets
without attribute labels), test NLL, training tokens/s and peak memory. Writes
``reports/ablation/<schedule>/metrics.json``; MLflow gets one child run per schedule under one parent run per
ablation (found by a key of the params it shares), which ``ablation_summary`` completes.

The default pipeline's ablation is a smoke test (``ablation.steps``: 60, too few for any schedule to draw shapes).
``--study --seed N`` is one run of the study in ``pipelines/ablation/dvc.yaml``: ``ablation.study_steps`` steps and
``ablation.study_captions`` captions, into ``reports/ablation_study/runs/<schedule>-seed<N>/``, which also gets each
caption's judgement (``captions.csv``), the samples' and the test images' features (``features.npy``,
``real_features.npy``) and each test image's NLL
(``test_image_bits.npy``) for ``ablation_study``'s paired comparisons.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from dalle.clip_metrics import CaptionScorer
from dalle.config import Params
from dalle.data.store import load_split
from dalle.data.tokens import load_tokens
from dalle.evalnet import EvalNet, caption_hits
from dalle.generate import draw_one_each, load_models
from dalle.intervals import mean_interval
from dalle.masks import layer_kinds
from dalle.prior_train import Callbacks, evaluate_prior, geometry_of, image_bits_per_image, train_prior
from dalle.training import default_device
from pipelines.evaluate import accuracy_by_group, feature_space, fid_with_interval, group_sizes, with_interval
from pipelines.params import add_seed_argument, load_params
from pipelines.reports import write_csv, write_json
from pipelines.sample import caption_set
from pipelines.tracking import MlflowCurves, check_reachable, log_metrics, log_params, tracking_uri, training_run
from pipelines.train_dvae import PREPARED
from pipelines.train_evalnet import load_evaluator
from pipelines.train_prior import TOKENS, data_fingerprint, peak_memory_mb

MODELS = Path("models")
REPORT_DIR = Path("reports/ablation/runs")  # one folder per schedule; the summary sits one level up
CHECKPOINTS = Path("checkpoints/ablation")
STUDY_REPORT_DIR = Path("reports/ablation_study/runs")  # --study: one folder per schedule and seed
STUDY_CHECKPOINTS = Path("checkpoints/ablation_study")


def study_run_name(schedule: str, seed: int) -> str:
    """The study's folder for one schedule and training seed, e.g. ``paper-seed1``."""
    return f"{schedule}-seed{seed}"


class MlflowCallbacks(MlflowCurves, Callbacks):
    """Curves to MLflow (``MlflowCurves``); the trainer's other hooks stay no-ops."""


def ablation_key(params: Params, fingerprint: str) -> str:
    """Identifies one ablation: the schedules, their shared prior settings, seed and data."""
    shared = {k: v for k, v in params.flat().items() if k.startswith(("prior.", "ablation.", "sample.")) or k == "seed"}
    shared.pop("prior.schedule")
    return hashlib.sha256(json.dumps([shared, fingerprint], sort_keys=True, default=str).encode()).hexdigest()[:16]


def parent_run(params: Params, key: str) -> str:
    """The MLflow parent run of this ablation: the newest with this key, or a new one. Under DVC it is the one
    nested in this pipeline execution's run (``tracking.pipeline_tags``), so each execution shows its ablation."""
    from pipelines.tracking import _experiment_id, pipeline_tags

    uri = tracking_uri()
    check_reachable(uri)  # the child runs' probe comes too late for this one
    client = MlflowClient(uri)
    experiment_id = _experiment_id(params.mlflow.experiment, uri)
    nesting = pipeline_tags(params)  # {} outside DVC
    query = f"tags.ablation_key = '{key}' and tags.stage = 'ablation'"
    if nesting:
        query += f" and tags.pipeline_run_id = '{nesting['pipeline_run_id']}'"
    runs = client.search_runs([experiment_id], query, max_results=1)
    if runs:
        return runs[0].info.run_id
    tags = {"stage": "ablation", "ablation_key": key, **nesting}
    run = client.create_run(experiment_id, run_name="ablation", tags=tags)
    client.log_param(run.info.run_id, "ablation.schedules", ",".join(params.ablation.schedules))
    return run.info.run_id


def ablation_prior_config(params: Params, schedule: str, steps: int):
    return dataclasses.replace(
        params.prior,
        schedule=schedule,
        steps=steps,
        warmup_steps=min(params.prior.warmup_steps, steps // 2),
        log_every=min(params.prior.log_every, steps),
        val_every=steps,
        sample_every=steps,
        checkpoint_every=min(params.prior.checkpoint_every, steps),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schedule", required=True)
    parser.add_argument("--params", default="params.yaml")
    add_seed_argument(parser)
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--tokens", type=Path, default=TOKENS)
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--study", action="store_true", help="the study: ablation.study_* instead of the smoke test")
    parser.add_argument("--reports", type=Path, default=None, help=f"default {REPORT_DIR} ({STUDY_REPORT_DIR})")
    parser.add_argument("--checkpoints", type=Path, default=None, help=f"default {CHECKPOINTS} ({STUDY_CHECKPOINTS})")
    args = parser.parse_args(argv)

    params = load_params(args.params, args.seed)
    if args.schedule not in params.ablation.schedules:
        raise ValueError(f"--schedule {args.schedule!r} is not in ablation.schedules {list(params.ablation.schedules)}")
    study = params.ablation
    if args.study and params.seed not in study.study_seeds:
        raise ValueError(f"--seed {params.seed} is not in ablation.study_seeds {list(study.study_seeds)}")
    steps, n_captions = (study.study_steps, study.study_captions) if args.study else (study.steps, study.n_captions)
    reports = args.reports or (STUDY_REPORT_DIR if args.study else REPORT_DIR)
    checkpoints = args.checkpoints or (STUDY_CHECKPOINTS if args.study else CHECKPOINTS)
    name = study_run_name(args.schedule, params.seed) if args.study else args.schedule
    cfg = ablation_prior_config(params, args.schedule, steps)
    device = default_device()
    models = load_models(args.models, device)
    evaluator = load_evaluator(args.models / "evalnet", device)
    evalnet = evaluator if isinstance(evaluator, EvalNet) else None
    train_tokens, val_tokens = load_tokens(args.tokens, "train"), load_tokens(args.tokens, "val")
    geometry = geometry_of(train_tokens, models.tokenizer.vocab_size, models.dvae.cfg.codebook_size)
    fingerprint = data_fingerprint(args.tokens)
    parent = parent_run(params, ablation_key(params, fingerprint))
    checkpoint = checkpoints / f"{name}.pt"
    out = reports / name
    tags = {"mlflow.parentRunId": parent, "ablation_schedule": args.schedule}
    with training_run(
        f"ablate@{name}", params, checkpoint, cfg.resume, tags, reports=out, datasets=[args.tokens, args.prepared]
    ) as run:
        kinds = ",".join(layer_kinds(cfg.schedule, cfg.n_layers))  # logged again on a resume: the same values
        log_params({"ablation.schedule": args.schedule, "ablation.layer_kinds": kinds})
        started = time.monotonic()
        callbacks = MlflowCallbacks()
        result = train_prior(
            cfg,
            params.seed,
            geometry,
            train_tokens,
            val_tokens,
            checkpoint,
            fingerprint,
            callbacks,
            device=device,
            loader=params.loader,
        )
        seconds = time.monotonic() - started
        captions, records = caption_set(args.prepared, n_captions)
        prior_models = dataclasses.replace(models, prior=result.model)
        sampling = params.sample
        started_sampling = time.monotonic()
        filters = (sampling.temperature, sampling.top_k, sampling.top_p)
        images = draw_one_each(prior_models, captions, *filters, params.seed, sampling.batch_size)
        sampling_seconds = time.monotonic() - started_sampling
        name, features = feature_space(params.eval.fid_features, params.eval.inception_weights, models, evalnet)
        real = np.asarray(load_split(args.prepared, "test").images)
        test_tokens = load_tokens(args.tokens, "test")
        nll = evaluate_prior(result.model, test_tokens, len(real), device)
        bits = image_bits_per_image(result.model, test_tokens, len(real), device)
        generated, real_features = features(images), features(real)
        metrics = {
            "schedule": args.schedule,
            "seed": params.seed,
            "steps": cfg.steps,
            "captions": len(captions),
            **fid_with_interval(f"fid_{name}", real_features, generated, params.seed),
            "test_text_nll": nll["val_text_nll"],
            "test_image_bits": nll["val_image_bits"],
            **dict(zip(("test_image_bits_low", "test_image_bits_high"), mean_interval(bits))),
            "tokens_per_s": float(np.median([row["tokens_per_s"] for row in result.history])),
            "train_seconds_this_run": round(seconds, 1),
            "images_per_s": len(captions) / sampling_seconds,
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "mlflow_run_id": run.info.run_id,
            "mlflow_parent_run_id": parent,
        }
        sizes = group_sizes(records)
        for group, accuracy in accuracy_by_group(evalnet, images, records).items():
            metrics.update(with_interval(f"accuracy_all_{group}", accuracy["all"], sizes[group]))
        # What the study's paired comparisons need (same captions and test images for every schedule and seed):
        # each caption's judgement, the samples' features and each test image's NLL.
        out.mkdir(parents=True, exist_ok=True)
        per_caption = {"caption": captions, **({"held_out": records["held_out"]} if "held_out" in records else {})}
        if evalnet is not None:
            hits = caption_hits(evalnet, images, records.to_dict("records"))
            per_caption.update({f"correct_{k}": v for k, v in hits.items()})
        write_csv(out / "captions.csv", pd.DataFrame(per_caption).to_dict("records"))
        np.save(out / "features.npy", generated.astype(np.float32))
        np.save(out / "real_features.npy", real_features.astype(np.float32))
        np.save(out / "test_image_bits.npy", bits.astype(np.float32))
        if isinstance(evaluator, CaptionScorer):
            metrics["clip_score"] = evaluator.clip_score(images, captions)
        write_json(out / "metrics.json", metrics)
        write_csv(out / "history.csv", result.history)
        log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    print(f"ablate@{args.schedule}: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
