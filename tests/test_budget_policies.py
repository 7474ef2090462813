"""BudgetRefresh (the default), the study's candidate RelativeRefresh (a policy that keeps state) and
its probes SmallFactorsOnClock and WholeBlocks: selection on constructed staleness, budget accounting, checkpoint
round trips and refusals at construction."""

from __future__ import annotations

import math
import numpy
import random

import pytest
import torch
from torch import nn

import lightning_kron as lk
from lightning_kron.scheduling.budget_policies import BudgetRefresh
from lightning_kron.scheduling.scheduler import RefreshScheduler
from scripts.refresh_candidates import RelativeRefresh, SmallFactorsOnClock, WholeBlocks


# ----------------------------------------------------------------- BudgetRefresh: selection
def test_budget_spends_on_the_most_stale_factors():
    policy = BudgetRefresh(every=4, front_load=1.0)  # 8 factors / every=4: 2 per step
    staleness = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.0, 0.3, 0.05, 0.4])
    assert policy.select(staleness, step=1).nonzero().flatten().tolist() == [1, 3]


def test_budget_breaks_ties_by_position_and_skips_factors_at_the_tolerance():
    policy = BudgetRefresh(every=1, front_load=1.0, tolerance=0.1)  # 4 factors, 4 per step
    chosen = policy.select(torch.tensor([0.1, 0.5, 0.05, 0.5]), step=1)
    assert chosen.tolist() == [False, True, False, True]  # 0.1 and 0.05 are not above the tolerance
    ties = BudgetRefresh(every=2, front_load=1.0).select(torch.full((4,), 0.3), step=1)
    assert ties.tolist() == [True, True, False, False]


def test_budget_ranks_by_staleness_times_the_steps_since_each_factors_last_refresh():
    policy = BudgetRefresh(every=4, front_load=1.0)  # 4 factors / every=4: one refresh per step
    staleness = torch.tensor([0.30, 0.29, 0.10, 0.05])
    ages = torch.tensor([1.0, 1.0, 4.0, 2.0])  # scores 0.30, 0.29, 0.40, 0.10
    assert policy.select(staleness, step=1, steps_since_refresh=ages).tolist() == [False, False, True, False]
    assert policy.select(staleness, step=1).tolist() == [True, False, False, False]  # no ages: staleness alone
    plain = BudgetRefresh(every=4, front_load=1.0, age_power=0.0)
    assert not plain.uses_refresh_age and policy.uses_refresh_age
    assert plain.select(staleness, step=1, steps_since_refresh=ages).tolist() == [True, False, False, False]
    squared = BudgetRefresh(every=4, front_load=1.0, age_power=2.0)  # 0.30, 0.29, 1.60, 0.20
    assert squared.select(staleness, step=1, steps_since_refresh=ages).nonzero().flatten().tolist() == [2]
    at_tolerance = BudgetRefresh(every=4, front_load=1.0, tolerance=0.2)  # 0.10 x 4 is not eligible
    assert at_tolerance.select(staleness, step=1, steps_since_refresh=ages).tolist() == [True, False, False, False]


def test_a_factor_the_policy_refuses_never_takes_the_slot_of_one_it_would_refresh():
    """Ranked before the tolerance was applied, an old factor just below it (or a NaN staleness,
    which sorts first) took the one slot, and nothing was refreshed while 0.5 waited."""
    policy = BudgetRefresh(every=2, front_load=1.0, tolerance=0.1)  # 2 factors / every=2: one per step
    ages = torch.tensor([100.0, 1.0])
    assert policy.select(torch.tensor([0.09, 0.5]), step=1, steps_since_refresh=ages).tolist() == [False, True]
    nan_first = torch.tensor([float("nan"), 0.5])
    assert BudgetRefresh(every=2, front_load=1.0).select(nan_first, step=1, steps_since_refresh=ages).tolist() == [
        False, True]


class _RecordingAges:
    """A user-written policy that asks for the ages and always refreshes the first factor."""

    uses_refresh_age = True

    def __init__(self):
        self.seen = []

    def checks_at(self, step):
        return True

    def select(self, staleness, step, total_steps=None, steps_since_refresh=None):
        self.seen.append(steps_since_refresh.tolist())
        return torch.arange(staleness.numel()) == 0


