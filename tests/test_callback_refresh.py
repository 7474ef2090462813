"""The refresh schedule KronCallback owns: adaptive per factor, budgeted, tolerance schedule."""

import lightning as L
import pytest
import torch
from callback_helpers import TinyRegression, fit, loader, make_net

from lightning_kron import SOAP, AdaptiveRefresh, FixedRefresh, KronCallback
from lightning_kron.scheduling.scheduler import RefreshScheduler
from lightning_kron.scheduling.tolerance_schedule import LinearRamp, TighterEarly


def run(policy, steps: int = 12, **scheduler_options):
    """A plain loop with a RefreshScheduler; returns (net, optimizer, scheduler, per-step records)."""
    net = make_net()
    optimizer = SOAP([(f"net.{n}", p) for n, p in net.named_parameters()], lr=1e-2, refresh_timing="in_step")
    records = []
    scheduler = RefreshScheduler(optimizer, policy, **scheduler_options)
    decide = scheduler.in_step

    def recording_owner():  # sees the staleness the in-step decision is made on
        records.append({i.name: i.staleness for i in optimizer.factors()})
        return decide()

    scheduler.in_step = recording_owner

    def note_refreshed():
        records[-1]["refreshed"] = {i.name for i in optimizer.factors() if i.steps_since_refresh == 0}

    _train(optimizer, net, steps, after_step=note_refreshed)
    return net, optimizer, scheduler, records


def _train(optimizer, net, steps: int = 10, after_step=lambda: None) -> None:
    """``steps`` regression steps over the helper's batches (two passes at most)."""
    batches = [batch for _ in range(2) for batch in loader()]
    for step in range(steps):
        inputs, targets = batches[step]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(inputs), targets).backward()
        optimizer.step()
        after_step()


def test_adaptive_refreshes_fewer_factors_than_every_step_and_each_at_its_own_rate():
    fixed, adaptive = KronCallback(refresh=FixedRefresh(every=1)), KronCallback(refresh=AdaptiveRefresh(tolerance=0.03))
    fit(TinyRegression(), [fixed], max_epochs=2)
    fit(TinyRegression(), [adaptive], max_epochs=2)
    assert fixed.scheduler.counters.refreshes == 15 * 6  # steps 2..16, all 6 factors
    assert 0 < adaptive.scheduler.counters.refreshes < 0.8 * fixed.scheduler.counters.refreshes
    counts = [info.refreshes for info in adaptive.optimizer.factors()]
    assert len(set(counts)) > 1, counts  # factors drift at different rates and are refreshed independently


def test_budget_refreshes_the_most_stale_first_and_defers_the_rest():
    _, optimizer, scheduler, records = run(FixedRefresh(every=4), max_per_step=2)
    names = optimizer.factor_names()
    for step, record in enumerate(records, start=1):
        relative = step - 1  # step 1: the optimizer's own exact refresh of every factor
        expected = 6 if relative == 0 else 2 if relative % 4 in (0, 1, 2) and relative > 2 else 0
        assert len(record["refreshed"]) == expected, (step, record["refreshed"])
        if relative > 0 and relative % 4 == 0:  # the check step: the two stalest of all six
            ranked = sorted(names, key=lambda name: -record[name])
            assert record["refreshed"] == set(ranked[:2])
    assert scheduler.deferred_count == 0 and scheduler.counters.refreshes == 2 * 6


def test_tolerance_zero_is_exactly_the_fixed_frequency():
    net_adaptive, *_ = run(AdaptiveRefresh(tolerance=0.0, check_every=3))
    net_fixed, *_ = run(FixedRefresh(every=3))
    for a, b in zip(net_adaptive.parameters(), net_fixed.parameters()):
        assert torch.equal(a, b)


def test_huge_tolerance_never_refreshes_after_the_first_exact_basis():
    _, optimizer, scheduler, _ = run(AdaptiveRefresh(tolerance=1.0))
    assert scheduler.counters.refreshes == 0 and scheduler.counters.checks == 11
    assert {info.refreshes for info in optimizer.factors()} == {1}


def test_tighter_tolerance_early_refreshes_more_early_only():
    base = AdaptiveRefresh(tolerance=0.05)
    _, _, plain, plain_records = run(base)
    _, _, tight, tight_records = run(base, tolerance_schedule=TighterEarly(early_tolerance=0.0, early_steps=5))
    early = lambda records: sum(len(r["refreshed"]) for r in records[1:5])  # relative steps 1..4
    assert early(tight_records) == 4 * 6 > early(plain_records)
    assert tight.tolerance_at(4) == 0.0 and tight.tolerance_at(5) == 0.05 == plain.tolerance_at(4)


def test_callback_resolves_a_fractional_schedule_from_the_trainer():
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(callback.scheduler.tolerance_at(trainer.global_step - 1))

    callback = KronCallback(refresh=AdaptiveRefresh(0.05), tolerance_schedule=TighterEarly(0.01, early_fraction=0.25))
    fit(TinyRegression(), [callback, Spy()], max_steps=8)
    assert callback.scheduler.total_steps == 8
    assert seen == [0.01, 0.01, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]


def test_linear_ramp_refreshes_at_a_tight_tolerance_first_then_loosens():
    base = AdaptiveRefresh(tolerance=1.0)  # alone: never refreshes after the first exact basis
    _, _, ramped, records = run(base, tolerance_schedule=LinearRamp(start_tolerance=0.0, ramp_steps=10))
    refreshed = [len(r["refreshed"]) for r in records[1:]]
    assert sum(refreshed[:3]) > 0 and refreshed[-2:] == [0, 0], refreshed  # tolerance 0.1 at step 1, 1.0 from step 10
    assert ramped.tolerance_at(1) == 0.1 and ramped.tolerance_at(5) == 0.5 and ramped.tolerance_at(40) == 1.0


