"""The optimizers round-trip through ``torch.distributed.checkpoint`` (one process, no sharding).

``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups``, keyed by parameter names,
and ``set_optimizer_state_dict`` runs a zero-gradient step on an optimizer whose state is empty. So
the optimizer-wide entry lives in the first parameter group, the state exists from construction,
and loading maps saved entries by position, whatever their keys.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import lightning_kron as lk


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _steps(model: nn.Module, optimizer, start: int, count: int) -> None:
    for step in range(start, start + count):
        inputs = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


def _fresh_copy(model: nn.Module, make_optimizer):
    copy = _model()
    copy.load_state_dict(model.state_dict())
    return copy, make_optimizer(copy.named_parameters())


def test_get_and_set_optimizer_state_dict_resume_exactly_without_a_step(make_optimizer):
    model = _model()
    optimizer = make_optimizer(model.named_parameters(), refresh=lk.FixedRefresh(every=2))
    _steps(model, optimizer, 0, 5)
    saved = get_optimizer_state_dict(model, optimizer)
    resumed_model, resumed = _fresh_copy(model, lambda p: make_optimizer(p, refresh=lk.FixedRefresh(every=2)))
    before = [p.detach().clone() for p in resumed_model.parameters()]
    set_optimizer_state_dict(resumed_model, resumed, saved)
    assert resumed.global_step == optimizer.global_step == 5
    assert all(torch.equal(a, b) for a, b in zip(before, resumed_model.parameters()))  # no step was taken
    _steps(model, optimizer, 5, 4)
    _steps(resumed_model, resumed, 5, 4)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_dcp_save_and_load_continue_bit_identically(tmp_path):
    model = _model()
    policy = lk.AdaptiveRefresh(tolerance=0.0, max_per_step=2)  # deferred factors must travel too
    optimizer = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy)
    _steps(model, optimizer, 0, 4)
    assert optimizer.scheduler.deferred_count > 0
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(tmp_path))
    resumed_model, resumed = _fresh_copy(model, lambda p: lk.SOAP(p, lr=1e-2, refresh=policy))
    target = {"optimizer": get_optimizer_state_dict(resumed_model, resumed)}
    dcp.load(target, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(resumed_model, resumed, target["optimizer"])
    assert resumed.global_step == 4 and resumed.scheduler.deferred_count == optimizer.scheduler.deferred_count
    _steps(model, optimizer, 4, 5)
    _steps(resumed_model, resumed, 4, 5)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_a_sharded_state_is_refused_by_an_unsharded_optimizer():
    """Under FSDP2 each rank's state covers its own rows; the world size is part of the state."""
    model = _model()
    optimizer = lk.SOAP(model.named_parameters())
    state = optimizer.state_dict()
    state["param_groups"][0]["lightning_kron"]["world_size"] = 2
    with pytest.raises(ValueError, match="saved sharded over 2 ranks and cannot be loaded unsharded"):
        optimizer.load_state_dict(state)
