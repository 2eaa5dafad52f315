"""Training seeds apart from the data seed, and the seeds summary (pipelines/seeds_summary.py)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from dalle.config import ParamsError
from pipelines import seeds_summary
from pipelines.params import load_params

REPO = Path(__file__).resolve().parents[1]


def test_seed_override_replaces_the_training_seed_only(tmp_path):
    params = load_params(REPO / "params.yaml", seed=7)
    default = load_params(REPO / "params.yaml")
    assert params.seed == 7 and params.data.seed == default.data.seed
    assert params.flat() | {"seed": default.seed} == default.flat()
    with pytest.raises(ParamsError, match="--seed: must be >= 0"):
        load_params(REPO / "params.yaml", seed=-1)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seeds"]["extra"] = [1, 1]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"seeds\.extra: lists a seed twice"):
        load_params(tmp_path / "p.yaml")


def write_seed(root: Path, seed: int) -> dict[str, float]:
    """A seed's eval and dvae metrics as the stages write them; returns the values written."""
    values = {
        "accuracy_seen_n1": 0.8 + seed / 100,
        "accuracy_held_out_n1": 0.6 + seed / 50,
        "accuracy_seen_n16": 0.9,
        "accuracy_held_out_n16": 0.8 - seed / 100,
        "judge_accuracy_seen_n1": 0.7,
        "judge_accuracy_held_out_n1": 0.6 + seed / 20,
        "judge_accuracy_seen_n16": 0.95,
        "judge_accuracy_held_out_n16": 0.9,
        "judge_candidates_seen": 0.9,
        "judge_candidates_held_out": 0.8 + seed / 50,
        "judge_oracle_seen_n16": 1.0,
        "judge_oracle_held_out_n16": 0.98,
        "fid_evalnet": 40.0 + seed,
        "fid_evalnet_reconstruction": 30.0,
        "test_image_bits": 1.0 + seed / 10,
    }
    metrics = {"fid_feature_dim": 64, "headline_n": 16, **values}
    for key, value in values.items():
        if key != "test_image_bits":
            metrics |= {f"{key}_low": value - 0.05, f"{key}_high": value + 0.05}
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (root / "dvae").mkdir(parents=True)
    (root / "dvae" / "metrics.json").write_text(json.dumps({"val_psnr": 25.0 + seed}))
    return {**values, "val_psnr": 25.0 + seed}


def test_summary_gives_mean_sd_and_every_seed(tmp_path, mlflow_store):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seed"], raw["seeds"]["extra"] = 0, [1, 3]
    raw["mlflow"]["experiment"] = "test-seeds"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    written = {0: write_seed(tmp_path / "reports", 0)}
    written |= {n: write_seed(tmp_path / "reports" / "seeds" / f"seed{n}", n) for n in (1, 3)}
    out = tmp_path / "summary"
    argv = ["--params", str(params), "--reports", str(tmp_path / "reports")]
    argv += ["--seeds-dir", str(tmp_path / "reports" / "seeds"), "--out", str(out)]
    seeds_summary.main(argv)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == 3
    renamed = {"fid_evalnet": "fid", "fid_evalnet_reconstruction": "fid_reconstruction"}
    for source in written[0]:
        key = renamed.get(source, source)
        values = [written[seed][source] for seed in (0, 1, 3)]
        assert summary[key] == pytest.approx(statistics.fmean(values), abs=1e-12), key
        assert summary[f"{key}_sd"] == pytest.approx(statistics.stdev(values), abs=1e-12), key
        assert (summary[f"{key}_min"], summary[f"{key}_max"]) == (min(values), max(values))
        assert summary[f"{key}_seed3"] == written[3][source]
    assert summary["fid_seed1_low"] == pytest.approx(40.95) and "test_image_bits_seed1_low" not in summary
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["seed"] for row in rows] == ["0", "1", "3", "mean", "sd"]
    assert float(rows[3]["accuracy_held_out_n1"]) == pytest.approx(np.mean([0.6, 0.62, 0.66]))
    assert (out / "summary.png").stat().st_size > 10_000

    raw["seeds"]["extra"] = [0, 1]
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"seeds.extra \[0, 1\] repeats seed 0"):
        seeds_summary.main(argv)
    raw["seeds"]["extra"] = [1, 2]
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(FileNotFoundError, match=r"seed2/eval/metrics.json not found; run that seed's chain"):
        seeds_summary.main(argv)
