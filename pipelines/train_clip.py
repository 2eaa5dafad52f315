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

from dalle.checkpoint import save_weights
from dalle.clip import Clip
from dalle.clip_train import Callbacks, TrainResult, train_clip
from dalle.config import ClipConfig, LoaderConfig, Params
from dalle.data.store import Split, load_split
from dalle.data.tokens import TokenSplit, load_tokens
from dalle.text import TextTokenizer
from pipelines.params import add_seed_argument, load_params
from pipelines.reports import write_csv, write_json
from pipelines.tracking import MlflowCurves, log_artifact, log_metrics, training_run
from pipelines.train_dvae import PREPARED
from pipelines.train_dvae import data_fingerprint as prepared_fingerprint
from pipelines.train_prior import TOKENS
from pipelines.train_prior import data_fingerprint as tokens_fingerprint

MODEL_DIR = Path("models/clip")
REPORT_DIR = Path("reports/clip")
CHECKPOINT = Path("checkpoints/clip/last.pt")


class MlflowCallbacks(MlflowCurves, Callbacks):
    """Curves to MLflow (``MlflowCurves``); the trainer's other hooks stay no-ops."""


@dataclasses.dataclass(frozen=True)
class ContrastiveData:
    """What a contrastive model trains on: prepared images, caption tokens, the tokenizer and their fingerprint."""

    train: Split
    val: Split
    train_tokens: TokenSplit
    val_tokens: TokenSplit
    tokenizer: TextTokenizer
    fingerprint: str

    @classmethod
    def load(cls, params: Params, prepared: Path, tokens: Path) -> ContrastiveData:
        cache = params.data.cache_mb * 2**20  # decoded into memory when a split fits, else read per batch
        return cls(
            train=load_split(prepared, "train", cache),
            val=load_split(prepared, "val", cache),
            train_tokens=load_tokens(tokens, "train"),
            val_tokens=load_tokens(tokens, "val"),
            tokenizer=TextTokenizer.from_file(prepared / "tokenizer.json"),
            fingerprint=prepared_fingerprint(prepared) + tokens_fingerprint(tokens),
        )


def fit(
    cfg: ClipConfig, seed: int, data: ContrastiveData, checkpoint: Path, loader: LoaderConfig
) -> tuple[TrainResult, float]:
    """Train (or resume) a contrastive model on ``data``, read in ``loader.order``, with curves to the active
    MLflow run; returns the result and the seconds this run took."""
    started = time.monotonic()
    result = train_clip(
        cfg,
        seed,
        data.tokenizer.vocab_size,
        data.train.images,
        data.train_tokens,
        data.val.images,
        data.val_tokens,
        checkpoint,
        data.fingerprint,
        MlflowCallbacks(),
        loader=loader,
    )
    return result, time.monotonic() - started


def model_dims(model: Clip) -> dict[str, int]:
    """The sizes config.json records beside the ``clip`` settings, so the model loads without the data."""
    return {"text_vocab": model.text_vocab, "text_len": model.text_len, "image_size": model.image_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    add_seed_argument(parser)
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--tokens", type=Path, default=TOKENS)
    parser.add_argument("--models", type=Path, default=MODEL_DIR)
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args(argv)

    params = load_params(args.params, args.seed)
    cfg = params.clip
    data = ContrastiveData.load(params, args.prepared, args.tokens)
    with training_run(
        "train_clip", params, args.checkpoint, cfg.resume, reports=args.reports, datasets=[args.prepared, args.tokens]
    ) as run:
        result, seconds = fit(cfg, params.seed, data, args.checkpoint, params.loader)
        model = result.model
        config = {**dataclasses.asdict(cfg), **model_dims(model)}
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
            log_artifact(str(args.reports / name))
        log_artifact(str(args.models / "config.json"), artifact_path="model")
        log_metrics({k: float(v) for k, v in metrics.items() if not k.startswith("val_")})
    print(
        f"reranker: text→image top-1 {metrics['val_text_to_image_top1']:.1%}, "
        f"top-5 {metrics['val_text_to_image_top5']:.1%}, {seconds:.0f} s; MLflow run {run.info.run_id}"
    )


if __name__ == "__main__":
    main()
