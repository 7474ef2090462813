"""Refresh policies: when is a Kronecker factor's eigenbasis due for recomputation.

A policy sees, on the steps it checks, the staleness ``e(Q, L)`` of every factor (one tensor,
still on the device) and answers with a boolean mask of the factors that are due. Deciding on the
whole tensor at once keeps the step to a single host synchronisation per checked step instead of
one ``.item()`` per factor. What happens to the due factors (the per-step budget, deferral, which
rank computes them) is the scheduler's business (``scheduling/scheduler.py``), the same for every
policy. Any object with the two methods of :class:`RefreshPolicy` is a policy.

>>> import torch
>>> policy = AdaptiveRefresh(tolerance=0.05)
>>> policy.select(torch.tensor([0.01, 0.2, 0.07])).tolist()
[False, True, True]
>>> FixedRefresh(every=10).checks_at(20), FixedRefresh(every=10).checks_at(21)
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch

from lightning_kron.engine.validation import check_positive_int, check_unit_interval


@runtime_checkable
class RefreshPolicy(Protocol):
    """What the scheduler asks of a refresh policy (the built-in two and any user-written one).

    Steps are counted from the first preconditioned step (``start_preconditioning_step``), whose
    exact refresh of every factor happens before any policy is asked; ``total_steps`` is on the
    same clock: the policy is asked about steps 1 to ``total_steps - 1`` of a run of the planned
    length (the scheduler converts the optimizer steps it is told; None when unknown).

    Required:
        ``checks_at(step) -> bool``: is the staleness looked at on this step?
        ``select(staleness, step, total_steps=None) -> bool tensor``: which factors are due, from
        the staleness of every factor (a 1-D tensor on the factors' device; keep the answer there).

    Optional attributes, read with these defaults when absent:
        ``tolerance_at(step, total_steps=None) -> float`` (0.0): the staleness a warm-QR refresh
        aims below (it repeats up to ``max_iters`` times) and the figure that telemetry logs;
        ``max_iters`` (1); ``uses_refresh_age`` (False): when true, ``select`` is also given
        ``steps_since_refresh=``, a float tensor in the order of ``staleness`` of the optimizer steps
        since each factor's last refresh (what :class:`~lightning_kron.BudgetRefresh` ranks by);
        ``max_per_step`` (None): the scheduler's budget of refreshes per step,
        most stale first, the rest deferred to the next steps; ``state_dict()`` /
        ``load_state_dict(state)`` for a policy that keeps state between checks (saved and restored
        with the scheduler's own state, so a resumed run decides as an uninterrupted one).

    >>> class EveryThird:
    ...     def checks_at(self, step): return step % 3 == 0
    ...     def select(self, staleness, step, total_steps=None): return staleness > staleness.median()
    >>> isinstance(EveryThird(), RefreshPolicy), isinstance(object(), RefreshPolicy)
    (True, False)
    """

    # Unannotated on purpose: LightningCLI (jsonargparse) accepts a class for a Protocol-typed
    # argument (the callback's and the optimizers' ``refresh``) only when its annotations equal the
    # Protocol's; annotations here would refuse, in a YAML config, the built-in policies
    # (``step: Optional[int]``) and any user-written one annotated otherwise.
    def checks_at(self, step): ...

    def select(self, staleness, step, total_steps=None): ...


def check_policy(policy: Any) -> Any:
    """Refuse, at construction, an object that is not a :class:`RefreshPolicy` or whose optional
    attributes are out of range; returns the policy."""
    if isinstance(policy, type):
        raise ValueError(f"refresh must be a policy object, e.g. {policy.__name__}(...), got the class itself")
    if not isinstance(policy, RefreshPolicy) or not (callable(policy.checks_at) and callable(policy.select)):
        raise ValueError(f"refresh must be BudgetRefresh, FixedRefresh, AdaptiveRefresh or an object with "
                         f"checks_at(step) and select(staleness, step, total_steps=None) methods, got {policy!r}")
    check_positive_int("max_iters", getattr(policy, "max_iters", 1))
    if getattr(policy, "max_per_step", None) is not None:
        check_positive_int("max_per_step", policy.max_per_step)
    tolerance_at = getattr(policy, "tolerance_at", None)
    if tolerance_at is not None and not callable(tolerance_at):
        raise ValueError(f"refresh.tolerance_at must be callable(step, total_steps=None), got {tolerance_at!r}")
    return policy


@dataclass(frozen=True)
class FixedRefresh:
    """Refresh every factor every ``every`` steps (SOAP's and Shampoo's classic clock).

    One warm-QR iteration per refresh, as in the SOAP paper; with ``solver="eigh"`` the refresh is
    exact anyway.
    """

    every: int = 10

    def __post_init__(self) -> None:
        check_positive_int("every", self.every)

    @property
    def tolerance(self) -> float:
        return 0.0

    @property
    def max_iters(self) -> int:
        return 1

    def checks_at(self, step: int) -> bool:
        return step % self.every == 0

    def tolerance_at(self, step: int, total_steps: Optional[float] = None) -> float:
        """Always 0: a due factor is refreshed (one QR step) whatever its staleness."""
        return 0.0

    def select(self, staleness: torch.Tensor, step: Optional[int] = None,
               total_steps: Optional[float] = None) -> torch.Tensor:
        """Every factor, on the steps where :meth:`checks_at` is true."""
        return torch.ones_like(staleness, dtype=torch.bool)


@dataclass(frozen=True)
class AdaptiveRefresh:
    """Refresh a factor only when its eigenbasis has gone stale (Purifying Shampoo, 2506.03595).

    Every ``check_every`` steps each factor's relative off-diagonal mass
    ``e = ||B - Diag(B)||_F / ||B||_F`` (``B = Q^T L Q``) is compared with ``tolerance``; factors
    above it are refreshed, each independently. A warm-QR refresh repeats while ``e > tolerance``,
    at most ``max_iters`` times. ``max_iters`` defaults to 1 because a factor still above tolerance
    is simply picked again at the next check, which spreads the cost over steps.
    ``max_per_step`` caps how many factors one step may refresh (the scheduler takes the most stale
    first and defers the rest) so no single step stalls. ``tolerance=0`` with ``check_every=f``
    reproduces ``FixedRefresh(every=f)`` exactly, a factor that is already diagonal included.

    Choosing the tolerance: one EMA step moves a factor's staleness by about
    ``(1 - shampoo_beta)`` times the off-diagonal share of the new gradient's outer product, so
    with noisy gradients a tolerance at or below ``1 - shampoo_beta`` (0.05 for SOAP's 0.95)
    refreshes nearly every step; a tolerance a few times larger is what saves refreshes (measured
    in ``scripts/bench_step.py``, where correlated gradients with a heavy-tailed spectrum drift
    slowly and i.i.d. noise drifts at that rate every step).

    ``schedule``: a tolerance schedule ``schedule(step, total_steps, tolerance)`` such as
    ``TighterEarly(early_tolerance=0.15, early_steps=60)`` or ``LinearRamp(...)``. Basis accuracy
    matters most early in training (Purifying Shampoo; measured on the GPT recipe in docs/refresh-study.md), so
    a tighter tolerance early buys more per refresh than a constant one. Inside the optimizer the
    training length is unknown: give schedules step counts, not fractions (``KronCallback`` and
    ``RefreshScheduler`` know the length and accept either).
    """

    tolerance: float = 0.05
    check_every: int = 1
    max_iters: int = 1
    max_per_step: Optional[int] = None
    schedule: Optional[Callable[[int, Optional[float], float], float]] = None

    def __post_init__(self) -> None:
        check_unit_interval("tolerance", self.tolerance, closed_right=True)
        check_positive_int("check_every", self.check_every)
        check_positive_int("max_iters", self.max_iters)
        if self.max_per_step is not None:
            check_positive_int("max_per_step", self.max_per_step)
        if self.schedule is not None and not callable(self.schedule):
            raise ValueError(f"schedule must be callable(step, total_steps, tolerance), got {self.schedule!r}")

    def checks_at(self, step: int) -> bool:
        return step % self.check_every == 0

    def tolerance_at(self, step: int, total_steps: Optional[float] = None) -> float:
        """The tolerance in force at ``step`` (counted from the first preconditioned step)."""
        if self.schedule is None:
            return self.tolerance
        return float(self.schedule(step, total_steps, self.tolerance))

    def select(self, staleness: torch.Tensor, step: Optional[int] = None,
               total_steps: Optional[float] = None) -> torch.Tensor:
        """Factors above the tolerance in force (``step`` applies the ``schedule``; without it:
        ``tolerance``); every factor when that tolerance is 0, the fixed frequency."""
        tolerance = self.tolerance if step is None else self.tolerance_at(step, total_steps)
        if tolerance == 0:
            return torch.ones_like(staleness, dtype=torch.bool)
        return staleness > tolerance
