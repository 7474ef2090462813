"""The test matrix every optimizer passes (convergence, dtypes, state, checkpoints, names, bad input).

Every variant of every method in ``lightning_kron/methods/registry.py`` runs it (factories in conftest.py).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lightning_kron as lk


def _regression(seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(128, 12, generator=generator, dtype=dtype)
    target_weight = torch.randn(5, 12, generator=generator, dtype=dtype)
    targets = inputs @ target_weight.T
    return inputs, targets


def _train(model, optimizer, inputs, targets, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model(inputs) - targets).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_converges_on_linear_regression(make_optimizer):
    inputs, targets = _regression()
    model = nn.Linear(12, 5)
    # Kronecker methods take spectral steps (~sqrt(rank) in Frobenius norm, AdamW ~sqrt(numel)),
    # so they want a larger lr than AdamW on this rank-5 gradient.
    losses = _train(model, make_optimizer(model.named_parameters(), lr=0.05), inputs, targets, 150)
    assert losses[-1] < 0.05 * losses[0]


def test_converges_on_small_mlp(make_optimizer):
    inputs, _ = _regression()
    targets = torch.sin(inputs[:, :3]).sum(dim=1, keepdim=True)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 1))
    losses = _train(model, make_optimizer(model.named_parameters(), lr=3e-3), inputs, targets, 200)
    assert losses[-1] < 0.25 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_parameter_dtype_preserved_and_statistics_precise(make_optimizer, dtype):
    inputs, targets = _regression(dtype=dtype)
    model = nn.Sequential(nn.Linear(12, 5).to(dtype))
    optimizer = make_optimizer(model.parameters())
    _train(model, optimizer, inputs, targets, 3)
    expected_state = torch.float64 if dtype == torch.float64 else torch.float32
    for param in model.parameters():
        assert param.dtype == dtype
        assert torch.isfinite(param.float()).all()
        for key, value in optimizer.state[param].items():
            if value.is_floating_point() and ".refresh_seconds" not in key:
                assert value.dtype == expected_state, key


def test_state_shapes_are_stable(make_optimizer):
    inputs, targets = _regression()
    model = nn.Linear(12, 5)
    optimizer = make_optimizer(model.parameters())
    _train(model, optimizer, inputs, targets, 1)
    first = {id(p): {k: tuple(v.shape) for k, v in optimizer.state[p].items()} for p in model.parameters()}
    _train(model, optimizer, inputs, targets, 25)
    later = {id(p): {k: tuple(v.shape) for k, v in optimizer.state[p].items()} for p in model.parameters()}
    assert first == later and first


def test_checkpoint_round_trip_is_bit_identical(make_optimizer):
    inputs, targets = _regression()
    torch.manual_seed(1)
    reference = nn.Linear(12, 5)
    resumed = copy.deepcopy(reference)
    reference_opt = make_optimizer(reference.parameters())
    _train(reference, reference_opt, inputs, targets, 13)
    buffer = io.BytesIO()
    torch.save({"model": reference.state_dict(), "optimizer": reference_opt.state_dict()}, buffer)
    _train(reference, reference_opt, inputs, targets, 17)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make_optimizer(resumed.parameters())
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    _train(resumed, resumed_opt, inputs, targets, 17)
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def _train_scheduled(model, optimizer, schedule, inputs, targets, steps: int) -> None:
    for _ in range(steps):
        _train(model, optimizer, inputs, targets, 1)
        schedule.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_with_its_model_trains_on_bit_identically_and_apart(make_optimizer, how):
    """``copy.deepcopy((model, optimizer, lr_scheduler))`` and a pickle round trip give a working
    optimizer: the copy's next steps equal the original's, and stepping one leaves the other as it
    was (a torch LR scheduler wraps the optimizer's ``step`` on the instance, a wrapper that refers to
    the original)."""
    inputs, targets = _regression()
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 5))
    optimizer = make_optimizer(model.named_parameters())
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    _train_scheduled(model, optimizer, schedule, inputs, targets, 7)
    if how == "deepcopy":
        model_copy, optimizer_copy, schedule_copy = copy.deepcopy((model, optimizer, schedule))
    else:
        buffer = io.BytesIO()
        torch.save((model, optimizer, schedule), buffer)
        buffer.seek(0)
        model_copy, optimizer_copy, schedule_copy = torch.load(buffer, weights_only=False)
    assert optimizer_copy.factor_names() == optimizer.factor_names()
    assert (optimizer_copy.global_step, optimizer_copy.skipped_steps) == (optimizer.global_step, optimizer.skipped_steps)
    before = [param.detach().clone() for param in model.parameters()]
    _train_scheduled(model_copy, optimizer_copy, schedule_copy, inputs, targets, 9)
    assert optimizer.global_step == 7 and optimizer.param_groups[0]["lr"] != optimizer_copy.param_groups[0]["lr"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))  # the original did not move
    _train_scheduled(model, optimizer, schedule, inputs, targets, 9)
    for a, b in zip(model.parameters(), model_copy.parameters()):
        assert torch.equal(a, b)
    state, state_copy = optimizer.state_dict()["state"], optimizer_copy.state_dict()["state"]
    timed = [name for key in state for name in state[key] if ".refresh_seconds." in name]  # wall clock
    assert all(torch.equal(state[key][name], state_copy[key][name])
               for key in state for name in state[key] if name not in timed)


def test_load_state_dict_hooks_run_as_in_torch_optim(make_optimizer):
    model = nn.Linear(12, 5)
    optimizer = make_optimizer(model.parameters())
    _train(model, optimizer, *_regression(), 3)
    saved, seen = optimizer.state_dict(), []

    def pre_hook(opt, state_dict):
        seen.append(("pre", opt.global_step))
        return {**state_dict, "param_groups": [{**group, "lr": 0.125} for group in state_dict["param_groups"]]}

    optimizer.register_load_state_dict_pre_hook(pre_hook)
    optimizer.register_load_state_dict_post_hook(lambda opt: seen.append(("post", opt.param_groups[0]["lr"])))
    optimizer.global_step = 99
    optimizer.load_state_dict(saved)
    assert seen == [("pre", 99), ("post", 0.125)]
    assert optimizer.global_step == 3 and saved["param_groups"][0]["lr"] != 0.125  # the caller's dict untouched


def test_a_state_dict_post_hook_sees_the_optimizer_entry(make_optimizer):
    """Prepended or appended, and in the order registered among the user's own hooks."""
    model = nn.Linear(12, 5)
    optimizer = make_optimizer(model.parameters())
    _train(model, optimizer, *_regression(), 2)
    seen = []
    for name, prepend in [("appended", False), ("prepended", True), ("prepended last", True)]:
        optimizer.register_state_dict_post_hook(
            lambda opt, state, name=name: seen.append((name, state["param_groups"][0]["lightning_kron"]["global_step"])),
            prepend=prepend)
    optimizer.state_dict()
    assert seen == [("prepended last", 2), ("prepended", 2), ("appended", 2)]


