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
2.167 -> 2.139; ViT tiny 0.160 -> 0.157 (within its seed noise). EShampoo makes the same two
choices and blocks conv weights per dim too: measured better than its earlier ones (``"rotate"``
inside the step, merged dims) on the nine models of the refresh study at SOAP's betas and at
AdamW's (docs/refresh-study.md). Figures and commands: docs/algorithms.md, "Deviations from
the reference SOAP".
SOAP also gives each dim of a convolution weight its own factor (``merge_dims=False``, the
reference's blocking): with the two choices above, merging ``[out, in*kh*kw]`` ended 47% above it on
the small CNN of the refresh study (3 seeds, every=10) and 5% on the ResNet recipe
(docs/refresh-study.md, "Against the reference SOAP").

Design decision: both moments are kept in rotated coordinates (SOAP's choice) rather than keeping
``M`` in parameter space (EShampoo's): equal in exact arithmetic, but it saves one full rotation
per step; the price, re-expressing ``M'`` at a refresh, is paid only on the rare refresh steps.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from lightning_kron.engine.basis_change import permute_buffer, rotate_buffer
from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.validation import check_betas, check_choice, check_flag
from lightning_kron.methods.kron_optimizer import KronOptimizer
from lightning_kron.methods.step_hyperparameters import StepHyperparameters
from lightning_kron.scheduling.budget_policies import BudgetRefresh
from lightning_kron.scheduling.policies import FixedRefresh, RefreshPolicy

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
Coefficient = Union[float, torch.Tensor, list]


def adam_in_eigenbasis(exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], rotated: list[torch.Tensor],
                       keep1: Coefficient, weight1: float, keep2: Coefficient, weight2: float,
                       eps: Coefficient, scale: Coefficient) -> list[torch.Tensor]:
    """Adam's moments and normalised step on a list of stacks, in place and with foreach ops only:
    ``M <- keep1 M + weight1 G'``, ``V <- keep2 V + weight2 G'^2``, returns ``scale M / (sqrt(V) + eps)``.

    Pure (no optimizer state), so ``compile=True`` can hand it to ``torch.compile``, which fuses it
    into a few kernels. ``keep*`` are the betas as floats, or 0-dim tensors that are 1 for a
    skipped group (whose ``G'`` is 0, so its moments stay); ``eps``/``scale`` are 0-dim tensors or
    one tensor per stack. Five passes to the step, as the per-stack code had: the division is a
    reciprocal and a product because foreach has no in-place ``x <- M / x`` (a new buffer per
    stack costs more in page faults on a CPU than the extra pass). ``alpha=`` selects the Tensor
    overload of ``_foreach_add_`` (a 0-dim tensor would otherwise bind to its Scalar overload
    through an ``.item()`` host sync).
    """
    if isinstance(keep1, float):  # nothing to mask: one pass
        torch._foreach_lerp_(exp_avgs, rotated, weight1)
    else:
        torch._foreach_mul_(exp_avgs, keep1)
        torch._foreach_add_(exp_avgs, rotated, alpha=weight1)
    torch._foreach_mul_(exp_avg_sqs, keep2)
    torch._foreach_addcmul_(exp_avg_sqs, rotated, rotated, value=weight2)
    step = torch._foreach_sqrt(exp_avg_sqs)
    if isinstance(eps, list):
        torch._foreach_add_(step, eps)
    else:
        torch._foreach_add_(step, eps, alpha=1.0)
    torch._foreach_reciprocal_(step)
    torch._foreach_mul_(step, exp_avgs)
    torch._foreach_mul_(step, scale)
    return step


class EigenvalueCorrectedOptimizer(KronOptimizer):
    """Shared implementation of :class:`SOAP` and :class:`EShampoo` (they differ in defaults)."""

    masks_skipped_direction = True  # _directions returns exactly 0 for a skipped parameter group
    compilable = {**KronOptimizer.compilable, "direction": adam_in_eigenbasis}

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
        defaults = dict(lr=lr, betas=check_betas(betas), eps=eps, weight_decay=weight_decay,
                        weight_decay_mode=weight_decay_mode, shampoo_beta=shampoo_beta)
        super().__init__(params, defaults, **options)

    def _init_state(self, group: FactorGroup) -> None:
        group.add("exp_avg", group.zeros_like_blocks())
        group.add("exp_avg_sq", group.zeros_like_blocks())

    def _directions(self, items) -> list[torch.Tensor]:
        """Adam on the rotated gradients of a parameter group's stacks with ``torch._foreach_*``
        ops (:func:`adam_in_eigenbasis`, compiled with ``compile=True``), then each stack's step
        rotated back: about a dozen ops for the group instead of a dozen per stack."""
        hyper = items[0].hyper
        like = items[0].group.tensors["exp_avg"]
        eps, scale = self._bias_corrections(items, hyper)
        adam = self._compiled("direction") or adam_in_eigenbasis
        normalized = adam(
            [item.group.tensors["exp_avg"] for item in items], [item.group.tensors["exp_avg_sq"] for item in items],
            [item.rotated for item in items], hyper.keep(hyper.beta1, like), 1.0 - hyper.beta1,
            hyper.keep(hyper.beta2, like), 1.0 - hyper.beta2, eps, scale)
        return [item.group.rotate_out(step, keep_rotation_dtype=True) for item, step in zip(items, normalized)]

    def _bias_corrections(self, items, hyper: StepHyperparameters):
        """Adam's ``M/c1 / (sqrt(V/c2) + eps)`` as ``s M / (sqrt(V) + e)`` with ``e = eps sqrt(c2)``
        (``e = eps`` with ``bias_corrected_eps=False``, the reference's placement) and
        ``s = sqrt(c2) / c1`` (0 for a skipped group, whose direction is then exactly 0):
        0-dim tensors shared by the parameter group when its stacks share the step count (the
        usual case), else one per-member tensor per stack."""
        def per(group):
            like = group.tensors["exp_avg"]
            root = hyper.bias_correction(hyper.beta2, group, like).sqrt()
            scale = root / hyper.bias_correction(hyper.beta1, group, like)
            if hyper.finite is not None:
                scale.mul_(hyper.finite)
            eps = root.mul_(hyper.eps) if self.bias_corrected_eps else torch.full_like(root, hyper.eps)
            return eps, scale
        if hyper.step is not None:
            return per(items[0].group)
        pairs = [per(item.group) for item in items]
        return [eps for eps, _ in pairs], [scale for _, scale in pairs]

    def _finish(self, items) -> None:
        """With ``update_at_start=False`` the step at ``start_preconditioning_step`` ends here: its
        gradient went into the statistics and the exact first bases only (the SOAP reference's first
        step). Its step count is taken back, so Adam's bias correction counts the moment updates."""
        if self.update_at_start or self.global_step != self.start_preconditioning_step:
            super()._finish(items)
            return
        for item in items:
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
        refresh: ``None`` (default) is ``BudgetRefresh()``: as many refreshes as
            ``FixedRefresh(every=20)``, half the SOAP paper's every=10, each spent on the factor
            ranked highest by staleness times the steps since its last refresh, front-loaded and
            then tapering when the training length is known (``KronCallback`` and the
            recipes pass it). Chosen by ``scripts/refresh_study.py`` on ten models, three seeds
            each, against every=10 and the SOAP reference (docs/refresh-study.md; what it does:
            docs/adaptive-refresh.md, "The default schedule"). Alone it does not know the
            length and front-loads only its first 30 steps (``early_steps_if_unknown``);
            ``BudgetRefresh(total_steps=N)`` spreads it over the run. ``FixedRefresh(every=10)`` is the paper's clock; ``AdaptiveRefresh`` a
            staleness tolerance (tune it per model).
        solver: "qr" (warm power step, default) or "eigh" (exact).
        orthonormalizer: "auto" (default: "cholesky_qr3" on CUDA, "householder" elsewhere),
            "householder", "cholesky_qr3" (shifted Cholesky-QR3) or "cholesky_qr2" (batched,
            faster on GPUs; a QR step shifted by ``delta I``, so rank-deficient factors need no
            fallback: 400-900 ``u ||B||_F`` for Cholesky-QR3, as good as Householder's step
            within 5% on gpt-mini; 0.24% of ``||B||`` for Cholesky-QR2, 1.7x Householder's
            staleness; the members they still cannot orthonormalise, non-finite ones, are
            refreshed again with Householder).
        max_precond_dim: dims above this get no factor (or are split with ``split_large_dims``).
        rotation_dtype: "auto" (default: "tf32" on CUDA, fp32 elsewhere); "tf32" rotates the
            direction back on TF32 tensor cores (measured loss-neutral; everything else stays IEEE
            fp32); ``torch.bfloat16`` runs every rotation in bf16 matmuls: the per-step ones
            (gradient in, direction out) and the moments' re-expression at a refresh. Statistics,
            bases and the refresh's QR and ``Q P`` stay in fp32.
        compile: ``True`` compiles the per-group Adam and the parameter update with
            ``torch.compile`` (meant for CUDA; equal to eager to float tolerance).
        replicated: in a process group with plain parameters, whether the ranks are DDP replicas
            (True: refreshes split between them; checked once) or train their own (False).
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
                 weight_decay: float = 0.01, *, refresh: Optional[RefreshPolicy] = None, solver: str = "qr",
                 second_moment_on_refresh: str = "keep", refresh_timing: str = "after_step", merge_dims: bool = False,
                 **options: Any) -> None:
        refresh = refresh if refresh is not None else BudgetRefresh()
        super().__init__(params, lr, betas, eps, weight_decay, refresh=refresh, solver=solver,
                         second_moment_on_refresh=second_moment_on_refresh, refresh_timing=refresh_timing,
                         merge_dims=merge_dims, **options)


class EShampoo(EigenvalueCorrectedOptimizer):
    """Eigenvalue-corrected Shampoo: SOAP's update with exact ``eigh`` refreshes and AdamW's default
    hyperparameters. The refresh default is SOAP's, ``BudgetRefresh()``: every=20's count of
    refreshes, each on the factor ranked highest by the staleness criterion (Purifying Shampoo) times
    the steps since its last refresh, instead of an absolute tolerance that does not transfer
    between models. Around a refresh it makes SOAP's choices (after the step, V carried over by
    eigenvalue rank, one factor per conv dim): on the nine models of the refresh study they beat
    the earlier ones (inside the step, V rotated, merged dims) at SOAP's betas and at AdamW's
    (docs/refresh-study.md).

    >>> import torch
    >>> opt = EShampoo(torch.nn.Linear(4, 4).parameters())
    >>> opt.solver, opt.refresh.every
    ('eigh', 20)
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, *, refresh: Optional[RefreshPolicy] = None, solver: str = "eigh",
                 second_moment_on_refresh: str = "keep", refresh_timing: str = "after_step", merge_dims: bool = False,
                 **options: Any) -> None:
        refresh = refresh if refresh is not None else BudgetRefresh()
        super().__init__(params, lr, betas, eps, weight_decay, refresh=refresh, solver=solver,
                         second_moment_on_refresh=second_moment_on_refresh, refresh_timing=refresh_timing,
                         merge_dims=merge_dims, **options)