def test_the_scheduler_gives_a_policy_that_asks_the_steps_since_each_factors_last_refresh():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    policy = _RecordingAges()
    optimizer = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy)
    for _ in range(5):  # step 1: the exact refresh of all; steps 2-5: the policy
        optimizer.zero_grad()
        model(torch.randn(16, 6)).square().mean().backward()
        optimizer.step()
    # the weight's two factors: the first refreshed on every step, the second only at step 1
    assert policy.seen == [[1.0, 1.0], [1.0, 2.0], [1.0, 3.0], [1.0, 4.0]]


# ----------------------------------------------------------------- BudgetRefresh: accounting
@pytest.mark.parametrize("check_every, length", [(1, 121), (3, 121), (1, 150), (1, 200)])
def test_budget_spends_exactly_the_fixed_clocks_count_over_a_known_length(check_every, length):
    """The scheduler decides steps 1 .. length - 1; there the clock makes (length - 1) // 20 whole
    refreshes per factor (6 at 121 steps, 7 at 150, 9 at 200), and so does the budget: exactly, its
    allowance reaching the whole count at the last decided step (it used to one step later, so a run
    of the planned length made up to one refresh per factor fewer than the clock)."""
    policy = BudgetRefresh(every=20, front_load=2.0, early_fraction=0.25, total_steps=length, check_every=check_every)
    factors = 13
    spent = sum(policy.budget_at(step, factors) for step in range(1, length) if policy.checks_at(step))
    whole = factors * ((length - 1) // 20)
    assert spent == whole
    clock = lk.FixedRefresh(every=10)
    assert 2 * spent <= factors * sum(clock.checks_at(step) for step in range(1, length))  # at most half of every=10


def test_an_early_phase_in_steps_longer_than_the_budget_allows_never_overspends():
    """front_load * early_steps above the length: the early phase used to run on past the whole
    budget (3x every=20's count with early_steps >= the length) and the tapered allowance then fell."""
    with pytest.raises(ValueError, match="front_load \\* early_steps must be <= total_steps"):
        BudgetRefresh(total_steps=100, early_steps=50)
    for early_steps in (100, 300):  # the length known only when the scheduler passes it
        policy = BudgetRefresh(every=20, early_steps=early_steps)
        allowance = [policy.allowance(step, 200) for step in range(0, 200)]
        assert all(b >= a for a, b in zip(allowance, allowance[1:]))  # never falls
        assert sum(policy.budget_at(step, 4, 200) for step in range(1, 200)) == 4 * (199 // 20)


def test_budget_is_front_loaded():
    policy = BudgetRefresh(every=20, front_load=2.0, early_fraction=0.25, total_steps=201)
    early = sum(policy.budget_at(step, 10) for step in range(1, 51))
    late = sum(policy.budget_at(step, 10) for step in range(51, 202))
    assert early == 50  # twice the average rate (10 per factor over the 200 decided steps) in their first quarter
    assert early + late == 10 * 200 // 20 and late < 3 * early


def test_budget_with_an_unknown_length_runs_at_the_clocks_rate_after_its_early_steps():
    policy = BudgetRefresh(every=10, front_load=3.0, early_steps=20)
    assert policy.allowance(20) == pytest.approx(6.0) and policy.allowance(120) == pytest.approx(16.0)
    assert policy.allowance(120, total_steps=float("inf")) == policy.allowance(120)  # inf: unknown
    # no early_steps and no length: the first early_steps_if_unknown steps at the early rate
    assert BudgetRefresh(every=10, front_load=3.0).allowance(50) == pytest.approx((3 * 30 + 20) / 10)
    assert BudgetRefresh(every=10, early_steps_if_unknown=0).allowance(50) == pytest.approx(5.0)


def test_budget_drives_the_optimizer_and_the_scheduler_passes_the_length():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=BudgetRefresh(every=5, total_steps=41))
    for _ in range(41):  # the exact first refresh, then 40 scheduled steps
        optimizer.zero_grad()
        model(torch.randn(16, 6)).square().mean().backward()
        optimizer.step()
    factors = len(optimizer.factors())
    assert factors * 40 // 5 - factors < optimizer.scheduler.counters.refreshes <= factors * 40 // 5


@pytest.mark.parametrize("start", [1, 61, 151])
def test_a_late_start_spends_the_clocks_count_over_the_steps_left(start):
    """The policies count steps from start_preconditioning_step, the planned length from the start
    of training: the scheduler converts one into the other. Passed as it was, a start at step 151
    of 200 made 2.8x the clock's refreshes (the budget planned for 199 decided steps; 49 came)."""
    counts = {}
    for name, policy in (("clock", lk.FixedRefresh(every=20)), ("budget", BudgetRefresh(total_steps=200))):
        model = _model()
        optimizer = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy, start_preconditioning_step=start)
        _train(policy, 200, model, torch.Generator().manual_seed(1), optimizer)
        counts[name] = optimizer.scheduler.counters.refreshes
    clock = len(optimizer.factors()) * ((200 - start) // 20)  # the clock decides steps start+1 .. 200
    assert counts["clock"] == clock
    assert clock - len(optimizer.factors()) < counts["budget"] <= clock


def test_a_fractional_tolerance_schedule_spans_the_preconditioned_steps():
    """A ramp over 90% of the run reaches the policy's tolerance by its last step after a late start
    too (it stopped at 0.372 of 0.6), and a fraction's boundary is not lost to round-off."""
    from lightning_kron.scheduling.tolerance_schedule import LinearRamp, TighterEarly

    optimizer = lk.SOAP(_model().named_parameters(), start_preconditioning_step=51)
    ramp = lk.AdaptiveRefresh(0.6, schedule=LinearRamp(start_tolerance=0.1, ramp_fraction=0.9))
    scheduler = RefreshScheduler(optimizer, ramp, total_steps=100)
    assert scheduler.policy_length == 50
    assert scheduler.tolerance_at(0) == pytest.approx(0.1) and scheduler.tolerance_at(100 - 51) == pytest.approx(0.6)
    assert TighterEarly(early_fraction=0.29).boundary(100) == 29  # 0.29 * 100 is 28.999999999999996


def test_an_eligible_overflowed_factor_still_takes_a_free_slot():
    """Ranked last among the eligible, but above the ineligible: at a tie with them it lost its
    slot to an ineligible factor of lower index, which was then dropped, and waited forever."""
    from lightning_kron.scheduling.budget_policies import most_stale

    chosen = most_stale(torch.tensor([0.1, math.nan]), 1, torch.tensor([False, True]))
    assert chosen.tolist() == [False, True]
    staleness = torch.tensor([0.3, math.nan, 0.2], dtype=torch.float64)  # fp64 too (its lowest overflowed fp32)
    assert BudgetRefresh(every=1, front_load=1.0).select(staleness, step=1).tolist() == [True, False, True]


def test_the_per_step_cap_ranks_an_overflowed_factor_last():
    """A NaN staleness (an overflowed factor) took one of max_per_step's slots on every check."""
    optimizer = lk.SOAP(_model().named_parameters())
    scheduler = RefreshScheduler(optimizer, lk.AdaptiveRefresh(0.0), max_per_step=1)
    due = torch.tensor([True, True, True])
    assert scheduler._within_budget(due, torch.tensor([math.nan, 0.5, 0.2])).tolist() == [False, True, False]
    assert scheduler._within_budget(due, torch.tensor([math.nan, math.nan, math.nan])).tolist() == [True, False, False]


def test_checked_every_ten_steps_the_optimizer_makes_as_many_refreshes_as_checked_every_step():
    """Through the scheduler: at three times every=20's rate early a check every 10 steps could
    spend 1.5 refreshes per factor but refreshes each once; the later checks spend the rest."""
    counts = {}
    for check_every in (1, 10):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        policy = BudgetRefresh(every=20, front_load=3.0, early_fraction=0.2, total_steps=201, check_every=check_every)
        optimizer = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy)
        for _ in range(201):
            optimizer.zero_grad()
            model(torch.randn(16, 6)).square().mean().backward()
            optimizer.step()
        counts[check_every] = optimizer.scheduler.counters.refreshes
    factors = len(optimizer.factors())
    assert factors * 200 // 20 - factors < counts[1] <= factors * 200 // 20 and counts[10] == counts[1]


