"""DVC stage ``train_evalnet``: the evaluation instrument, independent of every model it judges → ``models/evalnet``
(safetensors + config.json whose ``kind`` says which) and ``reports/evalnet/metrics.json``.

Shapes (``kind: attributes``): the attribute network of ``dalle/evalnet.py``, trained to read colour, shape, size
and position; its penultimate layer is the feature space of ``fid_evalnet``. It trains on ``evalnet.n_images``
single-object shapes rendered with *every* colour-shape pair, not on the training split: an instrument that never
saw a red triangle cannot say whether a sample is one (trained on the training split it read held-out test images
right 53% of the time, against 100% when the renders cover every pair). The held-out pairs stay unseen by every
model that is evaluated. Metrics: its accuracy on the real test images, seen and held-out pairs apart.

Any other dataset (``kind: clip``): captions carry no labels, so the instrument is a second contrastive model
(``dalle/clip.py``), trained like the reranker (the ``clip`` section, on the training split) from another seed
(``data.seed`` + ``EVALNET_SEED_OFFSET``: other initial weights and batch order). Evaluation reads the CLIP-score
analogue of samples with it, never with the reranker that picked them. Metrics: its retrieval on val and test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dalle.checkpoint import save_weights
from dalle.clip_metrics import (
    RECALL_K,
    TOKENIZER_FILE,
    CaptionScorer,
    chance_recall,
    load_caption_scorer,
    text_to_image_recall,
)
from dalle.config import Params
from dalle.data.shapes import iter_shapes
from dalle.data.store import load_split
from dalle.evalnet import HEADS, EvalNet, caption_accuracy, load_evalnet, train_evalnet
from dalle.training import default_device
from pipelines.params import load_params
from pipelines.reports import write_json
from pipelines.tracking import log_metrics, stage_run, training_run
from pipelines.train_clip import ContrastiveData, fit, model_dims
from pipelines.train_dvae import PREPARED
from pipelines.train_prior import TOKENS

MODEL_DIR = Path("models/evalnet")
REPORT_DIR = Path("reports/evalnet")
CHECKPOINT = Path("checkpoints/evalnet/last.pt")
EVALNET_SEED_OFFSET = 7919
KIND_ATTRIBUTES = "attributes"  # shapes: dalle.evalnet.EvalNet
KIND_CLIP = "clip"  # any captioned data: dalle.clip_metrics.CaptionScorer


def load_evaluator(directory: Path, device: torch.device | str = "cpu") -> EvalNet | CaptionScorer:
    """The instrument ``train_evalnet`` wrote to ``directory``, of the kind its config.json names."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; run the train_evalnet stage first")
    config = json.loads(config_path.read_text())
    kind = config.get("kind", KIND_ATTRIBUTES)  # attribute networks were written before kinds were recorded
    if "fallback" in config or kind not in (KIND_ATTRIBUTES, KIND_CLIP):
        raise ValueError(f"{config_path}: not an evaluation model this code reads; run the train_evalnet stage again")
    return load_caption_scorer(directory, device) if kind == KIND_CLIP else load_evalnet(directory, device)


def single_objects(records) -> np.ndarray:
    """Rows of single-object images with every attribute labelled (shapes); empty for unlabelled data."""
    if not set(HEADS) <= set(records.columns) or "n_objects" not in records:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero((records["n_objects"] == 1).to_numpy())


def render_all_pairs(params) -> tuple[np.ndarray, list[dict]]:
    """``evalnet.n_images`` single-object shapes like the dataset's but with no pair held out, from their own
    random stream (the seed shifted by a constant, so none is a copy of a dataset image)."""
    data = dataclasses.replace(params.data, holdout_pairs=(), max_objects=1)
    pairs = list(iter_shapes(data, params.data.seed + EVALNET_SEED_OFFSET, "train", params.evalnet.n_images))
    return np.stack([image for image, _ in pairs]), [record for _, record in pairs]


