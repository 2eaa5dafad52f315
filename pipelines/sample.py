"""DVC stage ``sample``: generations with reranking for a fixed caption set of the test split (half seen
combinations, half held-out ones on shapes) → ``reports/samples/`` (the ``python -m dalle generate`` format:
PNGs, manifest.csv, sheet.png) and ``reports/sample/metrics.json``: caption accuracy by the pixel-rule judge of
the best of N candidates and of the first candidate alone (N = 1, no reranking), and sampling speed with and
without the key/value cache. On datasets without attribute labels the judge has nothing to check, and the same
two picks get the CLIP-score analogue of the independent scorer of ``train_evalnet`` instead (``clip_score_n1``,
``clip_score_n<N>``). One MLflow run with the contact sheet.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dalle.clip_metrics import CaptionScorer, clip_score
from dalle.data.judge import attribute_accuracy
from dalle.data.store import load_split
from dalle.generate import Candidates, generate, load_models, write_outputs
from dalle.sampling import sample_image_tokens
from dalle.training import default_device
from pipelines.params import add_seed_argument, load_params
from pipelines.reports import write_json
from pipelines.tracking import log_artifact, log_metrics, stage_run
from pipelines.train_dvae import PREPARED
from pipelines.train_evalnet import load_evaluator

MODELS = Path("models")
OUT = Path("reports/samples")
REPORT_DIR = Path("reports/sample")


def caption_rows(records: pd.DataFrame, n: int) -> np.ndarray:
    """Row numbers of the ``n`` test images whose first captions are generated: on shapes, single-object images,
    half with seen (colour, shape) pairs and half with held-out ones; otherwise the first ``n``."""
    records = records.reset_index(drop=True)
    if {"n_objects", "held_out"} <= set(records.columns):
        single = records[records["n_objects"] == 1]
        held_out = single[single["held_out"]].head(n // 2)
        records = pd.concat([single[~single["held_out"]].head(n - len(held_out)), held_out])
    else:
        records = records.head(n)
    return records.index.to_numpy()


def caption_set(prepared: Path, n: int) -> tuple[list[str], pd.DataFrame]:
    """First captions of the ``caption_rows`` test images, and their records."""
    records = load_split(prepared, "test").records
    records = records.iloc[caption_rows(records, n)].reset_index(drop=True)
    return [str(captions[0]) for captions in records["captions"]], records


def clip_scores(scorer: CaptionScorer, results: list[Candidates], candidates: int) -> dict[str, float]:
    """CLIP-score analogue (``dalle.clip_metrics``) of candidate 0 (``n1``) and of the reranked best."""
    text = scorer.embed_captions([r.caption for r in results])
    picks = {"n1": [r.images[0] for r in results], f"n{candidates}": [r.best(1)[0][0] for r in results]}
    return {
        f"clip_score_{label}": clip_score(scorer.embed_images(np.stack(images)), text)
        for label, images in picks.items()
    }


def accuracy(results: list[Candidates], records: pd.DataFrame, candidates: int) -> dict[str, float]:
    """Judged caption accuracy (per attribute and all four) of the reranked best and of candidate 0."""
    metrics: dict[str, float] = {}
    if "held_out" not in records:
        return metrics
    for group, held_out in (("seen", False), ("held_out", True)):
        rows = np.flatnonzero(records["held_out"].to_numpy() == held_out)
        if not len(rows):
            continue
        chosen = records.iloc[rows].to_dict("records")
        for label, pick in (("n1", lambda r: r.images[0]), (f"n{candidates}", lambda r: r.best(1)[0][0])):
            scores = attribute_accuracy([pick(results[i]) for i in rows], chosen)
            metrics.update({f"{group}_{attribute}_{label}": value for attribute, value in scores.items()})
    return metrics


@torch.no_grad()
def cache_speedup(models, caption: str, batch: int = 16) -> dict[str, float]:
    """Images/s of one batch sampled with the key/value cache and by recomputing the prefix at every position."""
    encoded = models.tokenizer.encode([caption], models.prior.geometry.text_len)
    device = models.device
    ids = torch.from_numpy(encoded.ids.astype(np.int64)).to(device).expand(batch, -1)
    lengths = torch.from_numpy(encoded.lengths.astype(np.int64)).to(device).expand(batch)
    speed = {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        started = time.perf_counter()
        generator = torch.Generator(device).manual_seed(0)
        sample_image_tokens(models.prior, ids, lengths, generator=generator, use_cache=use_cache)
        speed[f"images_per_s_{name}"] = batch / (time.perf_counter() - started)
    speed["cache_speedup"] = speed["images_per_s_cached"] / speed["images_per_s_uncached"]
    return speed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    add_seed_argument(parser)
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--evalnet", type=Path, default=None, help="evaluation network (default: MODELS/evalnet)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)

    params = load_params(args.params, args.seed)
    cfg = params.sample
    models = load_models(args.models, default_device())
    evaluator = load_evaluator(args.evalnet or args.models / "evalnet", models.device)
    captions, records = caption_set(args.prepared, cfg.n_captions)
    with stage_run("sample", params, reports=args.reports) as run:
        started = time.monotonic()
        results = list(
            generate(
                models,
                captions,
                cfg.candidates,
                cfg.temperature,
                cfg.top_k,
                cfg.top_p,
                cfg.guidance_scale,
                params.seed,
                cfg.batch_size,
            )
        )
        seconds = time.monotonic() - started
        write_outputs(args.out, results, cfg.top)
        metrics = {
            **accuracy(results, records, cfg.candidates),
            **(clip_scores(evaluator, results, cfg.candidates) if isinstance(evaluator, CaptionScorer) else {}),
            "mean_best_score": float(np.mean([r.scores.max() for r in results])),
            "images_per_s": len(captions) * cfg.candidates / seconds,
            **cache_speedup(models, captions[0]),
            "captions": len(captions),
            "candidates": cfg.candidates,
        }
        write_json(args.reports / "metrics.json", metrics)
        log_metrics(metrics)
        log_artifact(str(args.out / "sheet.png"))
        log_artifact(str(args.out / "manifest.csv"))
    headline = ("all_n1", f"all_n{cfg.candidates}")
    summary = ", ".join(
        f"{k} {v:.1f}" if k.startswith("clip_score") else f"{k} {v:.0%}"
        for k, v in metrics.items()
        if k.endswith(headline) or k.startswith("clip_score")
    )
    print(f"sample: {summary}; {metrics['images_per_s']:.0f} images/s; MLflow run {run.info.run_id}")


if __name__ == "__main__":
    main()
