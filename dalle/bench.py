"""Measuring what a step costs: timings (median, min, max after warm-up), peak memory, and the workloads the
benchmark stage times: dense GEMM peak, prior training steps, one attention layer per mask kind, sampling with
and without the key/value cache, and the dVAE. Weights are random: none of these costs depends on training.

Peak memory is what the process holds at its highest during a measurement: on CUDA ``max_memory_allocated``; on
Linux CPUs the resident set's high-water mark (``VmHWM``), which writing ``5`` to ``/proc/self/clear_refs``
resets; elsewhere the process's lifetime peak (``ru_maxrss``), labelled as such.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle.blocked_attention import blocked_attention
from dalle.config import DvaeConfig, PriorConfig
from dalle.dvae import DiscreteVAE
from dalle.flops import matmul_flops
from dalle.masks import attention_mask, block_mask
from dalle.prior import Prior, PriorGeometry, compiled_flex_attention
from dalle.sampling import sample_image_tokens
from dalle.training import adamw, mixed_precision

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Measurement:
    median_s: float
    min_s: float
    max_s: float
    runs: int
    peak_memory_mb: float
    memory_kind: str  # cuda_max_allocated | rss_high_water | rss_process_peak

    def as_dict(self) -> dict:
        return dict(vars(self))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Context manager: ``peak_mb`` is the highest memory use inside the block (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.kind = device, 0.0, ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        elif _reset_high_water():
            self.kind = "rss_high_water"
        else:
            self.kind = "rss_process_peak"
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_max_allocated":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "rss_high_water":
            self.peak_mb = _high_water_kb() / 1024
        else:  # ru_maxrss is in kilobytes on Linux, bytes on macOS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _reset_high_water() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _high_water_kb() > 0


def _high_water_kb() -> int:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(run: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Measurement:
    """Call ``run`` ``warmup`` times untimed, then ``repeats`` times timed (each synchronised on CUDA)."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    with PeakMemory(device) as memory:
        for _ in range(warmup):
            run()
        synchronize(device)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            synchronize(device)
            seconds.append(time.perf_counter() - started)
    return Measurement(statistics.median(seconds), min(seconds), max(seconds), repeats, memory.peak_mb, memory.kind)


def machine(device: torch.device) -> dict[str, str | int]:
    """What the numbers were measured on."""
    info: dict[str, str | int] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda_device=props.name, cuda_memory_gb=round(props.total_memory / 2**30), cuda=torch.version.cuda)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fresh_compiles() -> None:
    """Forget every compiled graph, so that a measurement never inherits the guards (or the exhausted recompile
    budget, after which dynamo runs eager code) of the measurements before it."""
    torch._dynamo.reset()


# --- workloads: each returns a zero-argument callable that does one unit of work ---------------------------------