def train_attribute_network(params: Params, args: argparse.Namespace) -> dict[str, float]:
    cfg = params.evalnet
    test = load_split(args.prepared, "test")
    with stage_run("train_evalnet", params, reports=args.reports, datasets=[args.prepared]):
        shutil.rmtree(args.models, ignore_errors=True)
        started = time.monotonic()
        images, records = render_all_pairs(params)
        model = train_evalnet(cfg, params.data.seed, images, records, default_device())
        seconds = time.monotonic() - started
        config = {"kind": KIND_ATTRIBUTES, **dataclasses.asdict(cfg), "image_size": params.data.image_size}
        save_weights(model, args.models, config)
        metrics: dict[str, float] = {"train_seconds": round(seconds, 1)}
        test_rows = single_objects(test.records)
        held_out_rows = test.records["held_out"].to_numpy()[test_rows] if "held_out" in test.records else None
        groups = np.zeros(len(test_rows), bool) if held_out_rows is None else held_out_rows
        for name, held_out in (("seen", False), ("held_out", True)):
            chosen = test_rows[groups == held_out]
            if len(chosen):
                accuracy = caption_accuracy(model, test.images[chosen], test.records.iloc[chosen].to_dict("records"))
                metrics.update({f"test_{key}_{name}": value for key, value in accuracy.items()})
        write_json(args.reports / "metrics.json", metrics)
        log_metrics(metrics)
    print(", ".join(f"{k} {v:.1%}" for k, v in metrics.items() if k.endswith(("all_seen", "all_held_out"))))
    return metrics


def train_caption_scorer(params: Params, args: argparse.Namespace) -> dict[str, float]:
    cfg, seed = params.clip, params.data.seed + EVALNET_SEED_OFFSET
    data = ContrastiveData.load(params, args.prepared, args.tokens)
    test = load_split(args.prepared, "test", params.data.cache_mb * 2**20)
    with training_run(
        "train_evalnet",
        params,
        args.checkpoint,
        cfg.resume,
        reports=args.reports,
        datasets=[args.prepared, args.tokens],
    ):
        shutil.rmtree(args.models, ignore_errors=True)
        result, seconds = fit(cfg, seed, data, args.checkpoint, params.loader)
        model = result.model
        config = {"kind": KIND_CLIP, **dataclasses.asdict(cfg), "seed": seed, **model_dims(model)}
        save_weights(model, args.models, config)
        shutil.copyfile(args.prepared / TOKENIZER_FILE, args.models / TOKENIZER_FILE)
        scorer = CaptionScorer(model, data.tokenizer)
        first_captions = [str(captions[0]) for captions in test.records["captions"]]
        recall = text_to_image_recall(scorer.embed_captions(first_captions), scorer.embed_images(test.images), RECALL_K)
        metrics: dict[str, float] = {
            **result.final,
            **{f"test_text_to_image_r{k}": value for k, value in recall.items()},
            **{f"test_chance_r{k}": chance_recall(len(test), k) for k in RECALL_K},
            "test_images": len(test),
            "seed": seed,
            "steps": cfg.steps,
            "train_seconds_this_run": round(seconds, 1),
        }
        write_json(args.reports / "metrics.json", metrics)
        log_metrics({k: float(v) for k, v in metrics.items() if not k.startswith("val_")})
    print(
        f"evalnet (contrastive scorer, seed {seed}): test text→image R@1 {metrics['test_text_to_image_r1']:.1%} "
        f"(chance {metrics['test_chance_r1']:.1%}), {seconds:.0f} s"
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--tokens", type=Path, default=TOKENS, help="caption tokens (datasets other than shapes)")
    parser.add_argument("--models", type=Path, default=MODEL_DIR)
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if params.data.source == "shapes":
        train_attribute_network(params, args)
    else:
        train_caption_scorer(params, args)


if __name__ == "__main__":
    main()
