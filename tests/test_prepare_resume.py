"""`prepare` after a real SIGKILL: finished units are kept, the rest rebuilt, the output bit-identical; unit ranges."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from photos import build_photo_datasets

from dalle.config import Params
from dalle.data.prepare import prepare_dataset

REPO = Path(__file__).resolve().parents[1]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 4 photos per shard: ~110 units, so a kill lands while most are still to do.
    return build_photo_datasets(tmp_path_factory.mktemp("photos"), n=400, per_shard=4)["webdataset"]


def _params_file(tmp_path: Path, shards: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(
        source="webdataset", path=str(shards), image_size=32, group_key="photo", val_fraction=0.2, test_fraction=0.2
    )
    raw["data"].update(n_train=200, shard_size=16, workers=2)  # the train cap falls inside a unit's shard
    raw["tokenizer"]["vocab_size"] = 300
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_sigkill_then_rerun_keeps_finished_units_and_is_bit_identical(shards, tmp_path):
    params_file = _params_file(tmp_path, shards)
    params = Params.from_dict(yaml.safe_load(params_file.read_text()))
    reference = tmp_path / "reference" / "prepared"
    stats = prepare_dataset(params, reference)
    assert stats["n_images"]["train"] == 200 and stats["over_cap"]["train"] > 0

    out = tmp_path / "run" / "prepared"
    staging = out.with_name(".prepared.staging")
    command = [sys.executable, "-m", "pipelines.prepare", "--params", str(params_file), "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(staging.glob("unit-*.json"))) < 3:
        assert process.poll() is None, "prepare finished before it could be killed"
        assert time.monotonic() < deadline, "no unit finished within 120 s"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(0.5)  # the workers die with their parent (PR_SET_PDEATHSIG)
    finished = {p.name: p.stat().st_mtime_ns for p in staging.glob("unit-*.json")}
    assert 3 <= len(finished) < stats["units"] and not (out / "stats.json").exists()

    prepare_dataset(params, out, units=slice(0, stats["units"]))  # build what is missing, publish nothing
    kept = {name: (staging / name).stat().st_mtime_ns for name in finished}
    assert kept == finished  # verified by checksum and kept, not rebuilt
    assert len(list(staging.glob("unit-*.json"))) == stats["units"] and not out.exists()

    prepare_dataset(params, out)
    assert files(out) == files(reference)
    leftovers = [p for p in out.parent.rglob("*") if ".tmp" in p.name or p.name.endswith(".staging")]
    assert leftovers == [] and sorted(p.name for p in out.parent.iterdir()) == ["prepared"]


def test_unit_ranges_from_two_machines_then_publish_equal_one_run(shards, tmp_path):
    params = Params.from_dict(yaml.safe_load(_params_file(tmp_path, shards).read_text()))
    prepare_dataset(params, tmp_path / "one" / "prepared")
    out = tmp_path / "two" / "prepared"
    assert prepare_dataset(params, out, units=slice(0, 40)) is None
    assert prepare_dataset(params, out, units=slice(40, 200)) is None
    assert not out.exists()
    prepare_dataset(params, out)
    assert files(out) == files(tmp_path / "one" / "prepared")


def test_changed_settings_discard_the_staging_area(shards, tmp_path):
    params = Params.from_dict(yaml.safe_load(_params_file(tmp_path, shards).read_text()))
    out = tmp_path / "prepared"
    prepare_dataset(params, out, units=slice(0, 5))
    staging = out.with_name(".prepared.staging")
    assert len(list(staging.glob("unit-*.json"))) == 5
    raw = yaml.safe_load(_params_file(tmp_path, shards).read_text())
    raw["data"]["image_size"] = 16
    raw["eval"]["blur_radii"] = [0, 8, 16]  # >= 0.5 px at 16 px
    prepare_dataset(Params.from_dict(raw), out, units=slice(5, 6))
    assert [p.name for p in staging.glob("unit-*.json")] == ["unit-000005.json"]
