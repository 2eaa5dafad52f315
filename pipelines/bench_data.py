"""Data benchmark: ``prepare`` throughput and peak memory from WebDataset shards, and bytes per image on disk.

    python -m pipelines.bench_data [--images 10000 200000] [--size 64] [--workers 2] [--out reports/bench]

For each count it writes that many source images as img2dataset-style shards (``KEY.jpg`` + ``KEY.txt`` +
``KEY.json``, 1000 per shard; shapes rendered at 1.5x the target size from a pool of distinct renders, each
written under its own key), then runs ``prepare_dataset`` on them in a subprocess (no MLflow run) with
``data.workers`` processes while sampling the resident memory of the whole process tree every 0.1 s. Reports
images/s, peak RSS (main process and the tree), the prepared bytes per image against the raw ``(S, S, 3)`` uint8
array the format replaced, and the ratio of peak RSS between the largest and smallest count (memory must not grow
with the dataset). Writes ``<out>/data.json``. Not a DVC stage: it takes minutes at 200k images.

``--loading data/tokens`` instead measures data loading's share of a prior training step at the ``prior`` size of
params.yaml, with the token shards read through their memory-mapped view (no in-memory cache), in both
``loader.order`` values, into ``<out>/data_loading.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from dalle.config import DataConfig
from dalle.data.prepare import prepare_dataset
from dalle.data.shapes import iter_shapes
from dalle.data.tokens import load_tokens
from pipelines.params import load_params
from pipelines.reports import write_json

REPO = Path(__file__).resolve().parents[1]
POOL = 2000  # distinct renders; the sources cycle through them under distinct keys
PER_SHARD = 1000


def write_sources(root: Path, n: int, size: int) -> Path:
    """``n`` captioned JPEGs as tar shards under ``root``."""
    render = DataConfig(image_size=max(16, min(256, size * 3 // 2)), n_train=POOL)
    pool = []
    for image, record in iter_shapes(render, 0, "train", POOL):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        pool.append((buffer.getvalue(), record["captions"][0].encode()))
    root.mkdir(parents=True, exist_ok=True)
    for shard in tqdm(range(0, n, PER_SHARD), desc=f"write {n} sources", unit="shard"):
        with tarfile.open(root / f"{shard // PER_SHARD:05d}.tar", "w") as tar:
            for index in range(shard, min(shard + PER_SHARD, n)):
                jpeg, caption = pool[index % POOL]
                meta = json.dumps({"key": f"{index:09d}", "status": "success"}).encode()
                for suffix, data in (("jpg", jpeg), ("txt", caption), ("json", meta)):
                    info = tarfile.TarInfo(f"{index:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def run_prepare(params_file: Path, out: Path) -> dict:
    """Run the prepare stage in a subprocess; wall time and peak RSS of its main process and process tree."""
    command = [sys.executable, "-m", "pipelines.bench_data", "--prepare", str(params_file), str(out)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    main = psutil.Process(process.pid)
    peak_main = peak_tree = 0
    while process.poll() is None:
        try:
            rss_main = main.memory_info().rss
            rss_tree = rss_main + sum(_rss(child) for child in main.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        peak_main, peak_tree = max(peak_main, rss_main), max(peak_tree, rss_tree)
        time.sleep(0.1)
    _, stderr = process.communicate()
    if process.returncode:
        raise RuntimeError(f"prepare failed:\n{stderr[-2000:]}")
    return {
        "seconds": time.monotonic() - started,
        "peak_rss_main_mb": peak_main / 2**20,
        "peak_rss_mb": peak_tree / 2**20,
    }


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def loading_share(params_file: Path, tokens: Path, steps: int = 40) -> dict:
    """Data loading's share of a prior training step at the params' prior size, reading the token shards through
    the memory-mapped view (no in-memory cache), in each ``loader.order``: batch ``step`` assembled alone, then a
    whole step with it."""
    from dalle.config import LoaderConfig
    from dalle.prior import Prior
    from dalle.prior_train import geometry_of, training_batch, training_losses, training_order
    from dalle.training import adamw

    params = load_params(params_file)
    cfg = params.prior
    train = load_tokens(tokens, "train", cache_bytes=0)
    vocab = json.loads((tokens.parent / "prepared" / "tokenizer.json").read_text())["model"]["vocab"]
    codebook = json.loads((tokens.parent.parent / "models" / "dvae" / "config.json").read_text())["codebook_size"]
    geometry = geometry_of(train, len(vocab), codebook)
    cpu = torch.device("cpu")
    result = {"token_view": type(train.image_tokens).__name__, "shards": len(train.shards)}
    for order_name in ("random", "stream"):
        loader = LoaderConfig(order=order_name, shuffle_block=params.loader.shuffle_block)
        order = training_order(train, cfg.batch_size, params.seed, loader)
        torch.manual_seed(params.seed)
        prior = Prior(cfg, geometry)
        optimizer = adamw(prior, cfg.lr, cfg.weight_decay)
        data_seconds, step_seconds = [], []
        for step in range(steps):
            started = time.perf_counter()
            batch = training_batch(train, order, step, cpu)
            loaded = time.perf_counter()
            losses, _ = training_losses(prior, prior, batch)
            optimizer.zero_grad(set_to_none=True)
            losses.loss.backward()
            optimizer.step()
            data_seconds.append(loaded - started)
            step_seconds.append(time.perf_counter() - started)
        data, total = float(np.median(data_seconds[5:])), float(np.median(step_seconds[5:]))  # after warm-up
        result[order_name] = {
            "data_ms": round(1000 * data, 3),
            "step_ms": round(1000 * total, 1),
            "data_share": round(data / total, 5),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-format", default="png", choices=["png", "jpeg", "webp"])
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    parser.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--prepare", nargs=2, type=Path, metavar=("PARAMS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--loading",
        type=Path,
        metavar="TOKENS",
        help="instead: data loading's share of a prior step on an encoded token set (e.g. data/tokens)",
    )
    args = parser.parse_args(argv)
    if args.loading:
        result = loading_share(Path("params.yaml"), args.loading)
        write_json(args.out / "data_loading.json", result)
        print(json.dumps(result))
        return
    if args.prepare:  # the measured child: prepare alone, without the stage's MLflow run
        prepare_dataset(load_params(args.prepare[0]), args.prepare[1])
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.tmp))
    rows = []
    try:
        for n in args.images:
            sources = write_sources(scratch / f"sources-{n}", n, args.size)
            raw = yaml.safe_load((REPO / "params.yaml").read_text())
            raw["data"].update(
                source="webdataset",
                path=str(sources),
                image_size=args.size,
                min_size=16,
                n_train=n,
                n_val=n,
                n_test=n,
                workers=args.workers,
                image_format=args.image_format,
            )
            raw["dvae"]["downsample"] = 4 if args.size % 8 else 8
            params_file = scratch / f"params-{n}.yaml"
            params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
            out = scratch / f"prepared-{n}"
            measured = run_prepare(params_file, out)
            stats = json.loads((out / "stats.json").read_text())
            images = sum(stats["n_images"].values())
            disk = sum(p.stat().st_size for split in ("train", "val", "test") for p in (out / split).glob("*.tar"))
            row = {
                "images": images,
                "size": args.size,
                "workers": args.workers,
                "image_format": args.image_format,
                "images_per_s": round(images / measured["seconds"], 1),
                **{k: round(v, 1) for k, v in measured.items()},
                "bytes_per_image": round(disk / images, 1),
                "npy_bytes_per_image": args.size * args.size * 3 + 128 / images,  # the old raw format
            }
            rows.append(row)
            print(json.dumps(row))
            shutil.rmtree(sources), shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"runs": rows, "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"}
    if len(rows) > 1:
        result["peak_rss_ratio_largest_to_smallest"] = round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)
    write_json(args.out / "data.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