def test_named_and_unnamed_parameters(make_optimizer):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    named = make_optimizer(model.named_parameters())
    assert named.factor_names() == ["0.weight[L]", "0.weight[R]", "1.weight[L]", "1.weight[R]"]
    unnamed = make_optimizer(model.parameters())
    assert unnamed.factor_names() == ["group0.param0[L]", "group0.param0[R]", "group0.param2[L]", "group0.param2[R]"]
    groups = make_optimizer([{"params": list(model[0].named_parameters()), "lr": 1e-3},
                             {"params": list(model[1].parameters()), "weight_decay": 0.0}])
    assert groups.param_groups[0]["lr"] == 1e-3 and groups.param_groups[1]["weight_decay"] == 0.0


def test_nonfinite_gradient_skips_the_step_and_keeps_state(make_optimizer):
    inputs, targets = _regression()
    model = nn.Linear(12, 5)
    optimizer = make_optimizer(model.parameters())
    _train(model, optimizer, inputs, targets, 4)
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = {k: v.clone() for p in model.parameters() for k, v in optimizer.state[p].items()}
    for poison in (float("nan"), float("inf")):
        model.weight.grad = torch.ones_like(model.weight)
        model.weight.grad[0, 0] = poison
        model.bias.grad = torch.ones_like(model.bias)
        optimizer.step()
    assert optimizer.skipped_steps == 2
    for before, param in zip(before_params, model.parameters()):
        assert torch.equal(before, param)
    after_state = {k: v for p in model.parameters() for k, v in optimizer.state[p].items()}
    queued = [key for key in before_state if ".deferred." in key]
    for key, value in before_state.items():
        if key in queued:  # a refresh due on a skipped step waits for the next finite one: queued, never lost
            assert (~value | after_state[key]).all(), key
        else:
            assert torch.equal(value, after_state[key]), key
    _train(model, optimizer, inputs, targets, 1)
    assert not any(optimizer.state[p][key].any() for p in model.parameters() for key in queued
                   if key in optimizer.state[p])  # the finite step ran what was queued


