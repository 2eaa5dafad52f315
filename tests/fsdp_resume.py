"""Run under ``torchrun --nproc-per-node N`` by tests/test_cuda.py (N GPUs, NCCL) and tests/test_parallel.py (CPU,
gloo); N = 1 shards over a process group of one. The tiny prior trained with FSDP2 (on CUDA under its policy: bf16
parameters in compute, fp32 reduction) against the same run without sharding (N = 1) or with DDP (N = 2), then
killed on every rank just after its step-6 sharded checkpoint and resumed, which must end where the uninterrupted
run ends."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_prior_train import GEOMETRY, colour_tokens, tiny_cfg  # noqa: E402

from dalle import prior_train  # noqa: E402
from dalle.parallel import read_progress  # noqa: E402


def main(out_dir: str) -> None:
    out = Path(out_dir)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    sharded_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # wrap()'s policy
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.use_deterministic_algorithms(True, warn_only=True)
    train, val = colour_tokens(64), colour_tokens(40, seed=1)
    cfg = tiny_cfg(steps=9, batch_size=8, log_every=3, val_every=9, sample_every=9, checkpoint_every=3)

    compute_dtypes = []
    wrap = prior_train.wrap

    def wrap_and_watch(model, blocks, parallel, dev):
        wrapped = wrap(model, blocks, parallel, dev)
        blocks[0].register_forward_pre_hook(lambda module, args: compute_dtypes.append(module.attn.qkv.weight.dtype))
        return wrapped

    prior_train.wrap = wrap_and_watch
    plain = prior_train.train_prior(cfg, 0, GEOMETRY, train, val, device=device)
    plain_dtype = compute_dtypes[-1]
    fsdp_cfg = dataclasses.replace(cfg, parallel="fsdp")
    sharded = prior_train.train_prior(fsdp_cfg, 0, GEOMETRY, train, val, device=device)
    if rank == 0:
        print(f"param_dtype={compute_dtypes[-1]} (unsharded {'ddp' if size > 1 else 'one process'}: {plain_dtype})")
    assert compute_dtypes[-1] == sharded_dtype and plain_dtype == torch.float32, (compute_dtypes[-1], plain_dtype)
    for a, b in zip(plain.history, sharded.history):
        assert abs(a["loss"] - b["loss"]) <= 3e-2 * abs(a["loss"]), (a, b)

    save_sharded = prior_train.save_sharded

    def save_then_die(directory, model, optimizer, progress):
        save_sharded(directory, model, optimizer, progress)
        if progress["step"] == 6:
            raise KeyboardInterrupt("killed after the step-6 checkpoint")

    checkpoint = out / "last.pt"
    whole = prior_train.train_prior(fsdp_cfg, 0, GEOMETRY, train, val, checkpoint, "d", device=device)
    prior_train.save_sharded = save_then_die
    try:
        prior_train.train_prior(fsdp_cfg, 0, GEOMETRY, train, val, out / "killed.pt", "d", device=device)
        raise AssertionError("the run was not killed")
    except KeyboardInterrupt:
        pass
    prior_train.save_sharded = save_sharded
    progress = read_progress(out / "killed.dcp")
    resumed = prior_train.train_prior(fsdp_cfg, 0, GEOMETRY, train, val, out / "killed.pt", "d", device=device)
    if rank == 0:
        print(f"resumed from step {progress['step']}")
        for name, tensor in whole.model.state_dict().items():
            torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
        assert [row["step"] for row in resumed.history] == [row["step"] for row in whole.history]
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
