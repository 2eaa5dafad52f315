"""The data a training stage reads, as MLflow dataset inputs of its run (``mlflow.data`` datasets).

A dataset is a directory the stage reads (``data/prepared``, ``data/tokens``), named by its path, with DVC's hash of
it as its digest: the md5 that dvc.lock records for it as a stage's output when the stage runs under DVC (which has
just checked that output), else computed from its files the way DVC computes it (the md5 of each file, then of the
sorted listing, ``.dir`` appended), so both are the hash ``dvc`` commands show. Its source is where the data came
from: ``data.path`` (a folder, manifest, shards or URL), or for the procedural shapes the generator, with
``data.source`` and ``data.path`` in its profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import yaml
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from dalle.config import DataConfig, Params

CHUNK = 2**20  # bytes read at a time when hashing a file


def directory_md5(directory: Path) -> str:
    """DVC's hash of a directory (``dvc_data``'s ``Tree.digest``): md5 of the JSON of its files' md5s and relative
    paths, sorted by path, plus ``.dir``."""
    listing = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.md5()
        with path.open("rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
        listing.append({"md5": digest.hexdigest(), "relpath": path.relative_to(directory).as_posix()})
    listing.sort(key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def _lock_files() -> list[Path]:
    """dvc.lock here (the stage's working directory) and beside the dvc.yaml of the stage running now."""
    files = [Path("dvc.lock")]
    stage = os.environ.get("DVC_STAGE", "")
    if ":" in stage:  # "pipelines/seeds/dvc.yaml:train_dvae@1"; a stage of ./dvc.yaml is just its name
        files.append(Path(stage.rsplit(":", 1)[0]).with_name("dvc.lock"))
    return [f for f in dict.fromkeys(files) if f.is_file()]


def locked_md5(directory: Path) -> str | None:
    """The md5 dvc.lock records for ``directory`` as a stage's output, or None."""
    wanted = os.path.normpath(directory)
    for lock in _lock_files():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", ()):
                if os.path.normpath(out["path"]) == wanted and "md5" in out:
                    return out["md5"]
    return None


def dvc_hash(directory: Path) -> tuple[str, str]:
    """DVC's hash of ``directory`` and where it was read: ``dvc.lock`` (under DVC), else ``computed``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {directory}")
    recorded = locked_md5(directory) if "DVC_STAGE" in os.environ else None
    return (recorded, "dvc.lock") if recorded else (directory_md5(directory), "computed")


def data_source(data: DataConfig) -> DatasetSource:
    """Where the data came from: ``data.path`` as MLflow reads a location (local, s3, http...), else the generator."""
    if data.path is not None:
        with warnings.catch_warnings():  # MLflow warns that a local path matches two equivalent source classes
            warnings.simplefilter("ignore")
            try:
                return resolve_dataset_source(str(data.path))
            except Exception:  # a pattern no source class takes (e.g. "{000..009}"): kept as written below
                pass
    return CodeDatasetSource({"data.source": data.source, "data.path": str(data.path)})


def dataset_input(params: Params, directory: Path, context: str = "training") -> dict[str, str]:
    """An outbox ``inputs`` record's entry for one directory (``RunLogger.log_inputs``)."""
    digest, origin = dvc_hash(Path(directory))
    name = Path(directory).as_posix()
    entity = MetaDataset(data_source(params.data), name=name, digest=digest).to_dict()
    profile = {"data.source": params.data.source, "data.path": params.data.path, "digest": origin}
    return {**entity, "profile": json.dumps(profile), "context": context}
