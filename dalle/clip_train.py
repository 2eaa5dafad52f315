"""Training loop of the contrastive reranker: AdamW with warm-up and cosine decay, bf16 autocast on CUDA, atomic
checkpoints with exact resume, retrieval top-1/top-5 on validation. One caption per image per epoch, drawn as in
the prior's loop. Knows nothing of trackers: logging hooks in via callbacks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dalle.clip import Clip
from dalle.config import ClipConfig, LoaderConfig
from dalle.data.order import DEFAULT_LOADER, caption_rows, loader_resume_config, make_order
from dalle.data.tokens import TokenSplit
from dalle.pixels import to_float_images
from dalle.schedules import warmup_cosine
from dalle.training import (
    adamw,
    default_device,
    mixed_precision,
    restore_training_state,
    save_training_state,
    set_lr,
)


class Callbacks:
    def on_train_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_validation(self, step: int, metrics: dict[str, float]) -> None: ...


@dataclasses.dataclass
class TrainResult:
    model: Clip
    final: dict[str, float]
    history: list[dict[str, float]]
    val_history: list[dict[str, float]]


def text_batch(tokens: TokenSplit, rows: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    ids = torch.from_numpy(np.asarray(tokens.text_ids[rows], dtype=np.int64)).to(device)
    return ids, torch.from_numpy(np.asarray(tokens.text_lengths[rows], dtype=np.int64)).to(device)


def recall_at(similarity: Tensor, k: int) -> float:
    """Fraction of rows whose own column (the diagonal) is among their k most similar."""
    own = similarity.diagonal()[:, None]
    rank = (similarity > own).sum(dim=1)  # ties count in the row's favour
    return (rank < k).float().mean().item()


@torch.no_grad()
def retrieval(model: Clip, images: np.ndarray, tokens: TokenSplit, n: int, device: torch.device) -> dict[str, float]:
    """Retrieval among the first ``n`` validation images and their first captions, both directions."""
    model.eval()
    n = min(n, len(images))
    image_embeddings, text_embeddings = [], []
    for start in range(0, n, 250):
        stop = min(start + 250, n)
        image_embeddings.append(model.encode_image(to_float_images(images[start:stop], device)))
        text_embeddings.append(model.encode_text(*text_batch(tokens, tokens.caption_offsets[start:stop], device)))
    similarity = torch.cat(text_embeddings) @ torch.cat(image_embeddings).T  # (captions, images)
    return {
        "val_text_to_image_top1": recall_at(similarity, 1),
        "val_text_to_image_top5": recall_at(similarity, 5),
        "val_image_to_text_top1": recall_at(similarity.T, 1),
        "val_image_to_text_top5": recall_at(similarity.T, 5),
    }


def resume_config(
    cfg: ClipConfig, seed: int, data_fingerprint: str, loader: LoaderConfig = DEFAULT_LOADER
) -> dict[str, Any]:
    config = {f"clip.{k}": v for k, v in dataclasses.asdict(cfg).items() if k not in ClipConfig.CADENCE_KEYS}
    return {**config, "seed": seed, "data": data_fingerprint, **loader_resume_config(loader, 1)}


def train_clip(
    cfg: ClipConfig,
    seed: int,
    text_vocab: int,
    train_images: np.ndarray,
    train_tokens: TokenSplit,
    val_images: np.ndarray,
    val_tokens: TokenSplit,
    checkpoint_path: Path | None = None,
    data_fingerprint: str = "",
    callbacks: Callbacks | None = None,
    device: torch.device | None = None,
    loader: LoaderConfig = DEFAULT_LOADER,
) -> TrainResult:
    """Train on uint8 (N, S, S, 3) images and their captions' token rows (memory-mapped is fine), read in
    ``loader.order`` (single process)."""
    if len(train_images) != len(train_tokens):
        raise ValueError(f"{len(train_images)} training images but token data for {len(train_tokens)}")
    callbacks = callbacks or Callbacks()
    device = device or default_device()
    torch.manual_seed(seed)
    model = Clip(cfg, text_vocab, train_tokens.text_ids.shape[1], train_images.shape[1]).to(device)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.98))
    order = make_order(loader, train_tokens.shards, cfg.batch_size, seed)
    config = resume_config(cfg, seed, data_fingerprint, loader)
    step, history, val_history = 0, [], []
    window = {"loss": 0.0, "accuracy": 0.0, "n": 0}
    stateful = {"model": model, "optimizer": optimizer}
    state = restore_training_state(checkpoint_path, config, "clip", stateful, device) if cfg.resume else None
    if state is not None:
        step, history, val_history, window = state["step"], state["history"], state["val_history"], state["window"]

    def checkpoint() -> None:
        progress = {"step": step, "history": history, "val_history": val_history, "window": window}
        save_training_state(checkpoint_path, config, stateful, device, **progress)

    progress = tqdm(total=cfg.steps, initial=step, desc="train_clip", unit="step")
    model.train()
    while step < cfg.steps:
        lr = warmup_cosine(step, cfg.steps, cfg.lr, cfg.lr_min, cfg.warmup_steps)
        set_lr(optimizer, lr)
        picks = order.batch(step)
        rows = caption_rows(picks, train_tokens.caption_offsets)
        pixels = to_float_images(train_images[picks.images], device)
        with mixed_precision(device):
            logits, loss = model(pixels, *text_batch(train_tokens, rows, device))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite reranker loss at step {step}; the last good checkpoint is kept at {checkpoint_path}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1

        targets = torch.arange(len(logits), device=device)
        window["loss"] += loss.item()
        window["accuracy"] += (logits.argmax(dim=1) == targets).float().mean().item()
        window["n"] += 1
        progress.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = window["n"]
            row = {
                "step": step,
                "loss": window["loss"] / n,
                "batch_accuracy": window["accuracy"] / n,
                "temperature": 1 / model.logit_scale.exp().item(),
                "lr": lr,
            }
            window = {"loss": 0.0, "accuracy": 0.0, "n": 0}
            history.append(row)
            callbacks.on_train_log(step, {k: v for k, v in row.items() if k != "step"})
            progress.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['batch_accuracy']:.2f}")
        if step % cfg.val_every == 0 or step == cfg.steps:
            metrics = retrieval(model, val_images, val_tokens, cfg.val_images, device)
            val_history.append({"step": step, **metrics})
            callbacks.on_validation(step, metrics)
            model.train()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    progress.close()
    return TrainResult(model.eval(), {k: v for k, v in val_history[-1].items() if k != "step"}, history, val_history)
