"""SOAP and EShampoo: Adam run in the Kronecker eigenbasis (eigenvalue-corrected Shampoo).

The gradient is rotated into the eigenbases of the Kronecker factors, ``G' = G x_i Q_i^T``; Adam's
moments are kept there; the normalised step is rotated back. The second moment ``V`` is the
diagonal of the full-matrix second moment in the Kronecker eigenbasis (the *corrected
eigenvalues*), which is why no learning-rate grafting is needed and why AdamW's lr, betas and
weight decay transfer (docs/algorithms.md §2). With every basis the identity (before
``start_preconditioning_step``, or for blocks with no factor) the update is exactly AdamW's.

Design decision (measured, issue 11): SOAP carries the second moment over a refresh by eigenvalue
rank (``"keep"``) and refreshes *after* the step (``refresh_timing="after_step"``), as the SOAP
reference does. The two go together: refreshing inside the step with ``"keep"`` diverged at
every=1 on two of three small models, and so did a tiny GPT/Llama in an earlier version of this
code, while after the step ``"keep"`` trained everywhere. Against the previous default (inside the
step, squared rotation ``"rotate"``), at every=10: GPT-2 tiny 1.5975 -> 1.5616 (3 seeds), Llama
tiny 1.4416 -> 1.4304, ResNet tiny 0.066 -> 0.050 (5 seeds), an MLP 0.0335 -> 0.0300, an LSTM
2.167 -> 2.139; ViT tiny 0.160 -> 0.157 (within its seed noise). EShampoo keeps ``"rotate"`` in the
step (not re-measured). Figures and commands: docs/algorithms.md, "Deviations from the reference SOAP".

Design decision: both moments are kept in rotated coordinates (SOAP's choice) rather than keeping
``M`` in parameter space (EShampoo's): equal in exact arithmetic, but it saves one full rotation
per step; the price, re-expressing ``M'`` at a refresh, is paid only on the rare refresh steps.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_kron.engine.basis_change import permute_buffer, rotate_buffer
from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.validation import check_choice, check_flag
from lightning_kron.methods.kron_optimizer import (
    KronOptimizer,
    StepHyperparameters,
    bias_correction,
)
from lightning_kron.scheduling.policies import AdaptiveRefresh, FixedRefresh

SECOND_MOMENT_ON_REFRESH = ("keep", "rotate")
#: ``SOAP(params, lr, betas, eps, weight_decay, **REFERENCE_OPTIONS)`` computes the trajectory of the
#: SOAP authors' code (as ported by ``pytorch_optimizer.SOAP``, at its defaults) to float round-off
#: (tests/test_reference_parity.py); each entry undoes one deliberate deviation (docs/algorithms.md,
#: "Deviations from the reference SOAP"). Override ``refresh`` for another precondition_frequency.
REFERENCE_OPTIONS = dict(
    merge_dims=False, max_precond_dim=10000, second_moment_on_refresh="keep", refresh_timing="after_step",
    update_at_start=False, bias_corrected_eps=False, weight_decay_mode="decoupled_after_update",
    refresh=FixedRefresh(every=10), solver="qr",
)


class EigenvalueCorrectedOptimizer(KronOptimizer):
    """Shared implementation of :class:`SOAP` and :class:`EShampoo` (they differ in defaults)."""

    masks_skipped_direction = True  # _direction returns exactly 0 for a skipped parameter group

    def __init__(self, params: Any, lr: float, betas, eps: float, weight_decay: float, *,
                 shampoo_beta: Optional[float] = None, weight_decay_mode: str = "decoupled",
                 second_moment_on_refresh: str = "rotate", update_at_start: bool = True,
                 bias_corrected_eps: bool = True, **options: Any) -> None:
        check_choice("second_moment_on_refresh", second_moment_on_refresh, SECOND_MOMENT_ON_REFRESH)
        check_flag("update_at_start", update_at_start)
        check_flag("bias_corrected_eps", bias_corrected_eps)
        self.second_moment_on_refresh = second_moment_on_refresh
        self.update_at_start = update_at_start
        self.bias_corrected_eps = bias_corrected_eps
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
        normalized = exp_avg_sq.sqrt().add_(root_c2 * hyper.eps if self.bias_corrected_eps else hyper.eps)
        torch.div(exp_avg, normalized, out=normalized)
        scale = root_c2 / c1
        if hyper.finite is not None:  # the skip mask rides on the per-member scale: no extra pass
            scale.mul_(hyper.weight(1.0, scale))
        normalized.mul_(scale)
        return group.rotate_out(normalized, keep_rotation_dtype=True)

    def _finish(self, item) -> None:
        """With ``update_at_start=False`` the step at ``start_preconditioning_step`` ends here: its
        gradient went into the statistics and the exact first bases only (the SOAP reference's first
        step). Its step count is taken back, so Adam's bias correction counts the moment updates."""
        if self.update_at_start or self.global_step != self.start_preconditioning_step:
            super()._finish(item)
            return
        taken = 1 if item.hyper.finite is None else item.hyper.finite.long()
        item.group.steps.sub_(taken)
        if item.rows is not None:
            item.source.absorb(item.group, item.rows)

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
        refresh: ``FixedRefresh(every=10)`` (default, the SOAP paper) or ``AdaptiveRefresh``.
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
        update_at_start: False makes the step at ``start_preconditioning_step`` only set the
            statistics and the exact bases, with no moment or parameter update (the reference).
        bias_corrected_eps: False adds ``eps`` to the raw ``sqrt(V)``, with the bias correction
            in the step size (the reference; default: to ``sqrt(V / c2)``, as AdamW).
        refresh_timing ("in_step" or "after_step"), weight_decay_mode ("decoupled", "l2" or
            "decoupled_after_update"): see docs/optimizers.md. :data:`REFERENCE_OPTIONS` sets all
            of them to the SOAP reference code's choices.

    >>> import torch
    >>> model = torch.nn.Linear(8, 4)
    >>> opt = SOAP(model.named_parameters(), lr=3e-3)
    >>> model(torch.randn(16, 8)).square().mean().backward(); opt.step()
    >>> opt.factor_names()
    ['weight[L]', 'weight[R]']
    """

    def __init__(self, params: Any, lr: float = 3e-3, betas=(0.95, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.01, *, refresh=None, solver: str = "qr",
                 second_moment_on_refresh: str = "keep", refresh_timing: str = "after_step", **options: Any) -> None:
        refresh = refresh if refresh is not None else FixedRefresh(every=10)
        super().__init__(params, lr, betas, eps, weight_decay, refresh=refresh, solver=solver,
                         second_moment_on_refresh=second_moment_on_refresh, refresh_timing=refresh_timing, **options)


class EShampoo(EigenvalueCorrectedOptimizer):
    """Eigenvalue-corrected Shampoo: SOAP's update with exact ``eigh`` refreshes, decided per
    factor by the staleness criterion (Purifying Shampoo) and AdamW's default hyperparameters.

    >>> import torch
    >>> opt = EShampoo(torch.nn.Linear(4, 4).parameters())
    >>> opt.solver, opt.refresh.tolerance
    ('eigh', 0.05)
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, *, refresh=None, solver: str = "eigh", **options: Any) -> None:
        refresh = refresh if refresh is not None else AdaptiveRefresh(tolerance=0.05)
        super().__init__(params, lr, betas, eps, weight_decay, refresh=refresh, solver=solver, **options)
