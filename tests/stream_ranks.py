"""Run by tests/test_prior_train.py under ``torchrun --nproc-per-node 2``: train the prior for 4 steps with
``loader.order: stream`` on token shards memory-mapped from ``DIR/tokens``; every rank writes the shards it opened
to ``DIR/rank{r}.json``, and rank 0 the checkpoint ``DIR/last.pt``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_prior_train import GEOMETRY, STREAM, tiny_cfg  # noqa: E402

from dalle.data.tokens import load_tokens  # noqa: E402
from dalle.prior_train import train_prior  # noqa: E402


def main(out_dir: str) -> None:
    out = Path(out_dir)
    dist.init_process_group("gloo")
    train = load_tokens(out / "tokens", "train", cache_bytes=0)  # memory-mapped shards, nothing cached
    val = load_tokens(out / "tokens", "val")
    cfg = tiny_cfg(steps=4, batch_size=8, log_every=2, val_every=4, sample_every=4, checkpoint_every=4)
    train_prior(cfg, 0, GEOMETRY, train, val, out / "last.pt", "d", loader=STREAM, device=torch.device("cpu"))
    read = {name: sorted(getattr(train, name).shards_read) for name in ("image_tokens", "text_ids")}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(read))
    dist.barrier()  # both ranks done before teardown: a rank tearing down alone can leave the other hanging
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
