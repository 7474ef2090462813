"""KronCallback inside Lightning's training features: accumulation, AMP (skipped steps), bf16."""

import lightning as L
import pytest
import torch
from callback_helpers import TinyRegression, fit
from lightning.pytorch.plugins import MixedPrecision

from lightning_kron import AdaptiveRefresh, FixedRefresh, KronCallback


def test_accumulated_gradients_update_statistics_once_per_optimizer_step():
    accumulated = TinyRegression(eps=1e-3)
    callback = KronCallback(refresh=FixedRefresh(every=1))
    trainer = fit(accumulated, [callback], batch_size=8, max_steps=4, accumulate_grad_batches=2)
    whole = TinyRegression(eps=1e-3)
    fit(whole, [KronCallback(refresh=FixedRefresh(every=1))], batch_size=16, max_steps=4)
    assert trainer.optimizers[0].global_step == 4 and callback.scheduler.counters.checks == 3
    for a, b in zip(accumulated.parameters(), whole.parameters()):
        assert torch.allclose(a, b, atol=1e-4)  # two halves of 16 accumulated == one batch of 16


class PoisonOneStep(L.Callback):
    """Puts an Inf into one gradient at one step and records what the optimizer state did."""

    def __init__(self, poisoned_step: int) -> None:
        self.poisoned_step, self.records = poisoned_step, []

    def on_after_backward(self, trainer, module):
        if trainer.global_step == self.poisoned_step:
            module.net[0].weight.grad[0, 0] = float("inf")

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.before = (optimizer.global_step, self._state(optimizer), [p.detach().clone() for p in module.parameters()])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        steps, state, params = self.before
        unchanged = all(torch.equal(a, b) for a, b in zip(state, self._state(optimizer)))
        params_unchanged = all(torch.equal(a, b) for a, b in zip(params, module.parameters()))
        self.records.append((optimizer.global_step - steps, unchanged, params_unchanged))

    @staticmethod
    def _state(optimizer):
        if optimizer.global_step == 0:
            return []
        return [tensor.clone() for group in optimizer.factor_groups() for tensor in group.tensors.values()]


def test_a_step_skipped_by_the_fp16_grad_scaler_touches_no_statistics():
    poison = PoisonOneStep(poisoned_step=3)
    callback = KronCallback(refresh=AdaptiveRefresh(0.0))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer = fit(TinyRegression(), [callback, poison], max_steps=6,
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    optimizer = trainer.optimizers[0]
    stepped = [record[0] for record in poison.records]
    assert stepped == [1, 1, 1, 0, 1, 1]
    assert poison.records[3][1:] == (True, True)  # statistics, bases, moments and parameters untouched
    assert optimizer.global_step == 5 and optimizer.skipped_steps == 0  # the scaler skipped it, not our guard
    assert callback.scheduler.counters.checks == 4  # no refresh decision on the skipped step
    assert scaler.get_scale() < 2.0 ** 8


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training_keeps_fp32_statistics_and_learns(precision):
    module = TinyRegression(lr=3e-2)
    callback = KronCallback(refresh=AdaptiveRefresh(0.05))
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = fit(module, [callback, Losses()], max_epochs=6, precision=precision)
    optimizer = trainer.optimizers[0]
    expected_param_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert next(module.parameters()).dtype == expected_param_dtype
    assert {group.stats(0).dtype for group in optimizer.factor_groups() if group.factored_dims} == {torch.float32}
    assert all(torch.isfinite(p.float()).all() for p in module.parameters())
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])
    assert callback.scheduler.counters.refreshes > 0
