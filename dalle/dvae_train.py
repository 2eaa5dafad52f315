"""Training loop of the dVAE (Ramesh et al. 2021, Appendix A.2): AdamW, cosine LR, cosine τ and β schedules,
EMA weights, atomic checkpoints with exact resume. Knows nothing of trackers: logging hooks in via callbacks.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dalle.config import DvaeConfig, LoaderConfig
from dalle.data.order import DEFAULT_LOADER, first_rows, loader_resume_config, make_order
from dalle.dvae import DiscreteVAE
from dalle.ema import Ema
from dalle.pixels import bits_per_dim, to_float_images, unit_interval_nll
from dalle.schedules import cosine, warmup_cosine
from dalle.training import (
    adamw,
    default_device,
    mixed_precision,
    restore_training_state,
    save_training_state,
    set_lr,
)

WINDOW_KEYS = ("loss", "recon", "kl", "mse", "n")


class Callbacks:
    """Override what you need; the trainer calls these with plain floats and uint8 arrays."""

    def on_train_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_validation(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_images(self, step: int, grid: np.ndarray) -> None: ...


def resume_config(
    cfg: DvaeConfig, seed: int, data_fingerprint: str, loader: LoaderConfig = DEFAULT_LOADER
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: everything that shapes the weights."""
    config = {f"dvae.{k}": v for k, v in dataclasses.asdict(cfg).items() if k not in DvaeConfig.CADENCE_KEYS}
    return {**config, "seed": seed, "data": data_fingerprint, **loader_resume_config(loader, 1)}


@dataclasses.dataclass
class TrainResult:
    model: DiscreteVAE  # the EMA weights
    final: dict[str, float]  # validation metrics of the EMA model at the end
    history: list[dict[str, float]]  # training rows every log_every steps
    val_history: list[dict[str, float]]  # validation rows every val_every steps


def training_images(cfg: DvaeConfig, available: int) -> int:
    """How many training images the dVAE trains on: the first ``cfg.train_images``, or all ``available``."""
    if cfg.train_images is None:
        return available
    if cfg.train_images > available:
        raise ValueError(f"dvae.train_images is {cfg.train_images} but there are only {available} training images")
    return cfg.train_images


def train_dvae(
    cfg: DvaeConfig,
    seed: int,
    train_images: np.ndarray,
    val_images: np.ndarray,
    checkpoint_path: Path | None = None,
    data_fingerprint: str = "",
    callbacks: Callbacks | None = None,
    device: torch.device | None = None,
    loader: LoaderConfig = DEFAULT_LOADER,
) -> TrainResult:
    """Train on uint8 (N, S, S, 3) arrays (prepared shards or memory-mapped are fine), the first
    ``cfg.train_images`` of ``train_images`` when that is set, read in ``loader.order``."""
    n_train = training_images(cfg, len(train_images))
    shards = getattr(train_images, "shard_lengths", None) or (len(train_images),)  # a plain array is one shard
    order = make_order(loader, first_rows(shards, n_train), cfg.batch_size, seed)
    callbacks = callbacks or Callbacks()
    device = device or default_device()
    torch.manual_seed(seed)
    model = DiscreteVAE(cfg).to(device)
    ema = Ema(model, cfg.ema_decay)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    config = resume_config(cfg, seed, data_fingerprint, loader)
    step, history, val_history = 0, [], []
    usage = torch.zeros(cfg.codebook_size, dtype=torch.long, device=device)  # codes seen this log window
    window = dict.fromkeys(WINDOW_KEYS, 0.0)  # sums of loss parts this log window
    stateful = {"model": model, "ema": ema.model, "optimizer": optimizer}
    state = restore_training_state(checkpoint_path, config, "dvae", stateful, device) if cfg.resume else None
    if state is not None:
        step, history, val_history, window = state["step"], state["history"], state["val_history"], state["window"]
        usage.copy_(state["usage"])

    def checkpoint() -> None:
        progress = {"step": step, "history": history, "val_history": val_history, "window": window, "usage": usage}
        save_training_state(checkpoint_path, config, stateful, device, **progress)

    progress = tqdm(total=cfg.steps, initial=step, desc="train_dvae", unit="step")
    model.train()
    while step < cfg.steps:
        tau = cosine(step, cfg.tau_steps, cfg.tau_start, cfg.tau_end)
        beta = cosine(step, cfg.kl_warmup_steps, 0.0, cfg.kl_weight)
        lr = warmup_cosine(step, cfg.steps, cfg.lr, cfg.lr_min, cfg.warmup_steps)
        set_lr(optimizer, lr)
        images = to_float_images(train_images[order.batch(step).images], device)
        with mixed_precision(device):
            loss, parts = model(images, tau=tau, kl_weight=beta)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite dVAE loss at step {step}: loss={loss.item()}, recon={parts['recon'].item()}, "
                f"kl={parts['kl'].item()}; the last good checkpoint is kept at {checkpoint_path}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model, step)
        step += 1

        usage += torch.bincount(parts["codes"].flatten(), minlength=cfg.codebook_size)
        for key in ("recon", "kl", "mse"):
            window[key] += parts[key].item()
        window["loss"] += loss.item()
        window["n"] += 1.0
        progress.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = window.pop("n")
            row = {
                "step": step,
                **{k: v / n for k, v in window.items()},
                "tau": tau,
                "beta": beta,
                "lr": lr,
                **codebook_usage(usage),
            }
            window = dict.fromkeys(WINDOW_KEYS, 0.0)
            history.append(row)
            callbacks.on_train_log(step, {k: v for k, v in row.items() if k != "step"})
            progress.set_postfix(loss=f"{row['loss']:.4f}", mse=f"{row['mse']:.4f}", ppl=f"{row['perplexity']:.0f}")
            usage.zero_()
        if step % cfg.val_every == 0 or step == cfg.steps:
            metrics = evaluate(ema.model, val_images[: cfg.val_images], device)
            val_history.append({"step": step, **metrics})
            callbacks.on_validation(step, metrics)
            model.train()
        if step % cfg.image_every == 0 or step == cfg.steps:
            callbacks.on_images(step, reconstruction_grid(ema.model, val_images[:16], device))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    progress.close()
    return TrainResult(ema.model, {k: v for k, v in val_history[-1].items() if k != "step"}, history, val_history)


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """Perplexity exp(H) of code frequencies, fraction of codes used, and dead (unused) codes."""
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum().item())
    return {
        "perplexity": math.exp(entropy),
        "used_fraction": used / len(counts),
        "dead_codes": len(counts) - used,
    }


