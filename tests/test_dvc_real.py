"""The whole pipeline on real photographs (tests/photos.py), in all three source layouts, through DVC.

`dvc repro` on img2dataset-style shards, then `dvc exp run -S data.source=folder|manifest -S data.path=...` as a
user would, each in a temporary copy of the repository with tiny steps. Every stage's outputs are checked, and
the label-free evaluation must give finite numbers, above-chance retrieval and no shapes-only keys.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from photos import EXPECTED_SKIPS, build_photo_datasets
from test_dvc import run, tiny_repo

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
SHAPES_ONLY = ("accuracy_", "real_accuracy_", "seen_", "held_out_", "n_test_held_out")


def check_outputs(root: Path, layout: str) -> dict:
    stats = json.loads((root / "data/prepared/stats.json").read_text())
    assert {k: v for k, v in stats["skipped"].items() if v} == EXPECTED_SKIPS[layout]
    assert all(n > 0 for n in stats["n_images"].values()) and "n_test_held_out" not in stats
    for model in ("dvae", "prior", "clip", "evalnet"):
        assert (root / "models" / model / "model.safetensors").is_file(), model
    assert json.loads((root / "models/evalnet/config.json").read_text())["kind"] == "clip"
    sample = json.loads((root / "reports/sample/metrics.json").read_text())
    evaluate = json.loads((root / "reports/eval/metrics.json").read_text())
    for metrics in (sample, evaluate):
        assert not [k for k in metrics if k.startswith(SHAPES_ONLY)], metrics
    assert 0 <= sample["clip_score_n1"] <= 100
    for key in ("fid_reranker", "fid_reranker_reconstruction", "test_image_bits", "test_text_nll", "clip_score"):
        assert math.isfinite(evaluate[key]), key
    assert evaluate["fid_reranker"] > 0 and 0 <= evaluate["clip_score_real"] <= 100
    assert evaluate["retrieval_text_to_image_r5"] > evaluate["retrieval_chance_r5"]  # the reranker learned
    assert (root / "reports/eval/sheets/sheet_n1.png").is_file()
    assert (root / "reports/eval/accuracy_by_attribute.csv").read_text().count("\n") == 1  # header only
    assert (root / "reports/ablation/summary.csv").read_text().count("\n") == 3  # header + 2 schedules
    registered = json.loads((root / "reports/register/metrics.json").read_text())
    assert registered["model_uri"] == f"models:/dalle-workbench/{registered['version']}"
    return evaluate


def test_real_photographs_through_every_stage_in_every_layout(tmp_path, mlflow_store):
    data = build_photo_datasets(tmp_path / "photos", n=160, per_shard=32)
    root = tiny_repo(
        tmp_path / "repo",
        "test-dvc-real",
        source="webdataset",
        path=str(data["webdataset"]),
        n_train=1000,
        n_val=1000,
        n_test=1000,
        min_size=16,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    params = root / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    # Enough for retrieval above chance. Splits are by crop (no group_key), so test crops come from photographs
    # the reranker saw in training; grouping by photo is tested in test_ingest.py.
    raw["clip"].update(steps=60, batch_size=32, lr=0.003)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "commit", "-qam", "real photos"], root)

    run([sys.executable, "-m", "dvc", "repro"], root)
    check_outputs(root, "webdataset")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "lock"], root)
    for layout in ("folder", "manifest"):
        overrides = ["-S", f"data.source={layout}", "-S", f"data.path={data[layout]}"]
        run([sys.executable, "-m", "dvc", "exp", "run", *overrides, "-n", f"real-{layout}"], root)
        check_outputs(root, layout)
