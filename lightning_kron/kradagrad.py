"""KrADagrad and KrADagrad*: Kronecker preconditioning with no matrix inverse (Mei et al., UAI 2023).

Shampoo keeps ``L_i = sum A_i`` and needs ``(eps I + L_i)^(-1/(2k))``, an inverse root of a matrix
whose condition number grows without bound; in fp32 its small eigenvalues drown in round-off.
KrADagrad keeps ``X_i ~ (eps I + L_i)^-1`` itself, starting from ``I / eps`` and updated with the
approximation-domination downdate ``X <- X - X A X / s`` (see
:mod:`lightning_kron.approximation_domination`): matmuls only, and ``X`` is a positive matrix
bounded by ``I / eps``, so only a *positive* root of it is ever taken.

Two variants (ALGORITHMS.md §4):

* ``variant="star"`` (KrADagrad*): every factor is downdated every step with its own statistic
  ``A_i = unfold_i(G) unfold_i(G)^T``; direction ``G x_1 X_1^(1/(2k)) ... x_k X_k^(1/(2k))``.
* ``variant="alternating"`` (KrADagrad, the paper's main method): one factor per step, cycling
  through the dims, with the statistic taken from the gradient already preconditioned in the other
  modes, ``A_i = unfold_i(G x_{j!=i} X_j^(1/4)) unfold_i(...)^T`` (for a matrix ``G X_R^(1/2) G^T``,
  split symmetrically so it is PSD by construction). Because each statistic already carries the
  other modes' preconditioning, the direction uses ``X_i^(1/2)`` in every mode: for Kronecker
  gradient covariance ``C_1 x ... x C_k`` the fixed point is ``X_i ~ C_i^-1`` and the step is
  full-matrix AdaGrad's ``C^(-1/2)`` (Shampoo and KrADagrad* reach only ``C^(-1/(2k))``). The other
  modes' scales come from the current ``diag(stats.j)``, not the frozen root scales: same cost,
  fresher, and right from the first step (before any refresh, ``X_j = I / eps``).

How it sits on the shared engine: each ``X_i`` is stored in its own eigenbasis like every factor
(``stats.i = Q_i^T X_i Q_i``), so the statistic in that basis is built from the rotated gradient the
engine already computed, and the downdate, its scale ``s`` and the positive-definiteness check are
all basis invariant. The root ``X_i^p`` is ``Q_i diag(x)^p Q_i^T`` with per-dim scales frozen at each
refresh, exactly as Shampoo's inverse roots (:mod:`lightning_kron.root_preconditioner`).

Design decisions (each checked in tests/test_kradagrad.py or scripts/illconditioned.py):

* Refreshing the eigenbasis of ``X`` rather than of ``L``: ``X`` has the same eigenvectors, and a
  sorted warm QR step contracts the angle between eigenvectors ``i, j`` by ``min/max`` of their
  eigenvalue ratio, which is the same number for ``X`` and ``L = X^-1``, so the refresh machinery
  works unchanged (the sort is by ``diag(X)`` descending, i.e. L's *smallest* first; only pairwise
  ratios matter). What does not carry over is the staleness criterion: ``e(Q, X)`` is dominated by
  X's largest eigenvalues, which are the damped, near-empty directions of ``L``. The optimizer
  therefore reports ``e(Q, L)`` estimated to first order from ``stats`` (no inverse), so a
  tolerance means the same as for SOAP/Shampoo.
* Non-finite or non-positive-definite ``X`` after a downdate (round-off can do it in fp32 when a
  rank-1 direction dominates): detected for all members at once with a batched Cholesky
  (``cholesky_ex``, no host sync); those members keep their previous ``X`` and ``failures.i``
  (factor telemetry) counts it. Non-finite gradients are refused before any statistic changes.
* EMA (``shampoo_beta < 1``) keeps the damping at ``eps`` (see
  :func:`~lightning_kron.approximation_domination.krad_update`) and bias-corrects the root with
  ``(1 - beta^t) X``; the default is the paper's AdaGrad sum, ``shampoo_beta = 1``.
* Blocks with no factored dim (biases, norms by default) get the diagonal form of the same method,
  ``m / sqrt(eps + v)`` with ``v`` the sum (or EMA) of squared gradients: diagonal KrAD is exact.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from lightning_kron.approximation_domination import (
    DOMINATION_SCALES,
    exact_from_isotropic,
    krad_update,
    positive_definite,
)
from lightning_kron.basis_refresh import take
from lightning_kron.factor_group import FactorGroup
from lightning_kron.kron_optimizer import StepHyperparameters
from lightning_kron.modes import unfold
from lightning_kron.refresh import FixedRefresh
from lightning_kron.root_preconditioner import RootPreconditionedOptimizer, scale_modes
from lightning_kron.soap import bias_correction
from lightning_kron.staleness import inverse_factor_staleness
from lightning_kron.validation import check_choice

VARIANTS = ("star", "alternating")


class KrADagrad(RootPreconditionedOptimizer):
    """KrADagrad (``variant="alternating"``) and KrADagrad* (``variant="star"``, default).

    Args:
        params: ``model.parameters()``, ``model.named_parameters()`` or parameter-group dicts.
        lr: learning rate. The direction is normalised like AdaGrad's, so AdaGrad-sized rates work.
        betas: ``(beta1, beta2)``: momentum of the gradient, and the grafted method's beta2 (also
            the statistics' EMA rate when ``shampoo_beta=None``).
        eps: damping: ``X`` starts at ``I / eps`` and approximates ``(eps I + L)^-1``. Must be > 0.
        weight_decay: decoupled (AdamW-style) by default; ``weight_decay_mode="l2"`` adds it to G.
        variant: "star" (KrADagrad*: every factor, every step) or "alternating" (KrADagrad).
        graft: ``None`` (no grafting) or "adam" | "adagrad" | "rmsprop" | "sgd": borrow that
            method's per-block step size; ``graft_eps`` is its epsilon.
        shampoo_beta: 1 (default) sums the statistics as AdaGrad; < 1 is an EMA; ``None`` uses beta2.
        domination_scale: "trace" (``1 + tr(XA)``, default), "frobenius" or "damped"; see
            :mod:`lightning_kron.approximation_domination`.
        refresh, solver, max_precond_dim, ...: as :class:`lightning_kron.SOAP` (default: sorted
            warm-QR refresh every 10 steps).

    >>> import torch
    >>> model = torch.nn.Linear(8, 4)
    >>> opt = KrADagrad(model.named_parameters(), lr=0.1)
    >>> model(torch.randn(16, 8)).square().mean().backward(); opt.step()
    >>> opt.factor_names()
    ['weight[L]', 'weight[R]']
    >>> x = opt.state[model.weight]["block0.stats.0"]  # X_L in its eigenbasis: positive, <= 1/eps
    >>> bool(torch.linalg.eigvalsh(x).min() > 0), bool(torch.linalg.eigvalsh(x).max() <= 1 / 0.1)
    (True, True)
    """

    initial_refresh_solver = "qr"  # the first update already stores every X in its exact eigenbasis

    def __init__(self, params: Any, lr: float = 0.1, betas=(0.9, 0.999), eps: float = 0.1,
                 weight_decay: float = 0.0, *, variant: str = "star", graft: Optional[str] = None,
                 graft_eps: float = 1e-8, shampoo_beta: Optional[float] = 1.0, domination_scale: str = "trace",
                 weight_decay_mode: str = "decoupled", refresh=None, solver: str = "qr", **options: Any) -> None:
        self.variant = check_choice("variant", variant, VARIANTS)
        self.domination_scale = check_choice("domination_scale", domination_scale, DOMINATION_SCALES)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        weight_decay_mode=weight_decay_mode, shampoo_beta=shampoo_beta)
        refresh = refresh if refresh is not None else FixedRefresh(every=10)
        super().__init__(params, defaults, graft="none" if graft is None else graft, graft_eps=graft_eps,
                         refresh=refresh, solver=solver, **options)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        if not group["eps"] > 0:
            raise ValueError(f"eps must be > 0 for KrADagrad (X starts at I / eps), got {group['eps']!r}")

    # ----------------------------------------------------------------- state
    def _init_state(self, group: FactorGroup) -> None:
        super()._init_state(group)
        eps = self.param_groups[group.param_group]["eps"]
        for dim in group.factored_dims:
            size = group.shape[dim]
            eye = torch.eye(size, dtype=group.state_dtype, device=group.device) / eps
            group.stats(dim).copy_(eye.expand(len(group), size, size))
        if not group.factored_dims:
            group.add("diagonal_sq", group.zeros_like_blocks())

    def factor_staleness(self, stats: torch.Tensor) -> torch.Tensor:
        return inverse_factor_staleness(stats)

    # ----------------------------------------------------------------- statistics
    def _dims_this_step(self, group: FactorGroup) -> list[int]:
        dims = group.factored_dims
        if self.variant == "star" or not dims:
            return dims
        return [dims[(self.global_step - 1) % len(dims)]]

    def _statistic(self, group: FactorGroup, rotated: torch.Tensor, dim: int) -> torch.Tensor:
        """``A_dim`` in the eigenbasis of ``X_dim`` (see the module docstring for the variants)."""
        normaliser = 1.0
        if self.variant == "alternating":
            others = [j for j in group.factored_dims if j != dim]
            halves = {j: group.stats(j).diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt() for j in others}
            rotated = scale_modes(rotated, halves)
            normaliser = float(math.prod(group.shape[j] for j in others))
        unfolded = unfold(rotated, dim)
        statistic = unfolded @ unfolded.mT
        return statistic if normaliser == 1.0 else statistic / normaliser

    def _update_statistics(self, group: FactorGroup, rotated: torch.Tensor, hyper: StepHyperparameters) -> None:
        if not group.factored_dims:
            self._accumulate_diagonal(group, rotated, hyper.shampoo_beta)
        for dim in self._dims_this_step(group):
            statistic = self._statistic(group, rotated, dim)
            old = group.stats(dim)
            new = krad_update(old, statistic, hyper.shampoo_beta, hyper.eps, self.domination_scale)
            if self._first_update(group, dim):
                new = self._exact_first_update(group, dim, statistic, hyper, fallback=new)
            ok = positive_definite(new)
            old.copy_(torch.where(ok[:, None, None], new, old))
            group.tensors[f"failures.{dim}"].add_((~ok).long())

    def _first_update(self, group: FactorGroup, dim: int) -> bool:
        """Is this the step that first downdates ``dim`` from ``X_0 = I / eps``? (host-side, no sync)

        Star updates every dim at step 1; alternating updates dim number ``j`` first at step ``j+1``.
        A factor whose first step was skipped (non-finite gradient) starts with dominated downdates.
        """
        return self.global_step <= (len(group.factored_dims) if self.variant == "alternating" else 1)

    def _exact_first_update(self, group: FactorGroup, dim: int, statistic: torch.Tensor,
                            hyper: StepHyperparameters, fallback: torch.Tensor) -> torch.Tensor:
        """``X_1`` exactly, stored diagonal in its own eigenbasis; see :func:`exact_from_isotropic`.

        ``X_0`` is isotropic, so moving the basis costs nothing: the frozen root scale is uniform
        and KrADagrad keeps no other buffer in rotated coordinates. If preconditioning has already
        started (the alternating variant reaches dim ``j`` only at step ``j + 1``, after the first
        refresh), the root scale is set from the exact ``X_1`` too: frozen at ``(I / eps)^p`` until
        the next refresh it would overshoot by orders of magnitude (measured: divergence on the
        ill-conditioned quadratic of tests/test_kradagrad.py).
        """
        weight = 1.0 if hyper.shampoo_beta == 1.0 else 1.0 - hyper.shampoo_beta
        vectors, values, ok = exact_from_isotropic(statistic, hyper.eps, weight)
        keep = ok[:, None, None]
        basis = group.basis(dim)
        basis.copy_(torch.where(keep, basis @ vectors, basis))
        if self.global_step >= self.start_preconditioning_step:
            scale = group.tensors[f"root_scale.{dim}"]
            scale.copy_(torch.where(ok[:, None], self._scale_from(values, group.tensors["step"], group, hyper), scale))
        return torch.where(keep, torch.diag_embed(values), fallback)

    @staticmethod
    def _accumulate_diagonal(group: FactorGroup, grad: torch.Tensor, beta: float) -> None:
        squares = group.tensors["diagonal_sq"]
        if beta == 1.0:
            squares.addcmul_(grad, grad)
        else:
            squares.mul_(beta).addcmul_(grad, grad, value=1.0 - beta)

    # ----------------------------------------------------------------- direction
    def _exponent(self, group: FactorGroup) -> float:
        return 0.5 if self.variant == "alternating" else 1.0 / (2 * len(group.factored_dims))

    def _root_scale(self, group: FactorGroup, rows, dim: int, hyper: StepHyperparameters) -> torch.Tensor:
        eigenvalues = take(group.stats(dim), rows).diagonal(dim1=-2, dim2=-1)
        return self._scale_from(eigenvalues, take(group.tensors["step"], rows), group, hyper)

    def _scale_from(self, eigenvalues: torch.Tensor, step: torch.Tensor, group: FactorGroup,
                    hyper: StepHyperparameters) -> torch.Tensor:
        """``(c x)^p`` from X's eigenvalue estimates ``x``; ``c = 1 - beta^t`` undoes the EMA's bias."""
        eigenvalues = eigenvalues.clamp_min(torch.finfo(eigenvalues.dtype).tiny)
        if hyper.shampoo_beta < 1:
            eigenvalues = eigenvalues * (1.0 - torch.pow(hyper.shampoo_beta, step))[:, None]
        return eigenvalues.pow(self._exponent(group))

    def _preconditioned(self, group: FactorGroup, momentum: torch.Tensor, hyper: StepHyperparameters) -> torch.Tensor:
        if group.factored_dims:
            return super()._preconditioned(group, momentum, hyper)
        squares = group.tensors["diagonal_sq"]
        if hyper.shampoo_beta < 1:
            squares = squares / bias_correction(hyper.shampoo_beta, group.tensors["step"], squares)
        return momentum * (squares + hyper.eps).rsqrt()
