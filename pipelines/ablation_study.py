"""DVC stage ``ablation_study`` (``pipelines/ablation/dvc.yaml``): every attention schedule against full attention.

Reads the study's runs (``ablate --study``, ``reports/ablation_study/runs/<schedule>-seed<N>/``) and writes
``reports/ablation_study/``:

- ``summary.csv`` and ``summary.json`` (DVC metrics): per schedule, pooled over the study's seeds, seen and held-out
  caption accuracy at N = 1 (95% Wilson interval over captions × seeds), FID of all its samples against the test
  images (bootstrap interval over images), test NLL in bits per image token (t-interval over test images) and
  training tokens/s (median over seeds; the dense kernel, the fastest on CPU at this grid), plus each seed's values;
- ``differences.csv``: each schedule minus ``full`` per measure, with a 95% interval from paired comparisons (the
  same captions, test images and seeds for every schedule): per-caption accuracy differences and per-image NLL
  differences (t-intervals), and a bootstrap of the FID difference that resamples real images and caption rows once
  for both FIDs. Verdict: ``difference`` when the interval excludes 0, ``tie`` when it lies within ± the measure's
  margin (``TIE_MARGIN``: 5 accuracy points, 5 FID, 0.05 bits), else ``inconclusive``;
- ``summary.png``: the measures per schedule with their intervals, and the differences with theirs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dalle.fid import frechet_distance  # noqa: E402
from dalle.intervals import (  # noqa: E402
    bootstrap_fid,
    bootstrap_fid_difference,
    error_bars,
    mean_interval,
    resamples_for,
    wilson,
)
from pipelines.ablate import STUDY_REPORT_DIR, study_run_name  # noqa: E402
from pipelines.params import load_params  # noqa: E402
from pipelines.reports import write_csv, write_json  # noqa: E402
from pipelines.tracking import check_reachable, log_artifact, log_metrics, stage_run, tracking_uri  # noqa: E402

BASELINE = "full"
GROUPS = ("seen", "held_out")
# Half-width within which a difference's whole interval makes a tie: accuracy in fractions (5 points), FID, bits.
TIE_MARGIN = {"accuracy_seen": 0.05, "accuracy_held_out": 0.05, "fid": 5.0, "test_image_bits": 0.05}


def verdict(low: float, high: float, margin: float) -> str:
    """``difference`` if the interval excludes 0, ``tie`` if it lies within ±margin, else ``inconclusive``."""
    if low > 0 or high < 0:
        return "difference"
    if -margin <= low and high <= margin:
        return "tie"
    return "inconclusive"


def load_runs(runs: Path, schedules: tuple[str, ...], seeds: tuple[int, ...]) -> dict[str, list[dict]]:
    """Per schedule, one entry per seed: its metrics, captions table, sample features and per-image NLL."""
    out: dict[str, list[dict]] = {}
    for schedule in schedules:
        out[schedule] = []
        for seed in seeds:
            folder = runs / study_run_name(schedule, seed)
            if not (folder / "metrics.json").is_file():
                raise FileNotFoundError(
                    f"{folder}/metrics.json not found; run ablate@{schedule}-{seed} "
                    "(dvc repro pipelines/ablation/dvc.yaml)"
                )
            out[schedule].append(
                {
                    "seed": seed,
                    "metrics": json.loads((folder / "metrics.json").read_text()),
                    "captions": pd.read_csv(folder / "captions.csv"),
                    "features": np.load(folder / "features.npy").astype(np.float64),
                    "real": np.load(folder / "real_features.npy").astype(np.float64),
                    "bits": np.load(folder / "test_image_bits.npy").astype(np.float64),
                }
            )
    reference = out[schedules[0]][0]
    for schedule, entries in out.items():
        for entry in entries:
            if not entry["captions"]["caption"].equals(reference["captions"]["caption"]):
                raise ValueError(f"{schedule} seed {entry['seed']} scored other captions than {schedules[0]}: rerun it")
            if not np.array_equal(entry["real"], reference["real"]):
                raise ValueError(f"{schedule} seed {entry['seed']} measured other test-image features: rerun it")
    return out


def hits(entries: list[dict], group: str) -> np.ndarray:
    """0/1 per (seed, caption) of ``group``, seeds concatenated in order (rows paired across schedules)."""
    parts = []
    for entry in entries:
        table = entry["captions"]
        rows = table["held_out"].to_numpy(bool) == (group == "held_out")
        parts.append(table["correct_all"].to_numpy(bool)[rows].astype(np.float64))
    return np.concatenate(parts)


def schedule_row(schedule: str, entries: list[dict], real: np.ndarray, seed: int) -> dict:
    row: dict = {"schedule": schedule, "seeds": len(entries)}
    labelled = "correct_all" in entries[0]["captions"] and "held_out" in entries[0]["captions"]
    for group in GROUPS if labelled else ():
        correct = hits(entries, group)
        low, high = wilson(int(correct.sum()), len(correct))
        row |= {f"accuracy_{group}": correct.mean(), f"accuracy_{group}_low": low, f"accuracy_{group}_high": high}
        row[f"accuracy_{group}_n"] = len(correct)
        for entry in entries:
            row[f"accuracy_{group}_seed{entry['seed']}"] = hits([entry], group).mean()
    generated = np.concatenate([entry["features"] for entry in entries])
    low, high = bootstrap_fid(real, generated, resamples_for(real.shape[1]), seed)
    row |= {"fid": frechet_distance(real, generated), "fid_low": low, "fid_high": high}
    row["fid_generated_images"], row["fid_real_images"] = len(generated), len(real)
    for entry in entries:
        row[f"fid_seed{entry['seed']}"] = next(
            v for k, v in entry["metrics"].items() if k.startswith("fid_") and k.count("_") == 1
        )
    bits = np.mean([entry["bits"] for entry in entries], axis=0)  # per test image, averaged over seeds
    low, high = mean_interval(bits)
    row |= {"test_image_bits": bits.mean(), "test_image_bits_low": low, "test_image_bits_high": high}
    row["tokens_per_s"] = float(np.median([entry["metrics"]["tokens_per_s"] for entry in entries]))
    row["steps"] = entries[0]["metrics"]["steps"]
    return row


def differences(schedule: str, entries: list[dict], baseline: list[dict], real: np.ndarray, seed: int) -> list[dict]:
    """``schedule`` minus the baseline per measure, paired, with intervals and verdicts."""
    rows = []
    labelled = "correct_all" in entries[0]["captions"] and "held_out" in entries[0]["captions"]
    for group in GROUPS if labelled else ():
        delta = hits(entries, group) - hits(baseline, group)
        rows.append((f"accuracy_{group}", delta.mean(), *mean_interval(delta), len(delta)))
    a = np.concatenate([entry["features"] for entry in entries])
    b = np.concatenate([entry["features"] for entry in baseline])
    estimate, low, high = bootstrap_fid_difference(real, a, b, resamples_for(real.shape[1]), seed)
    rows.append(("fid", estimate, low, high, len(a)))
    delta = np.mean([entry["bits"] for entry in entries], axis=0) - np.mean(
        [entry["bits"] for entry in baseline], axis=0
    )
    rows.append(("test_image_bits", delta.mean(), *mean_interval(delta), len(delta)))
    return [
        {
            "schedule": schedule,
            "measure": measure,
            "difference": value,
            "low": low,
            "high": high,
            "n": n,
            "verdict": verdict(low, high, TIE_MARGIN[measure]),
        }
        for measure, value, low, high, n in rows
    ]


def plot(summary: list[dict], diffs: list[dict], path: Path, steps: int, seeds: tuple[int, ...]) -> None:
    measures = [m for m in ("accuracy_seen", "accuracy_held_out", "fid", "test_image_bits") if m in summary[0]]
    fig, axes = plt.subplots(2, len(measures) + 1, figsize=(3.3 * (len(measures) + 1), 6.6))
    names = [row["schedule"] for row in summary]
    for ax, measure in zip(axes[0], measures):
        bars = ax.bar(names, [row[measure] for row in summary], yerr=error_bars(summary, measure), capsize=2)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(measure, fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    bars = axes[0][-1].bar(names, [row["tokens_per_s"] for row in summary], color="tab:gray")
    axes[0][-1].bar_label(bars, fmt="%.0f", fontsize=7)
    axes[0][-1].set_title("training tokens/s (median)", fontsize=9)
    axes[0][-1].tick_params(axis="x", rotation=60, labelsize=8)
    colours = {"difference": "tab:red", "tie": "tab:green", "inconclusive": "tab:gray"}
    for ax, measure in zip(axes[1], measures):
        rows = [row for row in diffs if row["measure"] == measure]
        for y, row in enumerate(rows):
            ax.errorbar(
                [row["difference"]],
                [y],
                xerr=[[row["difference"] - row["low"]], [row["high"] - row["difference"]]],
                fmt="o",
                color=colours[row["verdict"]],
                capsize=3,
            )
        ax.axvline(0, color="black", linewidth=0.8)
        margin = TIE_MARGIN[measure]
        ax.axvspan(-margin, margin, color="tab:green", alpha=0.1)
        ax.set_yticks(range(len(rows)), [f"{row['schedule']} ({row['verdict']})" for row in rows], fontsize=8)
        ax.set_title(f"{measure} − {BASELINE}", fontsize=9)
    axes[1][-1].axis("off")
    fig.suptitle(f"attention-mask ablation study: {steps} steps, seeds {list(seeds)}, 95% intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", type=Path, default=STUDY_REPORT_DIR)
    parser.add_argument("--out", type=Path, default=STUDY_REPORT_DIR.parent)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    schedules, seeds = params.ablation.schedules, params.ablation.study_seeds
    if BASELINE not in schedules:
        raise ValueError(f"ablation.schedules {list(schedules)} must include {BASELINE!r}, the study's baseline")
    runs = load_runs(args.runs, schedules, seeds)
    real = runs[BASELINE][0]["real"]
    summary = [schedule_row(s, runs[s], real, params.seed) for s in schedules]
    diffs = [
        row for s in schedules if s != BASELINE for row in differences(s, runs[s], runs[BASELINE], real, params.seed)
    ]
    flat = {f"{row['schedule']}.{k}": v for row in summary for k, v in row.items() if k != "schedule"}
    for row in diffs:
        key = f"{row['schedule']}_minus_{BASELINE}.{row['measure']}"
        flat |= {key: row["difference"], f"{key}_low": row["low"], f"{key}_high": row["high"]}
    with stage_run("ablation_study", params, reports=args.out):
        write_json(args.out / "summary.json", flat)
        write_csv(args.out / "summary.csv", summary)
        write_csv(args.out / "differences.csv", diffs)
        plot(summary, diffs, args.out / "summary.png", summary[0]["steps"], seeds)
        log_metrics({k: float(v) for k, v in flat.items()})
        for name in ("summary.csv", "differences.csv", "summary.png"):
            log_artifact(str(args.out / name))
    uri = tracking_uri()
    check_reachable(uri)
    client = MlflowClient(uri)
    for parent in sorted({entry["metrics"]["mlflow_parent_run_id"] for entries in runs.values() for entry in entries}):
        client.set_terminated(parent)  # the ablate runs' parents (one per seed): complete once summarised
    for row in diffs:
        print(
            f"{row['schedule']:>7} - {BASELINE}: {row['measure']:<18} {row['difference']:+.3f} "
            f"[{row['low']:+.3f}, {row['high']:+.3f}] {row['verdict']}"
        )


if __name__ == "__main__":
    main()
