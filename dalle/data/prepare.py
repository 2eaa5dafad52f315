"""Build ``data/prepared``: render or ingest images into sharded splits, train the caption BPE, write stats.

Units of work are staged in ``.prepared.staging`` beside the output (``dalle/data/ingest.py``) and the whole
result is assembled there, then moved into place at the end with ``stats.json`` last: a killed or failed run
never leaves outputs that look complete, a previous complete run is only replaced once the new one is whole, and
a rerun after a kill keeps the finished units. Once published, the staging area is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from dalle.config import Params
from dalle.data.ingest import Skipped, build_units, capacities, plan_units, publish
from dalle.data.store import FORMAT, INDEX_FILE, RECORDS_FILE, SPLITS, STATS_FILE, caption_lists, read_split
from dalle.text import TextTokenizer
from dalle.viz import contact_sheet

TOKENIZER_FILE = "tokenizer.json"
SHEET_FILE = "contact_sheet.png"
SHEET_IMAGES = 32


def prepare_dataset(params: Params, out_dir: str | Path, units: slice | None = None) -> dict | None:
    """Write the prepared dataset for ``params`` to ``out_dir``; returns the stats also saved as stats.json.

    Work is staged unit by unit in ``.<out_dir>.staging`` beside the output: a killed run resumes where it
    stopped. With ``units``, only that range of units is built into the staging area and nothing is published
    (returns None): several machines can build one dataset, and a final call without ``units`` publishes it.
    """
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    cfg = params.data
    _open_staging(staging, params)
    plan = plan_units(cfg, cfg.seed)
    if units is not None:
        build_units(cfg, cfg.seed, plan[units], staging)
        return None
    unit_ids = build_units(cfg, cfg.seed, plan, staging, capacities(cfg))
    skipped = Skipped()
    tmp = staging / "publish"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts, over_cap = publish(unit_ids, staging, tmp, cfg, skipped)
        _check_not_empty(counts, skipped, cfg)
        train_captions = (c for batch in caption_lists(tmp / "train") for caps in batch for c in caps)
        tokenizer = TextTokenizer.train(train_captions, params.tokenizer.vocab_size)
        tokenizer.save(tmp / TOKENIZER_FILE)

        stats = _stats(params, tmp, tokenizer, counts, skipped if cfg.source != "shapes" else None)
        if cfg.source != "shapes":
            stats["over_cap"] = over_cap
        stats["units"] = len(plan)
        _write_sheet(read_split(tmp / "train", cache_bytes=0), tmp / SHEET_FILE)  # 32 images, not the split
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        _publish(tmp, out_dir, [*SPLITS, TOKENIZER_FILE, SHEET_FILE, STATS_FILE])
    except ValueError:  # bad input: nothing worth resuming
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if cfg.source != "shapes":
            skipped.warn(f"data.path={cfg.path}")
    shutil.rmtree(staging)
    return stats


def _open_staging(staging: Path, params: Params) -> None:
    """Reuse ``staging`` if it was made for the same data settings; otherwise start it afresh."""
    settings = {k: v for k, v in params.flat().items() if k.startswith("data.")}
    for key in ("data.workers", "data.cache_mb", "data.n_train", "data.n_val", "data.n_test"):
        settings.pop(key)  # how fast or how much, not what: units stay valid
    fingerprint = json.dumps({"format": FORMAT, "settings": settings}, sort_keys=True, default=str)
    marker = staging / "fingerprint.json"
    if staging.is_dir() and not (marker.is_file() and marker.read_text() == fingerprint):
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        marker.write_text(fingerprint)
    for leftover in staging.glob("*.tmp-*"):  # pieces of a killed worker's unit
        leftover.unlink()


def _check_not_empty(counts: dict[str, int], skipped: Skipped, cfg) -> None:
    empty = [split for split, count in counts.items() if count == 0]
    if empty:
        raise ValueError(
            f"data.path={cfg.path}: no usable images left for split(s) {', '.join(empty)} "
            f"(data.val_fraction={cfg.val_fraction}, data.test_fraction={cfg.test_fraction}); "
            f"skipped by reason: { {reason: n for reason, n in skipped.counts().items() if n} }"
        )


def _stats(params: Params, root: Path, tokenizer: TextTokenizer, counts: dict, skipped) -> dict:
    """Counts and caption-length statistics, streaming the captions a batch at a time."""
    text_len = params.tokenizer.text_len
    lengths, n_captions = [], {}
    for split in SPLITS:
        n_captions[split] = 0
        for batch in caption_lists(root / split):
            captions = [c for caps in batch for c in caps]
            n_captions[split] += len(captions)
            lengths.append(tokenizer.encode(captions, text_len).full_lengths)
    full = np.concatenate(lengths)
    truncated = full > text_len
    index = {split: json.loads((root / split / INDEX_FILE).read_text()) for split in SPLITS}
    stats = {
        "n_images": counts,
        "n_captions": n_captions,
        "caption_tokens": {
            "mean": round(float(full.mean()), 3),
            "p50": float(np.percentile(full, 50)),
            "p90": float(np.percentile(full, 90)),
            "p99": float(np.percentile(full, 99)),
            "max": int(full.max()),
        },
        "text_len": text_len,
        "n_truncated": int(truncated.sum()),
        "truncation_rate": round(float(truncated.mean()), 6),
        "vocab_size": tokenizer.vocab_size,
        "skipped": skipped.counts() if skipped is not None else {},
        "bytes_per_image": {
            split: round(sum(s["bytes"] for s in index[split]["shards"]) / max(counts[split], 1), 1) for split in SPLITS
        },
    }
    if params.data.source == "shapes":
        held_out = pd.read_parquet(root / "test" / RECORDS_FILE, columns=["held_out"])["held_out"]
        stats["n_test_held_out"] = int(held_out.sum())
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