# ----------------------------------------------------------------- RelativeRefresh
def test_relative_compares_each_factor_with_its_own_first_check():
    policy = RelativeRefresh(ratio=4.0, floor=0.01)
    first = policy.select(torch.tensor([0.01, 0.10, 0.002]), step=1)  # references: these values
    assert first.tolist() == [False, False, False]
    later = policy.select(torch.tensor([0.05, 0.30, 0.009]), step=2)
    # 0.05 > 4 * 0.01; 0.30 < 4 * 0.10; 0.009 > 4 * 0.002 but not above the floor
    assert later.tolist() == [True, False, False]
    after = policy.select(torch.tensor([0.003, 0.45, 0.03]), step=3)  # factor 0 was refreshed: new reference 0.003
    assert after.tolist() == [False, True, True]
    assert policy.select(torch.tensor([0.011, 0.0, 0.0]), step=4).tolist() == [False, False, False]


def _train(policy, steps, model, generator, optimizer=None):
    optimizer = optimizer or lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 6, generator=generator)).square().mean().backward()
        optimizer.step()
    return optimizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_relative_state_survives_a_checkpoint_and_the_resumed_run_is_bit_identical():
    reference_model = _model()
    reference = _train(RelativeRefresh(ratio=1.5, floor=0.0), 30, reference_model, torch.Generator().manual_seed(1))
    assert reference.scheduler.counters.refreshes > 0
    model, generator = _model(), torch.Generator().manual_seed(1)
    interrupted = _train(RelativeRefresh(ratio=1.5, floor=0.0), 15, model, generator)
    state = interrupted.state_dict()
    assert state["param_groups"][0]["lightning_kron"]["scheduler"]["policy"]["reference"] is not None
    fresh_policy = RelativeRefresh(ratio=1.5, floor=0.0)
    resumed = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=fresh_policy)
    resumed.load_state_dict(state)
    assert fresh_policy.state_dict() == interrupted.scheduler.policy.state_dict()
    _train(None, 15, model, generator, optimizer=resumed)
    for a, b in zip(reference_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert resumed.scheduler.counters.refreshes == reference.scheduler.counters.refreshes


def test_budget_keeps_no_state_and_a_resumed_run_is_bit_identical():
    policy = BudgetRefresh(every=3, total_steps=30)
    reference_model = _model()
    reference = _train(policy, 30, reference_model, torch.Generator().manual_seed(1))
    model, generator = _model(), torch.Generator().manual_seed(1)
    state = _train(policy, 12, model, generator).state_dict()
    assert "policy" not in state["param_groups"][0]["lightning_kron"]["scheduler"]
    resumed = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy)
    resumed.load_state_dict(state)
    _train(None, 18, model, generator, optimizer=resumed)
    for a, b in zip(reference_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert resumed.own_scheduler.counters.refreshes == reference.own_scheduler.counters.refreshes


# ----------------------------------------------------------------- SmallFactorsOnClock
def _trained_under(policy) -> lk.SOAP:
    """A small conv net's SOAP after 40 steps under ``policy`` (bound first, when it binds)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    optimizer = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy)
    if hasattr(policy, "bind"):
        with pytest.raises(RuntimeError, match="bind"):
            policy.select(torch.zeros(6), step=1)
        policy.bind(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):
        optimizer.zero_grad()
        model(torch.randn(8, 1, 6, 6, generator=generator)).square().mean().backward()
        optimizer.step()
    return optimizer


def _refreshes_per_factor(policy) -> dict[tuple[int, str], int]:
    """(size, name) -> refreshes after 40 steps of a small conv net under ``policy``."""
    return {(info.size, info.name): info.refreshes for info in _trained_under(policy).factors()}


def test_small_factors_refresh_on_the_clock_and_the_budget_goes_to_the_large_ones():
    counts = _refreshes_per_factor(SmallFactorsOnClock(BudgetRefresh(every=4, total_steps=40), max_size=3, every=10))
    clock = _refreshes_per_factor(lk.FixedRefresh(every=10))
    small = [count for (size, _), count in counts.items() if size <= 3]
    large = [count for (size, _), count in counts.items() if size > 3]
    assert len(small) == 2 and small == [clock[key] for key in counts if key[0] <= 3]  # the kernel dims 3, 3
    budget = BudgetRefresh(every=4, total_steps=40)
    spendable = sum(budget.budget_at(step, len(counts), 40) for step in range(1, 41))
    assert len(large) == 3 and 0 < sum(large) - len(large) <= spendable  # the budget, spent on the large ones only


def test_whole_blocks_refresh_every_factor_of_a_block_on_the_same_steps():
    budget = BudgetRefresh(every=8, total_steps=40)
    optimizer = _trained_under(WholeBlocks(budget))
    by_parameter: dict[str, list] = {}
    for info in optimizer.factors():
        by_parameter.setdefault(info.parameter, []).append((info.refreshes, info.steps_since_refresh))
    assert sorted(len(factors) for factors in by_parameter.values()) == [2, 3]  # linear L, R; conv 6, 3, 3
    assert all(len(set(factors)) == 1 for factors in by_parameter.values())  # same count, same last step
    extra = sum(refreshes - 1 for factors in by_parameter.values() for refreshes, _ in factors)  # minus step 0's
    picked = sum(budget.budget_at(step, 5, 40) for step in range(1, 41))
    assert 0 < extra <= 3 * picked  # each pick widened to its block, of at most 3 factors


def test_whole_blocks_number_the_blocks_of_every_group_row_by_row():
    class Group:  # what bind reads of a FactorGroup: its rows and its factored dims
        def __init__(self, rows, dims):
            self.rows, self.factored_dims = rows, dims

        def __len__(self):
            return self.rows

    class Optimizer:
        def factor_groups(self):
            return [Group(2, (0, 1)), Group(1, (0, 1, 2))]  # flat: g0 L r0, r1; g0 R r0, r1; g1 dims 0-2

    class Picks:  # a budget whose choice is given
        max_iters = 1

        def __init__(self, picked):
            self.picked = picked

        def select(self, staleness, step, total_steps=None, steps_since_refresh=None):
            return torch.tensor([index in self.picked for index in range(staleness.numel())])

    def widened(*picked):
        policy = WholeBlocks(Picks(set(picked)))
        policy.bind(Optimizer())
        return policy.select(torch.zeros(7), step=1).nonzero().flatten().tolist()

    assert widened(1) == [1, 3]  # the second row's L: its R too, not the first row's
    assert widened(2) == [0, 2]
    assert widened(5) == [4, 5, 6]
    assert widened(0, 6) == [0, 2, 4, 5, 6]
    assert widened() == []


# ----------------------------------------------------------------- refusals
@pytest.mark.parametrize("make, message", [
    (lambda: BudgetRefresh(every=0), "every must be an integer >= 1"),
    (lambda: BudgetRefresh(front_load=0.5), "front_load must be a finite number >= 1"),
    (lambda: BudgetRefresh(front_load="3"), "front_load must be a finite number >= 1"),
    (lambda: BudgetRefresh(front_load=3.0, early_fraction=0.5), "front_load \\* early_fraction must be <= 1"),
    (lambda: BudgetRefresh(early_fraction=1.5), "early_fraction must be in"),
    (lambda: BudgetRefresh(total_steps=0), "total_steps must be an integer >= 1"),
    (lambda: BudgetRefresh(early_steps_if_unknown=-1), "early_steps_if_unknown must be an integer >= 0"),
    (lambda: BudgetRefresh(tolerance=-0.1), "tolerance must be in"),
    (lambda: BudgetRefresh(check_every=2.5), "check_every must be an integer"),
    (lambda: BudgetRefresh(age_power=-1.0), "age_power must be a finite number >= 0"),
    (lambda: BudgetRefresh(late_taper=1.5), "late_taper must be in \\[0, 1\\]"),
    (lambda: BudgetRefresh(age_power=float("inf")), "age_power must be a finite number >= 0"),
    (lambda: RelativeRefresh(ratio=1.0), "ratio must be a number > 1"),
    (lambda: RelativeRefresh(floor=1.0), "floor must be in"),
    (lambda: RelativeRefresh(max_iters=0), "max_iters must be an integer >= 1"),
    (lambda: SmallFactorsOnClock(BudgetRefresh(), max_size=0), "max_size must be an integer >= 1"),
    (lambda: RefreshScheduler(lk.SOAP([torch.nn.Parameter(torch.ones(2, 2))]), total_steps=0),
     "total_steps must be None \\(unknown\\) or a number of optimizer steps > 0"),
    (lambda: RefreshScheduler(lk.SOAP([torch.nn.Parameter(torch.ones(2, 2))]), total_steps=float("nan")),
     "total_steps must be None"),
])
def test_invalid_hyperparameters_fail_at_construction_with_one_line(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_numpy_integers_are_accepted_where_an_integer_is_asked():
    every = numpy.int64(10)  # e.g. from a sweep's numpy grid
    assert lk.FixedRefresh(every=every).every == 10 and BudgetRefresh(every=every).allowance(21, 101) > 0


def test_the_callbacks_default_is_the_budget_front_loaded_over_the_trainers_length():
    from callback_helpers import TinyRegression, fit

    callback = lk.KronCallback()
    trainer = fit(TinyRegression(), [callback], max_epochs=5)  # 8 batches a epoch: 40 steps
    assert isinstance(callback.scheduler.policy, BudgetRefresh) and callback.scheduler.total_steps == 40
    factors = len(callback.optimizer.factors())
    assert trainer.global_step == 40
    # every=20's whole count on the 39 decided steps: 1 per factor, as FixedRefresh(every=20) makes
    assert 0 < callback.scheduler.counters.refreshes <= factors


def test_the_tapered_late_rate_spends_the_same_budget_and_less_of_it_at_the_end():
    tapered, flat = BudgetRefresh(total_steps=300), BudgetRefresh(total_steps=300, late_taper=1.0)
    factors = 20
    spent = {name: [policy.budget_at(step, factors) for step in range(1, 300)]
             for name, policy in (("tapered", tapered), ("flat", flat))}
    whole = factors * (299 // 20)  # A(299) = 14 per factor, reached at the last decided step
    assert sum(spent["tapered"]) == sum(spent["flat"]) == whole
    assert spent["tapered"][:60] == spent["flat"][:60]  # the same early phase
    assert sum(spent["tapered"][-60:]) < sum(spent["flat"][-60:]) and tapered.allowance(299) == pytest.approx(14.0)
    # the rate after the early phase falls linearly to late_taper of its start: 4 x the end's rate
    start = tapered.allowance(61) - tapered.allowance(60)
    end = tapered.allowance(299) - tapered.allowance(298)
    assert start == pytest.approx(4 * end, rel=0.02)  # one-step differences of the quadratic: 2% off


@pytest.mark.parametrize("late_taper", [0.0, 0.25, 1.0])
def test_a_run_longer_than_planned_keeps_refreshing_at_the_clocks_rate(late_taper):
    policy = BudgetRefresh(every=20, total_steps=100, late_taper=late_taper)
    assert policy.allowance(99) == pytest.approx(99 // 20)  # the last decided step: the whole budget
    assert policy.allowance(160) - policy.allowance(99) == pytest.approx(61 / 20)
    assert all(policy.budget_at(step, 10) >= 0 for step in range(1, 300))


@pytest.mark.parametrize("check_every", [5, 10, 50])
def test_a_check_spends_at_most_one_refresh_per_factor_and_later_checks_spend_what_it_held_back(check_every):
    """Checked every 10 steps, three times every=20's rate early is 1.5 refreshes per factor per
    check; a check refreshes a factor at most once, and the checks after it make up the rest, so
    the total is the same as when checking every step (before, 0.39x every=10's count)."""
    length, factors = 300, 14
    every_step = BudgetRefresh(every=20, front_load=3.0, early_fraction=0.2, total_steps=length)
    sparse = BudgetRefresh(every=20, front_load=3.0, early_fraction=0.2, total_steps=length, check_every=check_every)
    spent = [sparse.budget_at(step, factors) for step in range(1, length) if sparse.checks_at(step)]
    assert max(spent) <= factors and min(spent) >= 0
    assert (max(spent) == factors) == (check_every >= 10)  # 0.7 per factor per check at 5: no cap
    total = sum(every_step.budget_at(step, factors) for step in range(1, length))
    last_check = (length - 1) // check_every * check_every  # the allowance the last check has reached
    assert sum(spent) == min(total, math.floor(factors * sparse.allowance(last_check) + 1e-9), factors * len(spent))
    if check_every <= 10:
        assert sum(spent) >= total - factors


def test_the_carried_budget_is_the_same_asked_in_any_order():
    """The cache behind the carry-over is derived, not state: a fresh policy (a resumed run) and
    one asked out of order give the same budgets as one asked check by check."""
    in_order = BudgetRefresh(every=20, total_steps=300, check_every=10)
    expected = [in_order.budget_at(step, 9) for step in range(10, 300, 10)]
    shuffled = BudgetRefresh(every=20, total_steps=300, check_every=10)
    steps = list(range(10, 300, 10))
    random.Random(0).shuffle(steps)
    assert {step: shuffled.budget_at(step, 9) for step in steps} == dict(zip(range(10, 300, 10), expected))
    assert BudgetRefresh(every=20, total_steps=300, check_every=10).budget_at(150, 9) == expected[14]
