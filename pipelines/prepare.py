"""DVC stage ``prepare``: params ``data`` (``data.seed`` renders and splits), ``tokenizer`` → ``data/prepared/``
(+ an MLflow run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dalle.data.prepare import SHEET_FILE, prepare_dataset
from dalle.data.store import STATS_FILE
from pipelines.params import load_params
from pipelines.tracking import flat_metrics, log_artifact, log_metrics, stage_run

OUT_DIR = Path("data/prepared")


def unit_range(text: str) -> slice:
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(start) >= int(stop):
        raise argparse.ArgumentTypeError(f"expected START:STOP with 0 <= START < STOP, got {text!r}")
    return slice(int(start), int(stop))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default: {OUT_DIR})")
    parser.add_argument(
        "--shards",
        type=unit_range,
        metavar="START:STOP",
        help="build only these input units (webdataset shards, or blocks of data.shard_size files) into the "
        "staging area and publish nothing: machines sharing the filesystem each take a range; a final run "
        "without --shards publishes",
    )
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if args.shards is not None:
        prepare_dataset(params, args.out, units=args.shards)
        print(f"prepare: built units {args.shards.start}:{args.shards.stop} into the staging area beside {args.out}")
        return
    with stage_run("prepare", params, reports=args.out):
        stats = prepare_dataset(params, args.out)
        log_metrics(flat_metrics(stats))
        log_artifact(str(args.out / SHEET_FILE))
        log_artifact(str(args.out / STATS_FILE))
    n = stats["n_images"]
    print(
        f"prepared {n['train']} train / {n['val']} val / {n['test']} test images in {args.out}; "
        f"caption tokens p99 {stats['caption_tokens']['p99']:.0f}, truncated {stats['truncation_rate']:.2%}"
    )


if __name__ == "__main__":
    main()
