"""Resumable, distributable encoding into token shards (the format of dalle/data/tokens.py): a staging area beside
the output, one unit of work per prepared shard, and a publish step once every shard is there.

    data/.tokens.staging/
        fingerprint.json                  what the staged shards are made from (dVAE, prepared data, tokenizer, ...)
        train/shard-00000/                a finished token shard: its arrays and manifest.json (fingerprint, counts,
                                          sha256 of each file, which process encoded it)
        train/.shard-00001.tmp-HOST-PID/  a shard being written, renamed to shard-00001/ when complete

A kill leaves finished shards and at most one partial directory per process. A rerun keeps every shard whose
manifest carries the current fingerprint and whose files match their checksums, and encodes only the rest; other
inputs (another fingerprint) start the area afresh. The work is a list of :class:`ShardTask` in a fixed order
(train, val, test, each shard in order): in a world of ``w`` processes, rank ``r`` takes tasks ``r, r + w, ...``,
and a run may be restricted to a range of tasks, so several machines sharing a filesystem can fill one staging
area. :func:`publish` hard-links the shards into a temporary directory beside the output, writes each split's
``index.json`` last, swaps it in with one rename and removes the staging area. The token files depend only on the
inputs, never on the world size, the ranges or the kills that produced them. Only a full run restarts an area made
from other inputs: a range or a merge refuses, so it cannot wipe what other machines encoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dalle.data.store import SPLITS, Split, file_sha256
from dalle.data.tokens import FORMAT, INDEX_FILE, EncodedShard

FINGERPRINT_FILE = "fingerprint.json"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ShardTask:
    number: int  # position in the plan: ranks and ranges select by it
    split: str
    shard: int  # the prepared shard it encodes
    prepared: str  # that shard's file name
    rows: range  # its image rows in the split

    @property
    def name(self) -> str:
        return f"shard-{self.shard:05d}"

    @property
    def key(self) -> str:
        return f"{self.split}/{self.name}"


def plan_shards(splits: Mapping[str, Split]) -> list[ShardTask]:
    """One task per prepared shard of every split, in split then shard order."""
    tasks, number = [], 0
    for split in SPLITS:
        start = 0
        for shard, entry in enumerate(splits[split].images.index_shards):
            rows = range(start, start + entry["samples"])
            tasks.append(ShardTask(number, split, shard, entry["name"], rows))
            number, start = number + 1, rows.stop
        assert start == len(splits[split]), f"{split}: shard sizes do not add up to the split"
    return tasks


def inputs_fingerprint(files: Iterable[Path], settings: Mapping) -> str:
    """Identifies what the shards are made from: the contents (not the paths) of ``files``, and ``settings``."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    for path in files:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Staging:
    """The staging area of one token set: which shards are done, and writing one more."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint
        self._verified: dict[str, dict] = {}  # key → manifest, checked once per process

    def open(self, restart: bool) -> None:
        """Create the area. If it was made from other inputs, start it afresh with ``restart``, else fail (a run
        of one range, or a merge, must not wipe what other machines encoded). Call on one process (rank 0) before
        the others use it; a shard from other inputs is never kept anyway (its manifest says so)."""
        marker = self.directory / FINGERPRINT_FILE
        if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != self.fingerprint:
            if not restart:
                raise ValueError(
                    f"{self.directory} holds shards made from other inputs (dVAE, prepared data, tokenizer, text_len "
                    "or precision); run without --shards or --merge to start it afresh"
                )
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            _write_atomic(marker, json.dumps({"fingerprint": self.fingerprint}) + "\n")

    def completed(self, task: ShardTask) -> dict | None:
        """The manifest of ``task``'s staged shard if it is complete, from these inputs and intact; else None."""
        if task.key in self._verified:
            return self._verified[task.key]
        path = self.directory / task.split / task.name
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if manifest.get("fingerprint") != self.fingerprint:
            return None
        for name, sha256 in manifest["sha256"].items():
            if not (path / name).is_file() or file_sha256(path / name) != sha256:
                return None
        self._verified[task.key] = manifest
        return manifest

    def commit(self, task: ShardTask, shard: EncodedShard, encoded_by: dict) -> dict:
        """Write ``task``'s shard under a temporary name, then rename it into place; returns its manifest."""
        split_dir = self.directory / task.split
        split_dir.mkdir(parents=True, exist_ok=True)
        for leftover in split_dir.glob(f".{task.name}.tmp-*"):  # a killed process's partial copy of this shard
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = split_dir / f".{task.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        tmp.mkdir()
        sha256 = {}
        for name, array in shard.arrays.items():
            data = _npy_bytes(array)
            (tmp / f"{name}.npy").write_bytes(data)
            sha256[f"{name}.npy"] = hashlib.sha256(data).hexdigest()
        manifest = {
            "fingerprint": self.fingerprint,
            "images": shard.images,
            "captions": shard.captions,
            "truncated": shard.truncated,
            "sha256": sha256,
            "encoded_by": encoded_by,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        final = split_dir / task.name
        shutil.rmtree(final, ignore_errors=True)  # a damaged or stale copy
        tmp.rename(final)
        self._verified[task.key] = manifest
        return manifest

    def missing(self, tasks: Iterable[ShardTask]) -> list[ShardTask]:
        return [task for task in tasks if self.completed(task) is None]


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # no copy: the staging area is beside the output, on the same filesystem
    except OSError:
        shutil.copyfile(source, target)


def require_complete(staging: Staging, tasks: list[ShardTask]) -> None:
    """Fail, naming them, if any of ``tasks`` has no complete, intact shard in ``staging``."""
    missing = staging.missing(tasks)
    if missing:
        names = ", ".join(task.key for task in missing[:8]) + (", ..." if len(missing) > 8 else "")
        first, last = missing[0].number, missing[-1].number + 1
        raise FileNotFoundError(
            f"{len(missing)} of {len(tasks)} token shards are not encoded yet in {staging.directory} ({names}); "
            f"encode them (e.g. --shards {first}:{last}), or run without --shards to encode and publish"
        )


def publish(staging: Staging, tasks: list[ShardTask], out: Path, grid: int, text_len: int, image_dtype: str):
    """Assemble every staged shard into the token set at ``out`` and remove the staging area. Returns one row per
    shard: its counts and which process encoded it. Fails, naming them, if shards are missing."""
    require_complete(staging, tasks)
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):  # a publish killed midway
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    rows = []
    for split in SPLITS:
        shards = []
        for task in (task for task in tasks if task.split == split):
            manifest = staging.completed(task)
            (tmp / split / task.name).mkdir(parents=True)
            for name in manifest["sha256"]:
                _link(staging.directory / split / task.name / name, tmp / split / task.name / name)
            counts = {key: manifest[key] for key in ("images", "captions", "truncated")}
            shards.append({"name": task.name, "prepared": task.prepared, **counts, "sha256": manifest["sha256"]})
            rows.append({"split": split, "shard": task.name, **counts, **manifest["encoded_by"]})
        (tmp / split).mkdir(parents=True, exist_ok=True)
        index = {
            "format": FORMAT,
            "grid": grid,
            "text_len": text_len,
            "image_dtype": image_dtype,
            **{key: sum(shard[key] for shard in shards) for key in ("images", "captions", "truncated")},
            "shards": shards,
        }
        (tmp / split / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(staging.directory)
    return rows
