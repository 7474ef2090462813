"""Tolerance schedules for the adaptive refresh criterion: a tighter tolerance early in training.

Purifying Shampoo (arXiv 2506.03595) found that eigenbasis accuracy matters most in the first part
of training, when the factors change fastest, and much less later. A schedule is any callable
``schedule(step, total_steps, tolerance) -> float``: it gets the optimizer step (counted from the
first preconditioned step), the planned number of steps (``None`` when unknown) and the policy's
own tolerance, and returns the tolerance to use at that step.

>>> schedule = TighterEarly(early_tolerance=0.01, early_fraction=0.1)
>>> schedule(50, 1000, 0.05), schedule(100, 1000, 0.05)
(0.01, 0.05)
>>> TighterEarly(early_tolerance=0.02, early_steps=10)(9, None, 0.1)
0.02
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lightning_kron.validation import check_positive_int, check_unit_interval


@dataclass(frozen=True)
class TighterEarly:
    """``early_tolerance`` for the first ``early_steps`` steps (or ``early_fraction`` of the planned
    steps), then the refresh policy's own tolerance.

    A step function rather than a ramp: the paper's finding is about a phase (early training), and
    one switch keeps the number of eigendecompositions easy to predict.
    """

    early_tolerance: float = 0.01
    early_fraction: float = 0.1
    early_steps: Optional[int] = None

    def __post_init__(self) -> None:
        check_unit_interval("early_tolerance", self.early_tolerance, closed_right=True)
        check_unit_interval("early_fraction", self.early_fraction, closed_right=True)
        if self.early_steps is not None:
            check_positive_int("early_steps", self.early_steps, minimum=0)

    def boundary(self, total_steps: Optional[float]) -> int:
        """The first step that uses the policy's tolerance."""
        if self.early_steps is not None:
            return self.early_steps
        if total_steps is None or not math.isfinite(total_steps):
            raise ValueError(
                "TighterEarly(early_fraction=...) needs a finite training length (set max_steps or max_epochs); "
                "or pass early_steps= instead"
            )
        return int(self.early_fraction * total_steps)

    def __call__(self, step: int, total_steps: Optional[float], tolerance: float) -> float:
        return self.early_tolerance if step < self.boundary(total_steps) else tolerance
