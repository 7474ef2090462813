"""Probes of SOAP's first step for the refresh study: hooks that change what the first step leaves
behind (its update, Adam's moments), run right after it by ``scripts/refresh_study.py``.

They measured which part of the first step separates our SOAP from the reference on the ResNet and
the ViT (docs/refresh-study.md, "Closing the gap to the reference"). Probes, not options: they
reach into SOAP's stacked state and its bias corrections, which a user never needs to.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def adam_first_step(optimizer: torch.optim.Optimizer, before: list) -> None:
    """Adam's first step, ``-lr * sign(g)`` (its bias-corrected ``m / sqrt(v)``), on every
    parameter with a gradient: the first step in the identity basis, for a SOAP whose own first
    step only set the statistics and bases (``update_at_start=False``)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.add_(param.grad.sign(), alpha=-float(group["lr"]))


@torch.no_grad()
def undo_first_update(optimizer: torch.optim.Optimizer, before: list) -> None:
    """The weights put back as they were before the first step: its gradient stays in the
    statistics, the bases and Adam's moments; only the update is gone."""
    for param, weight in zip(weights_of(optimizer), before):
        param.copy_(weight)


@torch.no_grad()
def restart_moments(optimizer: torch.optim.Optimizer, before: list) -> None:
    """Adam's moments emptied after the first step, with its count taken back: the update stays,
    the first gradient stays in the statistics and bases, and the moments start at the second."""
    for group in optimizer.factor_groups():
        group.tensors["exp_avg"].zero_()
        group.tensors["exp_avg_sq"].zero_()
        group.steps.sub_(1)


def restart_one_moment(name: str):
    """A hook that empties one of Adam's moments (``"exp_avg"``: M, ``"exp_avg_sq"``: V) after the
    first step and keeps the other. Its bias correction then counts one gradient fewer than the
    step count: ``1 - beta^(t-1)`` instead of ``1 - beta^t``, put in by rescaling SOAP's ``s`` (and
    ``e``, which carries ``sqrt(c2)``, for V) on every later step."""
    def hook(optimizer: torch.optim.Optimizer, before: list) -> None:
        assert optimizer.update_at_start, "the first step must have updated the moments to restart one of them"
        for group in optimizer.factor_groups():
            group.tensors[name].zero_()
        corrections = optimizer._bias_corrections

        def one_gradient_fewer(items, hyper):
            eps, scale = corrections(items, hyper)
            assert hyper.step is not None, "the study's parameter groups share one step count"
            t = float(hyper.step)
            if name == "exp_avg":
                return eps, scale * ((1 - hyper.beta1 ** t) / (1 - hyper.beta1 ** (t - 1)))
            ratio = math.sqrt((1 - hyper.beta2 ** (t - 1)) / (1 - hyper.beta2 ** t))
            return (eps * ratio if optimizer.bias_corrected_eps else eps), scale * ratio
        optimizer._bias_corrections = one_gradient_fewer
    return hook


def weights_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


#: Schedules that change what the first step leaves behind: ``hook(optimizer, weights_before)``
#: runs right after it. Adam's first step in the identity basis instead of SOAP's (whose own then
#: only sets the statistics and bases), the update undone, or the moments restarted (both, M or V).
AFTER_FIRST_STEP = {"every10-first-step-adam": adam_first_step,
                    "every10-first-step-undone": undo_first_update,
                    "every10-first-step-fresh-moments": restart_moments,
                    "every10-first-step-fresh-m": restart_one_moment("exp_avg"),
                    "every10-first-step-fresh-v": restart_one_moment("exp_avg_sq"),
                    "budget20-front3-aged-taper-first-step-fresh-m": restart_one_moment("exp_avg")}
