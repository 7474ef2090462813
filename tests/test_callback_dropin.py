"""KronCallback as a drop-in: AdamW in, SOAP/EShampoo/Shampoo out, schedulers still driving the lr."""

import importlib.util
import types
import warnings

import lightning as L
import pytest
import torch
from callback_helpers import TinyRegression, fit, loader, make_net, parameters_of
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_kron import (
    SOAP,
    AdaptiveRefresh,
    EShampoo,
    FixedRefresh,
    KronCallback,
    Shampoo,
    TighterEarly,
)
from lightning_kron.methods.registry import METHODS
from lightning_kron.scheduling.scheduler import RefreshScheduler


def plain_loop(policy, steps: int, clip: float | None = None) -> list[torch.Tensor]:
    """The same training as ``TinyRegression`` + KronCallback, written as a plain PyTorch loop."""
    net = make_net()
    named = [(f"net.{name}", param) for name, param in net.named_parameters()]
    optimizer = SOAP(named, lr=1e-2, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.01)
    RefreshScheduler(optimizer, policy)
    batches = iter(loader())
    for _ in range(steps):
        inputs, targets = next(batches)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(inputs), targets).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
    return [p.detach() for p in net.parameters()]


def test_adamw_is_replaced_and_the_lr_schedule_still_drives_it():
    module = TinyRegression(step_lr=2)
    start = parameters_of(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module, [KronCallback(method="soap", refresh=AdaptiveRefresh(0.05))], max_steps=7)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is SOAP
    assert optimizer.global_step == 7
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["weight_decay_mode"]) == ((0.9, 0.95), 1e-7, 0.01, "decoupled")
    assert group["lr"] == pytest.approx(1e-2 * 0.5 ** 3)  # StepLR(step_size=2) after 7 steps, on the new optimizer
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert not any("lr_scheduler" in str(w.message) or "optimizer.step()" in str(w.message) for w in caught)
    assert optimizer.factor_names()[:2] == ["net.0.weight[L]", "net.0.weight[R]"]
    assert all(not torch.equal(a, b) for a, b in zip(start, module.parameters()))


def test_one_cycle_schedule_keeps_cycling_lr_and_betas_on_the_new_optimizer():
    def one_cycle(module):
        optimizer = torch.optim.AdamW([{"params": module.parameters(), "name": "all"}], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            group = trainer.optimizers[0].param_groups[0]
            seen.append((group["lr"], group["betas"][0]))

    trainer = fit(TinyRegression(optimizer=one_cycle), [KronCallback(), Record()], max_steps=8)
    assert type(trainer.optimizers[0]) is SOAP and trainer.optimizers[0].param_groups[0]["name"] == "all"
    lrs, beta1s = zip(*seen)
    assert max(lrs) == pytest.approx(1e-2, rel=0.05) and lrs[0] < 0.6e-2 and lrs[-1] < 0.3e-2  # warm up, anneal
    assert min(beta1s) < 0.9 < max(beta1s) + 1e-9  # OneCycleLR cycles beta1 through the copied "betas"


def test_lightning_run_equals_the_plain_loop_with_the_same_scheduler():
    policy = AdaptiveRefresh(tolerance=0.02, max_per_step=2)
    module = TinyRegression()
    fit(module, [KronCallback(refresh=policy)], max_steps=6)
    for ours, reference in zip(module.parameters(), plain_loop(policy, 6)):
        assert torch.equal(ours, reference)


def test_gradient_clipping_is_seen_by_the_preconditioner():
    policy = FixedRefresh(every=2)
    module = TinyRegression()
    fit(module, [KronCallback(refresh=policy)], max_steps=6, gradient_clip_val=0.05)
    clipped, unclipped = plain_loop(policy, 6, clip=0.05), plain_loop(policy, 6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(module.parameters(), clipped))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(module.parameters(), unclipped))


