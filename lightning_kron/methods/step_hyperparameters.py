"""What one step of a parameter group needs: its hyperparameters, read fresh each step, and the
EMA bias corrections every method shares. Kept apart from the optimizer so each method's math
(``soap.py``, ``shampoo.py``, ``kradagrad.py``) reads it without the optimizer's machinery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lightning_kron.engine.factor_group import FactorGroup


def bias_correction(beta: float, step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``1 - beta^t`` (computed in fp64, returned in ``like``'s dtype), shared by every method's EMAs.

    ``step`` is either one 0-d count shared by every member (it broadcasts over any stack) or the
    per-member counts ``[N]``, shaped here to broadcast over a ``[N, ...]`` stack like ``like``.
    Clamped to the smallest normal number: a group skipped before its first step has ``t = 0``,
    whose correction 0 would turn its zero moments into 0/0 = NaN (no real step count is affected:
    ``1 - beta^t >= 1 - beta`` for ``t >= 1``).
    """
    correction = (1.0 - torch.pow(beta, step.double())).to(like.dtype).clamp_min_(torch.finfo(like.dtype).tiny)
    return correction if step.dim() == 0 else correction.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class StepHyperparameters:
    """The per-parameter-group numbers one step needs, read fresh each step (LR schedulers).

    ``finite`` is the group's finite-gradient flag, a 0-dim bool on the device (None when nothing
    needs masking). It is never read on the host: a skipped group's updates are made with
    coefficients that leave every buffer as it was (:meth:`keep`, :meth:`weight`), so the step
    needs no host sync to skip it.

    ``step`` is the parameter group's step count, a 0-dim view of the device counter, when every
    stack of the group has taken the same steps (None otherwise): the bias corrections are then
    computed once per parameter group and step (:meth:`bias_correction`) instead of once per stack.
    It stays on the device because a skipped step does not count, and whether one was skipped is
    known only there.
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    shampoo_beta: float
    decay_after_update: bool = False
    finite: Optional[torch.Tensor] = None
    step: Optional[torch.Tensor] = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def keep(self, beta: float, like: torch.Tensor):
        """What an update ``x <- beta x + ...`` multiplies ``x`` by: ``beta``, or 1 if skipped."""
        if self.finite is None:
            return beta
        return self._mask(("keep", beta), lambda flag: 1.0 - flag * (1.0 - beta), like)

    def weight(self, value: float, like: torch.Tensor):
        """``value``, or 0 if skipped: the weight of the new gradient in an update."""
        if self.finite is None:
            return value
        return self._mask(("weight", value), lambda flag: flag * value, like)

    def bias_correction(self, beta: float, group: FactorGroup, like: torch.Tensor) -> torch.Tensor:
        """``1 - beta^t`` for ``group``'s members (see :func:`bias_correction`): one 0-dim tensor
        shared by the whole parameter group when it has a shared :attr:`step`, else per member."""
        if self.step is None:
            return bias_correction(beta, group.steps, like)
        return self._cached(("correction", beta, like.dtype), lambda: bias_correction(beta, self.step, like))

    def _mask(self, key, make, like: torch.Tensor) -> torch.Tensor:
        return self._cached(key + (like.dtype,), lambda: make(self.finite.to(like.dtype)))

    def _cached(self, key, make):
        if key not in self._cache:  # once per parameter group and step, shared by its stacks
            self._cache[key] = make()
        return self._cache[key]
