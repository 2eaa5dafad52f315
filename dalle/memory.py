"""How much memory one training process needs for the transformer prior (Ramesh et al. 2021, §2.2, §2.5, App. B).

Pure arithmetic over ``PriorConfig`` and ``PriorGeometry``, counted the way ``dalle.prior`` builds and runs the
model, in bytes per process:

- **States.** Parameters ``P = L·(12d² + 13d) + d·(2·text_vocab + 2·image_vocab + 2·text_len + 2·grid + 2)``; fp32
  weights, fp32 gradients and AdamW's two fp32 moments (16 bytes per parameter) plus AdamW's 4-byte ``step`` per
  tensor. Mixed precision keeps these fp32 masters: on CUDA the project computes under bf16 autocast, and under
  FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (``dalle.parallel.wrap``). FSDP on N
  ranks divides the states by N (``⌈P/N⌉``; FSDP's row padding is ignored); DDP does not.
- **Activations**, the tensors autograd saves for backward, per sequence position of a micro-batch. Per block:
  both LayerNorms' inputs (fp32: CUDA autocast runs LayerNorm in fp32) and their mean/rstd, ``8d + 16``; in the
  compute dtype (``c`` bytes) the inputs of the four matmuls ``7d``, q/k/v ``3d`` and the GELU input ``4d``, so
  ``14·c·d``; the attention kernel's own saves; dropout masks when ``dropout > 0``. Outside the blocks: token
  indices, the final LayerNorm's input, the heads' inputs and the fp32 log-probabilities the cross-entropies keep
  (``4·vocab`` per predicting position: the text and image heads dominate the rest at small widths).
- **Attention, measured** (``tests/test_memory.py``). With the dense boolean ``(T, T)`` mask, SDPA in torch 2.13 on
  CPU runs the fused ``_scaled_dot_product_flash_attention_for_cpu`` kernel, not the math path: it saves q, k, v
  (views of the qkv output), its output, a logsumexp ``(B, heads, T)`` in fp32, and the mask converted to an
  additive ``(T, T)`` tensor of the compute dtype, once per layer and not per sample or head: ``c·T²`` per layer.
  On CUDA the mask rules out flash, and the memory-efficient kernel saves the same things (assumed here, not
  measured). The math fallback (``sdpa="math"``, e.g. under ``sdpa_kernel(SDPBackend.MATH)``) instead keeps the
  softmax probabilities ``(B, heads, T, T)``: ``c·heads·T`` per position, per layer; at the paper's size that is
  194 MiB per layer and sequence, more than the rest of the block (175 MiB), and it grows with T.
- **Activation checkpointing** keeps only each block's input (``r·d`` per position, ``r`` the residual stream's
  bytes: fp32, or bf16 under FSDP's bf16 parameters), plus one block's full activations during its recompute.
- **Transients of sharding.** FSDP2 all-gathers the root's weights (embeddings, final norm, heads; not resharded
  after forward) and one block, plus ``prefetch`` blocks ahead, in the parameter dtype; in backward a unit's
  unsharded gradients plus the fp32 reduce-scatter input. DDP keeps fp32 gradient buckets as large as the
  gradients, for the whole run. Plain bf16 autocast (no FSDP) saves bf16 copies of the matmul weights for backward.
- **The optimizer step** runs after backward has freed the activations. On CUDA, AdamW's default foreach path
  allocates ``sqrt(v)`` for all of this rank's parameters at once (``4·⌈P/N⌉``); on CPU it loops over tensors, so
  only the largest tensor's.

``total`` = states + buckets + max(forward/backward transients, the step's buffer). The true peak also holds a few
short-lived tensors not counted here (gradients of logits and activations in flight): a few percent at d = 512.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Literal

from dalle.config import PriorConfig
from dalle.prior import PriorGeometry

GiB = 2**30

# The paper's 12B prior (Appendix B.1): 64 layers of width 3968 (62 heads of 64), 256 text tokens from a
# 16384-token vocabulary, a 32 × 32 grid of 8192 image codes (T = 1280), an 11 × 11 conv mask.
PAPER_12B = PriorConfig(n_layers=64, n_heads=62, d_model=3968, schedule="paper", conv_kernel=11)
PAPER_GEOMETRY = PriorGeometry(text_vocab=16384, text_len=256, image_vocab=8192, grid=32)

Precision = Literal["fp32", "bf16"]  # fp32: the project's CPU path; bf16: autocast (and FSDP's policy) on CUDA


def block_parameters(d_model: int) -> int:
    """One block: qkv (3d² + 3d), out proj (d² + d), MLP (4d² + 4d, 4d² + d), two LayerNorms (2d each)."""
    return 12 * d_model**2 + 13 * d_model


def outer_parameters(cfg: PriorConfig, geometry: PriorGeometry) -> int:
    """Embeddings (text, pad, text position, image, row, column), final LayerNorm and the two bias-free heads."""
    g = geometry
    return cfg.d_model * (2 * g.text_vocab + 2 * g.image_vocab + 2 * g.text_len + 2 * g.grid + 2)


def parameter_count(cfg: PriorConfig, geometry: PriorGeometry) -> int:
    return cfg.n_layers * block_parameters(cfg.d_model) + outer_parameters(cfg, geometry)


def parameter_tensors(cfg: PriorConfig) -> int:
    """Number of parameter tensors (AdamW keeps one ``step`` scalar per tensor): 12 per block, 10 outside."""
    return 12 * cfg.n_layers + 10


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process holds while training the prior."""

    parameters: int  # fp32 weights (this rank's shard)
    gradients: int  # fp32 gradients (this rank's shard)
    optimizer: int  # AdamW moments + step counters
    buckets: int  # DDP: fp32 gradient buckets, kept for the whole run
    activations: int  # saved for backward at the end of the forward pass
    recompute: int  # activation checkpointing: one block's activations while it is recomputed
    gathered: int  # FSDP: unsharded weights held at once (root + current block + prefetched ones)
    gradient_buffers: int  # FSDP, in backward: a unit's unsharded grads + the fp32 reduce-scatter input
    step_buffer: int  # AdamW's temporary sqrt(v) during the optimizer step

    @property
    def states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def passes(self) -> int:
        """What forward and backward add on top of the states."""
        return self.activations + self.recompute + self.gathered + self.gradient_buffers

    @property
    def total(self) -> int:
        """Peak bytes: the optimizer step runs after backward has freed the activations."""
        return self.states + self.buckets + max(self.passes, self.step_buffer)

    def gib(self) -> dict[str, float]:
        parts = {f.name: getattr(self, f.name) / GiB for f in fields(self)}
        return {**parts, "total": self.total / GiB}


