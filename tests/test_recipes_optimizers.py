"""Optimizer selection by name, weight-decay groups and the schedule (recipes/optimizers.py, schedule.py)."""

import doctest
import importlib
import re
import warnings

import pytest
import torch

import lightning_kron
from lightning_kron.methods.registry import METHODS
from recipes.gpt import build_network
from recipes.optimizers import (
    OPTIMIZER_NAMES,
    OptimizerConfig,
    accepted_options,
    build_optimizer,
    configure_optimization,
    weight_decay_groups,
)
from recipes.schedule import warmup_cosine_factor


@pytest.mark.parametrize("module", ["recipes.optimizers", "recipes.schedule", "recipes.splits", "recipes.errors",
                                    "recipes.gpt", "recipes.vision"])
def test_docstring_examples_run(module):
    """pytest's --doctest-modules skips recipes/ (see pyproject), so the examples are run here."""
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_weight_decay_skips_biases_norms_and_embeddings_of_a_gpt():
    network = build_network("gpt2", "tiny", context_length=16)
    decayed, kept = weight_decay_groups(network, OptimizerConfig(weight_decay=0.1))
    decayed_names = {name for name, _ in decayed["params"]}
    kept_names = {name for name, _ in kept["params"]}
    assert (decayed["weight_decay"], kept["weight_decay"]) == (0.1, 0.0)
    assert "transformer.h.0.mlp.c_fc.weight" in decayed_names
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
            "transformer.h.0.mlp.c_fc.bias"} <= kept_names
    assert "lm_head.weight" not in decayed_names | kept_names  # tied to wte: listed once
    assert len(decayed_names | kept_names) == len(list(network.parameters()))


def test_decay_flags_move_embeddings_and_norms_into_the_decayed_group():
    network = build_network("llama", "tiny", context_length=16)
    config = OptimizerConfig(decay_embeddings=True, decay_norms_and_biases=True)
    groups = weight_decay_groups(network, config)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("name, expected", [("adamw", "AdamW"), ("soap", "SOAP"), ("soap_adaptive", "SOAP"),
                                            ("eshampoo", "EShampoo"), ("shampoo", "Shampoo")])
def test_each_name_builds_its_optimizer_with_readable_factor_names(name, expected):
    network = build_network("gpt2", "tiny", context_length=16)
    optimizer = build_optimizer(OptimizerConfig(name=name), network)
    assert type(optimizer).__name__ == expected
    if name != "adamw":
        assert "transformer.h.1.attn.c_attn.weight[L]" in optimizer.factor_names()
    if name == "soap_adaptive":
        assert isinstance(optimizer.refresh, lightning_kron.AdaptiveRefresh) and optimizer.refresh.tolerance == 0.05
    if name == "shampoo":
        assert optimizer.graft == "adam"


def test_refresh_options_reach_the_policy():
    network = torch.nn.Linear(4, 4)
    fixed = build_optimizer(OptimizerConfig(name="soap", refresh_schedule="fixed", refresh_every=7), network)
    adaptive = build_optimizer(OptimizerConfig(name="soap_adaptive", tolerance=0.2, check_every=5, max_refreshes_per_step=3), network)
    assert fixed.refresh == lightning_kron.FixedRefresh(every=7)
    assert adaptive.refresh == lightning_kron.AdaptiveRefresh(tolerance=0.2, check_every=5, max_per_step=3)


def test_the_budget_reads_check_every_and_max_iters_and_kradagrad_its_clock():
    network = torch.nn.Linear(4, 4)
    budget = build_optimizer(OptimizerConfig(name="soap", check_every=10, max_iters=2), network, total_steps=300)
    assert budget.refresh == lightning_kron.BudgetRefresh(total_steps=300, check_every=10, max_iters=2)
    clock = build_optimizer(OptimizerConfig(name="kradagrad", refresh_every=5), network)
    assert clock.refresh == lightning_kron.FixedRefresh(every=5)


@pytest.mark.parametrize("fields, message", [
    (dict(name="soap", tolerance=0.3), "optimizer.tolerance: got 0.3, expected its default, 0.05: it is not read by "
                                       "soap with refresh_schedule budget (it reads refresh_budget_every, check_every"),
    (dict(name="eshampoo", max_refreshes_per_step=2), "optimizer.max_refreshes_per_step: got 2"),
    (dict(name="shampoo", refresh_budget_every=5), "not read by shampoo with refresh_schedule fixed (it reads refresh_every)"),
    (dict(name="soap_adaptive", refresh_every=5), "optimizer.refresh_every: got 5"),
    (dict(name="adamw", refresh_schedule="fixed"), "optimizer.refresh_schedule: got 'fixed', expected null: adamw"),
    (dict(name="adamw", tolerance=0.1), "not read by adamw, which refreshes nothing"),
    (dict(name="soap", refresh_budget_every=10, options={"refresh": lightning_kron.FixedRefresh(every=3)}),
     "not read by the refresh policy given in optimizer.options"),
])
def test_a_refresh_field_the_chosen_schedule_does_not_read_is_refused(fields, message):
    """A field that would do nothing fails at construction, naming what the schedule reads."""
    with pytest.raises(ValueError, match=re.escape(message)):
        OptimizerConfig(**fields)


