"""The memory model of prior training (dalle.memory) against what torch actually holds on CPU.

Activations are measured exactly: every tensor autograd saves in the forward pass, through
``saved_tensors_hooks``, each storage counted once, weights and buffers left out (they are states, not
activations). States are read from the model and AdamW after a step. The whole step's peak of live tensor bytes
comes from the profiler's memory timeline. Widths of 512 make the model dominate the small per-batch extras, as at
scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dalle.config import PriorConfig
from dalle.memory import (
    PAPER_12B,
    PAPER_GEOMETRY,
    estimate,
    paper_12b_table,
    parameter_count,
    parameter_tensors,
)
from dalle.prior import Prior, PriorGeometry
from dalle.training import adamw

GEOMETRY = PriorGeometry(text_vocab=1024, text_len=32, image_vocab=512, grid=16)  # T = 288
CONFIG = PriorConfig(n_layers=4, n_heads=8, d_model=512, schedule="paper")
MICRO_BATCH = 2
TOLERANCE = 0.15


def make_batch(geometry: PriorGeometry, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text_ids = torch.randint(0, geometry.text_vocab, (batch_size, geometry.text_len), generator=generator)
    text_lengths = torch.randint(2, geometry.text_len + 1, (batch_size,), generator=generator)
    image_tokens = torch.randint(0, geometry.image_vocab, (batch_size, geometry.grid**2), generator=generator)
    return text_ids, text_lengths, image_tokens


def saved_bytes(module: torch.nn.Module, run) -> tuple[int, object]:
    """Bytes of the tensors autograd saves while ``run()`` goes forward: each storage once, without ``module``'s
    parameters and buffers. Returns (bytes, what ``run`` returned)."""
    states = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in states:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return sum(saved.values()), result


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def relative_error(model: int, measured: int) -> float:
    return abs(model - measured) / measured


def make_prior(cfg: PriorConfig) -> Prior:
    torch.manual_seed(0)
    return Prior(cfg, GEOMETRY).train()


@pytest.mark.parametrize(
    "checkpointing, sdpa, dropout",
    [(False, "fused", 0.0), (True, "fused", 0.0), (False, "math", 0.0), (False, "fused", 0.1)],
)
def test_saved_activations_match_the_model(checkpointing, sdpa, dropout):
    cfg = dataclasses.replace(CONFIG, activation_checkpointing=checkpointing, dropout=dropout)
    prior = make_prior(cfg)
    batch = make_batch(GEOMETRY, MICRO_BATCH)
    backend = sdpa_kernel(SDPBackend.MATH) if sdpa == "math" else contextlib.nullcontext()
    with backend:
        measured, (_, loss) = saved_bytes(prior, lambda: prior(*batch))
        loss.backward()  # the recompute (with checkpointing) runs too
    model = estimate(cfg, GEOMETRY, MICRO_BATCH, activation_checkpointing=checkpointing, sdpa=sdpa).activations
    assert relative_error(model, measured) <= TOLERANCE, (model, measured)


def test_recompute_term_is_one_blocks_activations():
    prior = make_prior(CONFIG)
    x = torch.randn(MICRO_BATCH, GEOMETRY.seq_len, CONFIG.d_model, requires_grad=True)
    block = prior.blocks[0]
    measured, _ = saved_bytes(prior, lambda: block(x, prior._mask(block.kind, x.device)))
    model = estimate(CONFIG, GEOMETRY, MICRO_BATCH, activation_checkpointing=True).recompute
    assert relative_error(model, measured) <= TOLERANCE, (model, measured)


def test_the_fused_cpu_kernel_runs_and_keeps_one_float_mask_per_layer():
    """Dense SDPA with a boolean mask picks the fused CPU kernel, which saves no (B, heads, T, T) tensor."""
    prior = make_prior(CONFIG)
    batch = make_batch(GEOMETRY, MICRO_BATCH)
    calls, shapes = [], []

    class Calls(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in func.__name__:
                calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with Calls(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        prior(*batch)
    T = GEOMETRY.seq_len
    assert calls == ["_scaled_dot_product_flash_attention_for_cpu.default"] * CONFIG.n_layers
    assert shapes.count((T, T)) == CONFIG.n_layers
    assert not [s for s in shapes if len(s) == 4 and s[-2:] == (T, T)]


def test_weights_gradients_and_adamw_state_match_the_model():
    prior = make_prior(CONFIG)
    optimizer = adamw(prior, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    _, loss = prior(*make_batch(GEOMETRY, MICRO_BATCH))
    loss.backward()
    optimizer.step()
    parameters = list(prior.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    measured = [storage_bytes(parameters), storage_bytes(p.grad for p in parameters), storage_bytes(state)]
    est = estimate(CONFIG, GEOMETRY, MICRO_BATCH)
    for model, actual in zip((est.parameters, est.gradients, est.optimizer), measured):
        assert relative_error(model, actual) <= TOLERANCE, (model, actual)
    assert relative_error(est.states, sum(measured)) <= TOLERANCE


@pytest.mark.filterwarnings("ignore:.*export_memory_timeline.*:FutureWarning")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_peak_of_a_training_step_matches_the_total(checkpointing, tmp_path):
    """Live tensor bytes (not process RSS) over a second step, when AdamW's moments already exist."""
    cfg = dataclasses.replace(CONFIG, activation_checkpointing=checkpointing)
    prior = make_prior(cfg)
    optimizer = adamw(prior, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    batch = make_batch(GEOMETRY, MICRO_BATCH)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated between steps, as the states assume
        _, loss = prior(*batch)
        loss.backward()
        optimizer.step()

    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    prof.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())  # [times, [bytes per category] per time]
    measured = max(sum(row) for row in sizes)
    model = estimate(cfg, GEOMETRY, MICRO_BATCH, activation_checkpointing=checkpointing).total
    assert relative_error(model, measured) <= TOLERANCE, (model, measured)