def block_bytes_per_position(
    cfg: PriorConfig, seq_len: int, precision: Precision = "fp32", sdpa: Literal["fused", "math"] = "fused"
) -> int:
    """Bytes one block saves for backward per sequence position (the per-layer mask not included)."""
    d, c = cfg.d_model, _compute_bytes(precision)
    norms = 2 * (4 * d + 8)  # LayerNorm inputs in fp32 + mean and rstd
    matmuls = c * (7 * d + 3 * d + 4 * d)  # inputs of qkv, proj, fc, proj (7d); q, k, v (3d); GELU input (4d)
    attention = 4 * cfg.n_heads if sdpa == "fused" else c * cfg.n_heads * seq_len  # logsumexp | softmax rows
    return norms + matmuls + attention + 2 * _dropout_bytes(cfg, precision) * d


def estimate(
    cfg: PriorConfig,
    geometry: PriorGeometry,
    micro_batch: int,
    world: int = 1,
    sharded: bool = False,
    activation_checkpointing: bool = False,
    precision: Precision = "fp32",
    sdpa: Literal["fused", "math"] = "fused",
    prefetch: int = 1,
) -> MemoryEstimate:
    """Memory of one of ``world`` processes training on ``micro_batch`` sequences at a time; ``sharded`` is FSDP
    (else DDP when ``world > 1``). ``sdpa`` is the attention kernel that runs ("fused" is what dense SDPA picks)."""
    for key, value, low in (("micro_batch", micro_batch, 1), ("world", world, 1), ("prefetch", prefetch, 0)):
        if value < low:
            raise ValueError(f"{key} must be >= {low}, got {value}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if sdpa not in ("fused", "math"):
        raise ValueError(f"sdpa must be 'fused' or 'math', got {sdpa!r}")
    g, d, L, B = geometry, cfg.d_model, cfg.n_layers, micro_batch
    T, c = g.seq_len, _compute_bytes(precision)
    residual = 2 if precision == "bf16" and sharded else 4  # FSDP's bf16 embeddings keep the stream in bf16

    P = parameter_count(cfg, geometry)
    shard = math.ceil(P / world) if sharded else P
    states = {"parameters": 4 * shard, "gradients": 4 * shard, "optimizer": 8 * shard + 4 * parameter_tensors(cfg)}

    # Outside the blocks, per sequence: token indices (embeddings, cross-entropy targets) and caption masks,
    # the embedding dropout, the final LayerNorm, the heads' inputs at the T - 1 predicting positions and the
    # fp32 log-probabilities; per micro-batch: the position, row and column indices.
    indices = 8 * (T + g.text_len - 1) + 2 * g.text_len - 1
    logprobs = 4 * ((g.text_len - 1) * g.text_vocab + g.grid**2 * g.image_vocab)
    outer = indices + _dropout_bytes(cfg, precision) * d * T + (4 * d + 8) * T + c * d * (T - 1) + logprobs
    positions = 8 * (g.text_len + 2 * g.grid**2)
    copies = 2 if precision == "bf16" and not sharded else 0  # autocast's bf16 weight copies, saved for backward
    head_copies, block_copies = copies * d * (g.text_vocab + g.image_vocab), copies * 12 * d * d

    block = B * T * block_bytes_per_position(cfg, T, precision, sdpa) + (c * T * T if sdpa == "fused" else 0)
    block += block_copies
    if activation_checkpointing:
        activations = B * (L * residual * d * T + outer) + positions + head_copies
        recompute = block
    else:
        activations = B * outer + positions + head_copies + L * block
        recompute = 0

    gathered = gradient_buffers = 0
    if sharded:
        unit = max(block_parameters(d), outer_parameters(cfg, geometry))
        gathered = c * (outer_parameters(cfg, geometry) + (1 + prefetch) * block_parameters(d))
        gradient_buffers = (c + 4) * unit
    buckets = 4 * P if world > 1 and not sharded else 0
    largest = max(4 * d * d, d * g.text_vocab, d * g.image_vocab)
    step_buffer = 4 * (shard if precision == "bf16" else largest)  # foreach on CUDA, one tensor at a time on CPU
    return MemoryEstimate(
        **states,
        buckets=buckets,
        activations=activations,
        recompute=recompute,
        gathered=gathered,
        gradient_buffers=gradient_buffers,
        step_buffer=step_buffer,
    )


def _compute_bytes(precision: Precision) -> int:
    return 2 if precision == "bf16" else 4


def _dropout_bytes(cfg: PriorConfig, precision: Precision) -> int:
    """Bytes of a dropout mask per element: CPU's dropout keeps a float mask, CUDA's fused kernel a bool one."""
    if cfg.dropout == 0:
        return 0
    return 1 if precision == "bf16" else 4


def paper_12b_table(
    worlds: tuple[int, ...] = (8, 64, 512), micro_batch: int = 1
) -> list[tuple[int, bool, MemoryEstimate]]:
    """(GPUs, activation checkpointing, estimate per GPU) for the paper's 12B prior under FSDP in bf16."""
    paper = partial(estimate, PAPER_12B, PAPER_GEOMETRY, micro_batch, sharded=True, precision="bf16")
    return [(world, ac, paper(world=world, activation_checkpointing=ac)) for world in worlds for ac in (False, True)]


def main() -> None:
    P = parameter_count(PAPER_12B, PAPER_GEOMETRY)
    print(f"paper 12B prior: {P:,} parameters; in 16 bits {2 * P / 1e9:.1f} GB (the paper, §2.5: about 24 GB)")
    columns = [f.name for f in fields(MemoryEstimate) if f.name != "buckets"]  # DDP's buckets: none under FSDP
    heads = ("params", "grads", "adamw", "activ", "recomp", "gather", "gradbuf", "step", "total")
    print("GiB per GPU, FSDP, bf16 compute, micro-batch of 1 sequence (T = 1280)")
    print(f"{'GPUs':>5} {'AC':>3} " + " ".join(f"{h:>7}" for h in heads))
    for world, ac, est in paper_12b_table():
        gib = est.gib()
        values = " ".join(f"{gib[name]:7.2f}" for name in (*columns, "total"))
        print(f"{world:>5} {'yes' if ac else 'no':>3} {values}")


if __name__ == "__main__":
    main()
