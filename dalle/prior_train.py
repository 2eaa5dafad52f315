"""Training loop of the transformer prior (Ramesh et al. 2021, §2.2, Appendix B.2): AdamW with warm-up and cosine
decay, global-norm gradient clipping, bf16 autocast on CUDA, atomic checkpoints with exact resume, gradient
accumulation over micro-batches, optional activation checkpointing, and data parallelism when
``torch.distributed`` is initialised (``torchrun``): every rank takes an equal share of each global batch, and DDP
or FSDP2 (``prior.parallel``, ``dalle/parallel.py``) averages their gradients. Knows nothing of trackers: logging
hooks in via callbacks.

Each epoch draws one caption per image (§2.2 trains on one of an image's captions at a time), as a pure
function of (seed, epoch), so resumed and data-parallel runs see the same (image, caption) pairs.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dalle.checkpoint import CheckpointMismatch
from dalle.config import LoaderConfig, PriorConfig
from dalle.data.order import DEFAULT_LOADER, RandomOrder, StreamOrder, caption_rows, loader_resume_config, make_order
from dalle.data.tokens import TokenSplit
from dalle.parallel import (
    full_state,
    full_value,
    gradient_sync,
    is_sharded,
    load_sharded,
    read_progress,
    save_sharded,
    sharded_path,
    world,
    wrap,
)
from dalle.prior import Prior, PriorGeometry, PriorLosses, text_targets
from dalle.sampling import sample_image_tokens
from dalle.schedules import warmup_cosine
from dalle.training import (
    adamw,
    check_same_config,
    default_device,
    mixed_precision,
    restore_rng,
    restore_training_state,
    rng_state,
    save_training_state,
    set_lr,
)

# Sums over a log window; reduced over ranks before they become a history row.
WINDOW_KEYS = ("text_ce", "text_count", "image_ce", "image_count", "grad_norm", "steps", "tokens", "seconds")


class Callbacks:
    """Override what you need; only rank 0 calls them, with plain floats and integer arrays."""

    def on_train_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_validation(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_samples(self, step: int, image_tokens: np.ndarray) -> None:
        """``image_tokens``: (n, grid, grid) sampled for the sample captions given to ``train_prior``."""


class Batch(NamedTuple):
    text_ids: Tensor  # (B, text_len) long
    text_lengths: Tensor  # (B,) long
    image_tokens: Tensor  # (B, grid²) long


@dataclasses.dataclass
class TrainResult:
    model: Prior
    final: dict[str, float]  # validation metrics at the end
    history: list[dict[str, float]]  # training rows every log_every steps
    val_history: list[dict[str, float]]  # validation rows every val_every steps


def all_reduce_sum(values: Tensor) -> Tensor:
    if world()[1] > 1:
        torch.distributed.all_reduce(values)
    return values


def geometry_of(tokens: TokenSplit, text_vocab: int, image_vocab: int) -> PriorGeometry:
    text_len, grid = tokens.text_ids.shape[1], tokens.image_tokens.shape[1]
    return PriorGeometry(text_vocab=text_vocab, text_len=text_len, image_vocab=image_vocab, grid=grid)


def to_batch(tokens: TokenSplit, images: np.ndarray, rows: np.ndarray, device: torch.device) -> Batch:
    def tensor(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(array, dtype=np.int64)).to(device)

    return Batch(
        text_ids=tensor(tokens.text_ids[rows]),
        text_lengths=tensor(tokens.text_lengths[rows]),
        image_tokens=tensor(tokens.image_tokens[images].reshape(len(images), -1)),
    )


def training_order(
    tokens: TokenSplit, batch_size: int, seed: int, loader: LoaderConfig = DEFAULT_LOADER
) -> RandomOrder | StreamOrder:
    """The order this rank reads ``tokens`` in (``loader.order``), for a global batch of ``batch_size``."""
    rank, size = world()
    return make_order(loader, tokens.shards, batch_size, seed, rank, size)


def training_batch(
    tokens: TokenSplit,
    order: RandomOrder | StreamOrder,
    step: int,
    device: torch.device,
    null_text_prob: float = 0.0,
) -> Batch:
    """This rank's share of global batch ``step``. With probability ``null_text_prob`` a pair's caption is dropped
    (length 0: the all-pad text), which trains the unconditional model that classifier-free guidance contrasts
    with the conditional one."""
    picks = order.batch(step)
    batch = to_batch(tokens, picks.images, caption_rows(picks, tokens.caption_offsets), device)
    keep = torch.from_numpy(order.pair_draws(step, stream=2) >= null_text_prob).to(device)
    return batch._replace(text_lengths=batch.text_lengths * keep)


def global_text_count(batch: Batch) -> Tensor:
    """Text targets of the whole global batch (every rank's share of it)."""
    return all_reduce_sum(text_targets(batch.text_lengths).double().reshape(1))[0]


def training_losses(
    model: torch.nn.Module, prior: Prior, batch: Batch, global_count: Tensor | None = None, share: float = 1.0
) -> tuple[PriorLosses, Tensor]:
    """Losses of this rank's share, normalised so that the ranks' gradient average (DDP, FSDP) equals the gradient
    of the loss of the whole global batch (text targets differ per rank, so each rank divides by the global count
    / world). ``batch`` may be a micro-batch holding ``share`` of this rank's pairs (``global_count`` then comes
    from the whole share): its image term is weighted by ``share``, so the micro-batches' gradients sum to the
    whole share's. Returns the losses (``loss`` is what to backpropagate) and the global number of text targets."""
    _, size = world()
    if global_count is None:
        global_count = global_text_count(batch)
    with mixed_precision(batch.image_tokens.device):
        logits, _ = model(*batch)
    losses = prior.losses(logits, *batch, text_count=global_count / size)
    if share != 1.0:
        w = prior.cfg.text_loss_weight
        losses = losses._replace(loss=w * losses.text_nll + (1 - w) * losses.image_nll * share)
    return losses, global_count


def micro_batches(batch: Batch, size: int | None) -> list[Batch]:
    """``batch`` cut into consecutive micro-batches of ``size`` pairs (the last may be smaller); None: whole."""
    if size is None or size >= len(batch.text_ids):
        return [batch]
    return [Batch(*(t[start : start + size] for t in batch)) for start in range(0, len(batch.text_ids), size)]


@torch.no_grad()
def evaluate_prior(prior: Prior, tokens: TokenSplit, n_images: int, device: torch.device, batch_size: int = 250):
    """Text and image NLL with each image's first caption, over the first ``n_images`` images (sharded over
    ranks, summed exactly)."""
    rank, size = world()
    prior.eval()
    n_images = min(n_images, len(tokens))
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # text CE, text targets, image CE, image tokens
    shard = np.arange(n_images)[rank::size]
    batches = math.ceil(math.ceil(n_images / size) / batch_size)  # rank 0 has the most images: all run as many
    for start in range(0, batches * batch_size, batch_size):
        images = shard[start : start + batch_size]
        if not len(images):  # a sharded model's forward is a collective: take part, count nothing
            with mixed_precision(device):
                prior(*to_batch(tokens, np.zeros(1, np.int64), tokens.caption_offsets[:1], device))
            continue
        batch = to_batch(tokens, images, tokens.caption_offsets[images], device)
        with mixed_precision(device):
            logits, _ = prior(*batch)
        losses = prior.losses(logits, *batch)
        count = text_targets(batch.text_lengths).double()
        n_image = float(batch.image_tokens.numel())
        sums += torch.stack([losses.text_nll * count, count, losses.image_nll * n_image, count.new_tensor(n_image)])
    text_ce, text_count, image_ce, image_count = all_reduce_sum(sums).tolist()
    text_nll, image_nll = text_ce / max(text_count, 1), image_ce / image_count
    w = prior.cfg.text_loss_weight
    return {
        "val_loss": w * text_nll + (1 - w) * image_nll,
        "val_text_nll": text_nll,
        "val_image_nll": image_nll,
        "val_image_bits": image_nll / math.log(2),
    }


@torch.no_grad()
def image_bits_per_image(
    prior: Prior, tokens: TokenSplit, n_images: int, device: torch.device, batch_size: int = 250
) -> np.ndarray:
    """Image NLL in bits per token of each of the first ``n_images`` images with its first caption (one process):
    the per-image values whose mean is ``evaluate_prior``'s ``val_image_bits``, for an interval over images."""
    prior.eval()
    n_images = min(n_images, len(tokens))
    out = []
    for start in range(0, n_images, batch_size):
        images = np.arange(start, min(start + batch_size, n_images))
        batch = to_batch(tokens, images, tokens.caption_offsets[images], device)
        with mixed_precision(device):
            logits, _ = prior(*batch)
        ce = torch.nn.functional.cross_entropy(
            logits.image.flatten(0, 1).float(), batch.image_tokens.flatten().long(), reduction="none"
        )
        out.append((ce.view(len(images), -1).double().mean(1) / math.log(2)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def resume_config(
    cfg: PriorConfig,
    seed: int,
    geometry: PriorGeometry,
    data_fingerprint: str,
    loader: LoaderConfig = DEFAULT_LOADER,
    world_size: int = 1,
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: everything that shapes the weights."""
    config = {f"prior.{k}": v for k, v in dataclasses.asdict(cfg).items() if k not in PriorConfig.CADENCE_KEYS}
    config.update({f"geometry.{k}": v for k, v in dataclasses.asdict(geometry).items()})
    return {**config, "seed": seed, "data": data_fingerprint, **loader_resume_config(loader, world_size)}


def train_prior(
    cfg: PriorConfig,
    seed: int,
    geometry: PriorGeometry,
    train_tokens: TokenSplit,
    val_tokens: TokenSplit,
    checkpoint_path: Path | None = None,
    data_fingerprint: str = "",
    callbacks: Callbacks | None = None,
    sample_text: tuple[Tensor, Tensor] | None = None,
    device: torch.device | None = None,
    loader: LoaderConfig = DEFAULT_LOADER,
) -> TrainResult:
    """Train on token arrays (memory-mapped is fine), read in ``loader.order``. ``sample_text`` (ids, lengths) are
    the captions sampled for ``callbacks.on_samples`` every ``sample_every`` steps. Under torchrun, call on every
    rank; rank 0 alone calls the callbacks and writes checkpoints, and ``batch_size`` is the global batch."""
    rank, size = world()
    if cfg.batch_size % size:
        raise ValueError(f"prior.batch_size={cfg.batch_size} must be divisible by the {size} data-parallel processes")
    callbacks = callbacks or Callbacks()
    device = device or default_device()
    if cfg.attn_impl == "flex" and device.type == "cpu":
        raise ValueError(
            f"prior.attn_impl: flex cannot train on CPU: torch {torch.__version__} has no flex-attention backward "
            "there. Train with dense on CPU; flex trains on CUDA, and speeds up evaluation on either."
        )
    torch.manual_seed(seed)
    prior = Prior(cfg, geometry).to(device)
    if cfg.attn_impl == "flex":
        prior.use_compiled_flex()
    # DDP wraps the prior (and broadcasts rank 0's weights); FSDP shards it in place: build the optimizer after.
    model = wrap(prior, prior.blocks, cfg.parallel, device)
    optimizer = adamw(prior, cfg.lr, cfg.weight_decay, betas=(0.9, 0.95))
    order = training_order(train_tokens, cfg.batch_size, seed, loader)
    config = resume_config(cfg, seed, geometry, data_fingerprint, loader, size)
    step, history, val_history = 0, [], []
    window = dict.fromkeys(WINDOW_KEYS, 0.0)
    stateful = {"model": prior, "optimizer": optimizer}
    sharded_dir = sharded_path(checkpoint_path) if checkpoint_path is not None else None
    state = None
    if cfg.resume and sharded_dir is not None and (progress := read_progress(sharded_dir)) is not None:
        state = check_same_config(progress, config, sharded_dir, "prior")
        load_sharded(Path(progress["directory"]), prior, optimizer)  # re-sharded to this world size
        restore_rng(state, device)
    elif cfg.resume and is_sharded(model) and checkpoint_path is not None and checkpoint_path.is_file():
        raise CheckpointMismatch(
            f"checkpoint {checkpoint_path} was written without FSDP (one file, not a sharded directory); resume it "
            "with prior.parallel: ddp, or set prior.resume: false to start fresh"
        )
    elif cfg.resume:
        state = restore_training_state(checkpoint_path, config, "prior", stateful, device)
    if state is not None:
        step, history, val_history, window = state["step"], state["history"], state["val_history"], state["window"]

    def checkpoint() -> None:
        if checkpoint_path is None:
            return
        progress = {"step": step, "history": history, "val_history": val_history, "window": window}
        if is_sharded(model):  # every rank writes its shards
            save_sharded(sharded_dir, prior, optimizer, {**progress, "config": config, **rng_state(device)})
            if rank == 0:
                checkpoint_path.unlink(missing_ok=True)
        elif rank == 0:
            save_training_state(checkpoint_path, config, stateful, device, **progress)
            shutil.rmtree(sharded_dir, ignore_errors=True)  # superseded (e.g. written by more ranks earlier)

    def replica() -> Prior | None:
        """The whole prior on rank 0 (gathered from the shards under FSDP: every rank calls this), else None."""
        if not is_sharded(model):
            return prior if rank == 0 else None
        state = full_state(model)
        if rank != 0:
            return None
        whole = Prior(cfg, geometry).to(device)
        whole.load_state_dict(state)
        return whole.eval()

    def sample() -> None:
        if sample_text is None:
            return
        sampler = replica()
        if sampler is None:
            return
        sampler.eval()
        generator = torch.Generator(device).manual_seed(seed)  # the same draw at every interval: comparable grids
        with mixed_precision(device):
            image_tokens = sample_image_tokens(sampler, *(t.to(device) for t in sample_text), generator=generator)
        grid = geometry.grid
        callbacks.on_samples(step, image_tokens.view(-1, grid, grid).cpu().numpy())

    progress = tqdm(total=cfg.steps, initial=step, desc="train_prior", unit="step", disable=rank != 0)
    model.train()
    while step < cfg.steps:
        started = time.perf_counter()
        lr = warmup_cosine(step, cfg.steps, cfg.lr, cfg.lr_min, cfg.warmup_steps)
        set_lr(optimizer, lr)
        batch = training_batch(train_tokens, order, step, device, cfg.null_text_prob)
        global_count = global_text_count(batch)
        optimizer.zero_grad(set_to_none=True)
        parts = micro_batches(batch, cfg.micro_batch_size)
        part_losses = []
        for index, part in enumerate(parts):
            with gradient_sync(model, enabled=index == len(parts) - 1):  # reduce once, after the last part
                share = len(part.text_ids) / len(batch.text_ids)
                losses, _ = training_losses(model, prior, part, global_count, share)
                losses.loss.backward()
            part_losses.append(torch.stack([losses.loss, losses.text_nll, losses.image_nll]).detach())
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip))
        # The step's scalars in one host sync (each .item() would stall a GPU's queue), checked before the update.
        totals = torch.stack([global_count.float(), text_targets(batch.text_lengths).float(), grad_norm.float()])
        values = torch.cat([*part_losses, totals.to(part_losses[0].device)]).tolist()
        (count, text_count, norm), per_part = values[-3:], [values[i : i + 3] for i in range(0, len(values) - 3, 3)]
        for loss, text_nll, image_nll in per_part:
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite prior loss at step {step} on rank {rank}: text_nll={text_nll}, "
                    f"image_nll={image_nll}; the last good checkpoint is kept at {checkpoint_path}"
                )
        optimizer.step()
        step += 1

        for (_, text_nll, image_nll), part in zip(per_part, parts):
            window["text_ce"] += text_nll * count / size
            window["image_ce"] += image_nll * part.image_tokens.numel()
        window["text_count"] += text_count
        window["image_count"] += batch.image_tokens.numel()
        window["grad_norm"] += norm / size  # identical on every rank after the all-reduce
        window["steps"] += 1 / size
        window["tokens"] += len(batch.text_ids) * geometry.seq_len
        window["seconds"] += (time.perf_counter() - started) / size
        progress.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            sums = dict(zip(WINDOW_KEYS, all_reduce_sum(torch.tensor(list(window.values()), device=device)).tolist()))
            text_nll, image_nll = sums["text_ce"] / max(sums["text_count"], 1), sums["image_ce"] / sums["image_count"]
            w = cfg.text_loss_weight
            row = {
                "step": step,
                "loss": w * text_nll + (1 - w) * image_nll,
                "text_nll": text_nll,
                "image_nll": image_nll,
                "image_bits": image_nll / math.log(2),
                "grad_norm": sums["grad_norm"] / sums["steps"],
                "lr": lr,
                "tokens_per_s": sums["tokens"] / sums["seconds"],
            }
            window = dict.fromkeys(WINDOW_KEYS, 0.0)
            history.append(row)
            if rank == 0:
                callbacks.on_train_log(step, {k: v for k, v in row.items() if k != "step"})
            shown = {"text": text_nll, "bits": row["image_bits"], "tok_s": row["tokens_per_s"]}
            progress.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
        if step % cfg.val_every == 0 or step == cfg.steps:
            metrics = evaluate_prior(prior, val_tokens, cfg.val_images, device)
            val_history.append({"step": step, **metrics})
            if rank == 0:
                callbacks.on_validation(step, metrics)
            model.train()
        if step % cfg.sample_every == 0 or step == cfg.steps:
            sample()
            model.train()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    progress.close()
    final = {k: v for k, v in val_history[-1].items() if k != "step"}
    whole = replica()  # rank 0: the whole trained prior, plain tensors (gathered from the shards under FSDP)
    return TrainResult((whole if whole is not None else prior).eval(), final, history, val_history)
