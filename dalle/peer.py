"""Side-by-side peer for the benchmark: lucidrains' DALLE-pytorch (``pip install dalle-pytorch``) built at the same
depth, width, heads, text length, grid and vocabularies, timed in the same process with the same ``measure``.
Optional: it is never a dependency of this project; without it the benchmark says so in one line.

Made as plain as the library allows, to compare like with like: full attention in every layer (its axial and
conv-like masks are not the paper's), learned positions (``rotary_emb=False``), no token shift
(``shift_tokens=False``). What stays different, by its design: a GEGLU feed-forward (1.5× the MLP FLOPs),
LayerScale, one head over the joint text+image vocabulary at every position, and an explicit einsum attention.
Its ``generate_images(use_cache=True)`` drops the cache when there is no guidance (1.6.6), so cached sampling is
timed with the same loop calling ``DALLE.forward(..., cache=...)`` token by token, without the VAE decode.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from dalle.bench import measure
from dalle.config import PriorConfig
from dalle.prior import PriorGeometry
from dalle.training import mixed_precision

PEERS = ("dalle-pytorch",)
MODULES = {"dalle-pytorch": "dalle_pytorch"}


def missing(name: str) -> str | None:
    """Why peer ``name`` cannot run here, or None when it imports."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")
    module = MODULES[name]
    if importlib.util.find_spec(module) is None:
        return f"{name} is not installed ({module} is not importable); peer comparison skipped"
    try:
        importlib.import_module(module)
    except Exception as err:  # a broken install (e.g. its torchvision) is a skip with the reason, not a crash
        return f"{name} is installed but does not import ({type(err).__name__}: {err}); peer comparison skipped"
    return None


def build_dalle_pytorch(cfg: PriorConfig, geometry: PriorGeometry):
    from dalle_pytorch import DALLE, DiscreteVAE

    # The VAE only tells DALLE the grid (image_size / 2**num_layers) and the image vocabulary; it is frozen and
    # never called here.
    vae = DiscreteVAE(
        image_size=2 * geometry.grid, num_layers=1, num_tokens=geometry.image_vocab, codebook_dim=16, hidden_dim=16
    )
    return DALLE(
        dim=cfg.d_model,
        vae=vae,
        num_text_tokens=geometry.text_vocab,
        text_seq_len=geometry.text_len,
        depth=cfg.n_layers,
        heads=cfg.n_heads,
        dim_head=cfg.d_model // cfg.n_heads,
        attn_types=("full",),
        rotary_emb=False,
        shift_tokens=False,
        attn_dropout=0.0,
        ff_dropout=0.0,
    )


def peer_measurements(
    name: str,
    cfg: PriorConfig,
    geometry: PriorGeometry,
    batch_size: int,
    sample_batch_size: int,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict:
    """Training tokens/s and cached sampling images/s of the peer, or a row saying why it was skipped."""
    row: dict = {"peer": name, "grid": geometry.grid}
    reason = missing(name)
    if reason is not None:
        return {**row, "summary": reason}
    torch.manual_seed(0)
    model = build_dalle_pytorch(cfg, geometry).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    g = geometry
    # Text id 0 is its padding id; full-length captions of ids 1.. as in our random stream.
    text = torch.randint(1, g.text_vocab, (batch_size, g.text_len), device=device)
    image = torch.randint(g.image_vocab, (batch_size, g.grid**2), device=device)

    def train_step() -> None:
        model.train()
        with mixed_precision(device):
            loss = model(text, image, return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()

    sample_text = text[:1].expand(sample_batch_size, -1).contiguous()

    @torch.no_grad()
    def sample() -> torch.Tensor:
        model.eval()
        tokens = sample_text.new_zeros(sample_batch_size, 0)
        cache: dict = {}
        with mixed_precision(device):
            for _ in range(g.grid**2):
                logits = model(sample_text, tokens, cache=cache)[:, -1, model.num_text_tokens :]
                drawn = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)
                tokens = torch.cat([tokens, drawn], dim=1)
        return tokens

    trained = measure(train_step, device, warmup, repeats)
    sampled = measure(sample, device, warmup, repeats)
    tokens_per_step = batch_size * g.seq_len
    row.update(
        trainable_params=sum(p.numel() for p in trainable),
        train_batch_size=batch_size,
        tokens_per_s=tokens_per_step / trained.median_s,
        train_step_s=trained.median_s,
        train_peak_memory_mb=trained.peak_memory_mb,
        sample_batch_size=sample_batch_size,
        cached_images_per_s=sample_batch_size / sampled.median_s,
        sample_peak_memory_mb=sampled.peak_memory_mb,
    )
    return row
