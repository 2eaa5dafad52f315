"""Ingest a source into prepared shards in resumable *units*: decode in worker processes, publish in order.

A unit is a fixed slice of the source: one input ``.tar`` shard (webdataset), a block of ``data.shard_size``
listed files (folder, manifest), or ``data.shard_size`` rendered images of one split (shapes). A worker process
turns a unit into up to three tar shards, one per split (each sample's split comes from its group's hash), and
then writes ``unit-NNNNNN.json`` last, holding the records, member offsets, checksums and every skip by reason.
Everything goes to a staging directory beside the output (``data/.prepared.staging``), so after a kill a rerun
keeps each unit whose JSON exists and whose shards match their checksums, and builds only the rest. Units are
published in source order, so the result is the same for any worker count, any kill and any resume; the first
``n_train`` / ``n_val`` / ``n_test`` good samples of each split are kept and later ones dropped (``over_cap``),
never moved to another split.

Memory stays bounded: at most ``UNITS_PER_WORKER`` units per worker are in flight, and a worker holds one unit's
encoded images at a time. Several machines can each build a range of units into one shared staging area
(``units``); a final run publishes once every unit is there.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
from tqdm import tqdm

from dalle.config import DataConfig
from dalle.data.decode import SKIP_REASONS, Skip, decode_captions, decode_image
from dalle.data.shapes import iter_shapes
from dalle.data.sources import SPLITS, ListingSkip, RawSample, iter_raw, iter_webdataset, shard_urls, split_of
from dalle.data.store import SUFFIXES, SplitWriter, TarWriter, encode_image, shard_intact

LISTING_REASONS = ("missing_image", "missing_caption", "missing_group", "bad_metadata")
REASONS = LISTING_REASONS + tuple(r for r in SKIP_REASONS if r not in LISTING_REASONS)
WARN_EXAMPLES = 5
UNITS_PER_WORKER = 2  # units in flight per worker: enough to keep it busy, bounded memory
UNIT_FORMAT = 1


@dataclass
class Skipped:
    """Samples left out, by reason: ``paths[reason]`` lists their keys (paths relative to the dataset root, or
    ``shard.tar/key``)."""

    paths: dict[str, list[str]] = field(default_factory=lambda: {reason: [] for reason in REASONS})

    def add(self, reason: str, path: str) -> None:
        assert reason in REASONS, f"unknown skip reason {reason!r}"
        self.paths[reason].append(path)

    def counts(self) -> dict[str, int]:
        return {reason: len(paths) for reason, paths in self.paths.items()}

    def warn(self, source: str) -> None:
        """One warning naming ``source`` with each non-empty reason's count and first few keys."""
        lines = []
        for reason, paths in self.paths.items():
            if paths:
                more = f", ... ({len(paths) - WARN_EXAMPLES} more)" if len(paths) > WARN_EXAMPLES else ""
                lines.append(f"  {reason}: {len(paths)} ({', '.join(paths[:WARN_EXAMPLES])}{more})")
        if lines:
            total = sum(self.counts().values())
            warnings.warn(f"{source}: skipped {total} items\n" + "\n".join(lines), stacklevel=2)


@dataclass(frozen=True)
class Unit:
    """A slice of the source: listed samples, one shard URL (listed by the worker) or one shapes block."""

    id: int
    payload: list[RawSample | ListingSkip] | str | tuple[str, int, int]
    digest: str  # identifies the payload: a staged unit is reused only if its digest matches


def capacities(cfg: DataConfig) -> dict[str, int]:
    """The most images each split keeps (shapes: how many it renders)."""
    return {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}


def process(sample: RawSample, cfg: DataConfig) -> tuple[bytes, list[str]] | Skip:
    """Read, decode and re-encode one sample: (stored image bytes, captions), or the Skip that stopped it."""
    try:
        if isinstance(sample.captions, bytes):
            captions = decode_captions(sample.captions)
        else:
            captions = list(sample.captions)
        if isinstance(sample.image, bytes):
            data = sample.image
        else:
            with open(sample.image, "rb") as f:
                data = f.read()
        image = decode_image(data, cfg)
    except Skip as skip:
        return skip
    except OSError as err:  # the file vanished or cannot be read
        return Skip("unreadable_image", f"{type(err).__name__}: {err}")
    return encode_image(image, cfg.image_format, cfg.image_quality), captions


