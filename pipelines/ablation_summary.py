"""DVC stage ``ablation_summary``: the per-schedule results of ``ablate@*`` → ``reports/ablation/summary.csv`` and a
comparison figure (one bar chart per measure), logged to the ablation's MLflow parent run, which it closes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dalle.intervals import error_bars  # noqa: E402
from pipelines.ablate import REPORT_DIR as RUNS_DIR  # noqa: E402
from pipelines.params import load_params  # noqa: E402
from pipelines.reports import write_csv  # noqa: E402
from pipelines.tracking import check_reachable, tracking_uri  # noqa: E402

COLUMNS = (  # those a schedule's metrics lack (accuracy without attribute labels, clip_score on shapes) are left out
    "clip_score",
    "test_image_bits",
    "test_text_nll",
    "accuracy_all_seen",
    "accuracy_all_held_out",
    "tokens_per_s",
    "peak_memory_mb",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", type=Path, default=RUNS_DIR, help="per-schedule results of ablate@*")
    parser.add_argument("--out", type=Path, default=RUNS_DIR.parent)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    rows = []
    for schedule in params.ablation.schedules:
        path = args.runs / schedule / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run the ablate@{schedule} stage first")
        rows.append(json.loads(path.read_text()))
    fid_key = next(k for k in rows[0] if k.startswith("fid_"))
    columns = [c for c in (fid_key, *COLUMNS) if all(c in row for row in rows)]
    bounds = [f"{c}{end}" for c in columns for end in ("_low", "_high") if all(f"{c}{end}" in row for row in rows)]
    summary = [{"schedule": row["schedule"], **{c: row.get(c) for c in (*columns, *bounds)}} for row in rows]
    write_csv(args.out / "summary.csv", summary)

    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.4))
    names = [row["schedule"] for row in summary]
    for ax, column in zip(axes, columns):
        values = [row[column] for row in summary]
        # 95% intervals where the runs have them (bootstrap for FID, Wilson for accuracies)
        errors = error_bars(summary, column) if f"{column}_low" in summary[0] else None
        bars = ax.bar(names, values, yerr=errors, capsize=2, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(column, fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.suptitle(f"attention-mask ablation, {rows[0]['steps']} steps each")
    fig.tight_layout()
    figure = args.out / "summary.png"
    fig.savefig(figure, dpi=110)
    plt.close(fig)

    uri = tracking_uri()
    check_reachable(uri)
    client = MlflowClient(uri)
    for parent in sorted({row["mlflow_parent_run_id"] for row in rows}):
        for row in rows:
            if row["mlflow_parent_run_id"] == parent:
                for column in columns:
                    client.log_metric(parent, f"{row['schedule']}.{column}", float(row[column]))
        client.log_artifact(parent, str(args.out / "summary.csv"))
        client.log_artifact(parent, str(figure))
        client.set_terminated(parent)
    print("\n".join(f"{row['schedule']:>8}: " + ", ".join(f"{c} {row[c]:.3g}" for c in columns) for row in summary))


if __name__ == "__main__":
    main()
