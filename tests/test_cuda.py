"""The CUDA paths, skipped without a GPU: bf16 autocast training and its exact resume (the CUDA generator state is
in the checkpoint), blocked attention on CUDA and under autocast, the key/value cache on CUDA, FSDP2's bf16
mixed-precision policy with sharded checkpoints (a process group of one on one GPU; two GPUs for NCCL between
ranks), the dVAE under autocast and the benchmark's bf16 GEMM peak and CUDA memory counter.

On a CUDA machine: ``python -m pytest tests/test_cuda.py`` (``.ci/gpu`` runs it with the benchmark)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_blocked_attention import _output_and_grads, _qkv
from test_dvae import TINY, KillAt, shapes16  # noqa: F401 (a fixture)
from test_prior import make_batch, make_prior
from test_prior_train import GEOMETRY, Recorder, colour_tokens, tiny_cfg

from dalle.blocked_attention import blocked_attention
from dalle.checkpoint import load_checkpoint
from dalle.config import Params
from dalle.dvae_train import train_dvae
from dalle.masks import attention_mask
from dalle.prior_train import train_prior
from dalle.sampling import sample_image_tokens
from dalle.training import mixed_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
REPO = Path(__file__).resolve().parents[1]


def _on_cuda(qkv, upstream):
    moved = [t.detach().to(CUDA).requires_grad_() for t in qkv]
    return moved, upstream.to(CUDA)


@pytest.mark.parametrize("kind,kernel", [("row", 11), ("column", 11), ("conv", 11), ("full", 11)])
@pytest.mark.parametrize("text_len,grid", [(5, 6), (64, 32)])
def test_blocked_attention_equals_dense_on_cuda_and_under_autocast(kind, kernel, text_len, grid):
    qkv, upstream = _on_cuda(*_qkv(text_len + grid * grid, heads=4, head_size=32))
    mask = attention_mask(kind, text_len, grid, kernel).to(CUDA)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def blocked(q, k, v):
        return blocked_attention(q, k, v, kind, text_len, grid, kernel)

    want = _output_and_grads(dense, qkv, upstream)
    for got, reference in zip(_output_and_grads(blocked, qkv, upstream), want):
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    with mixed_precision(CUDA):  # bf16: blocked is as far from the fp32 result as dense bf16 is, no further
        dense_bf16 = _output_and_grads(dense, qkv, upstream)
        blocked_bf16 = _output_and_grads(blocked, qkv, upstream)
    for name, a, b, reference in zip(("output", "dq", "dk", "dv"), blocked_bf16, dense_bf16, want):
        assert a.dtype == b.dtype
        error, dense_error = (a.float() - reference).abs().max().item(), (b.float() - reference).abs().max().item()
        assert error <= 2 * dense_error + 1e-3, (name, error, dense_error)


@pytest.mark.parametrize("schedule", ["paper", "conv"])
def test_prior_blocked_equals_dense_on_cuda(schedule):
    text_ids, text_lengths, image_tokens = (t.to(CUDA) for t in make_batch())
    losses = []
    for impl in ("dense", "blocked"):
        prior = make_prior(schedule, attn_impl=impl).to(CUDA)
        logits, loss = prior(text_ids, text_lengths, image_tokens)
        loss.backward()
        losses.append((logits.image.detach(), loss.detach(), [p.grad.clone() for p in prior.parameters()]))
    (dense_logits, dense_loss, dense_grads), (logits, loss, grads) = losses
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, dense_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["paper", "full"])
def test_cached_sampling_draws_what_recomputing_the_prefix_draws_on_cuda(schedule):
    prior = make_prior(schedule).to(CUDA).eval()
    text_ids, text_lengths, _ = (t.to(CUDA) for t in make_batch())
    draws = []
    for use_cache in (True, False):
        generator = torch.Generator(CUDA).manual_seed(0)
        draws.append(
            sample_image_tokens(prior, text_ids, text_lengths, 0.9, top_k=8, generator=generator, use_cache=use_cache)
        )
    assert draws[0].device.type == "cuda"
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_prior_trains_in_bf16_on_cuda_and_resumes_exactly(tmp_path):
    train, val = colour_tokens(64), colour_tokens(40, seed=1)
    cfg = tiny_cfg(steps=12, lr=1e-2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        reference = train_prior(cfg, 0, GEOMETRY, train, val, tmp_path / "a.pt", "d", device=CUDA)
        with pytest.raises(KeyboardInterrupt):
            train_prior(cfg, 0, GEOMETRY, train, val, tmp_path / "b.pt", "d", Recorder(stop_at=8), device=CUDA)
        saved = load_checkpoint(tmp_path / "b.pt")
        assert saved["step"] == 6 and "rng_cuda" in saved  # the CUDA generator is part of the state
        resumed = train_prior(cfg, 0, GEOMETRY, train, val, tmp_path / "b.pt", "d", device=CUDA)
    finally:
        torch.use_deterministic_algorithms(False)
    assert reference.history[-1]["loss"] < reference.history[0]["loss"]
    for name, tensor in reference.model.state_dict().items():
        assert tensor.device.type == "cuda"
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
    # bf16 autocast: the same run in fp32 on the CPU ends close to it, not equal
    cpu = train_prior(cfg, 0, GEOMETRY, train, val, device=torch.device("cpu"))
    assert reference.final["val_image_nll"] == pytest.approx(cpu.final["val_image_nll"], rel=0.1, abs=0.05)


def test_dvae_trains_under_autocast_on_cuda_and_resumes(shapes16, tmp_path):  # noqa: F811
    train, val = shapes16
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        straight = train_dvae(TINY, 0, train, val, tmp_path / "a.pt", device=CUDA)
        with pytest.raises(KeyboardInterrupt):
            train_dvae(TINY, 0, train, val, tmp_path / "b.pt", callbacks=KillAt(6), device=CUDA)
        resumed = train_dvae(TINY, 0, train, val, tmp_path / "b.pt", device=CUDA)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(math.isfinite(value) for value in straight.history[-1].values() if isinstance(value, float))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def _torchrun(nproc: int, script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.run([*command, script, *args], env=env, capture_output=True, text=True, timeout=300)


def test_fsdp_on_one_gpu_trains_in_bf16_and_resumes_from_its_sharded_checkpoint(tmp_path):
    result = _torchrun(1, str(Path(__file__).with_name("fsdp_resume.py")), str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "param_dtype=torch.bfloat16" in result.stdout, result.stdout[-2000:]
    assert "resumed from step 6" in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between ranks needs two GPUs")
def test_ddp_and_fsdp_over_two_gpus_equal_one_gpu(tmp_path):
    result = _torchrun(2, str(Path(__file__).with_name("fsdp_resume.py")), str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from step 6" in result.stdout, result.stdout[-2000:]


def test_benchmark_measures_the_bf16_peak_and_cuda_memory():
    from pipelines.benchmark import Workloads

    params = Params()
    params = dataclasses.replace(params, bench=dataclasses.replace(params.bench, gemm_size=1024, warmup=1, repeats=2))
    work = Workloads(params, CUDA)
    assert [task.key for task in work.tasks()][:2] == ["peak/fp32", "peak/bf16"]
    fp32, bf16 = work.peak(torch.float32), work.peak(torch.bfloat16)
    assert bf16["memory_kind"] == "cuda_max_allocated" and bf16["peak_memory_mb"] >= 2 * 1024**2 * 2 / 2**20
    assert bf16["flops_per_s"] > fp32["flops_per_s"]
