"""Refresh policies the study measured and dropped (scripts/refresh_study.py), kept runnable so their
rows in docs/refresh-study.md can be redone: a candidate default, ``RelativeRefresh``, and two probes
of why the budget loses to the clock on some models, ``SmallFactorsOnClock`` and ``WholeBlocks``.
``RelativeRefresh`` keeps state, one reason it is not in the library: a default must decide the same
after a resume and on every rank. The probes read the optimizer's layout once (``bind``), which no
library policy needs. (The candidate that won, the budget ranked by staleness times age, is the
library's ``BudgetRefresh``: it reads the factors' ``last_refresh`` instead of keeping state.)
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


class SmallFactorsOnClock:
    """A probe the study measured and dropped (the ResNet ended no closer to the reference;
    docs/refresh-study.md): factors of size at most ``max_size`` on the ``every`` clock, the
    budget (counted over every factor) spent on the others.

    Why: on the ResNet the default budget leaves the 3x3 kernel factors of a convolution at 1-6
    refreshes in 150 steps and gives the channel factors 12-15 (the clock: 15 each). A small
    factor's refresh costs next to nothing, so if the reference's edge came from them, refreshing
    them on its clock would be free. ``bind(optimizer)`` (the study calls it once the optimizer is
    built) reads which factors are small, in the scheduler's flat order.
    """

    uses_refresh_age = True

    def __init__(self, budget: Any, max_size: int = 8, every: int = 10) -> None:
        check_positive_int("max_size", max_size)
        check_positive_int("every", every)
        self.budget, self.max_size, self.every = budget, max_size, every
        self.max_iters = budget.max_iters
        self._small: Optional[torch.Tensor] = None

    def bind(self, optimizer: Any) -> None:
        """Read which factors are small, in the scheduler's flat order (group, dim, then rows)."""
        sizes = [group.shape[dim] for group in optimizer.factor_groups() for dim in group.factored_dims
                 for _ in range(len(group))]
        self._small = torch.tensor([size <= self.max_size for size in sizes])

    def checks_at(self, step: int) -> bool:
        return True

    def select(self, staleness: torch.Tensor, step: int, total_steps: Optional[float] = None,
               steps_since_refresh: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The budget's choice among the large factors (the small ones score 0 there), and every
        small factor on the clock's steps."""
        if self._small is None or self._small.numel() != staleness.numel():
            raise RuntimeError("SmallFactorsOnClock.bind(optimizer) must be called once the optimizer is built")
        small = self._small.to(staleness.device)
        ranked = torch.where(small, torch.zeros_like(staleness), staleness)
        due = self.budget.select(ranked, step, total_steps, steps_since_refresh=steps_since_refresh) & ~small
        return due | small if step % self.every == 0 else due


class WholeBlocks:
    """A probe: the budget's choice widened to whole blocks, every factor of a block refreshed on the
    same step, at the refresh count of a budget ``budget`` of half the rate (so widening a 2-factor
    block's pick to both keeps the total).

    Why: at the same count of refreshes, the deep MLP ends at the reference's loss on the clock and
    1% above it under the budget. The clock refreshes both factors of a weight together; the budget
    ranks factors one by one, so it often refreshes L and R of one weight at different steps, each
    refresh carrying V over by eigenvalue rank along its own dim. Checking in batches (every 5 or 10
    steps) did not help, but a batch does not pair the factors of a block. ``bind(optimizer)`` reads
    which block each factor belongs to, in the scheduler's flat order (group, dim, then rows).
    """

    uses_refresh_age = True

    def __init__(self, budget: Any) -> None:
        self.budget = budget
        self.max_iters = budget.max_iters
        self._block_of: Optional[torch.Tensor] = None
        self._blocks = 0

    def bind(self, optimizer: Any) -> None:
        """Number each block (a group's row) and record it per factor, in the flat order."""
        block_of, first = [], 0
        for group in optimizer.factor_groups():
            for _ in group.factored_dims:
                block_of.extend(range(first, first + len(group)))
            first += len(group)
        self._block_of, self._blocks = torch.tensor(block_of), first

    def checks_at(self, step: int) -> bool:
        return self.budget.checks_at(step)

    def tolerance_at(self, step: int, total_steps: Optional[float] = None) -> float:
        return self.budget.tolerance_at(step, total_steps)

    def select(self, staleness: torch.Tensor, step: int, total_steps: Optional[float] = None,
               steps_since_refresh: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every factor of each block that has a factor among the budget's choice."""
        if self._block_of is None or self._block_of.numel() != staleness.numel():
            raise RuntimeError("WholeBlocks.bind(optimizer) must be called once the optimizer is built")
        block_of = self._block_of.to(staleness.device)
        due = self.budget.select(staleness, step, total_steps, steps_since_refresh=steps_since_refresh)
        chosen = torch.zeros(self._blocks, device=staleness.device).index_add_(0, block_of, due.float()) > 0
        return chosen[block_of]