def gemm(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], Tensor], int]:
    """One ``n × n`` matrix product and its FLOPs."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return (lambda: a @ b), matmul_flops(n)


def random_stream(geometry: PriorGeometry, batch_size: int, device: torch.device, seed: int = 0):
    """(text_ids, text_lengths, image_tokens) of random tokens; full-length captions (every text target counts)."""
    generator = torch.Generator().manual_seed(seed)
    g = geometry
    text_ids = torch.randint(g.text_vocab, (batch_size, g.text_len), generator=generator)
    text_lengths = torch.full((batch_size,), g.text_len, dtype=torch.long)
    image_tokens = torch.randint(g.image_vocab, (batch_size, g.grid**2), generator=generator)
    return text_ids.to(device), text_lengths.to(device), image_tokens.to(device)


def prior_training_step(
    cfg: PriorConfig, geometry: PriorGeometry, batch_size: int, device: torch.device
) -> Callable[[], None]:
    """One AdamW step of the prior (forward, backward, clipping, update) on a fixed random batch."""
    torch.manual_seed(0)
    prior = Prior(cfg, geometry).to(device).train()
    if cfg.attn_impl == "flex":
        fresh_compiles()
        prior.use_compiled_flex()
    optimizer = adamw(prior, cfg.lr, cfg.weight_decay, betas=(0.9, 0.95))
    batch = random_stream(geometry, batch_size, device)

    def step() -> None:
        with mixed_precision(device):
            _, loss = prior(*batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip)
        optimizer.step()

    return step


def attention_call(
    kind: str,
    text_len: int,
    grid: int,
    n_heads: int,
    head_dim: int,
    impl: str,
    backward: bool,
    device: torch.device,
    kernel: int = 11,
) -> Callable[[], None]:
    """One attention layer (batch 1) under mask ``kind``: dense-masked SDPA, compiled flex attention or the
    block-local kernel; with
    ``backward``, also the gradients of q, k and v."""
    seq_len = text_len + grid * grid
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, n_heads, seq_len, head_dim, generator=generator).to(device, dtype).requires_grad_(backward)
        for _ in range(3)
    )
    if impl == "dense":
        mask = attention_mask(kind, text_len, grid, kernel).to(device)

        def attend() -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif impl == "flex":
        fresh_compiles()
        blocks, flex = block_mask(kind, text_len, grid, kernel, device=device), compiled_flex_attention()

        def attend() -> Tensor:
            return flex(q, k, v, block_mask=blocks)
    elif impl == "blocked":

        def attend() -> Tensor:
            return blocked_attention(q, k, v, kind, text_len, grid, kernel)
    else:
        raise ValueError(f"unknown attention implementation {impl!r}; expected 'dense', 'flex' or 'blocked'")

    def call() -> None:
        out = attend()
        if backward:
            out.sum().backward()

    return call


def prefix_logits(prior: Prior, text_ids: Tensor, text_lengths: Tensor, image_tokens: Tensor, index: int) -> Tensor:
    """Logits of image token ``index`` computed from scratch: the caption and image tokens ``0..index-1`` run
    through the prior again (what a sampler without a key/value cache does at every position)."""
    logits, cache = prior.prefill(text_ids, text_lengths)
    if index > 0:
        logits, _ = prior.step(cache, image_tokens[:, :index])
    return logits


class SamplingRuns(NamedTuple):
    """Callables drawing one batch of images."""

    cached: Callable[[], object]  # the cached sampler, no guidance
    guided: Callable[[], object]  # the cached sampler with classifier-free guidance (two streams)
    uncached: Callable[[], object]  # the prefix recomputed at a few evenly spaced positions ...
    uncached_scale: float  # ... so that uncached time × this estimates a whole image (mean step cost × grid²)


def sampling_runs(
    prior: Prior, batch_size: int, guidance_scale: float, uncached_positions: int, device: torch.device
) -> SamplingRuns:
    """The sampling workloads of one caption batch (``uncached_positions`` positions for the uncached one)."""
    g = prior.geometry
    text_ids, text_lengths, image_tokens = random_stream(g, batch_size, device)
    positions = sorted({round(i) for i in torch.linspace(0, g.grid**2 - 1, uncached_positions).tolist()})

    @torch.no_grad()
    def uncached() -> None:
        for index in positions:
            logits = prefix_logits(prior, text_ids, text_lengths, image_tokens, index)
            torch.multinomial(F.softmax(logits.float(), dim=-1), 1)

    def cached_with(scale: float) -> Callable[[], Tensor]:
        def run() -> Tensor:
            generator = torch.Generator(device).manual_seed(0)
            with mixed_precision(device):
                return sample_image_tokens(prior, text_ids, text_lengths, guidance_scale=scale, generator=generator)

        return run

    def uncached_autocast() -> None:
        with mixed_precision(device):
            uncached()

    return SamplingRuns(cached_with(1.0), cached_with(guidance_scale), uncached_autocast, g.grid**2 / len(positions))


def dvae_runs(cfg: DvaeConfig, image_size: int, batch_size: int, device: torch.device) -> dict[str, Callable]:
    """Callables for one batch: ``encode`` (images → tokens), ``decode`` (tokens → images), ``train`` (a relaxed
    ELBO step with AdamW)."""
    torch.manual_seed(0)
    model = DiscreteVAE(cfg).to(device)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device)
    side = image_size // cfg.downsample
    tokens = torch.randint(cfg.codebook_size, (batch_size, side, side), device=device)

    def train() -> None:
        model.train()
        with mixed_precision(device):
            loss, _ = model(images, tau=1.0, kl_weight=cfg.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def inference(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            model.eval()
            with mixed_precision(device):
                return fn()

        return run

    return {
        "encode": inference(lambda: model.encode(images)),
        "decode": inference(lambda: model.decode(tokens)),
        "train": train,
    }


def first_line(err: BaseException) -> str:
    """A short reason for a workload that cannot run here."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def grid_of(image_tokens: int) -> int:
    grid = math.isqrt(image_tokens)
    if grid * grid != image_tokens:
        raise ValueError(f"image token count {image_tokens} is not a square grid (256, 1024, 4096, ...)")
    return grid
