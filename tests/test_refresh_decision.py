"""One refresh decision: the optimizer alone and KronCallback both run ``RefreshScheduler`` over a
``RefreshPolicy``, so a policy means the same thing wherever it is used."""

from __future__ import annotations

import pytest
import torch
from callback_helpers import TinyRegression, fit
from torch import nn

import lightning_kron as lk
from lightning_kron.scheduling.scheduler import RefreshScheduler


class EveryThird:
    """A user-written policy: the protocol's two methods and nothing else."""

    def checks_at(self, step: int) -> bool:
        return step % 3 == 0

    def select(self, staleness, step, total_steps=None):
        return staleness >= staleness.median()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
        self.unused = nn.Linear(3, 3)  # gets zero gradients: its factors stay exactly diagonal (staleness 0)

    def forward(self, inputs):
        return self.body(inputs)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Net()


def _train(refresh, steps: int = 14, model: nn.Module | None = None, owner: bool = False):
    """SOAP on a fixed data stream; ``owner``: the policy is given to an owner's RefreshScheduler
    (what KronCallback builds) instead of to the optimizer."""
    model = model or _model()
    optimizer = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=None if owner else refresh)
    if owner:
        RefreshScheduler(optimizer, refresh)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        inputs = torch.randn(16, 6, generator=generator)
        model(inputs).square().mean().backward()
        for param in model.unused.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
    return model, optimizer


def _refreshes(optimizer) -> dict[str, int]:
    return {info.name: info.refreshes for info in optimizer.factors()}


def test_a_user_written_policy_drives_the_optimizer_alone():
    _, optimizer = _train(EveryThird())
    # 14 steps: the first is the exact refresh of all factors; the policy checks steps 3, 6, 9, 12
    # (counted from it) and takes the half of the factors at or above the median staleness
    counts = _refreshes(optimizer)
    assert set(counts.values()) <= set(range(1, 6)) and max(counts.values()) > 1
    assert optimizer.scheduler.counters.checks == 4
    assert optimizer.scheduler.counters.refreshes == sum(counts.values()) - len(counts)


def test_a_user_written_policy_drives_the_callback_like_the_optimizer():
    callback = lk.KronCallback(refresh=EveryThird())
    fit(TinyRegression(), [callback], max_epochs=1)
    assert callback.scheduler.policy.__class__ is EveryThird
    steps = callback.optimizer.global_step
    assert steps > 6 and callback.scheduler.counters.checks == (steps - 1) // 3  # after the first exact refresh
    assert callback.scheduler.counters.refreshes > 0


def test_a_policy_without_the_protocol_fails_at_construction():
    class NoSelect:
        def checks_at(self, step):
            return True

    for make in (lambda: lk.SOAP(nn.Linear(2, 2).parameters(), refresh=NoSelect()),
                 lambda: lk.KronCallback(refresh=NoSelect())):
        with pytest.raises(ValueError, match="checks_at\\(step\\) and select"):
            make()


@pytest.mark.parametrize("answer, got", [
    (lambda staleness: staleness[:1] > 0, r"torch.bool of shape \(1,\)"),   # would broadcast to every factor
    (lambda staleness: staleness, "torch.float32 of shape"),                 # nonzero would mean "refresh"
    (lambda staleness: [True] * len(staleness), "got list"),
])
def test_a_policy_answering_in_the_wrong_form_is_named(answer, got):
    class Careless(EveryThird):
        def select(self, staleness, step, total_steps=None):
            return answer(staleness)

    with pytest.raises(ValueError, match=rf"Careless.select must return a bool tensor of shape \(\d+,\).*{got}"):
        _train(Careless(), steps=4)


@pytest.mark.parametrize("owner", [False, True], ids=["optimizer", "owner"])
def test_tolerance_zero_is_the_fixed_clock_exactly_even_for_diagonal_factors(owner):
    """``AdaptiveRefresh(tolerance=0, check_every=f)`` and ``FixedRefresh(every=f)``: the same
    refreshes of every factor (the unused layer's staleness is exactly 0) and the same weights,
    whoever holds the policy."""
    fixed_model, fixed = _train(lk.FixedRefresh(every=3), owner=owner)
    zero_model, zero = _train(lk.AdaptiveRefresh(tolerance=0.0, check_every=3), owner=owner)
    assert [i.staleness for i in fixed.factors() if i.name.startswith("unused")] == [0.0, 0.0]
    assert _refreshes(fixed) == _refreshes(zero)
    assert all(count == 1 + 13 // 3 for count in _refreshes(fixed).values())
    for a, b in zip(fixed_model.parameters(), zero_model.parameters()):
        assert torch.equal(a, b)


def test_the_optimizers_budget_defers_and_resumes_bit_identically():
    policy = lk.AdaptiveRefresh(tolerance=0.0, max_per_step=2)
    reference_model, reference = _train(policy, steps=10)
    assert reference.scheduler.deferred_count > 0
    model, optimizer = _train(policy, steps=6)
    state = optimizer.state_dict()
    resumed = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy)
    resumed.load_state_dict(state)
    assert optimizer.scheduler.deferred_count > 0  # the queue travels in the optimizer's state
    assert resumed.scheduler.deferred_count == optimizer.scheduler.deferred_count
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):  # replay the data stream to where the interrupted run stopped
        torch.randn(16, 6, generator=generator)
    for _ in range(4):
        resumed.zero_grad()
        model(torch.randn(16, 6, generator=generator)).square().mean().backward()
        for param in model.unused.parameters():
            param.grad = torch.zeros_like(param)
        resumed.step()
    for a, b in zip(reference_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert _refreshes(reference) == _refreshes(resumed)


@pytest.mark.parametrize("owner", ["optimizer", "attached scheduler"])
def test_a_rollback_redecides_the_step_it_returns_to(owner):
    """Load an earlier state into the same optimizer and take the step again: it refreshes as a
    fresh load of that state does (an attached scheduler used to remember having decided that step
    number already, and skipped its refreshes)."""
    def grads(step):
        return torch.randn(6, 5, generator=torch.Generator().manual_seed(step))

    def make(weight):
        optimizer = lk.SOAP([("w", weight)], lr=1e-2, refresh=lk.FixedRefresh(every=1))
        if owner == "attached scheduler":
            RefreshScheduler(optimizer, lk.FixedRefresh(every=1))
        return optimizer

    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 5))
    optimizer = make(weight)
    for step in range(5):
        weight.grad = grads(step)
        optimizer.step()
    saved_weight, saved = weight.detach().clone(), optimizer.state_dict()
    saved = {"state": {k: {n: t.clone() for n, t in v.items()} for k, v in saved["state"].items()},
             "param_groups": saved["param_groups"]}
    weight.grad = grads(5)
    optimizer.step()
    with torch.no_grad():
        weight.copy_(saved_weight)
    optimizer.load_state_dict(saved)
    weight.grad = grads(5)
    optimizer.step()

    fresh_weight = nn.Parameter(saved_weight.clone())
    fresh = make(fresh_weight)
    fresh.load_state_dict(saved)
    fresh_weight.grad = grads(5)
    fresh.step()
    assert [f.refreshes for f in optimizer.factors()] == [f.refreshes for f in fresh.factors()] == [6, 6]
    assert torch.equal(weight, fresh_weight)