@pytest.mark.parametrize("method, kind", [("eshampoo", EShampoo), ("shampoo", Shampoo)])
def test_other_methods_and_adam_l2_decay(method, kind):
    trainer = fit(TinyRegression(optimizer="adam"), [KronCallback(method=method, max_precond_dim=64)], max_steps=3)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is kind and optimizer.max_precond_dim == 64
    assert optimizer.param_groups[0]["weight_decay_mode"] == "l2"  # torch Adam's decay is L2, not decoupled
    if method == "shampoo":  # AdamW's eps is the graft's eps; Shampoo's own damping keeps its default
        assert optimizer.graft_eps == 1e-7 and optimizer.param_groups[0]["eps"] == 1e-12


def test_adam_groups_with_different_eps_need_an_explicit_graft_eps():
    """Shampoo's graft_eps is one value for the optimizer, where Adam's eps is per group: two
    different ones are refused with the option to set (the first group's used to be taken silently);
    an explicit graft_eps converts."""
    from lightning_kron.lightning.adam_conversion import convert_adam

    net = make_net()
    adam = torch.optim.AdamW([{"params": net[0].parameters(), "eps": 1e-8}, {"params": net[2].parameters(), "eps": 1e-3}])
    names = dict(net.named_parameters())
    with pytest.raises(ValueError, match=r"different eps \(1e-08, 0.001\).*graft_eps"):
        convert_adam(adam, "shampoo", names)
    assert convert_adam(adam, "shampoo", names, graft_eps=1e-6).graft_eps == 1e-6
    assert [group["eps"] for group in convert_adam(adam, "soap", names).param_groups] == [1e-8, 1e-3]  # SOAP's eps is per group


def test_a_weight_decay_mode_option_reaches_every_group():
    """The decay mode is a group key: an explicit option must be written into the converted groups
    (it was once overridden there by AdamW's "decoupled"), so REFERENCE_OPTIONS through the callback
    trains exactly as a SOAP built with them in configure_optimizers."""
    from lightning_kron.methods.soap import REFERENCE_OPTIONS

    def built_by_the_module(module):
        return SOAP(module.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.01, **REFERENCE_OPTIONS)

    converted = fit(TinyRegression(), [KronCallback(optimizer_options=dict(REFERENCE_OPTIONS))], max_steps=6)
    taken_over = fit(TinyRegression(optimizer=built_by_the_module), [KronCallback()], max_steps=6)
    groups = converted.optimizers[0].param_groups
    assert {group["weight_decay_mode"] for group in groups} == {"decoupled_after_update"}
    for mine, theirs in zip(parameters_of(converted.lightning_module), parameters_of(taken_over.lightning_module)):
        assert torch.equal(mine, theirs)


def test_a_tolerance_schedule_needs_an_adaptive_policy_by_fit_start():
    """Without refresh=, the policy is known at on_fit_start: a taken-over AdaptiveRefresh takes the
    schedule; SOAP's default budget is refused there in one message, before any step."""
    schedule = TighterEarly(early_tolerance=0.0, early_steps=3)

    def adaptive(module):
        return SOAP(module.parameters(), lr=1e-2, refresh=AdaptiveRefresh(0.2))

    trainer = fit(TinyRegression(optimizer=adaptive), [callback := KronCallback(tolerance_schedule=schedule)],
                  max_steps=4)
    assert callback.scheduler.policy.tolerance_at(2) == 0.0 and callback.scheduler.policy.tolerance_at(3) == 0.2
    assert trainer.global_step == 4
    module = TinyRegression()
    with pytest.raises(MisconfigurationException, match="needs refresh=AdaptiveRefresh.*BudgetRefresh"):
        fit(module, [KronCallback(tolerance_schedule=schedule)], max_steps=4)
    assert module.trainer.global_step == 0