def test_negative_infinity_and_huge_finite_gradients_are_told_apart(make_optimizer):
    """-Inf is caught (the check reads min and max); an fp64 gradient past fp32's range whose
    squares fit fp64 is not, and its step leaves finite state."""
    model = nn.Linear(3, 2).double()
    optimizer = make_optimizer(model.parameters())
    model.weight.grad = torch.full_like(model.weight, 1e60)
    model.bias.grad = torch.zeros_like(model.bias)
    optimizer.step()
    assert optimizer.skipped_steps == 0
    assert all(value.isfinite().all() for p in model.parameters() for value in optimizer.state[p].values()
               if value.is_floating_point())
    model.weight.grad[0, 0] = -float("inf")
    optimizer.step()
    assert optimizer.skipped_steps == 1


@pytest.mark.parametrize("dtype, huge", [(torch.float32, 1e25), (torch.float64, 1e200)])
def test_a_finite_gradient_whose_statistics_would_overflow_is_skipped(make_optimizer, dtype, huge):
    """A loss scaled by 1e25 in fp32: G G^T (1e50) is past fp32's range, so written in it would
    have left the statistics Inf/NaN for good. The step is skipped and counted instead, and the
    next ordinary gradient steps as before."""
    inputs, targets = _regression(dtype=dtype)
    model = nn.Linear(12, 5).to(dtype)
    optimizer = make_optimizer(model.parameters())
    _train(model, optimizer, inputs, targets, 3)
    before = {k: v.clone() for p in model.parameters() for k, v in optimizer.state[p].items() if ".deferred." not in k}
    model.weight.grad = torch.full_like(model.weight, huge)
    model.bias.grad = torch.full_like(model.bias, huge)
    optimizer.step()
    assert optimizer.skipped_steps == 1
    after = {k: v for p in model.parameters() for k, v in optimizer.state[p].items()}
    assert all(torch.equal(value, after[key]) for key, value in before.items())
    losses = _train(model, optimizer, inputs, targets, 3)
    assert optimizer.skipped_steps == 1 and all(torch.isfinite(torch.tensor(losses)))
    assert all(value.isfinite().all() for p in model.parameters() for value in optimizer.state[p].values()
               if value.is_floating_point())


def test_nonfinite_gradient_can_raise(make_optimizer):
    model = nn.Linear(3, 2)
    optimizer = make_optimizer(model.parameters(), nonfinite="raise")
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    with pytest.raises(FloatingPointError):
        optimizer.step()


