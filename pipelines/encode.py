"""DVC stage ``encode``: every split of ``data/prepared`` through the trained dVAE → ``data/tokens``, plus
codebook usage over the whole training set in ``reports/encode``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import torch

from dalle.data.store import SPLITS, load_split
from dalle.data.tokens import encode_split
from dalle.dvae import load_dvae
from dalle.dvae_train import codebook_usage
from dalle.text import TextTokenizer
from dalle.training import default_device
from pipelines.params import load_params
from pipelines.reports import write_csv
from pipelines.tracking import stage_run
from pipelines.train_dvae import MODEL_DIR, PREPARED

TOKENS = Path("data/tokens")
REPORT_DIR = Path("reports/encode")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--models", type=Path, default=MODEL_DIR)
    parser.add_argument("--out", type=Path, default=TOKENS)
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if not (args.models / "model.safetensors").is_file():
        raise FileNotFoundError(f"{args.models}/model.safetensors not found; run the train_dvae stage first")
    model = load_dvae(args.models, default_device())
    tokenizer = TextTokenizer.from_file(args.prepared / "tokenizer.json")
    with stage_run("encode", params):
        tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
        try:  # built aside and moved into place whole: a killed run never leaves half a token set
            counts = {}
            for split in SPLITS:
                prepared_split = load_split(args.prepared, split)
                text_len = params.tokenizer.text_len
                counts[split] = encode_split(
                    model, tokenizer, prepared_split, text_len, tmp / split, desc=f"encode {split}"
                )
            shutil.rmtree(args.out, ignore_errors=True)
            tmp.rename(args.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        usage = counts["train"]["code_counts"]

        metrics = {f"train_{k}": v for k, v in codebook_usage(torch.from_numpy(usage)).items()}
        metrics["grid"] = params.data.image_size // model.cfg.downsample
        metrics["captions"] = {split: c["captions"] for split, c in counts.items()}
        metrics["captions_truncated"] = {split: c["truncated"] for split, c in counts.items()}
        args.reports.mkdir(parents=True, exist_ok=True)
        (args.reports / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        ranked = np.sort(usage)[::-1]
        write_csv(args.reports / "codebook_usage.csv", [{"rank": i, "count": int(c)} for i, c in enumerate(ranked)])
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not isinstance(v, dict)})
        mlflow.log_artifact(str(args.reports / "codebook_usage.csv"))
    print(
        f"encoded {sum(c['captions'] for c in counts.values())} captions; "
        f"{metrics['train_used_fraction']:.0%} of codes used on train (perplexity {metrics['train_perplexity']:.0f})"
    )


if __name__ == "__main__":
    main()