def test_kradagrad_drop_in_grafts_adam_and_trains():
    from lightning_kron.methods.kradagrad import KrADagrad

    module = TinyRegression(optimizer="adamw", lr=1e-2)
    before = parameters_of(module)
    trainer = fit(module, [KronCallback(method="kradagrad")], max_steps=6)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is KrADagrad and optimizer.graft == "adam" and optimizer.graft_eps == 1e-7
    assert optimizer.factor_names() and all(f.refreshes >= 1 for f in optimizer.factors())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_a_lightning_kron_optimizer_is_taken_over_and_named():
    module = TinyRegression(optimizer=lambda m: SOAP(m.parameters(), lr=1e-2))
    callback = KronCallback(refresh=AdaptiveRefresh(0.0))
    trainer = fit(module, [callback], max_steps=4)
    optimizer = trainer.optimizers[0]
    assert callback.optimizer is optimizer and optimizer.scheduler is optimizer.own_scheduler  # handed back at teardown
    assert "net.2.weight[R]" in optimizer.factor_names()
    assert callback.scheduler.counters.refreshes == 3 * len(optimizer.factor_names())  # tolerance 0: all, steps 2..4


def test_manual_optimization_is_supported():
    class Manual(TinyRegression):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            optimizer.step()

    callback = KronCallback(refresh=FixedRefresh(every=1))
    trainer = fit(Manual(), [callback], max_steps=3)
    assert type(trainer.optimizers[0]) is SOAP and trainer.optimizers[0].global_step == 3
    assert callback.scheduler.counters.refreshes == 2 * 6


def test_a_kept_reference_to_the_replaced_adamw_steps_the_new_optimizer(recwarn):
    """Manual optimization through the module's own reference (``self.opt``) and a scheduler it
    steps itself: AdamW's step over SOAP's groups failed inside torch (KeyError: 'fused'), and torch
    warned that the scheduler stepped before the optimizer."""
    class KeepsItsOwn(TinyRegression):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self):
            self.opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            self.schedule = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)
            return self.opt

        def training_step(self, batch, batch_idx):
            self.opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            self.opt.step()
            self.schedule.step()

    module = KeepsItsOwn()  # Lightning counts no step it did not take: one epoch of 8 batches
    trainer = fit(module, [KronCallback(refresh=FixedRefresh(every=1))], max_steps=-1, max_epochs=1)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is SOAP and optimizer.global_step == 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 4)  # the schedule drove the new groups
    messages = [str(warning.message) for warning in recwarn]
    assert sum("its step() now steps the SOAP" in message for message in messages) == 1
    assert not any("lr_scheduler.step()` before `optimizer.step()" in message for message in messages), messages


@pytest.mark.parametrize("kind, message", [("two", "exactly one optimizer"), ("sgd", "replaces torch.optim.Adam/AdamW"),
                                           (lambda module: None, "configure_optimizers returned no optimizer")])
def test_unsupported_optimizers_are_refused_at_fit_start(kind, message):
    with pytest.raises(MisconfigurationException, match=message):
        fit(TinyRegression(optimizer=kind), [KronCallback()], max_steps=1)


def test_sgd_refusal_lists_every_method_the_callback_knows():
    with pytest.raises(MisconfigurationException) as refused:
        fit(TinyRegression(optimizer="sgd"), [KronCallback()], max_steps=1)
    for spec in METHODS.values():  # the one list of methods
        assert spec.optimizer.__name__ in str(refused.value)
    assert "KrADagrad" in str(refused.value)


def test_take_over_refuses_a_different_method_and_unused_options():
    module = TinyRegression(optimizer=lambda m: SOAP(m.parameters()))
    with pytest.raises(MisconfigurationException, match="method='shampoo'"):
        fit(module, [KronCallback(method="shampoo")], max_steps=1)
    with pytest.raises(MisconfigurationException, match="max_precond_dim"):
        fit(module, [KronCallback(max_precond_dim=8)], max_steps=1)


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_fsdp1_and_deepspeed_are_refused_at_setup_by_name(strategy):
    trainer = types.SimpleNamespace(strategy=object.__new__(strategy))
    with pytest.raises(MisconfigurationException, match=f"does not support {strategy.__name__}.*ModelParallelStrategy"):
        KronCallback().setup(trainer, None, "fit")


