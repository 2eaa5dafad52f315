"""Build ``data/prepared``: render or ingest images, split them, train the caption BPE, write stats.

Everything is written into a temporary sibling directory first and moved into place at the end, with
``stats.json`` last: a killed or failed run never leaves outputs that look complete, and a previous complete
run is only replaced once the new one is whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from dalle.config import Params
from dalle.data.ingest import Skipped, iter_real
from dalle.data.shapes import iter_shapes
from dalle.data.store import SPLITS, STATS_FILE, read_split, write_split
from dalle.text import TextTokenizer
from dalle.viz import contact_sheet

TOKENIZER_FILE = "tokenizer.json"
SHEET_FILE = "contact_sheet.png"
SHEET_IMAGES = 32


def prepare_dataset(params: Params, out_dir: str | Path) -> dict:
    """Write the prepared dataset for ``params`` to ``out_dir``; returns the stats also saved as stats.json."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts, skipped = _write_splits(params, tmp)
        splits = {split: read_split(tmp / split) for split in SPLITS}
        train_captions = [c for caps in splits["train"].records["captions"] for c in caps]
        tokenizer = TextTokenizer.train(train_captions, params.tokenizer.vocab_size)
        tokenizer.save(tmp / TOKENIZER_FILE)

        stats = _stats(params, splits, tokenizer, counts, skipped)
        _write_sheet(splits["train"], tmp / SHEET_FILE)
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        _publish(tmp, out_dir, [*SPLITS, TOKENIZER_FILE, SHEET_FILE, STATS_FILE])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def _write_splits(params: Params, tmp: Path):
    """Stream every split into ``tmp``; returns image counts per split and the inputs skipped (real data)."""
    cfg = params.data
    capacities = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    skipped = None if cfg.source == "shapes" else Skipped()
    try:
        if skipped is None:
            samples = {split: iter_shapes(cfg, params.seed, split, capacities[split]) for split in SPLITS}
        else:
            samples = iter_real(cfg, params.seed, skipped)
        counts = {
            split: write_split(tmp / split, samples[split], capacities[split], cfg.image_size, f"prepare {split}")
            for split in SPLITS
        }
    finally:  # report skipped files even when they leave nothing to prepare
        if skipped is not None:
            skipped.warn(f"data.path={cfg.path}")
    empty = [split for split, count in counts.items() if count == 0]
    if empty:
        raise ValueError(
            f"data.path={cfg.path}: no usable images left for split(s) {', '.join(empty)}; "
            f"skipped by reason: {skipped.counts() if skipped else {}}"
        )
    return counts, skipped


def _stats(params: Params, splits, tokenizer: TextTokenizer, counts: dict, skipped) -> dict:
    captions = [c for split in SPLITS for caps in splits[split].records["captions"] for c in caps]
    encoded = tokenizer.encode(captions, params.tokenizer.text_len)
    lengths = encoded.full_lengths
    stats = {
        "n_images": counts,
        "n_captions": {split: int(splits[split].records["captions"].map(len).sum()) for split in SPLITS},
        "caption_tokens": {
            "mean": round(float(lengths.mean()), 3),
            "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)),
            "p99": float(np.percentile(lengths, 99)),
            "max": int(lengths.max()),
        },
        "text_len": params.tokenizer.text_len,
        "n_truncated": int(encoded.truncated.sum()),
        "truncation_rate": round(float(encoded.truncated.mean()), 6),
        "vocab_size": tokenizer.vocab_size,
        "skipped": skipped.counts() if skipped is not None else {},
    }
    if "held_out" in splits["test"].records:
        stats["n_test_held_out"] = int(splits["test"].records["held_out"].sum())
    return stats


def _write_sheet(split, path: Path) -> None:
    n = min(SHEET_IMAGES, len(split))
    captions = [caps[0] for caps in split.records["captions"][:n]]
    contact_sheet(np.asarray(split.images[:n]), captions).save(path)


def _publish(tmp: Path, out_dir: Path, names: list[str]) -> None:
    """Move finished entries into ``out_dir`` one rename each; stats.json goes first out and last in."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STATS_FILE).unlink(missing_ok=True)
    for name in names:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
