"""Shampoo: the classic root-inverse Kronecker preconditioner with learning-rate grafting.

Direction for a block of order k: ``M x_1 (L_1 + eps I)^(-1/(2k)) ... x_k (L_k + eps I)^(-1/(2k))``
with ``M`` the bias-corrected momentum ("filtered gradient"). The factors are stored in their
eigenbases like every factor in this package, so each inverse root is
``Q diag((lambda + eps)^(-1/(2k))) Q^T``: rotate ``M`` in, scale by the outer product of the frozen
per-dim root scales, rotate out. The scales (``root_scale.i``) are recomputed from the corrected
factor eigenvalues at each refresh and stay frozen in between, as in Shampoo.

Design decision: ``k`` counts the *factored* dims of the block, so a one-sided block (a huge
embedding dim left unrotated) gets the ``-1/2`` root of full-matrix AdaGrad on its one factor
rather than an under-powered ``-1/4``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.validation import check_betas
from lightning_kron.methods.grafting import graft_direction
from lightning_kron.methods.root_preconditioner import RootPreconditionedOptimizer
from lightning_kron.methods.step_hyperparameters import StepHyperparameters, bias_correction


class Shampoo(RootPreconditionedOptimizer):
    """Root-inverse Shampoo with per-block grafting (adam | adagrad | rmsprop | sgd | none).

    Args:
        graft: whose step size to borrow (default "adam"); ``graft_eps`` is its epsilon.
        eps: damping added to the factor eigenvalues before the inverse root.
        Everything else as :class:`lightning_kron.SOAP` (default refresh: every 10 steps, eigh).

    >>> import torch
    >>> opt = Shampoo(torch.nn.Linear(4, 4).parameters(), lr=1e-3, graft="adagrad")
    >>> opt.graft
    'adagrad'
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-12,
                 weight_decay: float = 0.0, *, graft: str = "adam", graft_eps: float = 1e-8,
                 shampoo_beta: Optional[float] = None, weight_decay_mode: str = "decoupled",
                 solver: str = "eigh", **options: Any) -> None:
        defaults = dict(lr=lr, betas=check_betas(betas), eps=eps, weight_decay=weight_decay,
                        weight_decay_mode=weight_decay_mode, shampoo_beta=shampoo_beta)
        super().__init__(params, defaults, graft=graft, graft_eps=graft_eps, solver=solver, **options)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        if not group["eps"] > 0:  # a non-square weight's larger factor always has zero eigenvalues
            raise ValueError(f"eps must be > 0 for Shampoo (the inverse root of a rank-deficient factor's zero "
                             f"eigenvalues is infinite), got {group['eps']!r}")

    def _init_state(self, group: FactorGroup) -> None:
        super()._init_state(group)
        if not group.factored_dims:
            group.add("diagonal_sq", group.zeros_like_blocks())

    def _direction(self, group: FactorGroup, grad: torch.Tensor, rotated: torch.Tensor,
                   hyper: StepHyperparameters) -> torch.Tensor:
        """Blocks without a factor (biases, norm gains, 0-D/1-D tensors) take AdamW's diagonal step
        (docs/algorithms.md "Notation"), not the identity preconditioner rescaled by the graft."""
        if group.factored_dims:
            return super()._direction(group, grad, rotated, hyper)
        exp_avg = group.tensors["exp_avg"]
        exp_avg.lerp_(grad, hyper.weight(1.0 - hyper.beta1, exp_avg))
        momentum = exp_avg / hyper.bias_correction(hyper.beta1, group, exp_avg)
        return graft_direction("adam", momentum, grad, group.tensors["diagonal_sq"], hyper.beta2,
                               self.graft_eps, hyper.bias_correction(hyper.beta2, group, exp_avg),
                               keep2=hyper.keep(hyper.beta2, exp_avg))

    def _root_scale(self, group: FactorGroup, rows, dim: int, hyper: StepHyperparameters) -> torch.Tensor:
        """``(lambda_hat + eps)^(-1/(2k))`` from the bias-corrected factor eigenvalues ``diag(B)``."""
        step = group.read_rows(group.steps, rows)
        eigenvalues = group.read_rows(group.stats(dim), rows).diagonal(dim1=-2, dim2=-1).clamp_min(0)
        if hyper.shampoo_beta < 1:  # clamped: a member without a gradient yet (t = 0) gets no 0/0
            eigenvalues = eigenvalues / bias_correction(hyper.shampoo_beta, step, eigenvalues)
        exponent = -1.0 / (2 * len(group.factored_dims))
        return (eigenvalues + hyper.eps).pow(exponent)
