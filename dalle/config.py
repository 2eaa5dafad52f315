"""Typed configuration: one frozen dataclass per section of ``params.yaml``.

Field names are the params keys. ``Params.from_dict`` validates a parsed params file strictly: every key must
be present (DVC only tracks keys that are written down, so a silent code default would hide a change from
``dvc repro``), unknown keys are rejected, types are checked against the annotations and ranges by each
section's ``__post_init__``. Every error names the file, the section and the key.

This module never reads files; ``pipelines/params.py`` does.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 220, 220),
    "white": (240, 240, 240),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")


class ParamsError(ValueError):
    """A params file (or mapping) that does not describe a valid configuration."""


class FieldError(ValueError):
    """Raised by a section's validation; the loader adds the file and section to the message."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise FieldError(key, message)


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "dalle"

    def __post_init__(self):
        _check(bool(self.experiment.strip()), "experiment", "must be a non-empty experiment name")


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    source: Literal["shapes", "folder", "manifest", "webdataset"] = "shapes"
    path: str | None = None
    caption_key: str | None = None
    group_key: str | None = None
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    image_size: int = 32
    n_train: int = 10000
    n_val: int = 500
    n_test: int = 1000
    max_objects: int = 1
    captions_per_image: int = 3
    holdout_pairs: tuple[tuple[str, str], ...] = (
        ("red", "triangle"),
        ("blue", "circle"),
        ("yellow", "square"),
        ("cyan", "triangle"),
    )
    heldout_fraction: float = 0.5
    background: tuple[int, int, int] = (255, 255, 255)
    min_size: int = 32
    max_aspect: float = 3.0
    max_pixels: int = 89_478_485
    image_format: Literal["png", "jpeg", "webp"] = "png"
    image_quality: int = 95
    shard_size: int = 4096
    cache_mb: int = 4096
    workers: int = 2

    def __post_init__(self):
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _check(
            self.source == "shapes" or self.path is not None,
            "path",
            f"is required when data.source is {self.source!r} (a folder, a CSV/Parquet manifest or .tar shards)",
        )
        for key in ("caption_key", "group_key"):
            value = getattr(self, key)
            _check(value is None or bool(value.strip()), key, "must be null or a non-empty field name")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            _check(0.0 < value < 1.0, key, f"must be in (0, 1), got {value}")
        _check(
            self.val_fraction + self.test_fraction < 1.0,
            "test_fraction",
            f"val_fraction + test_fraction must leave a training share, got {self.val_fraction + self.test_fraction}",
        )
        _check(all(0 <= c <= 255 for c in self.background), "background", f"must be 0..255 each, got {self.background}")
        _check(self.min_size >= 1, "min_size", f"must be >= 1, got {self.min_size}")
        _check(self.max_aspect >= 1.0, "max_aspect", f"must be >= 1 (long side / short side), got {self.max_aspect}")
        _check(self.max_pixels >= 1, "max_pixels", f"must be >= 1, got {self.max_pixels}")
        _check(1 <= self.image_quality <= 100, "image_quality", f"must be in 1..100, got {self.image_quality}")
        _check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        _check(self.cache_mb >= 0, "cache_mb", f"must be >= 0, got {self.cache_mb}")
        _check(16 <= self.image_size <= 256, "image_size", f"must be in 16..256, got {self.image_size}")
        _check(self.n_train >= 1, "n_train", f"must be >= 1, got {self.n_train}")
        _check(self.n_val >= 1, "n_val", f"must be >= 1, got {self.n_val}")
        _check(self.n_test >= 1, "n_test", f"must be >= 1, got {self.n_test}")
        _check(self.max_objects in (1, 2), "max_objects", f"must be 1 or 2, got {self.max_objects}")
        _check(self.captions_per_image >= 1, "captions_per_image", f"must be >= 1, got {self.captions_per_image}")
        for colour, shape in self.holdout_pairs:
            _check(colour in COLOURS, "holdout_pairs", f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
            _check(shape in SHAPES, "holdout_pairs", f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        _check(len(set(self.holdout_pairs)) == len(self.holdout_pairs), "holdout_pairs", "lists a pair twice")
        _check(
            len(self.holdout_pairs) < len(COLOURS) * len(SHAPES),
            "holdout_pairs",
            "holds out every (colour, shape) pair; nothing is left to train on",
        )
        _check(
            0.0 <= self.heldout_fraction <= 1.0,
            "heldout_fraction",
            f"must be in [0, 1], got {self.heldout_fraction}",
        )
        _check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class LoaderConfig:
    """How the trainers (dVAE, prior, reranker) read their split: see dalle/data/order.py."""

    order: Literal["random", "stream"] = "random"
    shuffle_block: int = 65536

    def __post_init__(self):
        _check(self.shuffle_block >= 1, "shuffle_block", f"must be >= 1 sample, got {self.shuffle_block}")


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 512
    text_len: int = 32

    def __post_init__(self):
        # Byte-level BPE starts from 256 byte symbols; a smaller vocabulary cannot hold them.
        _check(self.vocab_size > 256, "vocab_size", f"must be > 256 (the byte alphabet), got {self.vocab_size}")
        _check(self.text_len >= 1, "text_len", f"must be >= 1, got {self.text_len}")


@dataclass(frozen=True)
class DvaeConfig:
    downsample: int = 4
    codebook_size: int = 512
    hidden: int = 32
    blocks_per_group: int = 1
    codebook_dim: int = 128
    recon_loss: Literal["logit_laplace", "mse", "smooth_l1"] = "mse"
    tau_start: float = 1.0
    tau_end: float = 0.0625
    tau_steps: int = 1000
    hard: bool = False
    kl_weight: float = 0.05
    kl_warmup_steps: int = 300
    lr: float = 3e-3
    lr_min: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    batch_size: int = 64
    steps: int = 1000
    train_images: int | None = None  # train on the first N training images (encode still covers all); null = all
    val_images: int = 500
    log_every: int = 50
    val_every: int = 250
    image_every: int = 250
    checkpoint_every: int = 250
    resume: bool = True

    # Keys that change only what is logged or saved, not the trained weights; a checkpoint may be resumed
    # across changes to these.
    CADENCE_KEYS = ("val_images", "log_every", "val_every", "image_every", "checkpoint_every", "resume")

    def __post_init__(self):
        d = self.downsample
        _check(d >= 1 and d & (d - 1) == 0, "downsample", f"must be a power of two (1, 2, 4, 8, ...), got {d}")
        _check(self.codebook_size >= 2, "codebook_size", f"must be >= 2, got {self.codebook_size}")
        for key in (
            "hidden",
            "blocks_per_group",
            "codebook_dim",
            "batch_size",
            "steps",
            "val_images",
            "log_every",
            "val_every",
            "image_every",
            "checkpoint_every",
        ):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(
            self.train_images is None or self.train_images >= 1,
            "train_images",
            f"must be >= 1 or null (all training images), got {self.train_images}",
        )
        _check(self.hidden % 4 == 0, "hidden", f"must be divisible by 4 (bottleneck width), got {self.hidden}")
        _check(
            0 < self.tau_end <= self.tau_start,
            "tau_end",
            f"need 0 < tau_end <= tau_start, got {self.tau_end}",
        )
        for key in ("tau_steps", "kl_warmup_steps", "warmup_steps"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _check(self.kl_weight >= 0, "kl_weight", f"must be >= 0, got {self.kl_weight}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.lr_min <= self.lr, "lr_min", f"must be in [0, lr], got {self.lr_min}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class PriorConfig:
    """The transformer prior (§2.2, Appendix B) and its training (stage ``train_prior``)."""

    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    schedule: str | tuple[str, ...] = "full"
    conv_kernel: int = 5
    attn_impl: Literal["dense", "flex", "blocked"] = "dense"
    text_loss_weight: float = 0.125
    dropout: float = 0.1
    null_text_prob: float = 0.0
    lr: float = 3e-3
    lr_min: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 64
    steps: int = 1000
    val_images: int = 500
    log_every: int = 25
    val_every: int = 200
    sample_every: int = 200
    samples: int = 8
    checkpoint_every: int = 100
    resume: bool = True
    parallel: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False
    micro_batch_size: int | None = None

    # Keys that change only what is logged, saved, which kernel computes the same attention, or how the same
    # step is laid out over processes and memory; a checkpoint may be resumed across changes to these.
    CADENCE_KEYS = (
        "attn_impl",
        "parallel",
        "activation_checkpointing",
        "micro_batch_size",
        "val_images",
        "log_every",
        "val_every",
        "sample_every",
        "samples",
        "checkpoint_every",
        "resume",
    )

    def __post_init__(self):
        for key in (
            "n_layers",
            "n_heads",
            "d_model",
            "batch_size",
            "steps",
            "val_images",
            "log_every",
            "val_every",
            "sample_every",
            "samples",
            "checkpoint_every",
        ):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(
            self.d_model % self.n_heads == 0, "d_model", f"{self.d_model} is not divisible by n_heads={self.n_heads}"
        )
        from dalle.masks import layer_kinds  # imports torch; only needed here

        try:
            layer_kinds(self.schedule, self.n_layers)
        except ValueError as err:
            raise FieldError("schedule", str(err)) from None
        _check(
            self.conv_kernel >= 1 and self.conv_kernel % 2 == 1, "conv_kernel", f"must be odd, got {self.conv_kernel}"
        )
        _check(0 <= self.text_loss_weight <= 1, "text_loss_weight", f"must be in [0, 1], got {self.text_loss_weight}")
        _check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(0 <= self.null_text_prob < 1, "null_text_prob", f"must be in [0, 1), got {self.null_text_prob}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.lr_min <= self.lr, "lr_min", f"must be in [0, lr], got {self.lr_min}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip > 0, "grad_clip", f"must be > 0 (max gradient norm), got {self.grad_clip}")
        _check(
            self.micro_batch_size is None or self.micro_batch_size >= 1,
            "micro_batch_size",
            f"must be null (the whole per-process batch at once) or >= 1, got {self.micro_batch_size}",
        )


@dataclass(frozen=True)
class ClipConfig:
    """The contrastive reranker (§2.6) and its training (stage ``train_clip``)."""

    embed_dim: int = 64
    text_layers: int = 2
    text_width: int = 128
    text_heads: int = 4
    image_channels: int = 16
    image_stages: int = 3
    lr: float = 1e-3
    lr_min: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.01
    batch_size: int = 128
    steps: int = 800
    val_images: int = 500
    log_every: int = 25
    val_every: int = 200
    checkpoint_every: int = 100
    resume: bool = True

    CADENCE_KEYS = ("val_images", "log_every", "val_every", "checkpoint_every", "resume")

    def __post_init__(self):
        for key in (
            "embed_dim",
            "text_layers",
            "text_width",
            "text_heads",
            "image_stages",
            "batch_size",
            "steps",
            "val_images",
            "log_every",
            "val_every",
            "checkpoint_every",
        ):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(
            self.text_width % self.text_heads == 0,
            "text_width",
            f"{self.text_width} is not divisible by text_heads={self.text_heads}",
        )
        _check(
            self.image_channels >= 4 and self.image_channels % 4 == 0,
            "image_channels",
            f"must be a positive multiple of 4 (group norm), got {self.image_channels}",
        )
        _check(self.batch_size >= 2, "batch_size", f"must be >= 2 (contrastive pairs), got {self.batch_size}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.lr_min <= self.lr, "lr_min", f"must be in [0, lr], got {self.lr_min}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class SampleConfig:
    """Generation with reranking (§2.6): the ``sample`` stage, and the defaults of ``python -m dalle generate``."""

    n_captions: int = 128
    candidates: int = 16
    top: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    batch_size: int = 256

    def __post_init__(self):
        for key in ("n_captions", "candidates", "top", "batch_size"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.top <= self.candidates, "top", f"keeps {self.top} of only {self.candidates} candidates")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1 or null, got {self.top_k}")
        _check(self.top_p is None or 0 < self.top_p <= 1, "top_p", f"must be in (0, 1] or null, got {self.top_p}")
        _check(self.guidance_scale >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}")


@dataclass(frozen=True)
class EvalNetConfig:
    """The evaluation network (``dalle.evalnet``): FID features and caption accuracy (stage ``train_evalnet``)."""

    n_images: int = 6000
    width: int = 16
    features: int = 64
    lr: float = 3e-3
    batch_size: int = 128
    steps: int = 250

    def __post_init__(self):
        for key in ("n_images", "features", "batch_size", "steps"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.width >= 4 and self.width % 4 == 0, "width", f"must be a positive multiple of 4, got {self.width}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


# The smallest Gaussian blur (pixels at the working resolution) accepted for FID vs blur. Below 0.285 px not even a
# 0-to-255 edge changes by half a level, so the 8-bit image is unchanged; at 0.5 px such an edge moves by 27 levels.
MIN_BLUR_SIGMA = 0.5


@dataclass(frozen=True)
class EvalConfig:
    """The ``evaluate`` stage: FID, FID vs blur, FID and accuracy (or CLIP-score) vs rerank N, retrieval, NLL on the
    test split, sample sheets."""

    fid_features: Literal["auto", "inception"] = "auto"
    inception_weights: str | None = None
    n_captions: int = 128
    rerank_n: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    blur_radii: tuple[float, ...] = (0.0, 4.0, 8.0, 16.0, 32.0)
    sheet_captions: int = 32

    def __post_init__(self):
        _check(
            self.fid_features != "inception" or self.inception_weights is not None,
            "inception_weights",
            "is required when eval.fid_features is 'inception' (path to the FID Inception-v3 weights file)",
        )
        _check(self.n_captions >= 2, "n_captions", f"must be >= 2 (FID needs two samples), got {self.n_captions}")
        _check(bool(self.rerank_n), "rerank_n", "must list at least one N")
        _check(all(n >= 1 for n in self.rerank_n), "rerank_n", f"every N must be >= 1, got {list(self.rerank_n)}")
        _check(list(self.rerank_n) == sorted(set(self.rerank_n)), "rerank_n", "must be increasing, without repeats")
        _check(all(r >= 0 for r in self.blur_radii), "blur_radii", f"must be >= 0, got {list(self.blur_radii)}")
        _check(self.sheet_captions >= 1, "sheet_captions", f"must be >= 1, got {self.sheet_captions}")


@dataclass(frozen=True)
class AblationConfig:
    """The attention-mask ablation: one prior per schedule, same step budget and seed, evaluated alike."""

    schedules: tuple[str, ...] = ("paper", "full", "row", "column", "axial", "conv")
    steps: int = 60
    n_captions: int = 128
    study_steps: int = 600
    study_captions: int = 1000
    study_seeds: tuple[int, ...] = (0, 1)

    def __post_init__(self):
        _check_schedules(self.schedules)
        _check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _check(self.n_captions >= 2, "n_captions", f"must be >= 2, got {self.n_captions}")
        _check(self.study_steps >= 1, "study_steps", f"must be >= 1, got {self.study_steps}")
        _check(self.study_captions >= 2, "study_captions", f"must be >= 2, got {self.study_captions}")
        _check_seeds(self.study_seeds, "study_seeds")


@dataclass(frozen=True)
class SeedsConfig:
    """Training seeds of ``pipelines/seeds/dvc.yaml``, each a whole chain beside the default one (``seed``)."""

    extra: tuple[int, ...] = (1, 2)

    def __post_init__(self):
        _check_seeds(self.extra, "extra")


def _check_seeds(seeds: tuple[int, ...], key: str) -> None:
    _check(bool(seeds), key, "must list at least one seed")
    _check(all(s >= 0 for s in seeds), key, f"seeds must be >= 0, got {list(seeds)}")
    _check(len(set(seeds)) == len(seeds), key, f"lists a seed twice: {list(seeds)}")


@dataclass(frozen=True)
class BenchConfig:
    """The benchmark stage (``python -m pipelines.benchmark``): what a step costs at the params' model sizes."""

    warmup: int = 2
    repeats: int = 5
    gemm_size: int = 2048
    batch_size: int = 64
    big_grid: int = 32
    big_batch_size: int = 4
    schedules: tuple[str, ...] = ("full", "paper")
    attn_impls: tuple[str, ...] = ("dense", "flex", "blocked")
    attention_image_tokens: tuple[int, ...] = (256, 1024, 4096)
    attention_text_len: int = 64
    sample_batch_size: int = 16
    guidance_scale: float = 3.0
    uncached_positions: int = 8
    dvae_batch_size: int = 64
    paper_batch_size: int = 1
    paper_d_model: int = 512
    paper_layers: int = 8

    def __post_init__(self):
        _check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        _check(self.paper_batch_size >= 0, "paper_batch_size", f"must be >= 0 (0 skips), got {self.paper_batch_size}")
        for key in (
            "repeats",
            "gemm_size",
            "batch_size",
            "big_grid",
            "big_batch_size",
            "attention_text_len",
            "sample_batch_size",
            "dvae_batch_size",
            "paper_d_model",
            "paper_layers",
        ):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check_schedules(self.schedules)
        _check(bool(self.attn_impls), "attn_impls", "must list at least one of dense, flex, blocked")
        for impl in self.attn_impls:
            _check(impl in ("dense", "flex", "blocked"), "attn_impls", f"unknown attention implementation {impl!r}")
        _check(bool(self.attention_image_tokens), "attention_image_tokens", "must list at least one size")
        for tokens in self.attention_image_tokens:
            side = int(round(tokens**0.5))
            _check(
                tokens >= 1 and side * side == tokens,
                "attention_image_tokens",
                f"{tokens} is not a square grid of image tokens (e.g. 256, 1024, 4096)",
            )
        _check(self.guidance_scale != 1, "guidance_scale", "must differ from 1 (1 is the unguided sampler)")
        _check(self.guidance_scale >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        _check(self.uncached_positions >= 2, "uncached_positions", f"must be >= 2, got {self.uncached_positions}")


def _check_schedules(schedules: tuple[str, ...]) -> None:
    """Key ``schedules``: a non-empty list of named attention schedules, each once."""
    from dalle.masks import SCHEDULES  # imports torch; only needed here

    _check(bool(schedules), "schedules", "must list at least one schedule")
    for name in schedules:
        _check(name in SCHEDULES, "schedules", f"unknown schedule {name!r}; expected names from {SCHEDULES}")
    _check(len(set(schedules)) == len(schedules), "schedules", "lists a schedule twice")


# [kind, low, high(, log)] or [categorical, choice, ...]; a choice may be any value a params key can hold.
SearchSpace = dict[str, tuple[str | bool | int | float | None, ...]]


def _default_dvae_space() -> SearchSpace:
    return {"lr": ("float", 0.0005, 0.005, "log"), "kl_weight": ("float", 0.0, 0.2), "hidden": ("categorical", 16, 32)}


def _default_prior_space() -> SearchSpace:
    return {
        "lr": ("float", 0.0003, 0.01, "log"),
        "d_model": ("categorical", 64, 128, 192),
        "n_layers": ("int", 2, 6),
        "weight_decay": ("float", 0.0, 0.1),
        "text_loss_weight": ("float", 0.05, 0.3),
    }


@dataclass(frozen=True)
class SweepConfig:
    """Optuna sweeps (``python -m pipelines.sweep``): search spaces over the ``dvae`` and ``prior`` sections.

    A space maps a key of the target section to ``[float, low, high]`` or ``[float, low, high, log]``,
    ``[int, low, high]`` (optionally ``log``) or ``[categorical, choice, ...]``, checked against the key's type:
    ``float`` ranges for number keys, ``int`` ranges for integer keys, choices of the key's own type.
    """

    storage: str | None = None
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = 5
    dvae_steps: int = 300
    prior_steps: int = 200
    dvae: SearchSpace = field(default_factory=_default_dvae_space)
    prior: SearchSpace = field(default_factory=_default_prior_space)

    def __post_init__(self):
        startup = self.pruner_startup_trials
        _check(startup >= 0, "pruner_startup_trials", f"must be >= 0, got {startup}")
        for key in ("dvae_steps", "prior_steps"):
            _check(getattr(self, key) >= 4, key, f"must be >= 4 (four intermediate reports), got {getattr(self, key)}")
        for target, section in (("dvae", DvaeConfig), ("prior", PriorConfig)):
            names = [f.name for f in dataclasses.fields(section)]
            hints = typing.get_type_hints(section)
            for name, spec in getattr(self, target).items():
                key = f"{target}.{name}"
                known = ", ".join(names)
                _check(name in names, key, f"unknown parameter of the {target} section; expected one of: {known}")
                _check_spec(key, spec, hints[name])


def _check_spec(key: str, spec: tuple, hint: Any) -> None:
    """One search space against the annotation ``hint`` of the key it samples: a ``float`` range only for a number
    key, an ``int`` range only for an integer key, categorical choices only of the key's own type."""
    kind = spec[0] if spec else None
    _check(kind in ("float", "int", "categorical"), key, f"must start with float, int or categorical, got {list(spec)}")
    if kind == "categorical":
        _check(len(spec) >= 2, key, "a categorical space needs at least one choice")
        for choice in spec[1:]:
            _check(
                _fits(choice, hint),
                key,
                f"choice {choice!r} ({type(choice).__name__}) is not {_describe(hint)}{_yaml_note(choice)}",
            )
        return
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    inner = [a for a in typing.get_args(hint) if a is not type(None)] if optional else [hint]
    numeric = {float: "float", int: "int"}.get(inner[0]) if len(inner) == 1 else None
    _check(
        numeric is not None,
        key,
        f"takes {_describe(hint)}; a {kind} range cannot sample it, use [categorical, choice, ...]",
    )
    _check(
        kind == numeric,
        key,
        f"takes {_describe(inner[0])}: use [{numeric}, low, high] or [{numeric}, low, high, log], got {list(spec)}",
    )
    numbers = spec[1:3]
    _check(
        len(spec) in (3, 4) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers),
        key,
        f"expected [{kind}, low, high] or [{kind}, low, high, log], got {list(spec)}"
        + "".join(_yaml_note(v) for v in numbers),
    )
    _check(numbers[0] < numbers[1], key, f"empty range: low {numbers[0]} must be below high {numbers[1]}")
    if len(spec) == 4:
        _check(spec[3] == "log", key, f"the optional fourth item must be 'log', got {spec[3]!r}")
        _check(numbers[0] > 0, key, f"a log range needs low > 0, got {numbers[0]}")
    if kind == "int":
        _check(all(isinstance(v, int) for v in numbers), key, f"int bounds must be integers, got {list(numbers)}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is valid for a key annotated ``hint`` (the check params.yaml's own values get)."""
    try:
        _coerce(value, hint, "", "")
    except ParamsError:
        return False
    return True


def _yaml_note(value: Any) -> str:
    """A hint for a number that YAML 1.1 read as a string: ``1e-3`` needs a dot and a signed exponent."""
    if not isinstance(value, str) or not re.fullmatch(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+", value):
        return ""
    mantissa, _, exponent = repr(float(value)).partition("e")
    written = f"{mantissa}{'' if '.' in mantissa else '.0'}e{exponent}" if exponent else mantissa
    return f"; YAML reads {value} as a string, write {written}"


@dataclass(frozen=True)
class RegisterConfig:
    """The ``register`` stage: the text-to-image model logged as an MLflow pyfunc and registered under a name."""

    model_name: str = "dalle-workbench"

    def __post_init__(self):
        name = self.model_name
        _check(bool(name.strip()), "model_name", "must be a non-empty registered model name")
        _check(
            name == name.strip() and not any(c in name for c in "/:%"),
            "model_name",
            f"{name!r} cannot be part of a models:/<name>/<version> URI (no '/', ':', '%' or edge spaces)",
        )


@dataclass(frozen=True)
class Params:
    seed: int = 0
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dvae: DvaeConfig = field(default_factory=DvaeConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evalnet: EvalNetConfig = field(default_factory=EvalNetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def __post_init__(self):
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.data.image_size % self.dvae.downsample:
            raise FieldError(
                "data.image_size",
                f"{self.data.image_size} is not divisible by dvae.downsample={self.dvae.downsample}",
            )
        sigmas = {r: r * self.data.image_size / 256 for r in self.eval.blur_radii if r > 0}
        if too_small := [r for r, sigma in sigmas.items() if sigma < MIN_BLUR_SIGMA]:
            smallest = MIN_BLUR_SIGMA * 256 / self.data.image_size
            raise FieldError(
                "eval.blur_radii",
                f"{too_small} blur by less than {MIN_BLUR_SIGMA} px at data.image_size="
                f"{self.data.image_size} (radii are pixels at 256 px), which leaves 8-bit images (nearly) unchanged "
                f"and FID with them; use 0 or radii >= {smallest:g}",
            )
        if self.data.image_size % 2**self.clip.image_stages:
            raise FieldError(
                "clip.image_stages",
                f"2**{self.clip.image_stages} does not divide data.image_size={self.data.image_size}",
            )

    @classmethod
    def from_dict(cls, raw: Any, source: str = "params") -> Params:
        """Build validated params from a parsed params file; ``source`` names the file in errors."""
        if not isinstance(raw, Mapping):
            raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        return _build(cls, raw, source, prefix="")

    def flat(self) -> dict[str, Any]:
        """``{"data.image_size": 32, ...}``: the keys `dvc exp run -S` and MLflow params use."""
        return _flatten(dataclasses.asdict(self))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _build(cls: type, raw: Mapping, source: str, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    where = prefix.rstrip(".") or "top level"
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ParamsError(
            f"{source}: {prefix}{unknown[0]}: unknown key in {where}; expected one of: {', '.join(names)}"
        )
    missing = [n for n in names if n not in raw]
    if missing:
        raise ParamsError(f"{source}: {prefix}{missing[0]}: missing required key in {where}")
    values = {}
    for name in names:
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(raw[name], Mapping):
                raise ParamsError(f"{source}: {key}: expected a section (mapping), got {raw[name]!r}")
            values[name] = _build(hint, raw[name], source, prefix=f"{key}.")
        else:
            values[name] = _coerce(raw[name], hint, source, key)
    try:
        return cls(**values)
    except FieldError as err:
        raise ParamsError(f"{source}: {prefix}{err.key}: {err.message}") from None


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """Check ``value`` against a field annotation; lists become tuples so sections stay hashable."""

    def fail(expected: str):
        raise ParamsError(f"{source}: {key}: expected {expected}, got {value!r} ({type(value).__name__})")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], source, key)
        for alternative in inner:  # e.g. a schedule name or a list of kinds
            try:
                return _coerce(value, alternative, source, key)
            except ParamsError:
                continue
        fail(" or ".join(_describe(a) for a in inner))
    if origin is dict:
        if not isinstance(value, Mapping):
            fail("a mapping")
        for name in value:
            if not isinstance(name, str):
                raise ParamsError(f"{source}: {key}: keys must be strings, got {name!r}")
        return {name: _coerce(item, args[1], source, f"{key}.{name}") for name, item in value.items()}
    if origin is Literal:
        if value not in args:
            fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f"a list of {len(args)} items")
        return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        if not math.isfinite(value):  # YAML reads .inf and .nan as floats; no setting means either
            fail("a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise AssertionError(f"unsupported annotation {hint} for {key}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "a list"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
