"""DVC stage ``train_evalnet``: the evaluation network (``dalle/evalnet.py``), trained to read colour, shape, size and
position → ``models/evalnet`` (safetensors + config.json) and ``reports/evalnet/metrics.json`` with its accuracy on
the real test images, seen and held-out pairs apart. Its penultimate layer is the feature space of ``fid_evalnet``.

It trains on ``evalnet.n_images`` single-object shapes rendered with *every* colour-shape pair, not on the
training split: an instrument that never saw a red triangle cannot say whether a sample is one (trained on the
training split it read held-out test images right 53% of the time, against 100% when the renders cover every
pair). The held-out pairs stay unseen by every model that is evaluated. Datasets other than shapes get no
network: the evaluation falls back to the reranker's image embeddings (``fid_reranker``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import mlflow
import numpy as np

from dalle.checkpoint import save_weights
from dalle.data.shapes import iter_shapes
from dalle.data.store import load_split
from dalle.evalnet import HEADS, caption_accuracy, train_evalnet
from dalle.training import default_device
from pipelines.params import load_params
from pipelines.reports import write_json
from pipelines.tracking import stage_run
from pipelines.train_dvae import PREPARED

MODEL_DIR = Path("models/evalnet")
REPORT_DIR = Path("reports/evalnet")
EVALNET_SEED_OFFSET = 7919


def single_objects(records) -> np.ndarray:
    """Rows of single-object images with every attribute labelled (shapes); empty for unlabelled data."""
    if not set(HEADS) <= set(records.columns) or "n_objects" not in records:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero((records["n_objects"] == 1).to_numpy())


def render_all_pairs(params) -> tuple[np.ndarray, list[dict]]:
    """``evalnet.n_images`` single-object shapes like the dataset's but with no pair held out, from their own
    random stream (the seed shifted by a constant, so none is a copy of a dataset image)."""
    data = dataclasses.replace(params.data, holdout_pairs=(), max_objects=1)
    pairs = list(iter_shapes(data, params.seed + EVALNET_SEED_OFFSET, "train", params.evalnet.n_images))
    return np.stack([image for image, _ in pairs]), [record for _, record in pairs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--models", type=Path, default=MODEL_DIR)
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    cfg = params.evalnet
    test = load_split(args.prepared, "test")
    with stage_run("train_evalnet", params):
        shutil.rmtree(args.models, ignore_errors=True)
        if params.data.source != "shapes":  # nothing to learn from: say so in the outputs DVC tracks
            args.models.mkdir(parents=True)
            (args.models / "config.json").write_text(json.dumps({"fallback": "reranker"}) + "\n")
            write_json(args.reports / "metrics.json", {"fallback": "reranker"})
            print("evalnet: no attribute labels in this dataset; evaluation uses the reranker's embeddings")
            return
        started = time.monotonic()
        images, records = render_all_pairs(params)
        model = train_evalnet(cfg, params.seed, images, records, default_device())
        seconds = time.monotonic() - started
        save_weights(model, args.models, {**dataclasses.asdict(cfg), "image_size": params.data.image_size})
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
        mlflow.log_metrics(metrics)
    print(", ".join(f"{k} {v:.1%}" for k, v in metrics.items() if k.endswith(("all_seen", "all_held_out"))))


if __name__ == "__main__":
    main()
