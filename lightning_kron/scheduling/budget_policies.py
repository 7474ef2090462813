"""A refresh policy that needs no tolerance tuned per model (docs/adaptive-refresh.md).

An absolute staleness tolerance does not transfer between models: a factor whose gradient is
mostly noise sits at a staleness plateau of about ``sqrt((1 - shampoo_beta) / 2)`` times its
off-diagonal share, whatever its basis, so a tolerance below that plateau refreshes it every step
and one above it never refreshes the factors that do drift. :class:`BudgetRefresh` avoids the number:
it states *how many* refreshes to make in the units users know ("as many as
``FixedRefresh(every=20)``"), front-loads them and tapers the rest (basis accuracy matters most
early: Purifying Shampoo, arXiv 2506.03595, and the GPT sweep in docs/refresh-study.md) and
spends each one on the most stale factor at that moment, weighted by the steps since its last
refresh. It is the default of SOAP and EShampoo, chosen by ``scripts/refresh_study.py`` over the
other candidates (a tolerance relative to each factor's own drift, the paper's periodic check with
several QR iterations, the GPT-tuned tolerance schedule, the ranking by staleness alone, a flat
late rate), whose figures are in docs/refresh-study.md.

>>> import torch
>>> policy = BudgetRefresh(every=2, front_load=1.0)
>>> policy.select(torch.tensor([0.3, 0.1, 0.2, 0.0]), step=1).tolist()  # 4 factors / every=2: 2 per step
[True, False, True, False]
>>> policy.select(torch.tensor([0.3, 0.1, 0.2, 0.0]), step=2, steps_since_refresh=torch.tensor([1, 9, 2, 9])).tolist()
[False, True, True, False]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from lightning_kron.engine.validation import check_nonnegative, check_positive_int, check_unit_interval, is_number


def most_stale(score: torch.Tensor, count: int, eligible: torch.Tensor) -> torch.Tensor:
    """Mask of the ``count`` highest-``score`` factors among the ``eligible`` (ties: the lower
    index first, so every rank and every rerun picks the same ones); stays on the device, no host
    sync. The ineligible (and NaN scores) rank last, so they never take a slot an eligible factor
    is waiting for."""
    chosen = torch.zeros_like(score, dtype=torch.bool)
    count = min(count, score.numel())
    if count <= 0:
        return chosen
    # a NaN among the eligible just above the ineligible: a tie at -inf gave its slot to an
    # ineligible factor of lower index, which was then dropped
    lowest = torch.finfo(score.dtype).min if score.is_floating_point() else -math.inf
    fill = torch.full_like(score, -math.inf).masked_fill(eligible, lowest)  # in the score's dtype (fp64 too)
    ranked = torch.where(eligible & ~score.isnan(), score, fill)
    order = torch.sort(ranked, descending=True, stable=True).indices[:count]
    chosen[order] = True
    return chosen & eligible


def _finite_length(*lengths: Optional[float]) -> Optional[float]:
    """The first known, finite training length (``inf``/``None``: unknown)."""
    return next((float(n) for n in lengths if n is not None and math.isfinite(n) and n > 0), None)


@dataclass(frozen=True)
class BudgetRefresh:
    """As many refreshes as ``FixedRefresh(every=every)`` over the run, front-loaded, each spent on
    the factor that is most stale when it is spent, weighted by how long ago it was last refreshed.

    Why a budget: the number of eigendecompositions is the cost a user plans for, and it is the one
    quantity a tolerance cannot promise across models (``AdaptiveRefresh(0.05)`` made 6x the
    refreshes of every=10 on an LSTM). A budget cannot overspend, and ranking by staleness needs
    no threshold: the spectra's scale does not matter, only which factor is worst.

    Why the age: ranked by staleness alone, the budget keeps returning to the factors that drift
    fastest (3 to 37 refreshes per factor on the 300-step GPT run, where every=20 gives 14 each)
    while the others, about as stale, wait. Ranked by ``staleness * steps_since_refresh **
    age_power``, a factor passed over gains priority with every step and one refreshed a moment ago
    loses it; the age is each factor's ``last_refresh``, optimizer state, so the policy stays
    stateless. Measured in docs/refresh-study.md (``budget20-front3-aged``).

    Why the taper: with a flat rate after the early phase, the language models and the deep MLP of
    the study (the models that most want refreshes) ended 0.2-0.5% lower, seed by seed, when the
    late rate fell to a quarter by the end (``budget20-front3-aged-taper``): the refreshes leave
    the end of the run, where the learning rate has decayed, for its middle. The 300-step small
    models lost some of their lead over every=10 with it; it is the default because it is the one
    that kept every study model within +1% of every=10.

    Budget accounting (stateless, so a resumed run decides exactly as an uninterrupted one): with
    ``n`` factors, by step ``t`` at most ``floor(n * A(t))`` refreshes, where ``A`` is the
    cumulative refreshes per factor: ``front_load`` times the average rate during the early phase,
    then a lower rate, falling linearly to ``late_taper`` of its start, that makes
    ``A(total_steps - 1) = floor((total_steps - 1) / every)``: the
    whole refreshes the fixed clock makes per factor on the steps the scheduler decides, 1 to
    ``total_steps - 1`` (step 0 is the optimizer's exact first refresh), so a run of the planned
    length spends exactly the clock's count. Over 200 steps every=20's budget is 9 per factor,
    under half of every=10's 19. An ``early_steps`` longer than the budget allows
    (``front_load * early_steps`` above the length the scheduler passes) ends when the early
    phase has spent the whole budget. A check spends
    ``floor(n A(t)) - floor(n A(t - check_every))``, but at most ``n``: a check refreshes a factor
    once at most. What the cap holds back (early, when ``check_every`` spans more than one
    refresh per factor at the early rate: every 10 steps at three times every=20's rate) is
    spent at the next checks that have room. With every=20, checks every 3 or 10 steps made
    within 1% of the refreshes of checks every step (4 to 50 factors, 150 to 1000 steps); checks
    every 25 steps (more than ``every``) leave no room after the early phase, and made 0.7x to
    0.8x. What a check cannot spend for another reason (factors at or below ``tolerance``)
    is not carried over, so the total is an upper bound.

    Args:
        every: the fixed clock whose refresh count is the budget (20: half of SOAP's every=10).
        front_load: how many times the average rate the early phase spends (1: an even spread).
        early_fraction: the early phase as a fraction of ``total_steps``.
        early_steps: the early phase in steps (overrides ``early_fraction``).
        early_steps_if_unknown: the early phase when neither ``early_steps`` nor the length is
            known (a bare ``SOAP(params)``): the first steps after the initialisation, when the
            statistics move fastest. Measured at 30 (``bare-early30`` in docs/refresh-study.md:
            it held on every study model where the even spread lost up to 16%), not tuned.
        total_steps: the planned optimizer steps, when the owner knows them (``KronCallback`` and the
            scheduler pass theirs to :meth:`select`, converted to the policy's clock, which starts
            at ``start_preconditioning_step``; :meth:`select` called directly takes it as it is). Unknown: the early phase at ``front_load /
            every``, then ``1 / every``: every=k's budget plus ``(front_load - 1) * early / every``
            refreshes per factor (3 at the defaults: 0.70x every=10's count over 150 steps, 0.53x
            over 1000).
        tolerance: factors at or below this staleness are never refreshed; also the staleness a
            refresh with ``max_iters > 1`` aims below.
        check_every: steps between decisions (the budget is the same, spent in larger portions;
            one host sync per check, so fewer checks suit a GPU).
        max_iters: warm-QR iterations per refresh (repeated while the factor is above ``tolerance``).
        age_power: the weight of the steps since a factor's last refresh in its rank (0: staleness
            alone, the ranking before the study's aged candidate won).
        late_taper: with a known length, the rate after the early phase falls linearly to this
            fraction of where it starts by ``total_steps`` (1: flat), moving refreshes from the end
            of the run, where the learning rate has decayed and the bases barely move, to its
            middle; the total is the same. Past ``total_steps`` (a run longer than planned) the
            budget continues at ``every``'s own rate, whatever the taper.
    """

    every: int = 20
    front_load: float = 3.0
    early_fraction: float = 0.2
    early_steps: Optional[int] = None
    early_steps_if_unknown: int = 30
    total_steps: Optional[int] = None
    tolerance: float = 0.0
    check_every: int = 1
    max_iters: int = 1
    age_power: float = 1.0
    late_taper: float = 0.25

    def __post_init__(self) -> None:
        check_positive_int("every", self.every)
        check_positive_int("check_every", self.check_every)
        check_positive_int("max_iters", self.max_iters)
        check_unit_interval("early_fraction", self.early_fraction, closed_right=True)
        check_unit_interval("tolerance", self.tolerance)
        check_unit_interval("late_taper", self.late_taper, closed_right=True)
        if self.early_steps is not None:
            check_positive_int("early_steps", self.early_steps, minimum=0)
        check_positive_int("early_steps_if_unknown", self.early_steps_if_unknown, minimum=0)
        if self.total_steps is not None:
            check_positive_int("total_steps", self.total_steps)
        check_nonnegative("age_power", self.age_power)
        if not is_number(self.front_load) or not 1.0 <= self.front_load < math.inf:
            raise ValueError(f"front_load must be a finite number >= 1, got {self.front_load!r}")
        if self.front_load * self.early_fraction > 1.0 and self.early_steps is None:
            raise ValueError(f"front_load * early_fraction must be <= 1 (the early phase cannot spend more than the "
                             f"whole budget), got {self.front_load} * {self.early_fraction}")
        if self.early_steps is not None and self.total_steps is not None \
                and self.front_load * self.early_steps > self.total_steps:
            raise ValueError(f"front_load * early_steps must be <= total_steps (the early phase cannot spend more "
                             f"than the whole budget), got {self.front_load} * {self.early_steps} > {self.total_steps}")
        object.__setattr__(self, "_capped_spending", {})  # a cache of derived figures, not state

    @property
    def uses_refresh_age(self) -> bool:
        """Asks the scheduler for each factor's steps since its last refresh (the policy protocol)."""
        return self.age_power != 0

    def checks_at(self, step: int) -> bool:
        return step % self.check_every == 0

    def tolerance_at(self, step: int, total_steps: Optional[float] = None) -> float:
        return self.tolerance

    def allowance(self, step: int, total_steps: Optional[float] = None) -> float:
        """Cumulative refreshes per factor allowed by ``step`` (``A(t)`` of the class docstring)."""
        length = _finite_length(total_steps, self.total_steps)
        if length is None:
            base = 1.0 / self.every
            early = self.early_steps if self.early_steps is not None else self.early_steps_if_unknown
            return self.front_load * base * min(step, early) + base * max(0, step - early)
        # the scheduler decides steps 1 .. total_steps - 1 (step 0 is the optimizer's exact refresh),
        # where the clock makes floor((total_steps - 1) / every) whole refreshes per factor: the
        # allowance is spread over those decided steps, so the last one reaches the whole budget
        span = math.floor(length) - 1
        if span <= 0:  # a one-step run: nothing to decide
            return max(step, 0) / self.every
        if step > span:  # a run longer than planned: the clock's own rate after the planned budget
            return self.allowance(span, total_steps) + (step - span) / self.every
        base = math.floor(span / self.every) / span
        early = self.early_steps if self.early_steps is not None else self.early_fraction * span
        # an early phase given in steps for a run shorter than planned ends when it has spent the budget
        early = min(early, span / self.front_load)
        early_rate = self.front_load * base
        if early >= span:
            return early_rate * step
        late_rate = (span * base - early * early_rate) / (span - early)
        if self.late_taper == 1.0 or step <= early:
            return early_rate * min(step, early) + late_rate * max(0.0, step - early)
        return self._tapered(step, span, base, early, early_rate * early)

    def _tapered(self, step: int, length: float, base: float, early: float, spent_early: float) -> float:
        """``A(t)`` after the early phase when the late rate falls linearly from its start ``r`` to
        ``late_taper * r`` at the last decided step ``length``; ``r`` makes the same total as the
        flat rate."""
        late, elapsed = length - early, step - early
        start_rate = 2 * (length * base - spent_early) / (late * (1 + self.late_taper))
        return spent_early + start_rate * (elapsed - (1 - self.late_taper) * elapsed ** 2 / (2 * late))

    def budget_at(self, step: int, factors: int, total_steps: Optional[float] = None) -> int:
        """How many refreshes a check at ``step`` may spend over ``factors`` factors: what the
        allowance grew by since the previous check, plus what the cap of one refresh per factor
        per check held back before, at most ``factors``."""
        before = self._spent_by(step - self.check_every, factors, total_steps)  # first: the cache then moves on
        return self._spent_by(step, factors, total_steps) - before

    def _spent_by(self, step: int, factors: int, total_steps: Optional[float]) -> int:
        """``S`` after the check at ``step`` of the chain ``step, step - check_every, ...``, where
        ``S = min(S_before + factors, floor(factors * A(check)))`` from ``S = 0`` at step 0.

        A pure function of its arguments. The checks come in increasing order, so the last ``S``
        of each chain is cached and the next call goes on from it (a resumed run, with an empty
        cache, recomputes it once from step 0 and gets the same figure)."""
        if step <= 0:
            return 0
        key = (factors, _finite_length(total_steps, self.total_steps), step % self.check_every)
        done, spent = self._capped_spending.get(key, (0, 0))
        if done > step:
            done, spent = 0, 0
        for check in range(done + self.check_every if done else (step - 1) % self.check_every + 1, step + 1,
                           self.check_every):
            spent = min(spent + factors, math.floor(factors * self.allowance(check, total_steps) + 1e-9))
        self._capped_spending[key] = (step, spent)
        return spent

    def select(self, staleness: torch.Tensor, step: int, total_steps: Optional[float] = None,
               steps_since_refresh: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The ``budget_at(step)`` factors above ``tolerance`` ranked highest by ``staleness *
        steps_since_refresh ** age_power`` (by staleness alone when the ages are not given)."""
        score = staleness
        if steps_since_refresh is not None and self.age_power != 0:
            score = staleness * steps_since_refresh.to(staleness).clamp_min(1.0) ** self.age_power
        return most_stale(score, self.budget_at(step, staleness.numel(), total_steps), staleness > self.tolerance)