@torch.no_grad()
def evaluate(model: DiscreteVAE, images: np.ndarray, device: torch.device, batch_size: int = 250) -> dict[str, float]:
    """Validation with argmax codes (what the prior sees): MSE, PSNR, bits/dim, code usage."""
    model.eval()
    sums = {"mse": 0.0, "nll": 0.0, "kl": 0.0}
    counts = torch.zeros(model.cfg.codebook_size, dtype=torch.long, device=device)
    for start in range(0, len(images), batch_size):
        batch = to_float_images(images[start : start + batch_size], device)
        out = model.hard_elbo(batch)
        sums["mse"] += ((out["recon"] - batch) ** 2).mean(dim=(1, 2, 3)).sum().item()
        sums["nll"] += out["nll"].sum().item()
        sums["kl"] += out["kl_per_dim"].sum().item()
        counts += torch.bincount(out["codes"].flatten(), minlength=model.cfg.codebook_size)
    n = len(images)
    mse = sums["mse"] / n
    metrics = {"val_mse": mse, "val_psnr": 10 * math.log10(1 / max(mse, 1e-12)), "val_kl": sums["kl"] / n}
    nll = unit_interval_nll(model.cfg.recon_loss, sums["nll"] / n, mse)
    metrics["val_bits_per_dim"] = bits_per_dim(nll, sums["kl"] / n)
    usage = codebook_usage(counts)
    metrics.update({f"val_{k}": v for k, v in usage.items()})
    return metrics


@torch.no_grad()
def reconstruct(model: DiscreteVAE, images: np.ndarray, device: torch.device, batch_size: int = 250) -> np.ndarray:
    """uint8 (N, S, S, 3) → uint8 decode(encode(x)), what the prior's tokens can at best give back."""
    model.eval()
    out = np.empty(images.shape, dtype=np.uint8)
    for start in range(0, len(images), batch_size):
        recon = model.decode(model.encode(to_float_images(images[start : start + batch_size], device)))
        out[start : start + len(recon)] = (recon.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
    return out


@torch.no_grad()
def reconstruction_grid(model: DiscreteVAE, images: np.ndarray, device: torch.device) -> np.ndarray:
    """uint8 image: originals on the top row, reconstructions of their argmax codes below."""
    model.eval()
    batch = to_float_images(images, device)
    recon = model.decode(model.encode(batch))
    rows = [torch.cat(list(t.permute(0, 2, 3, 1)), dim=1) for t in (batch, recon)]
    return (torch.cat(rows, dim=0).clamp(0, 1) * 255).round().byte().cpu().numpy()