def test_soap_and_eshampoo_default_to_the_front_loaded_budget_over_the_runs_length():
    network = torch.nn.Linear(4, 4)
    for name in ("soap", "eshampoo"):
        optimizer = build_optimizer(OptimizerConfig(name=name, refresh_budget_every=25), network, total_steps=300)
        assert optimizer.refresh == lightning_kron.BudgetRefresh(every=25, total_steps=300)
    unknown = build_optimizer(OptimizerConfig(name="soap"), network, total_steps=float("inf"))
    assert unknown.refresh == lightning_kron.BudgetRefresh(every=20)
    with pytest.raises(ValueError, match="optimizer.refresh_schedule: got 'sometimes'"):
        OptimizerConfig(name="soap", refresh_schedule="sometimes")


def test_bad_names_and_options_fail_at_construction():
    with pytest.raises(ValueError, match="optimizer.name: got 'lion', expected one of adamw, soap"):
        OptimizerConfig(name="lion")
    with pytest.raises(ValueError, match="optimizer.lr: got 0.0, expected a positive number"):
        OptimizerConfig(lr=0.0)
    with pytest.raises(ValueError, match=r"optimizer.tolerance: got -1, expected a number in \[0, 1\]"):
        OptimizerConfig(name="soap_adaptive", tolerance=-1)
    # options are checked when the config is made, not when the optimizer is first built
    with pytest.raises(ValueError, match="optimizer.options: got unknown key 'colour', expected keys of SOAP: .*rotation_dtype"):
        OptimizerConfig(name="soap", options={"colour": "red"})
    with pytest.raises(ValueError, match="optimizer.options: rotation_dtype must be None or one of .*got 'bf17'"):
        OptimizerConfig(name="soap", options={"rotation_dtype": "bf17"})
    assert OptimizerConfig(name="soap", options={"rotation_dtype": "bf16"}).options == {"rotation_dtype": "bf16"}
    with pytest.raises(ValueError, match="optimizer.options: got 'graft_eps', which the recipe sets from optimizer.eps"):
        OptimizerConfig(name="shampoo", options={"graft_eps": 1e-3})
    assert "amsgrad" in accepted_options("adamw") and "lr" not in accepted_options("adamw")
    assert {"graft", "shampoo_beta"} <= set(accepted_options("kradagrad"))


def test_schedule_warms_up_then_decays_to_the_floor():
    factor = warmup_cosine_factor(warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    values = [factor(step) for step in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[4:], values[5:])) and values[20] == pytest.approx(0.1)
    assert warmup_cosine_factor(2, float("inf"), 0.1)(1000) == 1.0


def test_a_warmup_as_long_as_the_run_warns():
    with pytest.warns(UserWarning, match="warmup_steps 10 is not shorter than the run's 10 optimizer steps"):
        configure_optimization(OptimizerConfig(name="adamw", warmup_steps=10), torch.nn.Linear(3, 3), 10)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*warmup_steps")
        configure_optimization(OptimizerConfig(name="adamw", warmup_steps=9), torch.nn.Linear(3, 3), 10)


def test_an_early_tolerance_looser_than_the_later_one_warns():
    """A warning, not an error: a checkpoint of a run made so must resume (its settings are restored)."""
    with pytest.warns(UserWarning, match="early_tolerance 0.9 is above optimizer.tolerance 0.1"):
        OptimizerConfig(name="soap_adaptive", tolerance=0.1, early_tolerance=0.9)
    with pytest.raises(ValueError, match="early_tolerance"):  # a field soap's schedule does not read: refused first
        OptimizerConfig(name="soap", early_tolerance=0.9)


def test_configured_scheduler_steps_every_optimizer_step():
    plan = configure_optimization(OptimizerConfig(name="soap", lr=1e-2, warmup_steps=2), torch.nn.Linear(3, 3), 10)
    assert plan["lr_scheduler"]["interval"] == "step"
    assert plan["optimizer"].param_groups[0]["lr"] == pytest.approx(5e-3)  # first warm-up step: half the rate
    assert set(OPTIMIZER_NAMES) == {"adamw", "soap_adaptive", *METHODS}  # every registered method


def test_early_tolerance_becomes_a_step_schedule_inside_the_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    config = OptimizerConfig(name="soap_adaptive", tolerance=0.5, early_tolerance=0.1, early_fraction=0.25)
    optimizer = build_optimizer(config, model, total_steps=100)
    assert optimizer.refresh.tolerance_at(24) == 0.1 and optimizer.refresh.tolerance_at(25) == 0.5
    with pytest.raises(ValueError, match="max_steps"):
        build_optimizer(config, model)
    with pytest.raises(ValueError, match="early_tolerance"):
        OptimizerConfig(name="soap_adaptive", early_tolerance=2.0)
