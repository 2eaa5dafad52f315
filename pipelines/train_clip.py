"""DVC stage ``train_clip``: ``data/prepared`` images + ``data/tokens`` captions → ``models/clip`` (the reranker,
safetensors + config.json + tokenizer.json) and ``reports/clip`` (metrics, history), one MLflow run with the loss
and validation retrieval curves. Resumes from ``checkpoints/clip`` after a kill.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import mlflow

from dalle.checkpoint import save_weights
from dalle.clip_train import Callbacks, train_clip
from dalle.data.store import load_split
from dalle.data.tokens import load_tokens
from dalle.text import TextTokenizer
from pipelines.params import load_params
from pipelines.reports import write_csv, write_json
from pipelines.tracking import MlflowCurves, training_run
from pipelines.train_dvae import PREPARED
from pipelines.train_dvae import data_fingerprint as prepared_fingerprint
from pipelines.train_prior import TOKENS
from pipelines.train_prior import data_fingerprint as tokens_fingerprint

MODEL_DIR = Path("models/clip")
REPORT_DIR = Path("reports/clip")
CHECKPOINT = Path("checkpoints/clip/last.pt")


class MlflowCallbacks(MlflowCurves, Callbacks):
    """Curves to MLflow (``MlflowCurves``); the trainer's other hooks stay no-ops."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--tokens", type=Path, default=TOKENS)
    parser.add_argument("--models", type=Path, default=MODEL_DIR)
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    cfg = params.clip
    cache = params.data.cache_mb * 2**20  # decoded into memory when a split fits, else read per batch
    train, val = load_split(args.prepared, "train", cache), load_split(args.prepared, "val", cache)
    train_tokens, val_tokens = load_tokens(args.tokens, "train"), load_tokens(args.tokens, "val")
    tokenizer = TextTokenizer.from_file(args.prepared / "tokenizer.json")
    fingerprint = prepared_fingerprint(args.prepared) + tokens_fingerprint(args.tokens)
    with training_run("train_clip", params, args.checkpoint, cfg.resume) as run:
        started = time.monotonic()
        result = train_clip(
            cfg,
            params.seed,
            tokenizer.vocab_size,
            train.images,
            train_tokens,
            val.images,
            val_tokens,
            args.checkpoint,
            fingerprint,
            MlflowCallbacks(),
        )
        seconds = time.monotonic() - started
        model = result.model
        config = {
            **dataclasses.asdict(cfg),
            "text_vocab": model.text_vocab,
            "text_len": model.text_len,
            "image_size": model.image_size,
        }
        save_weights(model, args.models, config)
        shutil.copyfile(args.prepared / "tokenizer.json", args.models / "tokenizer.json")
        metrics = {
            **result.final,
            "temperature": result.history[-1]["temperature"],
            "steps": cfg.steps,
            "train_seconds_this_run": round(seconds, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        write_json(args.reports / "metrics.json", metrics)
        write_csv(args.reports / "history.csv", result.history)
        write_csv(args.reports / "val_history.csv", result.val_history)
        for name in ("metrics.json", "history.csv", "val_history.csv"):
            mlflow.log_artifact(str(args.reports / name))
        mlflow.log_artifact(str(args.models / "config.json"), artifact_path="model")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not k.startswith("val_")})
    print(
        f"reranker: text→image top-1 {metrics['val_text_to_image_top1']:.1%}, "
        f"top-5 {metrics['val_text_to_image_top5']:.1%}, {seconds:.0f} s; MLflow run {run.info.run_id}"
    )


if __name__ == "__main__":
    main()
