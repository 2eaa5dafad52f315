"""DVC stage ``encode``: every split of ``data/prepared`` through the trained dVAE → ``data/tokens`` (one token shard
per prepared shard, dalle/data/tokens.py), plus codebook usage over the whole training set in ``reports/encode``.

Resumable: shards are staged in ``data/.tokens.staging`` (dalle/data/token_staging.py); after a kill, a rerun
keeps the finished ones and encodes the rest. Distributed: ``torchrun --nproc-per-node N -m pipelines.encode``
gives rank r the shards r, r + N, ...; rank 0 waits for the others and publishes. Several machines sharing a
filesystem: each runs ``--shards START:STOP`` (shard numbers count train, then val, then test), then one run
without a range (or ``--merge``, which encodes nothing) publishes once every shard is there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dalle.data.store import INDEX_FILE, RECORDS_FILE, SPLITS, load_split
from dalle.data.token_staging import Staging, inputs_fingerprint, plan_shards, publish, require_complete
from dalle.data.tokens import code_counts, encode_shard, load_tokens, token_dtype
from dalle.dvae import load_dvae
from dalle.dvae_train import codebook_usage
from dalle.text import TextTokenizer
from pipelines.params import add_seed_argument, load_params
from pipelines.reports import write_csv
from pipelines.tracking import log_artifact, log_metrics, stage_run
from pipelines.train_dvae import MODEL_DIR, PREPARED

TOKENS = Path("data/tokens")
REPORT_DIR = Path("reports/encode")
BARRIER_TIMEOUT = timedelta(hours=24)  # rank 0 waits at the barrier for the slowest rank's shards
PAUSE_ENV = "DALLE_ENCODE_PAUSE_S"  # tests only: seconds to sleep after each shard, so a kill lands mid-run


def shard_range(text: str) -> slice:
    """``START:STOP`` (either may be left out) → a slice of the shard plan."""
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shards: expected START:STOP, e.g. 0:16, got {text!r}") from None


def join_world() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the gloo group torchrun describes, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)  # only barriers: no tensors cross ranks
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        return rank, world, torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return rank, world, torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    add_seed_argument(parser)
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--models", type=Path, default=MODEL_DIR)
    parser.add_argument("--out", type=Path, default=TOKENS)
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--shards", type=shard_range, help="encode only shards START:STOP into the staging area")
    only.add_argument("--merge", action="store_true", help="encode nothing; publish the staged shards")
    args = parser.parse_args(argv)

    params = load_params(args.params, args.seed)
    text_len = params.tokenizer.text_len
    if not (args.models / "model.safetensors").is_file():
        raise FileNotFoundError(f"{args.models}/model.safetensors not found; run the train_dvae stage first")
    rank, world, device = join_world()
    try:
        splits = {split: load_split(args.prepared, split, cache_bytes=0) for split in SPLITS}  # decode per shard
        tasks = plan_shards(splits)
        inputs = [args.models / "model.safetensors", args.models / "config.json", args.prepared / "tokenizer.json"]
        inputs += [args.prepared / split / name for split in SPLITS for name in (INDEX_FILE, RECORDS_FILE)]
        precision = "bf16" if device.type == "cuda" else "fp32"  # mixed_precision's policy: it changes the codes
        staging = Staging(
            args.out.with_name(f".{args.out.name}.staging"),
            inputs_fingerprint(inputs, {"text_len": text_len, "precision": precision}),
        )
        publishing = args.shards is None
        if rank == 0:
            staging.open(restart=publishing and not args.merge)
        barrier()
        if args.merge and rank == 0:
            require_complete(staging, tasks)  # before the MLflow run opens
        model = load_dvae(args.models, device)
        tokenizer = TextTokenizer.from_file(args.prepared / "tokenizer.json")
        with stage_run("encode", params, reports=args.reports) if rank == 0 and publishing else nullcontext():
            selected = [] if args.merge else tasks[args.shards or slice(None)]
            mine = [task for task in selected if task.number % world == rank]
            selected_range = "{}:{}".format(*args.shards.indices(len(tasks))[:2]) if args.shards else "all"
            encoded_by = {"rank": rank, "world": world, "host": socket.gethostname(), "range": selected_range}
            done = 0
            for task in tqdm(mine, desc=f"encode (rank {rank} of {world})", unit="shard"):
                if staging.completed(task) is not None:
                    continue
                started = time.monotonic()
                shard = encode_shard(model, tokenizer, splits[task.split], task.rows, text_len)
                staging.commit(task, shard, {**encoded_by, "seconds": round(time.monotonic() - started, 3)})
                done += 1
                time.sleep(float(os.environ.get(PAUSE_ENV, "0")))
            print(f"rank {rank}: {done} shards encoded, {len(mine) - done} kept from an earlier run", flush=True)
            barrier()  # every rank's shards are staged
            if rank == 0 and publishing:
                grid = params.data.image_size // model.cfg.downsample
                dtype = token_dtype(model.cfg.codebook_size).name
                shard_rows = publish(staging, tasks, args.out, grid, text_len, dtype)
                report(args.out, args.reports, model.cfg.codebook_size, grid, shard_rows)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def report(tokens: Path, reports: Path, codebook_size: int, grid: int, shard_rows: list[dict]) -> None:
    """Codebook usage over the training set and caption counts, to ``reports`` and the active MLflow run."""
    indexes = {split: json.loads((tokens / split / INDEX_FILE).read_text()) for split in SPLITS}
    usage = code_counts(load_tokens(tokens, "train"), codebook_size)
    metrics = {f"train_{k}": v for k, v in codebook_usage(torch.from_numpy(usage)).items()}
    metrics["grid"] = grid
    metrics["captions"] = {split: index["captions"] for split, index in indexes.items()}
    metrics["captions_truncated"] = {split: index["truncated"] for split, index in indexes.items()}
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    ranked = np.sort(usage)[::-1]
    write_csv(reports / "codebook_usage.csv", [{"rank": i, "count": int(c)} for i, c in enumerate(ranked)])
    write_csv(reports / "shards.csv", shard_rows)  # which process encoded each shard, and how long it took
    log_metrics({k: float(v) for k, v in metrics.items() if not isinstance(v, dict)})
    log_artifact(str(reports / "codebook_usage.csv"))
    print(
        f"encoded {sum(metrics['captions'].values())} captions; "
        f"{metrics['train_used_fraction']:.0%} of codes used on train (perplexity {metrics['train_perplexity']:.0f})"
    )


if __name__ == "__main__":
    main()
