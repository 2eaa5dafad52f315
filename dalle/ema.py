"""Exponential moving average of parameters (the paper evaluates and exports the EMA, decay 0.999).

Hand-written rather than ``torch.optim.swa_utils.AveragedModel`` because that has no decay warm-up: with a
fixed 0.999 and the few thousand steps of a CPU run, ~5% of the average would still be the random init.
"""

from __future__ import annotations

import copy

import torch


class Ema:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        weight = 1 - self.decay_at(step)
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], weight)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
