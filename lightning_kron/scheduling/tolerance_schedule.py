"""Tolerance schedules for the adaptive refresh criterion: a tighter tolerance early in training.

Purifying Shampoo (arXiv 2506.03595) found that eigenbasis accuracy matters most in the first part
of training, when the factors change fastest, and much less later. A schedule is any callable
``schedule(step, total_steps, tolerance) -> float``: it gets the optimizer step (counted from the
first preconditioned step), the planned number of steps on the same clock (``None`` when unknown;
the scheduler converts the Trainer's length, ``total_steps - start_preconditioning_step + 1``) and
the policy's own tolerance, and returns the tolerance to use at that step.

>>> schedule = TighterEarly(early_tolerance=0.01, early_fraction=0.1)
>>> schedule(50, 1000, 0.05), schedule(100, 1000, 0.05)
(0.01, 0.05)
>>> TighterEarly(early_tolerance=0.02, early_steps=10)(9, None, 0.1)
0.02
>>> ramp = LinearRamp(start_tolerance=0.1, ramp_fraction=0.5)
>>> [round(ramp(step, 1000, 0.6), 3) for step in (0, 250, 500, 900)]
[0.1, 0.35, 0.6, 0.6]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lightning_kron.engine.validation import check_positive_int, check_unit_interval


def _planned_steps(fraction: float, steps: Optional[int], total_steps: Optional[float], name: str) -> int:
    """``steps`` if given, else ``fraction`` of the planned training length (which must be known)."""
    if steps is not None:
        return steps
    if total_steps is None or not math.isfinite(total_steps):
        steps_option = "early_steps" if name == "TighterEarly" else "ramp_steps"
        raise ValueError(
            f"{name}(..._fraction=...) needs the planned training length, which is unknown here: under "
            f"KronCallback set the Trainer's max_steps or max_epochs; with the optimizer alone, give "
            f"{name}({steps_option}=N) in steps instead"
        )
    return math.floor(fraction * total_steps + 1e-9)  # 0.29 * 100 is 28.999999999999996


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
        return _planned_steps(self.early_fraction, self.early_steps, total_steps, "TighterEarly")

    def __call__(self, step: int, total_steps: Optional[float], tolerance: float) -> float:
        return self.early_tolerance if step < self.boundary(total_steps) else tolerance


@dataclass(frozen=True)
class LinearRamp:
    """Tolerance rising linearly from ``start_tolerance`` at the first preconditioned step to the
    policy's own tolerance after ``ramp_steps`` steps (or ``ramp_fraction`` of the planned steps).

    Why a ramp: a constant tolerance can spend its refreshes *late*, when basis accuracy matters
    least. On the GPT recipe a constant 0.4 made only 73 of its 243 refreshes in the first third of
    the run and ended 7% above every=10; a staircase rising 0.1 -> 0.64 (``scripts/refresh_sweep.py``,
    docs/refresh-study.md) made 394 and ended 0.1% above it.
    """

    start_tolerance: float = 0.1
    ramp_fraction: float = 0.9
    ramp_steps: Optional[int] = None

    def __post_init__(self) -> None:
        check_unit_interval("start_tolerance", self.start_tolerance, closed_right=True)
        check_unit_interval("ramp_fraction", self.ramp_fraction, closed_right=True)
        if self.ramp_steps is not None:
            check_positive_int("ramp_steps", self.ramp_steps)

    def __call__(self, step: int, total_steps: Optional[float], tolerance: float) -> float:
        length = max(1, _planned_steps(self.ramp_fraction, self.ramp_steps, total_steps, "LinearRamp"))
        progress = min(1.0, step / length)
        return self.start_tolerance + (tolerance - self.start_tolerance) * progress
