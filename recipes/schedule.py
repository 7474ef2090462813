"""Learning-rate schedule shared by the recipes: linear warm-up, then cosine decay to a floor.

Warm-up matters more for the Kronecker methods than for AdamW: their first preconditioned steps
use factors estimated from a handful of gradients, so a small step size while the statistics
settle avoids an early loss spike. The cosine floor (``min_lr_ratio``) keeps the last steps useful.

>>> factor = warmup_cosine_factor(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
>>> round(factor(0), 3), round(factor(9), 3), round(factor(60), 3), round(factor(110), 3)
(0.1, 1.0, 0.55, 0.1)
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def warmup_cosine_factor(warmup_steps: int, total_steps: float, min_lr_ratio: float) -> Callable[[int], float]:
    """The multiplier of the base learning rate after ``step`` optimizer steps.

    ``total_steps`` may be ``inf`` (a run bounded by time, not steps): the rate then stays at its
    peak after warm-up instead of decaying against an unknown horizon.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if math.isinf(total_steps):
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: float,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` applying :func:`warmup_cosine_factor` to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_factor(warmup_steps, total_steps, min_lr_ratio))
