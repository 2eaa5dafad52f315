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

from dalle.config import Params
from dalle.data.ingest import Skipped, build_units, plan_units, publish
from dalle.data.store import FORMAT, SPLITS, STATS_FILE, read_split
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
    plan = plan_units(cfg, params.seed)
    if units is not None:
        build_units(cfg, params.seed, plan[units], staging)
        return None
    capacity = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    results = build_units(cfg, params.seed, plan, staging, capacity)
    skipped = Skipped()
    tmp = staging / "publish"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _check_not_empty(results, cfg)
        counts, over_cap = publish(results, staging, tmp, cfg, skipped)
        splits = {split: read_split(tmp / split) for split in SPLITS}
        train_captions = [c for caps in splits["train"].records["captions"] for c in caps]
        tokenizer = TextTokenizer.train(train_captions, params.tokenizer.vocab_size)
        tokenizer.save(tmp / TOKENIZER_FILE)

        stats = _stats(params, splits, tokenizer, counts, skipped if cfg.source != "shapes" else None)
        if cfg.source != "shapes":
            stats["over_cap"] = over_cap
        stats["units"] = len(plan)
        _write_sheet(splits["train"], tmp / SHEET_FILE)
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
    settings = {k: v for k, v in params.flat().items() if k.startswith("data.") or k == "seed"}
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


def _check_not_empty(results: list[dict], cfg) -> None:
    counts = {split: sum(len(r["splits"].get(split, {}).get("records", ())) for r in results) for split in SPLITS}
    empty = [split for split, count in counts.items() if count == 0]
    if empty:
        skipped: dict[str, int] = {}
        for result in results:
            for reason, keys in result["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + len(keys)
        raise ValueError(
            f"data.path={cfg.path}: no usable images left for split(s) {', '.join(empty)} "
            f"(data.val_fraction={cfg.val_fraction}, data.test_fraction={cfg.test_fraction}); "
            f"skipped by reason: {skipped}"
        )


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
        "bytes_per_image": {split: round(_bytes(splits[split]) / max(len(splits[split]), 1), 1) for split in SPLITS},
    }
    if "held_out" in splits["test"].records:
        stats["n_test_held_out"] = int(splits["test"].records["held_out"].sum())
    return stats


def _bytes(split) -> int:
    return sum(shard["bytes"] for shard in split.images.index_shards)


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