def test_tensor_parallelism_is_refused_at_setup():
    strategy = object.__new__(ModelParallelStrategy)
    strategy._tensor_parallel_size = 2
    with pytest.raises(MisconfigurationException, match="tensor_parallel_size=1 .*got tensor_parallel_size=2"):
        KronCallback().setup(types.SimpleNamespace(strategy=strategy), None, "fit")
    strategy._tensor_parallel_size = 1  # FSDP2 data parallel: accepted
    KronCallback().setup(types.SimpleNamespace(strategy=strategy), None, "fit")


@pytest.mark.parametrize("arguments, message", [
    (dict(method="adam"), "method must be one of"),
    (dict(refresh=10), "refresh must be"),
    (dict(refresh=FixedRefresh(5), tolerance_schedule=lambda *a: 0.1), "needs refresh=AdaptiveRefresh"),
    (dict(optimizer_options={"refresh": FixedRefresh(5)}, tolerance_schedule=lambda *a: 0.1), "needs refresh=AdaptiveRefresh"),
    (dict(optimizer_options=["x"]), "optimizer_options must be a dict"),
    (dict(refresh=FixedRefresh(3), optimizer_options={"refresh": FixedRefresh(5)}), "refresh is given twice"),
    (dict(max_refreshes_per_step=0), "max_refreshes_per_step"),
    (dict(log_every_n_steps=-1), "log_every_n_steps"),
    (dict(approximation_probe_max_numel=-5), "approximation_probe_max_numel"),
    (dict(lr=0.1), "come from the module's own Adam"),
    (dict(bogus_option=1), "not accepted by method='soap'"),
    (dict(max_precond_dim=-1), "max_precond_dim"),
])
def test_bad_arguments_fail_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        KronCallback(**arguments)


def test_kradagrad_is_loaded_lazily_or_refused_clearly():
    if importlib.util.find_spec("lightning_kron.methods.kradagrad") is None:
        with pytest.raises(ValueError, match="needs lightning_kron.methods.kradagrad.KrADagrad.*'soap'"):
            KronCallback(method="kradagrad", max_precond_dim=8)
    else:
        assert KronCallback(method="kradagrad").method == "kradagrad"


def test_a_yaml_config_can_set_every_argument_including_optimizer_options():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=KronCallback)
    config = parser.parse_object({"callback": {"class_path": "lightning_kron.KronCallback", "init_args": {
        "method": "eshampoo", "max_refreshes_per_step": 4,
        "refresh": {"class_path": "lightning_kron.AdaptiveRefresh", "init_args": {"tolerance": 0.02}},
        "optimizer_options": {"max_precond_dim": 5}}}})
    callback = parser.instantiate(config).callback
    assert callback.refresh == AdaptiveRefresh(0.02) and callback.optimizer_options == {"max_precond_dim": 5}
    trainer = fit(TinyRegression(), [callback], max_steps=2)
    assert type(trainer.optimizers[0]) is EShampoo and trainer.optimizers[0].max_precond_dim == 5


def test_nested_schedulers_are_repointed_to_the_new_optimizer():
    from lightning_kron.lightning.adam_conversion import repoint_schedulers

    model = torch.nn.Linear(4, 3)
    old = torch.optim.AdamW(model.parameters(), lr=1e-2)
    warmup = torch.optim.lr_scheduler.LinearLR(old, start_factor=0.1, total_iters=3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(old, T_max=10)
    schedule = torch.optim.lr_scheduler.SequentialLR(old, [warmup, cosine], milestones=[3])
    new = SOAP(model.parameters(), lr=old.param_groups[0]["lr"])
    for key in ("initial_lr",):
        new.param_groups[0][key] = old.param_groups[0][key]
    assert repoint_schedulers([schedule], old, new) == 3
    rates = []
    for _ in range(5):
        model(torch.randn(2, 4)).sum().backward()
        new.step()
        schedule.step()
        rates.append(new.param_groups[0]["lr"])
    assert len(set(rates)) == 5 and rates[0] < rates[2]
