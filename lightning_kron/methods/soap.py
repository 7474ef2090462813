"""SOAP and EShampoo: Adam run in the Kronecker eigenbasis (eigenvalue-corrected Shampoo).

The gradient is rotated into the eigenbases of the Kronecker factors, ``G' = G x_i Q_i^T``; Adam's
moments are kept there; the normalised step is rotated back. The second moment ``V`` is the
diagonal of the full-matrix second moment in the Kronecker eigenbasis (the *corrected
eigenvalues*), which is why no learning-rate grafting is needed and why AdamW's lr, betas and
weight decay transfer (docs/algorithms.md §2). With every basis the identity (before
``start_preconditioning_step``, or for blocks with no factor) the update is exactly AdamW's.

Design decision (measured): when a refresh changes the basis, the second moment is carried over
with the squared rotation (``"rotate"``) rather than by eigenvalue rank (``"keep"``, the SOAP
reference). On a tiny GPT/Llama, refreshing from step 1 on, ``"keep"`` pairs an exactly re-expressed
first moment with a second moment from another direction and diverged (loss 5.4 -> 111 in 4 steps),
``"rotate"`` trained (5.4 -> 4.3); at every=10 both are equal (4.81 vs 4.81 after 40 steps) and with
adaptive refresh ``"rotate"`` is better (5.15 vs 5.36).

Design decision: both moments are kept in rotated coordinates (SOAP's choice) rather than keeping
``M`` in parameter space (EShampoo's): equal in exact arithmetic, but it saves one full rotation
per step; the price, re-expressing ``M'`` at a refresh, is paid only on the rare refresh steps.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_kron.engine.basis_change import permute_buffer, rotate_buffer
from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.validation import check_choice
from lightning_kron.methods.kron_optimizer import (
    KronOptimizer,
    StepHyperparameters,
    bias_correction,
)
from lightning_kron.scheduling.budget_policies import BudgetRefresh

SECOND_MOMENT_ON_REFRESH = ("keep", "rotate")


class EigenvalueCorrectedOptimizer(KronOptimizer):
    """Shared implementation of :class:`SOAP` and :class:`EShampoo` (they differ in defaults)."""

    masks_skipped_direction = True  # _direction returns exactly 0 for a skipped parameter group

    def __init__(self, params: Any, lr: float, betas, eps: float, weight_decay: float, *,
                 shampoo_beta: Optional[float] = None, weight_decay_mode: str = "decoupled",
                 second_moment_on_refresh: str = "rotate", **options: Any) -> None:
        check_choice("second_moment_on_refresh", second_moment_on_refresh, SECOND_MOMENT_ON_REFRESH)
        self.second_moment_on_refresh = second_moment_on_refresh
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        weight_decay_mode=weight_decay_mode, shampoo_beta=shampoo_beta)
        super().__init__(params, defaults, **options)

    def _init_state(self, group: FactorGroup) -> None:
        group.add("exp_avg", group.zeros_like_blocks())
        group.add("exp_avg_sq", group.zeros_like_blocks())

    def _direction(self, group: FactorGroup, grad: torch.Tensor, rotated: torch.Tensor,
                   hyper: StepHyperparameters) -> torch.Tensor:
        exp_avg, exp_avg_sq = group.tensors["exp_avg"], group.tensors["exp_avg_sq"]
        exp_avg.lerp_(rotated, hyper.weight(1.0 - hyper.beta1, exp_avg))  # weights 0 when skipped
        exp_avg_sq.mul_(hyper.keep(hyper.beta2, exp_avg_sq)).addcmul_(rotated, rotated, value=1.0 - hyper.beta2)
        step = group.steps
        # Adam's M/c1 / (sqrt(V/c2) + eps) as s * M / (sqrt(V) + eps sqrt(c2)), s = sqrt(c2)/c1 per
        # member: four passes and one new stack (on a CPU a fresh large stack costs more in page
        # faults than the arithmetic that fills it)
        c1, c2 = bias_correction(hyper.beta1, step, exp_avg), bias_correction(hyper.beta2, step, exp_avg_sq)
        if hyper.finite is not None:  # a group skipped before its first step has c = 0: keep 0/0 out
            tiny = torch.finfo(c1.dtype).tiny  # (below 1 - beta for every step that happened)
            c1, c2 = c1.clamp_min_(tiny), c2.clamp_min_(tiny)
        root_c2 = c2.sqrt_()
        normalized = exp_avg_sq.sqrt().add_(root_c2 * hyper.eps)
        torch.div(exp_avg, normalized, out=normalized)
        scale = root_c2 / c1
        if hyper.finite is not None:  # the skip mask rides on the per-member scale: no extra pass
            scale.mul_(hyper.weight(1.0, scale))
        normalized.mul_(scale)
        return group.rotate_out(normalized, keep_rotation_dtype=True)

    def permute_rows(self, group, rows, dim, order) -> None:
        if self.second_moment_on_refresh == "keep":
            permute_buffer(group, "exp_avg_sq", rows, dim, order)

    def rotate_rows(self, group, rows, dim, rotation) -> None:
        rotate_buffer(group, "exp_avg", rows, dim, rotation.mT)
        if self.second_moment_on_refresh == "rotate":
            rotate_buffer(group, "exp_avg_sq", rows, dim, rotation.mT.square())


class SOAP(EigenvalueCorrectedOptimizer):
    """SOAP: Adam in the Kronecker eigenbasis, refreshed by a sorted warm-started QR step.

    Args:
        params: ``model.parameters()``, ``model.named_parameters()`` (names appear in telemetry)
            or parameter-group dicts.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled decay by default;
            ``weight_decay_mode="l2"`` adds ``wd * W`` to the gradient instead).
        shampoo_beta: EMA rate of the Kronecker statistics; ``None`` uses ``betas[1]``, 1 sums.
        refresh: ``None`` (default) is ``BudgetRefresh()``: as many refreshes as
            ``FixedRefresh(every=20)``, half the SOAP paper's every=10, spent on the most stale
            factors and front-loaded when the training length is known (``KronCallback`` and the
            recipes pass it). Chosen by ``scripts/refresh_study.py`` on six models, three seeds
            each (docs/adaptive-refresh.md, "The default schedule"): 0.47-0.50x the refreshes of
            every=10, each model's mean final loss within +0.91% of it. Alone, pass
            ``BudgetRefresh(total_steps=N)``: spread evenly (length unknown) the same budget ended
            up to 9% worse. ``FixedRefresh(every=10)`` is the paper's clock; ``AdaptiveRefresh`` a
            staleness tolerance (tune it per model).
        solver: "qr" (warm power step, default) or "eigh" (exact).
        orthonormalizer: "householder" (default) or "cholesky_qr2" (faster on GPUs).
        max_precond_dim: dims above this get no factor (or are split with ``split_large_dims``).
        rotation_dtype: e.g. ``torch.bfloat16`` to run the rotations in bf16 matmuls: the
            per-step ones (gradient in, direction out) and the moments' re-expression at a
            refresh. Statistics, bases and the refresh's QR and ``Q P`` stay in fp32.
        statistics_product_dtype: ``torch.bfloat16`` runs the statistics' product ``G' G'^T``
            in bf16 too (accumulated into fp32): faster still, at a measured +0.6% final loss on
            the GPT recipe (docs/benchmarks.md, "Optimizer step cost").
        merge_dims, precondition_1d, start_preconditioning_step, statistics_dtype, nonfinite,
        second_moment_on_refresh ("keep" or "rotate"): see docs/algorithms.md §2.

    >>> import torch
    >>> model = torch.nn.Linear(8, 4)
    >>> opt = SOAP(model.named_parameters(), lr=3e-3)
    >>> model(torch.randn(16, 8)).square().mean().backward(); opt.step()
    >>> opt.factor_names()
    ['weight[L]', 'weight[R]']
    """

    def __init__(self, params: Any, lr: float = 3e-3, betas=(0.95, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.01, *, refresh=None, solver: str = "qr", **options: Any) -> None:
        refresh = refresh if refresh is not None else BudgetRefresh()
        super().__init__(params, lr, betas, eps, weight_decay, refresh=refresh, solver=solver, **options)


class EShampoo(EigenvalueCorrectedOptimizer):
    """Eigenvalue-corrected Shampoo: SOAP's update with exact ``eigh`` refreshes and AdamW's default
    hyperparameters. The refresh default is SOAP's, ``BudgetRefresh()``: every=20's count of
    refreshes, each on the factor that is most stale by the staleness criterion (Purifying Shampoo),
    instead of an absolute tolerance that does not transfer between models.

    >>> import torch
    >>> opt = EShampoo(torch.nn.Linear(4, 4).parameters())
    >>> opt.solver, opt.refresh.every
    ('eigh', 20)
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, *, refresh=None, solver: str = "eigh", **options: Any) -> None:
        refresh = refresh if refresh is not None else BudgetRefresh()
        super().__init__(params, lr, betas, eps, weight_decay, refresh=refresh, solver=solver, **options)
