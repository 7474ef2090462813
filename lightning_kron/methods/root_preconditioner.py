"""Kronecker root preconditioners with frozen per-dim scales: what Shampoo and KrADagrad share.

Both methods precondition the (bias-corrected) momentum ``M`` with one matrix power per factored
dim, ``M x_1 F_1^(p_1) ... x_k F_k^(p_k)``, where ``F_i`` is the factor kept in its eigenbasis
``Q_i``. A matrix power of a factor that is diagonal in ``Q_i`` is ``Q_i diag(f^p) Q_i^T``, so the
whole product is: rotate ``M`` in, multiply by the outer product of the per-dim scale vectors
``root_scale.i = f_i^(p_i)``, rotate out. The scales are recomputed by each subclass from
``diag(stats.i)`` at every refresh of that factor and stay frozen in between (Shampoo's classic
"preconditioner computed every f steps"), which is what makes the step cost a few ``bmm``s.
Grafting (docs/algorithms.md §1) then borrows a simpler method's per-block step size.

Subclasses implement :meth:`RootPreconditionedOptimizer._root_scale` (and the statistics update).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.validation import check_choice, check_nonnegative
from lightning_kron.methods.grafting import GRAFTS, graft_direction, graft_norm
from lightning_kron.methods.kron_optimizer import KronOptimizer, StepHyperparameters


def scale_modes(rotated: torch.Tensor, scales: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Multiply a stack ``[N, d_1, ..., d_k]`` along each block dim ``i`` by ``scales[i]`` (``[N, d_i]``).

    >>> import torch
    >>> scale_modes(torch.ones(1, 2, 3), {0: torch.tensor([[2.0, 3.0]])}).tolist()
    [[[2.0, 2.0, 2.0], [3.0, 3.0, 3.0]]]
    """
    order = rotated.dim() - 1
    for dim, scale in scales.items():
        shape = [rotated.shape[0]] + [1] * order
        shape[dim + 1] = rotated.shape[dim + 1]
        rotated = rotated * scale.reshape(shape)
    return rotated


def root_scales(group: FactorGroup) -> dict[int, torch.Tensor]:
    """The frozen ``root_scale.i`` of every factored dim of ``group``."""
    return {dim: group.factor_tensor("root_scale", dim) for dim in group.factored_dims}


class RootPreconditionedOptimizer(KronOptimizer):
    """Momentum, frozen Kronecker root scales and grafting; see the module docstring.

    Args:
        graft: whose per-block step size to borrow: "adam", "adagrad", "rmsprop", "sgd" or "none".
        graft_eps: the grafted method's epsilon.
        Everything else is passed to :class:`lightning_kron.KronOptimizer`.
    """

    def __init__(self, params: Any, defaults: dict, *, graft: str, graft_eps: float, **options: Any) -> None:
        self.graft = check_choice("graft", graft, GRAFTS)
        self.graft_eps = check_nonnegative("graft_eps", graft_eps)
        super().__init__(params, defaults, **options)

    def _init_state(self, group: FactorGroup) -> None:
        group.add("exp_avg", group.zeros_like_blocks())
        if self.graft in ("adam", "adagrad", "rmsprop"):
            group.add("graft_sq", group.zeros_like_blocks())
        for dim in group.factored_dims:
            group.add_factor_tensor("root_scale", dim, torch.ones(len(group), group.shape[dim],
                                                       dtype=group.state_dtype, device=group.device))

    def _root_scale(self, group: FactorGroup, rows: Optional[torch.Tensor], dim: int,
                    hyper: StepHyperparameters) -> torch.Tensor:
        """The new ``root_scale.dim`` of ``rows`` (``[len(rows), d]``) from the refreshed ``stats.dim``."""
        raise NotImplementedError

    def after_refresh(self, group: FactorGroup, rows, dim: int) -> None:
        hyper = self._hyperparameters(self.param_groups[group.param_group])
        group.write_rows(group.factor_tensor("root_scale", dim), rows, self._root_scale(group, rows, dim, hyper))

    def _preconditioned(self, group: FactorGroup, momentum: torch.Tensor, hyper: StepHyperparameters) -> torch.Tensor:
        """``momentum x_i Q_i diag(root_scale.i) Q_i^T`` for every factored dim."""
        return group.rotate_out(scale_modes(group.rotate_in(momentum), root_scales(group)))

    def _direction(self, group: FactorGroup, grad: torch.Tensor, rotated: torch.Tensor,
                   hyper: StepHyperparameters) -> torch.Tensor:
        exp_avg = group.tensors["exp_avg"]
        exp_avg.lerp_(grad, hyper.weight(1.0 - hyper.beta1, exp_avg))
        momentum = exp_avg / hyper.bias_correction(hyper.beta1, group, exp_avg)
        direction = self._preconditioned(group, momentum, hyper)
        if self.graft == "none":
            return direction
        reference = graft_direction(self.graft, momentum, grad, group.tensors.get("graft_sq"), hyper.beta2,
                                    self.graft_eps, hyper.bias_correction(hyper.beta2, group, exp_avg),
                                    keep2=hyper.keep(hyper.beta2, exp_avg))
        return graft_norm(direction, reference)
