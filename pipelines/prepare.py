"""DVC stage ``prepare``: params ``seed``, ``data``, ``tokenizer`` → ``data/prepared/`` (+ an MLflow run)."""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow

from dalle.data.prepare import SHEET_FILE, prepare_dataset
from dalle.data.store import STATS_FILE
from pipelines.params import load_params
from pipelines.tracking import flat_metrics, stage_run

OUT_DIR = Path("data/prepared")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default: {OUT_DIR})")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    with stage_run("prepare", params):
        stats = prepare_dataset(params, args.out)
        mlflow.log_metrics(flat_metrics(stats))
        mlflow.log_artifact(str(args.out / SHEET_FILE))
        mlflow.log_artifact(str(args.out / STATS_FILE))
    n = stats["n_images"]
    print(
        f"prepared {n['train']} train / {n['val']} val / {n['test']} test images in {args.out}; "
        f"caption tokens p99 {stats['caption_tokens']['p99']:.0f}, truncated {stats['truncation_rate']:.2%}"
    )


if __name__ == "__main__":
    main()