@pytest.mark.parametrize("bad, match", [
    ({"lr": -1.0}, "lr"),
    ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": float("nan")}, "weight_decay"),
    ({"max_precond_dim": -1}, "max_precond_dim"),
    ({"solver": "svd"}, "solver"),
    ({"shampoo_beta": 1.5}, "shampoo_beta"),
    ({"weight_decay_mode": "l1"}, "weight_decay_mode"),
    ({"start_preconditioning_step": 0}, "start_preconditioning_step"),
    ({"nonfinite": "ignore"}, "nonfinite"),
    ({"refresh_timing": "later"}, "refresh_timing"),
    ({"statistics_product_dtype": torch.float16}, "statistics_product_dtype"),
    ({"rotation_dtype": "bfloat61"}, "rotation_dtype"),
    ({"rotation_dtype": torch.float16}, "rotation_dtype"),  # overflowed on finite gradients
    ({"statistics_dtype": torch.bfloat16}, "statistics_dtype"),
    ({"compile": "false"}, "compile must be True or False"),
    ({"merge_dims": "no"}, "merge_dims must be True or False"),  # "no" is truthy: it merged
    ({"split_large_dims": "yes"}, "split_large_dims must be True or False"),
    ({"precondition_1d": 1}, "precondition_1d must be True or False"),
    ({"betas": 0.9}, "betas must be a pair"),
    ({"refresh": lk.FixedRefresh}, "refresh must be a policy object, e.g. FixedRefresh"),
])
def test_invalid_hyperparameters_fail_at_construction(make_optimizer, bad, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(nn.Linear(3, 2).parameters(), **bad)


@pytest.mark.parametrize("optimizer", [lk.SOAP, lk.EShampoo, lk.Shampoo, lk.KrADagrad])
@pytest.mark.parametrize("bad", [{"lr": "0.1"}, {"lr": True}, {"betas": (0.9, "0.99")}, {"eps": False}])
def test_a_hyperparameter_that_is_not_a_number_is_refused(optimizer, bad):
    """A string from a config, or a bool, is not taken for a number (the matrix's factories scale lr)."""
    with pytest.raises(ValueError, match=f"{next(iter(bad))}.* must be"):
        optimizer(nn.Linear(3, 2).parameters(), **bad)


@pytest.mark.parametrize("params, error, match", [
    ([], ValueError, "empty parameter list"),
    (iter([]), ValueError, "empty parameter list"),
    ([torch.zeros(3, dtype=torch.long)], ValueError, "torch.int64: only floating-point"),
    ([1.0], TypeError, "is a float, not a tensor"),
])
def test_unusable_parameters_fail_at_construction(make_optimizer, params, error, match):
    with pytest.raises(error, match=match):
        make_optimizer(params)


def test_two_modules_named_parameters_in_two_groups_keep_apart(make_optimizer):
    """Each module names its weight "0.weight": the later one gets its group as a prefix, also
    when it comes in through add_param_group, and an empty first group is allowed (as in torch)."""
    encoder, decoder, head = (nn.Sequential(nn.Linear(3, 3)) for _ in range(3))
    optimizer = make_optimizer([{"params": encoder.named_parameters()}, {"params": decoder.named_parameters()}])
    optimizer.add_param_group({"params": list(head.named_parameters())})
    names = optimizer.factor_names()
    assert len(names) == len(set(names))
    assert {"0.weight[L]", "group1.0.weight[L]", "group2.0.weight[L]"} <= set(names)
    make_optimizer([{"params": []}]).add_param_group({"params": list(head.parameters())})


def test_load_state_dict_from_another_model_or_optimizer_fails_cleanly(make_optimizer):
    inputs, targets = _regression()
    model = nn.Linear(12, 5)
    optimizer = make_optimizer(model.parameters())
    _train(model, optimizer, inputs, targets, 3)
    snapshot = {k: v.clone() for p in model.parameters() for k, v in optimizer.state[p].items()}

    other = nn.Linear(12, 6)
    other_opt = make_optimizer(other.parameters())
    _train(other, other_opt, inputs, torch.cat([targets, targets[:, :1]], 1), 1)
    with pytest.raises(ValueError, match="does not match"):
        optimizer.load_state_dict(other_opt.state_dict())
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="not saved by a lightning_kron optimizer"):
        optimizer.load_state_dict(adamw.state_dict())
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        optimizer.load_state_dict("last.ckpt")
    after = {k: v for p in model.parameters() for k, v in optimizer.state[p].items()}
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)


def _without_global_step(state):
    del state["param_groups"][0]["lightning_kron"]["global_step"]


def _integer_basis(state):
    entry = next(entry for entry in state["state"].values() if any(".basis." in key for key in entry))
    key = next(key for key in entry if ".basis." in key)
    entry[key] = entry[key].long()  # copy_ would have truncated it to 0 and +-1


