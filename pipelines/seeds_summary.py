"""DVC stage ``seeds_summary`` (``pipelines/seeds/dvc.yaml``): the headline metrics of every training seed → mean ± sd.

Reads the default chain's results (training seed ``seed``: ``reports/eval``, ``reports/dvae``) and those of each seed
in ``seeds.extra`` (``reports/seeds/seed<N>/...``), and writes ``reports/seeds_summary/``:

- ``summary.json`` (DVC metrics): per headline metric its mean over seeds, sample standard deviation (``_sd``),
  range (``_min``/``_max``) and each seed's value with its own 95% interval (``_seed<N>``, ``_seed<N>_low/_high``);
- ``summary.csv``: one row per seed, then ``mean`` and ``sd`` rows;
- ``summary.png``: per metric, each seed's value with its interval, the mean as a line and ± sd as a band.

The spread over seeds and the interval of one seed measure different things: the interval is the sampling error of
one model's score over test captions (or images), the sd is how much retraining moves the model itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipelines.params import load_params  # noqa: E402
from pipelines.reports import write_csv, write_json  # noqa: E402
from pipelines.tracking import log_artifact, log_metrics, stage_run  # noqa: E402

OUT = Path("reports/seeds_summary")
SEEDS_DIR = Path("reports/seeds")  # seed N of seeds.extra: reports/seeds/seed<N>/{eval,dvae,...}
# (report folder, metric): the README's headline numbers; {n} is the evaluation's headline N (``headline_n``), and
# the FID key is found at run time (fid_<feature space>). Metrics a dataset cannot give (no attribute labels) are
# left out.
HEADLINE = (
    ("eval", "accuracy_seen_n1"),
    ("eval", "accuracy_held_out_n1"),
    ("eval", "accuracy_seen_n{n}"),
    ("eval", "accuracy_held_out_n{n}"),
    ("eval", "judge_accuracy_seen_n1"),  # the pixel-rule judge on canonical captions: what the targets read
    ("eval", "judge_accuracy_held_out_n1"),
    ("eval", "judge_accuracy_seen_n{n}"),
    ("eval", "judge_accuracy_held_out_n{n}"),
    ("eval", "judge_candidates_seen"),  # every candidate judged: N = 1 over N draws per caption (less noisy)
    ("eval", "judge_candidates_held_out"),
    ("eval", "judge_oracle_seen_n{n}"),  # a right candidate among N: the reranker's ceiling
    ("eval", "judge_oracle_held_out_n{n}"),
    ("eval", "fid"),
    ("eval", "fid_reconstruction"),
    ("eval", "test_image_bits"),
    ("dvae", "val_psnr"),
)


def seed_reports(default_reports: Path, seeds_dir: Path, seed: int, extra: tuple[int, ...]) -> dict[int, Path]:
    """Report root of each training seed: the default pipeline's for ``seed``, ``seeds_dir/seed<N>`` for the rest."""
    if seed in extra:
        raise ValueError(
            f"seeds.extra {list(extra)} repeats seed {seed}, whose chain is the default pipeline's; list other seeds"
        )
    return {seed: default_reports, **{n: seeds_dir / f"seed{n}" for n in extra}}


def read_seed(root: Path) -> dict[str, float]:
    """One seed's headline metrics with their ``_low``/``_high`` bounds where it has them."""
    values: dict[str, float] = {}
    for folder, name in HEADLINE:
        path = root / folder / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; run that seed's chain first (dvc repro pipelines/seeds/dvc.yaml)"
            )
        metrics = json.loads(path.read_text())
        key = name.format(n=metrics.get("headline_n"))
        if key.startswith("fid"):  # fid_<space> and fid_<space>_reconstruction
            space = next(k for k in metrics if k.startswith("fid_") and k.count("_") == 1)
            source = space if key == "fid" else f"{space}_reconstruction"
        else:
            source = key
        if metrics.get(source) is None:  # a measure this dataset does not give
            continue
        for suffix in ("", "_low", "_high"):
            if f"{source}{suffix}" in metrics and metrics[f"{source}{suffix}"] is not None:
                values[f"{key}{suffix}"] = float(metrics[f"{source}{suffix}"])
    return values


