"""DVC stage ``train_prior``: ``data/tokens`` → ``models/prior`` (safetensors + config.json) and ``reports/prior``
(metrics, history, the last sample grid), one MLflow run with per-modality curves and sample grids decoded by the
dVAE. Resumes from ``checkpoints/prior`` after a kill.

Data parallel: ``torchrun --nproc-per-node N -m pipelines.train_prior`` (gloo on CPU, nccl on CUDA); only rank 0
logs and writes. ``prior.batch_size`` is the global batch, split evenly over the processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dalle.checkpoint import save_weights
from dalle.data.store import load_split
from dalle.data.tokens import INDEX_FILE, load_tokens
from dalle.dvae import load_dvae
from dalle.prior_train import Callbacks, geometry_of, train_prior
from dalle.text import TextTokenizer
from dalle.viz import contact_sheet
from pipelines.params import add_seed_argument, load_params
from pipelines.reports import write_csv, write_json
from pipelines.tracking import MlflowCurves, log_artifact, log_image, log_metrics, training_run
from pipelines.train_dvae import MODEL_DIR as DVAE_DIR
from pipelines.train_dvae import PREPARED

TOKENS = Path("data/tokens")
MODEL_DIR = Path("models/prior")
REPORT_DIR = Path("reports/prior")
CHECKPOINT = Path("checkpoints/prior/last.pt")


class MlflowCallbacks(MlflowCurves, Callbacks):
    """Curves to MLflow; sample token grids decoded by the dVAE and logged (and kept) as a contact sheet."""

    def __init__(self, dvae, captions: list[str], sheet_path: Path):
        self.dvae, self.captions, self.sheet_path = dvae, captions, sheet_path

    @torch.no_grad()
    def on_samples(self, step: int, image_tokens: np.ndarray) -> None:
        device = next(self.dvae.parameters()).device
        pixels = self.dvae.decode(torch.from_numpy(image_tokens.astype(np.int64)).to(device))  # (n, 3, S, S)
        images = (pixels.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
        sheet = contact_sheet(images, [f"{c} (step {step})" for c in self.captions], columns=4, cell=96)
        log_image(np.asarray(sheet), key="samples", step=step)
        self.sheet_path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(self.sheet_path)


def data_fingerprint(tokens: Path) -> str:
    """Identifies the token data a checkpoint was trained on: each split's index holds the sha256 of every file."""
    digest = hashlib.sha256()
    for split in ("train", "val"):
        digest.update((tokens / split / INDEX_FILE).read_bytes())
    return digest.hexdigest()[:16]


def sample_captions(prepared: Path, tokens: Path, n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``n`` captions to sample during training: half from validation images (seen combinations), half from test
    images with held-out combinations where the dataset has them (zero-shot). Each image's first caption."""
    chosen: list[tuple[str, int]] = []  # (split, image index)
    held_out = load_split(prepared, "test").records.get("held_out")
    n_held_out = n // 2 if held_out is not None and held_out.any() else 0
    val_images = len(load_split(prepared, "val"))
    chosen += [("val", i) for i in range(min(n - n_held_out, val_images))]
    if n_held_out:
        chosen += [("test", int(i)) for i in np.flatnonzero(held_out.to_numpy())[:n_held_out]]
    captions, ids, lengths = [], [], []
    for split, image in chosen:
        split_tokens = load_tokens(tokens, split)
        row = split_tokens.caption_offsets[image]
        captions.append(str(load_split(prepared, split).records["captions"].iloc[image][0]))
        ids.append(np.asarray(split_tokens.text_ids[row], dtype=np.int64))
        lengths.append(int(split_tokens.text_lengths[row]))
    return captions, torch.from_numpy(np.stack(ids)), torch.tensor(lengths)


def init_distributed() -> torch.device:
    """Join the process group torchrun describes (if any) and return this process's device."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    add_seed_argument(parser)
    parser.add_argument("--prepared", type=Path, default=PREPARED)
    parser.add_argument("--tokens", type=Path, default=TOKENS)
    parser.add_argument("--dvae", type=Path, default=DVAE_DIR)
    parser.add_argument("--models", type=Path, default=MODEL_DIR)
    parser.add_argument("--reports", type=Path, default=REPORT_DIR)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args(argv)

    params = load_params(args.params, args.seed)
    cfg = params.prior
    if not (args.dvae / "model.safetensors").is_file():
        raise FileNotFoundError(f"{args.dvae}/model.safetensors not found; run the train_dvae stage first")
    device = init_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    train_tokens, val_tokens = load_tokens(args.tokens, "train"), load_tokens(args.tokens, "val")
    dvae = load_dvae(args.dvae, device)
    tokenizer = TextTokenizer.from_file(args.prepared / "tokenizer.json")
    geometry = geometry_of(train_tokens, tokenizer.vocab_size, dvae.cfg.codebook_size)
    captions, ids, lengths = sample_captions(args.prepared, args.tokens, cfg.samples)
    callbacks = MlflowCallbacks(dvae, captions, args.reports / "samples.png")
    run_context = (
        training_run("train_prior", params, args.checkpoint, cfg.resume, reports=args.reports, datasets=[args.tokens])
        if rank == 0
        else nullcontext()
    )
    try:
        with run_context as run:
            started = time.monotonic()
            result = train_prior(
                cfg,
                params.seed,
                geometry,
                train_tokens,
                val_tokens,
                args.checkpoint,
                data_fingerprint(args.tokens),
                callbacks,
                sample_text=(ids, lengths),
                device=device,
                loader=params.loader,
            )
            seconds = time.monotonic() - started
            if rank != 0:
                return
            config = {**dataclasses.asdict(cfg), "geometry": dataclasses.asdict(geometry)}
            save_weights(result.model, args.models, config)
            # The prior's text ids mean nothing without their tokenizer: keep it beside the weights.
            shutil.copyfile(args.prepared / "tokenizer.json", args.models / "tokenizer.json")
            metrics = {
                **result.final,
                "steps": cfg.steps,
                "train_seconds_this_run": round(seconds, 1),
                "tokens_per_s": float(np.median([row["tokens_per_s"] for row in result.history])),
                "peak_memory_mb": round(peak_memory_mb(device), 1),
                "parameters": sum(p.numel() for p in result.model.parameters()),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            }
            write_json(args.reports / "metrics.json", metrics)
            write_csv(args.reports / "history.csv", result.history)
            write_csv(args.reports / "val_history.csv", result.val_history)
            for name in ("metrics.json", "history.csv", "val_history.csv"):
                log_artifact(str(args.reports / name))
            log_artifact(str(args.models / "config.json"), artifact_path="model")
            log_metrics({k: float(v) for k, v in metrics.items() if not k.startswith("val_")})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(
        f"prior: val image {metrics['val_image_bits']:.3f} bits/token, text {metrics['val_text_nll']:.3f} nats/token, "
        f"{metrics['tokens_per_s']:.0f} tokens/s, {seconds:.0f} s; MLflow run {run.info.run_id}"
    )


if __name__ == "__main__":
    main()