@pytest.mark.parametrize(
    "n_layers, n_heads, d_model, geometry",
    [
        (1, 1, 8, PriorGeometry(text_vocab=5, text_len=3, image_vocab=7, grid=2)),
        (3, 2, 32, PriorGeometry(text_vocab=20, text_len=6, image_vocab=16, grid=4)),
        (4, 8, 512, GEOMETRY),
        (PAPER_12B.n_layers, PAPER_12B.n_heads, PAPER_12B.d_model, PAPER_GEOMETRY),
    ],
)
def test_parameter_count_is_what_the_prior_builds(n_layers, n_heads, d_model, geometry):
    cfg = PriorConfig(n_layers=n_layers, n_heads=n_heads, d_model=d_model, conv_kernel=3, schedule="paper")
    with torch.device("meta"):  # shapes only: the 12B prior would need 49 GB
        prior = Prior(cfg, geometry)
    parameters = list(prior.parameters())
    assert parameter_count(cfg, geometry) == sum(p.numel() for p in parameters)
    assert parameter_tensors(cfg) == len(parameters)


def test_paper_12b_has_12_billion_parameters_and_sharding_divides_only_the_states():
    assert parameter_count(PAPER_12B, PAPER_GEOMETRY) == 12_292_808_448
    one = estimate(PAPER_12B, PAPER_GEOMETRY, 1, world=1, sharded=True, precision="bf16")
    eight = estimate(PAPER_12B, PAPER_GEOMETRY, 1, world=8, sharded=True, precision="bf16")
    assert eight.parameters == pytest.approx(one.parameters / 8, abs=4)
    assert eight.activations == one.activations and eight.gathered == one.gathered
    rows = paper_12b_table()
    assert [(world, ac) for world, ac, _ in rows] == [(w, ac) for w in (8, 64, 512) for ac in (False, True)]
    for (_, _, plain), (_, _, checkpointed) in zip(rows[::2], rows[1::2]):
        assert checkpointed.activations + checkpointed.recompute < plain.activations / 10


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="micro_batch"):
        estimate(CONFIG, GEOMETRY, 0)
    with pytest.raises(ValueError, match="precision"):
        estimate(CONFIG, GEOMETRY, 1, precision="fp16")