def headline_keys(per_seed: dict[int, dict[str, float]]) -> list[str]:
    """The metrics every seed has (the same for all, or the seeds were evaluated differently)."""
    keys = [[k for k in row if not k.endswith(("_low", "_high"))] for row in per_seed.values()]
    for seed, row_keys in zip(per_seed, keys):
        if row_keys != keys[0]:
            raise ValueError(
                f"seed {seed} has the headline metrics {row_keys}, another seed {keys[0]}: evaluate them alike"
            )
    return keys[0]


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Mean, sd (sample, over seeds; 0 for one seed), min, max and every seed's value and interval, flat."""
    out: dict[str, float] = {"seeds": len(per_seed)}
    for key in headline_keys(per_seed):
        values = [row[key] for row in per_seed.values()]
        out[key] = statistics.fmean(values)
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
        for seed, row in per_seed.items():
            for suffix in ("", "_low", "_high"):
                if f"{key}{suffix}" in row:
                    out[f"{key}_seed{seed}{suffix}"] = row[f"{key}{suffix}"]
    return out


def plot(per_seed: dict[int, dict[str, float]], summary: dict[str, float], path: Path) -> None:
    keys = headline_keys(per_seed)
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(2.6 * ((len(keys) + 1) // 2), 6.0))
    seeds = list(per_seed)
    for ax, key in zip(axes.flat, keys):
        mean, sd = summary[key], summary[f"{key}_sd"]
        ax.axhspan(mean - sd, mean + sd, color="tab:blue", alpha=0.15, label="mean ± sd")
        ax.axhline(mean, color="tab:blue", linewidth=1)
        for x, seed in enumerate(seeds):
            row = per_seed[seed]
            value = row[key]
            if f"{key}_low" in row:
                error = [[value - row[f"{key}_low"]], [row[f"{key}_high"] - value]]
                ax.errorbar([x], [value], yerr=error, fmt="o", color="black", capsize=3)
            else:
                ax.plot([x], [value], "o", color="black")
        ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds], fontsize=8)
        ax.set_xlim(-0.6, len(seeds) - 0.4)
        ax.set_title(f"{key}\n{mean:.3g} ± {sd:.2g}", fontsize=9)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"headline metrics over {len(seeds)} training seeds (points: 95% interval of each seed's score)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reports", type=Path, default=Path("reports"), help="the default chain's report root")
    parser.add_argument("--seeds-dir", type=Path, default=SEEDS_DIR)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    roots = seed_reports(args.reports, args.seeds_dir, params.seed, params.seeds.extra)
    per_seed = {seed: read_seed(root) for seed, root in sorted(roots.items())}
    summary = summarise(per_seed)
    with stage_run("seeds_summary", params, reports=args.out):
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "summary.json", summary)
        keys = headline_keys(per_seed)
        rows = [{"seed": seed, **row} for seed, row in per_seed.items()]
        rows += [
            {"seed": "mean", **{k: summary[k] for k in keys}},
            {"seed": "sd", **{k: summary[f"{k}_sd"] for k in keys}},
        ]
        columns = [
            "seed",
            *[f"{k}{s}" for k in keys for s in ("", "_low", "_high") if any(f"{k}{s}" in r for r in rows)],
        ]
        write_csv(args.out / "summary.csv", [{c: row.get(c) for c in columns} for row in rows])
        plot(per_seed, summary, args.out / "summary.png")
        log_metrics(summary)
        log_artifact(str(args.out / "summary.csv"))
        log_artifact(str(args.out / "summary.png"))
    print(
        f"{len(per_seed)} seeds {list(per_seed)}: "
        + ", ".join(f"{k} {summary[k]:.3g} ± {summary[f'{k}_sd']:.2g}" for k in headline_keys(per_seed))
    )


if __name__ == "__main__":
    main()