def test_fractional_schedules_need_a_known_training_length():
    for schedule, in_steps in ((LinearRamp(start_tolerance=0.1), "ramp_steps"), (TighterEarly(early_tolerance=0.01), "early_steps")):
        with pytest.raises(ValueError, match=f"needs the planned training length.*max_steps.*{in_steps}=N"):
            schedule(3, None, 0.5)
    with pytest.raises(ValueError, match="start_tolerance"):
        LinearRamp(start_tolerance=1.5)


def test_a_bare_optimizer_refuses_a_fractional_schedule_before_its_first_step_changes_anything():
    """Alone, the optimizer does not know the run's length: the first step fails at once, with the
    state untouched (it used to fail at the first check step, after the statistics were updated)."""
    model = torch.nn.Linear(4, 3)
    optimizer = SOAP(model.parameters(), refresh=AdaptiveRefresh(0.1, schedule=TighterEarly(early_tolerance=0.01)))
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    before = {key: value.clone() for key, value in optimizer.state[model.weight].items()}
    with pytest.raises(ValueError, match="early_steps=N"):
        optimizer.step()
    assert optimizer.global_step == 0
    assert all(torch.equal(before[key], value) for key, value in optimizer.state[model.weight].items())


def test_owner_refreshes_inside_the_step_like_the_optimizers_own_policy():
    """An owner's scheduler refreshes where the optimizer's own would: in the step, or with
    ``refresh_timing="after_step"`` (SOAP's default) from the post-hook, exactly as a scheduler
    whose in-step window is shut."""
    nets, optimizers = [], []
    for owner, timing in (("optimizer", "in_step"), ("in step", "in_step"), ("after step", "in_step"),
                          ("optimizer", "after_step")):
        net = make_net()
        optimizer = SOAP(net.named_parameters(), lr=1e-2, refresh=FixedRefresh(every=3), refresh_timing=timing)
        if owner != "optimizer":
            RefreshScheduler(optimizer)
        if owner == "after step":
            optimizer.scheduler.in_step = lambda: []  # decides nothing in the step: the post-hook decides
        _train(optimizer, net)
        nets.append(net)
        optimizers.append(optimizer)
    gap = lambda a, b: max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    own, in_step, after, own_after = nets
    assert gap(own, in_step) < 1e-5 < gap(own, after)
    assert gap(own_after, after) < 1e-5
    assert [i.refreshes for i in optimizers[0].factors()] == [i.refreshes for i in optimizers[1].factors()]
    assert [i.refreshes for i in optimizers[3].factors()] == [i.refreshes for i in optimizers[2].factors()]


def test_a_partly_gradded_step_still_refreshes_in_the_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))  # one stack of two
    optimizer = SOAP(net.named_parameters(), lr=1e-2, refresh_timing="in_step")
    scheduler = RefreshScheduler(optimizer, FixedRefresh(every=1))
    calls = []
    decide = scheduler.in_step
    scheduler.in_step = lambda: calls.append(optimizer.global_step) or decide()
    for step in range(3):
        optimizer.zero_grad()
        net(torch.randn(8, 4)).square().mean().backward()
        if step == 2:
            net[0].weight.grad = None  # one member of the stack has no gradient this step
        optimizer.step()
    assert calls == [1, 2, 3]  # step 3, with one member of the stack in flight as a copy, too
    assert scheduler.counters.refreshes == 2 * 4


def test_a_never_gradded_layer_stacked_with_others_does_not_change_their_steps():
    """One layer that never gets a gradient, stacked with two of its shape, used to move the whole
    step's refresh to after the step, which changed the other layers' math (1.2e-3 in an audit's
    example). With it, they now take the same steps as without it (fp64, in-step refreshes)."""
    def run(with_idle_layer):
        torch.manual_seed(0)
        layers = [torch.nn.Linear(5, 5, bias=False, dtype=torch.float64) for _ in range(3)]
        params = [layer.weight for layer in layers[: 3 if with_idle_layer else 2]]
        optimizer = SOAP(params, lr=1e-2, refresh=FixedRefresh(every=2), refresh_timing="in_step")
        inputs = torch.randn(16, 5, dtype=torch.float64)
        for _ in range(7):
            optimizer.zero_grad()
            (layers[1](torch.tanh(layers[0](inputs)))).square().mean().backward()
            optimizer.step()
        assert len(optimizer.factor_groups()) == 1  # one stack, partly gradded at every step
        return [layer.weight.detach().clone() for layer in layers[:2]]

    for alone, stacked in zip(run(False), run(True)):
        torch.testing.assert_close(stacked, alone, rtol=0, atol=1e-12)


def test_only_the_groups_refreshed_in_the_step_rotate_their_gradient_again(monkeypatch):
    from lightning_kron.engine.factor_group import FactorGroup

    calls = []
    original = FactorGroup.rotate_in
    monkeypatch.setattr(FactorGroup, "rotate_in", lambda group, x, **kw: calls.append(group) or original(group, x, **kw))
    net = make_net()
    optimizer = SOAP(net.named_parameters(), lr=1e-2, refresh_timing="in_step")
    scheduler = RefreshScheduler(optimizer, FixedRefresh(every=1))
    _train(optimizer, net, steps=2)  # step 2 refreshes every factor: each factored stack once more
    stacks = len(optimizer.factor_groups())
    factored = sum(1 for group in optimizer.factor_groups() if group.factored_dims)
    assert 0 < factored < stacks and len(calls) == 2 * stacks + factored
    calls.clear()
    scheduler.detach()
    RefreshScheduler(optimizer, AdaptiveRefresh(tolerance=1.0))  # never stale: nothing refreshed
    _train(optimizer, net, steps=2)
    assert len(calls) == 2 * stacks
