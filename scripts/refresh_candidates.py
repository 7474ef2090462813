"""Refresh policies the study measured as candidates for the default (scripts/refresh_study.py),
kept runnable so their rows in docs/refresh-study.md can be redone. It keeps state, which is
one reason it is not in the library: its default must decide the same after a resume or on every
rank. (The other candidate that won, the budget ranked by staleness times age, is the library's
``BudgetRefresh``: it reads the factors' ``last_refresh`` instead of keeping state.)
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_kron.engine.validation import check_positive_int, check_unit_interval


class RelativeRefresh:
    """A candidate the study measured and dropped (it lost on llama and the MLP; docs/refresh-study.md).

    Refresh a factor when its staleness exceeds ``ratio`` times its own drift over one check
    right after its last refresh (and ``floor``).

    Why relative: the drift one EMA step causes is about ``(1 - shampoo_beta)`` times the factor's
    off-diagonal gradient share, which differs by orders of magnitude between factors and models;
    measuring it per factor replaces the one absolute tolerance that did not transfer. A factor whose
    staleness is pure EMA noise saturates below ``ratio`` times its first-check value (the plateau is
    about ``1 / sqrt(2 (1 - shampoo_beta))`` times it, 3.2x at 0.95) and is left alone.

    State (checkpointed through the scheduler): each factor's reference drift and which factors the
    last check chose (their next staleness becomes their reference).
    """

    def __init__(self, ratio: float = 8.0, floor: float = 0.02, check_every: int = 1, max_iters: int = 1) -> None:
        if not isinstance(ratio, (int, float)) or not ratio > 1:
            raise ValueError(f"ratio must be a number > 1, got {ratio!r}")
        check_unit_interval("floor", floor)
        check_positive_int("check_every", check_every)
        check_positive_int("max_iters", max_iters)
        self.ratio, self.floor, self.check_every, self.max_iters = float(ratio), float(floor), check_every, max_iters
        self._reference: Optional[torch.Tensor] = None
        self._chosen: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return f"RelativeRefresh(ratio={self.ratio}, floor={self.floor}, check_every={self.check_every}, max_iters={self.max_iters})"

    def checks_at(self, step: int) -> bool:
        return step % self.check_every == 0

    def tolerance_at(self, step: int, total_steps: Optional[float] = None) -> float:
        return self.floor

    def select(self, staleness: torch.Tensor, step: int, total_steps: Optional[float] = None) -> torch.Tensor:
        """Factors above ``max(floor, ratio * reference)``; the reference of a factor chosen at the
        last check (or never seen) is its staleness now."""
        if self._reference is None or self._reference.shape != staleness.shape:
            self._reference = staleness.clone()
            self._chosen = torch.zeros_like(staleness, dtype=torch.bool)
        self._reference = torch.where(self._chosen.to(staleness.device), staleness, self._reference.to(staleness.device))
        threshold = (self.ratio * self._reference).clamp_min(self.floor)
        self._chosen = staleness > threshold
        return self._chosen

    def state_dict(self) -> dict[str, Any]:
        return {"reference": None if self._reference is None else self._reference.cpu().tolist(),
                "chosen": None if self._chosen is None else self._chosen.cpu().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reference = None if state["reference"] is None else torch.tensor(state["reference"])
        self._chosen = None if state["chosen"] is None else torch.tensor(state["chosen"], dtype=torch.bool)