def plan_units(cfg: DataConfig, seed: int) -> list[Unit]:
    """The source cut into units, in source order."""
    if cfg.source == "shapes":
        units, capacity = [], capacities(cfg)
        for split in SPLITS:
            for start in range(0, capacity[split], cfg.shard_size):
                block = (split, start, min(start + cfg.shard_size, capacity[split]))
                units.append(Unit(len(units), block, _digest([split, start, block[2], capacity[split], seed])))
        return units
    if cfg.source == "webdataset":
        assert cfg.path is not None
        urls = shard_urls(cfg.path)
        return [Unit(i, url, _digest([url, _size(url)])) for i, url in enumerate(urls)]
    listed = list(iter_raw(cfg))
    units = []
    for start in range(0, len(listed), cfg.shard_size):
        block = listed[start : start + cfg.shard_size]
        units.append(Unit(len(units), block, _digest([_describe(item) for item in block])))
    return units


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _size(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    return int(fs.size(path))


def _describe(item: RawSample | ListingSkip) -> list:
    if isinstance(item, ListingSkip):
        return [item.reason, item.key]
    stat = os.stat(item.image) if isinstance(item.image, str) else None
    captions = item.captions.hex() if isinstance(item.captions, bytes) else list(item.captions)
    return [item.key, item.group, captions, item.meta, stat and (stat.st_size, stat.st_mtime_ns)]


def _unit_json(staging: Path, unit_id: int) -> Path:
    return staging / f"unit-{unit_id:06d}.json"


def staged(staging: Path, unit: Unit) -> dict | None:
    """The staged result of ``unit`` if it is complete, current and its shards match their checksums."""
    path = _unit_json(staging, unit.id)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if result.get("digest") != unit.digest or result.get("format") != UNIT_FORMAT:
        return None
    if not all(shard_intact(staging / part["file"], part) for part in result["splits"].values()):
        return None
    return result


def run_unit(unit: Unit, cfg: DataConfig, seed: int, staging: Path) -> dict:
    """Build one unit's shards in ``staging`` and its JSON (written last, atomically); returns the JSON."""
    writers: dict[str, TarWriter] = {}
    parts: dict[str, dict] = {}
    skipped: dict[str, list[str]] = {}
    suffix = SUFFIXES[cfg.image_format]
    for split, image_bytes, record in _unit_samples(unit, cfg, seed, skipped):
        if split not in writers:
            writers[split] = TarWriter(staging / f"unit-{unit.id:06d}.{split}.tar")
            parts[split] = {"file": f"unit-{unit.id:06d}.{split}.tar", "records": []}
        key = f"{unit.id:06d}-{len(parts[split]['records']):06d}"
        writers[split].add(f"{key}.{suffix}", image_bytes)
        parts[split]["records"].append({"key": key, **record})
    for split, writer in writers.items():
        parts[split].update(writer.close(), members=writer.members)
    result = {"format": UNIT_FORMAT, "unit": unit.id, "digest": unit.digest, "splits": parts, "skipped": skipped}
    path = _unit_json(staging, unit.id)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def _unit_samples(unit: Unit, cfg: DataConfig, seed: int, skipped: dict) -> Iterator[tuple[str, bytes, dict]]:
    """(split, stored image bytes, record) of every good sample of ``unit``; skips go to ``skipped``."""
    if isinstance(unit.payload, tuple):  # shapes: a block of one split's renders
        split, start, stop = unit.payload
        for index, (image, record) in enumerate(iter_shapes(cfg, seed, split, capacities(cfg)[split])):
            if index >= stop:
                break
            if index >= start:
                yield split, encode_image(image, cfg.image_format, cfg.image_quality), record
        return
    listed: Iterable[RawSample | ListingSkip]
    listed = iter_webdataset(cfg, [unit.payload]) if isinstance(unit.payload, str) else unit.payload
    for sample in listed:
        result = sample if isinstance(sample, ListingSkip) else process(sample, cfg)
        if isinstance(result, (ListingSkip, Skip)):
            skipped.setdefault(result.reason, []).append(sample.key)
            continue
        image_bytes, captions = result
        record = {"captions": captions, "source": sample.key}
        if sample.meta:
            record["meta"] = json.dumps(sample.meta, sort_keys=True, default=str)
        yield split_of(sample.group, cfg), image_bytes, record


def _die_with_parent() -> None:
    """Worker initializer: on Linux, get SIGKILLed when the parent dies, so a killed run leaves no orphans."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def build_units(
    cfg: DataConfig, seed: int, units: list[Unit], staging: Path, capacity: dict[str, int] | None = None
) -> list[int]:
    """Ids of ``units`` staged in ``staging``, in order, building those missing with ``cfg.workers`` processes.

    With ``capacity``, stops building once the units finished in order fill every split. Only per-unit counts
    are kept in memory; the records stay in the units' JSON files.
    """
    counts: dict[int, dict[str, int]] = {}  # unit id -> good samples per split

    def count(result: dict) -> dict[str, int]:
        return {split: len(part["records"]) for split, part in result["splits"].items()}

    todo = []
    for unit in tqdm(units, desc="verify staged units", unit="unit", leave=False):
        result = staged(staging, unit)
        if result is None:
            todo.append(unit)
        else:
            counts[unit.id] = count(result)
    order = [unit.id for unit in units]
    totals = dict.fromkeys(SPLITS, 0)  # good samples in the longest finished prefix of ``order``
    prefix = 0

    def filled() -> bool:
        """Whether the units finished in order already fill every split (advances the prefix: O(1) amortised)."""
        nonlocal prefix
        if capacity is None:
            return False
        while prefix < len(order) and order[prefix] in counts:
            for split, n in counts[order[prefix]].items():
                totals[split] += n
            prefix += 1
            if all(totals[split] >= capacity[split] for split in SPLITS):
                return True
        return all(totals[split] >= capacity[split] for split in SPLITS)

    progress = tqdm(total=len(units), initial=len(counts), desc="prepare", unit="unit")
    with progress:
        if cfg.workers == 1 or len(todo) <= 1:
            for unit in todo:
                if filled():
                    break
                counts[unit.id] = count(run_unit(unit, cfg, seed, staging))
                progress.update()
        else:
            context = multiprocessing.get_context("spawn")  # a forked child would inherit locked threads
            pool = ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_die_with_parent)
            pending: deque[tuple[Unit, Future]] = deque()
            try:
                queue = iter(todo)
                while True:
                    while len(pending) < UNITS_PER_WORKER * cfg.workers and not filled():
                        unit = next(queue, None)
                        if unit is None:
                            break
                        pending.append((unit, pool.submit(run_unit, unit, cfg, seed, staging)))
                    if not pending:
                        break
                    unit, future = pending.popleft()
                    counts[unit.id] = count(future.result())
                    progress.update()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    return [unit_id for unit_id in order if unit_id in counts]


def unit_result(staging: Path, unit_id: int) -> dict:
    return json.loads(_unit_json(staging, unit_id).read_text())


def publish(
    unit_ids: list[int], staging: Path, out: Path, cfg: DataConfig, skipped: Skipped
) -> tuple[dict[str, int], dict[str, int]]:
    """Move the units' shards into ``out/<split>`` in unit order, keeping the first ``n_*`` samples of each split.

    Returns the images per split and, per split, the good samples dropped by its cap.
    """
    capacity = capacities(cfg)
    writers = {split: SplitWriter(out / split, cfg.image_size, cfg.image_format) for split in SPLITS}
    over_cap = dict.fromkeys(SPLITS, 0)
    for unit_id in unit_ids:
        result = unit_result(staging, unit_id)
        for reason, keys in result["skipped"].items():
            for key in keys:
                skipped.add(reason, key)
        for split in SPLITS:
            part = result["splits"].get(split)
            if part is None:
                continue
            room = capacity[split] - len(writers[split])
            records, members = part["records"], [tuple(m) for m in part["members"]]
            over_cap[split] += max(len(records) - room, 0)
            if room <= 0:
                continue
            shard = staging / part["file"]
            if len(records) > room:  # the cap falls inside this shard: rewrite its first `room` samples
                shard, digest, members = _truncated(shard, members[:room], records[:room], cfg)
                records = records[:room]
            else:
                digest = {"bytes": part["bytes"], "sha256": part["sha256"]}
            writers[split].add_shard(shard, records, members, digest)
    return {split: writer.close() for split, writer in writers.items()}, over_cap


def _truncated(shard: Path, members: list[tuple[int, int]], records: list[dict], cfg: DataConfig):
    path = shard.with_name(shard.name.replace(".tar", ".cut.tar"))
    writer = TarWriter(path)
    data = np.memmap(shard, dtype=np.uint8, mode="r")
    for (offset, size), record in zip(members, records):
        writer.add(f"{record['key']}.{SUFFIXES[cfg.image_format]}", data[offset : offset + size].tobytes())
    digest = writer.close()
    return path, digest, writer.members