@pytest.mark.parametrize("damage, match", [
    (_without_global_step, "lacks global_step"),
    (lambda state: state["param_groups"][0]["lightning_kron"].update(scheduler={"format": 99}), "state format 99"),
    (lambda state: state["param_groups"][0].update(lr=-1.0), "lr"),
    (lambda state: state["param_groups"][0].update(weight_decay_mode="bogus"), "weight_decay_mode"),  # ran as decoupled
    (_integer_basis, "expected a torch.float32 tensor, found torch.int64"),
    (lambda state: state.pop("state"), "must hold 'state'"),
], ids=["no-global-step", "scheduler-format", "negative-lr", "bogus-decay-mode", "integer-basis", "no-state"])
def test_a_damaged_state_dict_is_refused_before_anything_changes(make_optimizer, damage, match):
    """Each used to load in part (the stacks and param_groups replaced, then a KeyError) or in full
    (a negative lr, an unknown mode, a basis cast from int64)."""
    inputs, targets = _regression()
    model = nn.Linear(12, 5)
    optimizer = make_optimizer(model.parameters())
    _train(model, optimizer, inputs, targets, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    _train(model, optimizer, inputs, targets, 2)
    before = {k: v.clone() for p in model.parameters() for k, v in optimizer.state[p].items()}
    groups_before, step_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]), optimizer.global_step
    damage(saved)
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(saved)
    after = {k: v for p in model.parameters() for k, v in optimizer.state[p].items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups_before
    assert optimizer.global_step == step_before


def test_a_checkpoint_with_a_tensor_lr_loads():
    """An lr or betas set to 0-d tensors mid-run (as some LR schedulers do) are checked as numbers on load."""
    model = nn.Linear(4, 3)
    optimizer = lk.SOAP(model.parameters())
    optimizer.param_groups[0]["lr"] = torch.tensor(0.01)
    model.weight.grad, model.bias.grad = torch.randn(3, 4), torch.randn(3)
    optimizer.step()
    optimizer.param_groups[0]["betas"] = (torch.tensor(0.9), torch.tensor(0.95))  # inside a tuple too
    loader = lk.SOAP(model.parameters())
    loader.load_state_dict(optimizer.state_dict())
    assert float(loader.param_groups[0]["lr"]) == pytest.approx(0.01)


@pytest.mark.parametrize("saved, loading", [({"max_precond_dim": 32}, {"max_precond_dim": 16}),
                                             ({"precondition_1d": True}, {"precondition_1d": False})],
                         ids=["max_precond_dim", "precondition_1d"])
def test_a_state_saved_with_another_blocking_is_refused(make_optimizer, saved, loading):
    """The same shapes, fewer factors: the saved moments live in bases the loader would drop, so
    the load is refused (it used to keep what matched and ignore the rest)."""
    inputs = torch.randn(64, 20)
    model = nn.Linear(20, 10)
    optimizer = make_optimizer(model.parameters(), **saved)
    _train(model, optimizer, inputs, torch.randn(64, 10), 3)
    loader = make_optimizer(model.parameters(), **loading)
    before = {k: v.clone() for p in model.parameters() for k, v in loader.state[p].items()}
    with pytest.raises(ValueError, match="with another blocking"):
        loader.load_state_dict(optimizer.state_dict())
    after = {k: v for p in model.parameters() for k, v in loader.state[p].items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_loading_another_kron_optimizer_type_is_refused():
    model = nn.Linear(3, 2)
    soap, shampoo = lk.SOAP(model.parameters()), lk.Shampoo(model.parameters())
    with pytest.raises(ValueError, match="saved by lightning_kron.Shampoo"):
        soap.load_state_dict(shampoo.state_dict())


def test_param_group_added_after_steps_keeps_existing_state(make_optimizer):
    inputs, targets = _regression()
    body, head = nn.Linear(12, 8), nn.Linear(8, 5)
    model = nn.Sequential(body, head)
    head.requires_grad_(False)
    optimizer = make_optimizer(body.named_parameters())
    _train(model, optimizer, inputs, targets, 3)
    kept = {k: v.clone() for k, v in optimizer.state[body.weight].items()}
    head.requires_grad_(True)
    optimizer.add_param_group({"params": list(head.named_parameters()), "lr": 1e-3})
    assert torch.equal(optimizer.state[body.weight]["block0.step"], kept["block0.step"])
    assert all(torch.equal(kept[k], v) for k, v in optimizer.state[body.weight].items())
    assert "weight[L]" in optimizer.factor_names()  # the new group's own names
    frozen_head = head.weight.detach().clone()
    _train(model, optimizer, inputs, targets, 2)
    assert not torch.equal(frozen_head, head.weight)
    assert optimizer.state[head.weight]["block0.step"] == 2


def test_a_group_added_after_steps_is_refreshed_by_the_schedule(make_optimizer):
    """``add_param_group`` after the scheduler has run: the new group's factors join its decisions
    (they used to stay outside them, never refreshed, the scheduler's factor count unchanged)."""
    inputs, targets = _regression()
    body, head = nn.Linear(12, 8), nn.Linear(8, 5)
    model = nn.Sequential(body, head)
    head.requires_grad_(False)
    optimizer = make_optimizer(body.named_parameters(), refresh=lk.FixedRefresh(every=2))
    _train(model, optimizer, inputs, targets, 3)
    head.requires_grad_(True)
    optimizer.add_param_group({"params": list(head.named_parameters(prefix="head"))})
    _train(model, optimizer, inputs, targets, 8)
    assert optimizer.scheduler.factor_count == len(optimizer.factors())
    added = [info for info in optimizer.factors() if info.name.startswith("head.")]
    assert added and all(info.refreshes >= 3 for info in added)  # 8 steps on a 2-step clock


def test_a_refused_param_group_is_not_added(make_optimizer):
    model = nn.Linear(4, 3)
    extra = nn.Parameter(torch.randn(5, 4))
    optimizer = make_optimizer(model.parameters())
    with pytest.raises(ValueError, match="lr"):
        optimizer.add_param_group({"params": [extra], "lr": -1.0})
    assert len(optimizer.param_groups) == 1 and extra not in optimizer.state
    optimizer.add_param_group({"params": [extra], "lr": 1e-3})  # a corrected retry is accepted
    assert len(optimizer.param_groups) == 2


def test_a_refused_nonfinite_step_is_not_counted(make_optimizer):
    """``nonfinite="raise"``: the refused step leaves no trace, so the run continues exactly as one
    that never saw it (its first exact refresh included)."""
    inputs, targets = _regression()
    torch.manual_seed(3)
    model = nn.Linear(12, 5)
    twin = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters(), nonfinite="raise")
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    with pytest.raises(FloatingPointError):
        optimizer.step()
    assert optimizer.global_step == 0
    _train(model, optimizer, inputs, targets, 4)
    _train(twin, make_optimizer(twin.parameters(), nonfinite="raise"), inputs, targets, 4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_parameter_without_gradients_at_refreshes_stays_finite(make_optimizer):
    """A layer that gets no gradient for its first steps (a head attached late) while the clock
    refreshes every factor: its zero statistics must not turn into 0/0 in a bias correction."""
    inputs, targets = _regression()
    body, head = nn.Linear(12, 8), nn.Linear(8, 5)
    model = nn.Sequential(body, head)
    optimizer = make_optimizer(model.parameters(), refresh=lk.FixedRefresh(every=3))
    for step in range(14):
        optimizer.zero_grad()
        (model(inputs) - targets).square().mean().backward()
        if step < 7:
            head.weight.grad = None
        optimizer.step()
    assert all(torch.isfinite(param).all() for param in model.parameters())
    assert all(torch.isfinite(value).all() for value in optimizer.state[head.weight].values() if value.is_floating_point())


def test_nonfinite_gradient_in_one_group_leaves_the_other_stepping(make_optimizer):
    first, second = nn.Linear(4, 3), nn.Linear(4, 3)
    optimizer = make_optimizer([{"params": first.parameters()}, {"params": second.parameters()}])
    for param in list(first.parameters()) + list(second.parameters()):
        param.grad = torch.ones_like(param)
    first.weight.grad[0, 0] = float("nan")
    before_first, before_second = first.weight.detach().clone(), second.weight.detach().clone()
    optimizer.step()
    assert optimizer.skipped_steps == 1
    assert torch.equal(before_first, first.weight) and not torch.equal(before_second, second.weight)


def test_dtype_options_accept_names_from_configs():
    optimizer = lk.SOAP(nn.Linear(3, 2).parameters(), rotation_dtype="bf16", statistics_product_dtype="torch.bfloat16")
    assert optimizer.rotation_dtype is torch.bfloat16 and optimizer.statistics_product_dtype is torch.bfloat16
