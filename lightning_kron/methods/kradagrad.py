"""KrADagrad and KrADagrad*: Kronecker preconditioning with no matrix inverse (Mei et al., UAI 2023).

Shampoo keeps ``L_i = sum A_i`` and needs ``(eps I + L_i)^(-1/(2k))``, an inverse root of a matrix
whose condition number grows without bound. KrADagrad keeps ``X_i ~ (eps I + L_i)^-1`` itself,
starting from ``I / eps`` and updated with the approximation-domination downdate
``X <- X - X A X / s`` (:mod:`lightning_kron.methods.inverse_factor_update`): matmuls only, and ``X`` is a
positive matrix bounded by ``I / eps``, so only a *positive* root of it is ever taken.

Two variants (docs/algorithms.md §4):

* ``variant="star"`` (KrADagrad*): every factor is downdated every step with its own statistic
  ``A_i = unfold_i(G) unfold_i(G)^T``; direction ``G x_1 X_1^(1/(2k)) ... x_k X_k^(1/(2k))``.
* ``variant="alternating"`` (KrADagrad): one factor per step, cycling through the dims, with the
  statistic taken from the gradient preconditioned in the other modes,
  ``A_i = unfold_i(G x_{j!=i} X_j^(1/2)) unfold_i(...)^T / prod_{j!=i} d_j`` (for a matrix
  ``G X_R G^T / d_R``), and ``X_i^(1/2)`` in every mode of the direction. For Kronecker gradient
  covariance ``C = C_1 x ... x C_k`` the fixed point is ``X_1 x ... x X_k = (t C)^-1``: full-matrix
  AdaGrad's ``(t C)^(-1/2)`` step (Shampoo and KrADagrad* reach ``C^(-1/(2k))``).
  Design decision, measured: the paper writes ``G X_R^(1/2) G^T``; with it the fixed point
  scales as ``|G|^(-1/3)``, so the step depends on the loss scale. The full ``X_j``, split
  symmetrically (PSD by construction) and normalised, is scale invariant (tests/test_kradagrad.py)
  and did better on a 20-32-5 MLP toy: best final loss 0.16 vs 0.24 (0.55 vs 1.2 with the loss
  scaled by 100).
  The other modes' ``X_j`` enter through the current ``diag(stats.j)`` (``X_j`` in its basis).

The alternating variant's defaults, ``damping="relative"``, ``eps=1e-2`` and the step bound
(measured on ``0.5 tr(W^T H1 W H2)``, W 32x24, 24x32 and 32x32, condition 1e2 and 1e4 per factor,
seeds 0-3, 300 fp32 steps, best of lr 1e-3..3; scripts/illconditioned.py). With an absolute ``eps``
and no bound it lost to AdamW by up to 1e4x and needed ``eps`` tuned to the loss scale; with both
its final loss is 50-130x below AdamW's at condition 1e4 and ~1e9x at 1e2, on every one of those
problems, and invariant to the loss scale.

* Step bound. Full-matrix AdaGrad counts the gradient before preconditioning it, so
  ``g^T C_t^-1 g <= 1``: its step is bounded whatever the damping. The alternating variant
  preconditions with factors of which all but one have not seen ``G``; along a direction new to
  them (rank-deficient early statistics, a rotating gradient) the step is ``~eps^(-1/2)`` too long
  (measured: the loss grew 1e6x in 10 steps on the quadratic, 1e8x on the rank-5 regression of
  tests/test_optimizer_matrix.py). With ``P = X_k x ... x X_1`` the direction is ``D = P^(1/2) m``
  and ``|D|_F^2 = m^T P m = q``; Sherman-Morrison on ``(P^-1 + m m^T)^-1`` gives ``q / (1 + q)``, so
  ``D / sqrt(1 + q)`` has exactly the length full-matrix AdaGrad's step would have with ``m``
  counted (``D / sqrt(1 + w q)``, ``w = (1 - beta) / (1 - beta^t)``, for the bias-corrected EMA).
  It is never longer than 1 (times lr), costs one reduction, and once the factors have seen the
  gradients (``q << 1``) leaves the step unchanged; it also makes the final loss nearly flat in lr
  (lr 1-30 within 3x on tests/test_kradagrad.py's problem). Without it, relative damping alone
  (eps 1e-4) lost to AdamW on condition 1e2 (1.4e-2 vs 6.1e-6 relative loss).
* Relative damping. Only the product ``X_1 x ... x X_k`` is determined (``c X_L, X_R / c`` give the
  same direction), and with an absolute ``eps`` in every factor the split is fixed by ``eps``: after
  ``X_L ~ eps / |G|^2`` the next statistic is ``A_R = G^T X_L G / d_L ~ eps``, so one factor's damping
  stays as large as its statistic and the other's is negligible, by an amount set by ``eps / |G|^2``,
  i.e. by the loss scale (on an ill-conditioned quadratic: 3.9e3 at eps 0.1, 8.3 at eps 10, AdamW 22). With
  ``damping="relative"`` each factor is damped by ``eps tr(L_i) / d_i``: every statistic ``A`` is
  downdated together with ``eps tr(A) / d I`` (an isotropic downdate, tight where ``X`` is largest)
  and the exact first update uses ``eps tr(A_1) / d``. Both the loss scale and the split ``c``
  cancel. ``eps=1e-2`` (relative to the mean eigenvalue) is a compromise, measured: smaller is
  better on noise-free problems (eps 1e-4: 5e3-7e4x below AdamW instead of 50x at condition 1e4) but
  worse with gradient noise (noise 0.1 of the initial gradient RMS, 32x24, condition 1e4, 300
  steps, seeds 0-2: AdamW 7.6e-3/4.3e-3/4.9e-3; eps 1e-2: 7.9e-3/5.3e-3/5.3e-3, 1.04-1.23x of
  AdamW; eps 1e-4: 1.75e-2/1.0e-2, 2.3x; eps 0.1: 0.87-1.04x but only 8x below AdamW
  noise-free), since directions the statistics barely see are noise there. A factor whose first
  gradient is exactly zero has no scale yet: it keeps ``X_0 = I / eps`` and starts with dominated
  downdates. Diagonal blocks use ``v + eps mean(v)`` likewise.
  An absolute ``eps`` with the bound was within 1.02x-6x of AdamW (not enough).
* KrADagrad* keeps ``damping="absolute"``, ``eps=0.1`` and no bound (unchanged, and still the default
  variant); ``damping="relative"`` is available to it.

How it sits on the shared engine: each ``X_i`` is stored in its own eigenbasis like every factor
(``stats.i = Q_i^T X_i Q_i``), so the statistic in that basis comes from the rotated gradient the
engine already computed, and the downdate, its scale ``s`` and the positive-definiteness check are
basis invariant. Kept nearly diagonal, ``B`` holds each eigenvalue of ``X`` to fp32's *relative*
precision however ill-conditioned ``X`` is; that, not the downdate alone, is what lets fp32 work.
The root ``X_i^p`` is ``Q_i diag(x)^p Q_i^T`` with per-dim scales frozen at each refresh, exactly
as Shampoo's inverse roots (:mod:`lightning_kron.methods.root_preconditioner`).

Design decisions (checked in tests/test_kradagrad.py and scripts/illconditioned.py):

* The first update of each factor, from ``X_0 = I / eps``, is exact, from an SVD of the unfolded
  gradient (:func:`~lightning_kron.methods.inverse_factor_update.exact_from_isotropic`), and sets the
  factor's eigenbasis. A dominated downdate from ``I / eps`` barely shrinks ``X`` (by ~1/rank(A) per
  step) so the first hundreds of steps were ~``eps^-1/2`` too long (the MLP toy blew up); an eigh of
  ``G G^T`` instead of the SVD of ``G`` squares the condition number and cost fp32 KrADagrad* a
  factor ~1e5 in final loss at eps=1e-12 on the ill-conditioned problem (now equal to fp64).
* Refresh: the eigenbasis of ``X`` is that of ``L``, and a sorted warm QR step contracts the angle
  between eigenvectors ``i, j`` by the ratio of their eigenvalues, the same number for ``X`` and
  ``X^-1``; so the machinery carries over (it sorts by ``diag(X)`` descending, L's *smallest* first,
  which is harmless: only pairwise ratios matter). The default solver is "qr": a QR step of ``B``
  keeps every eigenvalue of a graded ``B`` to relative precision in fp32, while an eigh of ``B``
  loses those below ~1e-7 of the largest (X's small ones, the gradient-heavy directions of ``L``).
* Staleness: ``e(Q, X)`` is dominated by X's largest eigenvalues, the damped, near-empty directions
  of ``L``. The optimizer reports ``e(Q, L)`` estimated to first order from ``stats`` (no inverse,
  :func:`~lightning_kron.engine.staleness.inverse_factor_staleness`), so a tolerance means the same as for
  SOAP and Shampoo and the Lightning callback can own the schedule unchanged.
* Non-finite or non-positive-definite ``X`` after an update: detected for all members at once by a
  batched ``cholesky_ex`` (no host sync); those members keep their previous ``X`` and
  ``failures.i`` (factor telemetry, shared with failed refreshes) counts it. Non-finite gradients
  are refused by the engine before any statistic changes.
* EMA (``shampoo_beta < 1``) keeps the damping at ``eps``
  (:func:`~lightning_kron.methods.inverse_factor_update.krad_update`) and bias-corrects the root with
  ``(1 - beta^t) X``; the default is the paper's AdaGrad sum, ``shampoo_beta = 1``.
* Blocks with no factored dim (biases, norms by default) get the diagonal form of the same method,
  ``m / sqrt(eps + v)``, ``v`` the sum (or EMA) of squared gradients: diagonal KrAD is exact.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.mode_products import unfold
from lightning_kron.engine.staleness import inverse_factor_staleness
from lightning_kron.engine.validation import check_betas, check_choice
from lightning_kron.methods.inverse_factor_update import (
    DOMINATION_SCALES,
    exact_from_isotropic,
    krad_update,
    positive_definite,
)
from lightning_kron.methods.root_preconditioner import (
    RootPreconditionedOptimizer,
    scale_modes,
)
from lightning_kron.methods.step_hyperparameters import StepHyperparameters, bias_correction
from lightning_kron.scheduling.policies import FixedRefresh, RefreshPolicy

VARIANTS = ("star", "alternating")
DAMPINGS = ("absolute", "relative")
ABSOLUTE_EPS = 0.1  # damping="absolute" (KrADagrad*'s default): X_0 = I / eps, in units of squared gradients
RELATIVE_EPS = 1e-2  # damping="relative" (KrADagrad's default): times each factor's tr(L_i) / d_i


class KrADagrad(RootPreconditionedOptimizer):
    """KrADagrad (``variant="alternating"``) and KrADagrad* (``variant="star"``, default).

    Args:
        params: ``model.parameters()``, ``model.named_parameters()`` or parameter-group dicts.
        lr: learning rate. The direction is normalised like AdaGrad's, so AdaGrad-sized rates work.
        betas: ``(beta1, beta2)``: momentum of the gradient, and the grafted method's beta2 (also
            the statistics' EMA rate when ``shampoo_beta=None``).
        eps: damping, > 0. ``damping="absolute"``: ``X`` starts at ``I / eps`` and approximates
            ``(eps I + L)^-1`` (default 0.1). ``"relative"``: ``(eps tr(L) / d I + L)^-1`` (default 1e-2).
        weight_decay: decoupled (AdamW-style) by default; ``weight_decay_mode="l2"`` adds it to G.
        variant: "star" (KrADagrad*: every factor, every step) or "alternating" (KrADagrad).
        graft: ``None`` (no grafting) or "adam" | "adagrad" | "rmsprop" | "sgd": borrow that
            method's per-block step size; ``graft_eps`` is its epsilon.
        shampoo_beta: 1 (default) sums the statistics as AdaGrad; < 1 is an EMA; ``None`` uses beta2.
        damping: "absolute" (KrADagrad*'s default) or "relative" (KrADagrad's default, scale
            invariant; see the module docstring).
        domination_scale: the downdate's ``s``: "trace" (``1 + tr(XA)``, default), "frobenius",
            "schatten" (tighter) or "damped" (looser); see :mod:`lightning_kron.methods.inverse_factor_update`.
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
    shifted_qr_refresh = False  # X's small eigenvalues (L's large ones) must keep their relative precision

    def __init__(self, params: Any, lr: float = 0.1, betas=(0.9, 0.999), eps: Optional[float] = None,
                 weight_decay: float = 0.0, *, variant: str = "star", graft: Optional[str] = None,
                 graft_eps: float = 1e-8, shampoo_beta: Optional[float] = 1.0, domination_scale: str = "trace",
                 damping: Optional[str] = None,
                 weight_decay_mode: str = "decoupled", refresh: Optional[RefreshPolicy] = None, solver: str = "qr", **options: Any) -> None:
        if options.get("statistics_product_dtype") is not None:  # its downdates form F F^T per stack, in the state dtype
            raise ValueError("statistics_product_dtype has no effect on KrADagrad (it updates the inverse factors "
                             f"directly, not by a product of the statistics); leave it out, got {options['statistics_product_dtype']!r}")
        self.variant = check_choice("variant", variant, VARIANTS)
        self.domination_scale = check_choice("domination_scale", domination_scale, DOMINATION_SCALES)
        alternating = self.variant == "alternating"
        damping = ("relative" if alternating else "absolute") if damping is None else damping
        self.damping = check_choice("damping", damping, DAMPINGS)
        if eps is None:
            eps = RELATIVE_EPS if self.damping == "relative" else ABSOLUTE_EPS
        defaults = dict(lr=lr, betas=check_betas(betas), eps=eps, weight_decay=weight_decay,
                        weight_decay_mode=weight_decay_mode, shampoo_beta=shampoo_beta)
        refresh = refresh if refresh is not None else FixedRefresh(every=10)
        super().__init__(params, defaults, graft="none" if graft is None else graft, graft_eps=graft_eps,
                         refresh=refresh, solver=solver, **options)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        if not group["eps"] > 0:
            raise ValueError(f"eps must be > 0 for KrADagrad (X starts at I / eps), got {group['eps']!r}")
        beta = group["betas"][1] if group["shampoo_beta"] is None else group["shampoo_beta"]
        if beta == 0:  # every downdate then failed its definiteness check: X froze at its first update
            raise ValueError("shampoo_beta must be > 0 for KrADagrad (the downdate divides X by it; "
                             f"shampoo_beta=None takes betas[1]), got {group['shampoo_beta']!r} with betas={group['betas']!r}")

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

    def factor_in_basis(self, group: FactorGroup, dim: int, row: int) -> torch.Tensor:
        """``L`` from the tracked ``X ~ (c I + L)^-1`` (in fp64: ``X`` may be near-singular in fp32),
        ``c = eps`` or, with relative damping, ``eps tr(L) / d`` (so ``tr X^-1 = (1 + eps) tr L``)."""
        inverse = torch.linalg.inv(group.stats(dim)[row].double())
        eps = self.param_groups[group.param_group]["eps"]
        size = inverse.shape[-1]
        damping = eps * inverse.trace() / (size * (1.0 + eps)) if self.damping == "relative" else eps
        return inverse - damping * torch.eye(size, dtype=inverse.dtype, device=inverse.device)

    # ----------------------------------------------------------------- statistics
    def _dims_this_step(self, group: FactorGroup) -> list[int]:
        dims = group.factored_dims
        if self.variant == "star" or not dims:
            return dims
        return [dims[(self.global_step - 1) % len(dims)]]

    def _statistic_factor(self, group: FactorGroup, rotated: torch.Tensor, dim: int) -> torch.Tensor:
        """``F`` with ``A_dim = F F^T`` in the eigenbasis of ``X_dim`` (see the module docstring)."""
        if self.variant == "star":
            return unfold(rotated, dim)
        others = [j for j in group.factored_dims if j != dim]
        halves = {j: group.stats(j).diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt() for j in others}
        normaliser = math.sqrt(math.prod(group.shape[j] for j in others))
        return unfold(scale_modes(rotated, halves), dim) / normaliser

    def _update_statistics(self, items, hyper: StepHyperparameters) -> None:
        """KrADagrad's downdates are per stack (each has its own positive-definiteness check)."""
        for item in items:
            self._update_stack_statistics(item.group, item.rotated, hyper)

    def _update_stack_statistics(self, group: FactorGroup, rotated: torch.Tensor, hyper: StepHyperparameters) -> None:
        if not group.factored_dims:
            self._accumulate_diagonal(group, rotated, hyper)
        for dim in self._dims_this_step(group):
            factor = self._statistic_factor(group, rotated, dim)
            old = group.stats(dim)
            new = krad_update(old, factor @ factor.mT, hyper.shampoo_beta, hyper.eps, self.domination_scale,
                              relative=self.damping == "relative")
            if self._first_update(group, dim):
                new = self._exact_first_update(group, dim, factor, hyper, fallback=new)
            definite = positive_definite(new)
            ok = definite if hyper.finite is None else definite & hyper.finite  # a skipped group keeps X
            old.copy_(torch.where(ok[:, None, None], new, old))
            group.failures(dim).add_((~definite if hyper.finite is None else ~definite & hyper.finite).long())

    def _first_update(self, group: FactorGroup, dim: int) -> bool:
        """May this step first downdate ``dim`` from ``X_0 = I / eps``? (host-side, no sync)

        Star updates every dim at step 1; alternating updates dim number ``j`` first at step ``j+1``.
        With star, a member that joins later (a layer unfrozen, added by ``add_param_group``, or
        first gradded on a step where others of its stack are not) gets its exact first update at
        its own first step: while a gradded member still holds the identity basis (host-side, and
        rebuilt by a load from the refresh counts) the device decides which members really are at
        their first finite step (:meth:`_exact_first_update`); a late member of a partly gradded
        stack used to take a dominated downdate from ``I / eps`` instead, a 17x longer first step.
        A stack whose members all have their bases is not scanned (``first_refreshes_done``).
        Alternating keeps the optimizer's clock: its dims take turns by the global step, so a late
        stack's turns start mid-cycle.
        """
        if self.variant == "alternating":
            return self.global_step <= len(group.factored_dims)
        return self.global_step == 1 or (not group.first_refreshes_done and bool(group.identity_rows(dim)))

    def _exact_first_update(self, group: FactorGroup, dim: int, factor: torch.Tensor,
                            hyper: StepHyperparameters, fallback: torch.Tensor) -> torch.Tensor:
        """``X_1`` exactly, stored diagonal in its own eigenbasis; see :func:`exact_from_isotropic`.

        ``X_0`` is isotropic, so moving the basis costs nothing: the frozen root scale is uniform
        and KrADagrad keeps no other buffer in rotated coordinates. It is a refresh in all but name
        (a decomposition that sets the basis), and telemetry counts it as one; the engine also relies
        on the count (a factor never refreshed is assumed to still have the identity basis).
        If preconditioning has already
        started (the alternating variant reaches dim ``j`` only at step ``j + 1``, after the first
        refresh), the root scale is set from the exact ``X_1`` too: frozen at ``(I / eps)^p`` until
        the next refresh it would overshoot by orders of magnitude (measured: divergence on the
        ill-conditioned quadratic of tests/test_kradagrad.py).
        """
        weight = 1.0 if hyper.shampoo_beta == 1.0 else 1.0 - hyper.shampoo_beta
        vectors, values, ok = exact_from_isotropic(factor, hyper.eps, weight, relative=self.damping == "relative")
        if hyper.finite is not None:  # a skipped group's factor stays X_0, its basis the identity
            ok = ok & hyper.finite
        if self.variant == "star" and self.global_step > 1:  # a late stack: its members at their first step
            ok = ok & (group.steps == 1)
        keep = ok[:, None, None]
        basis = group.basis(dim)
        basis.copy_(torch.where(keep, basis @ vectors, basis))
        group.refreshes(dim).add_(ok.long())
        # the rows whose basis moved: later refreshes start from it (one host read, on a stack's
        # first-update step only; a load marks the same rows, from the refresh counts)
        group.mark_refreshed(dim, [row for row, moved in enumerate(ok.tolist()) if moved])
        last = group.last_refresh(dim)
        last.copy_(torch.where(ok, self.global_step, last))
        if self.global_step >= self.start_preconditioning_step:
            scale = group.factor_tensor("root_scale", dim)
            scale.copy_(torch.where(ok[:, None], self._scale_from(values, group.steps, group, hyper), scale))
        return torch.where(keep, torch.diag_embed(values), fallback)

    @staticmethod
    def _accumulate_diagonal(group: FactorGroup, grad: torch.Tensor, hyper: StepHyperparameters) -> None:
        squares, beta = group.tensors["diagonal_sq"], hyper.shampoo_beta
        if beta == 1.0:
            squares.addcmul_(grad, grad)
        else:
            squares.mul_(hyper.keep(beta, squares)).addcmul_(grad, grad, value=1.0 - beta)

    # ----------------------------------------------------------------- direction
    def _exponent(self, group: FactorGroup) -> float:
        return 0.5 if self.variant == "alternating" else 1.0 / (2 * len(group.factored_dims))

    def _root_scale(self, group: FactorGroup, rows, dim: int, hyper: StepHyperparameters) -> torch.Tensor:
        eigenvalues = group.read_rows(group.stats(dim), rows).diagonal(dim1=-2, dim2=-1)
        return self._scale_from(eigenvalues, group.read_rows(group.steps, rows), group, hyper)

    def _scale_from(self, eigenvalues: torch.Tensor, step: torch.Tensor, group: FactorGroup,
                    hyper: StepHyperparameters) -> torch.Tensor:
        """``(c x)^p`` from X's eigenvalue estimates ``x``; ``c = 1 - beta^t`` undoes the EMA's bias."""
        eigenvalues = eigenvalues.clamp_min(torch.finfo(eigenvalues.dtype).tiny)
        if hyper.shampoo_beta < 1:
            eigenvalues = eigenvalues * bias_correction(hyper.shampoo_beta, step, eigenvalues)
        return eigenvalues.pow(self._exponent(group))

    def _preconditioned(self, group: FactorGroup, momentum: torch.Tensor, hyper: StepHyperparameters) -> torch.Tensor:
        if group.factored_dims:
            direction = super()._preconditioned(group, momentum, hyper)
            if self.variant == "alternating":  # the step bound (module docstring)
                wide = torch.promote_types(direction.dtype, torch.float32)  # fp64 state keeps fp64 here
                quadratic = direction.to(wide).square().flatten(1).sum(1)  # m^T (X_k x ... x X_1) m, per member
                if hyper.shampoo_beta < 1:  # the root is of the bias-corrected EMA: m enters it with this weight
                    quadratic = quadratic * (1.0 - hyper.shampoo_beta) / hyper.bias_correction(hyper.shampoo_beta, group, quadratic)
                shrink = (1.0 + quadratic).rsqrt().to(direction.dtype)
                direction = direction * shrink.reshape(-1, *[1] * (direction.dim() - 1))
            return direction
        squares = group.tensors["diagonal_sq"]
        if hyper.shampoo_beta < 1:
            squares = squares / hyper.bias_correction(hyper.shampoo_beta, group, squares)
        if self.damping == "relative":  # eps times the mean of v, as tr(L) / d for a factor
            mean = squares.flatten(1).mean(1).reshape(-1, *[1] * (squares.dim() - 1))
            return momentum * (squares + hyper.eps * mean).clamp_min(torch.finfo(squares.dtype).tiny).rsqrt()
        return momentum * (squares + hyper.eps).rsqrt()
