"""Cosine schedules for the relaxation temperature τ, the KL weight β and the learning rate (§A.2)."""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` at step 0 to ``end`` at ``total_steps``, then held at ``end``."""
    if total_steps <= 0 or step >= total_steps:
        return end
    progress = max(step, 0) / total_steps
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, peak: float, final: float, warmup_steps: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``final`` at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)
