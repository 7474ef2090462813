"""Approximation-domination ("KrAD") downdates: track ``X ~ (eps I + L)^-1`` with matmuls only.

Adding a PSD statistic ``A`` to ``L`` would need an inverse to update ``X = (eps I + L)^-1``.
The KrAD downdate (Mei, Moreno & Walters, UAI 2023; docs/algorithms.md §4) avoids it:

    X <- X - X A X / s,      s >= 1 + lambda_max(X^(1/2) A X^(1/2)).

For any such ``s`` the result stays symmetric positive definite and dominates the exact inverse,
``(X^-1 + A)^-1 <= X_new <= X`` in the Loewner order, so errors can only make the preconditioner
more conservative, never blow it up. For a rank-1 ``A`` and ``s = 1 + tr(XA)`` it *is*
Sherman-Morrison. Available choices of ``s`` (all safe upper bounds, computed from ``M = XA``):

* ``"trace"``:     ``1 + tr(XA)`` (the paper's rule; exact for rank-1 statistics);
* ``"frobenius"``: ``1 + ||X^(1/2) A X^(1/2)||_F`` (what the authors' released kradagrad.py uses;
  never looser than "trace", much tighter when ``A`` has high rank);
* ``"schatten"``:  ``1 + (tr (XA)^8)^(1/8)``, within ``rank(A)^(1/8)`` of ``lambda_max``, for two
  more matmuls;
* ``"damped"``:    ``d * (1 + tr(XA))`` (the most damped): very safe, very slow to shrink ``X``.

Tighter is not better in training here. A looser ``s`` under-counts later statistics, so the step
decays more slowly than with AdaGrad's exact sum; on the noise-free quadratic of
scripts/illconditioned.py (d=64, eps=1e-12, 200 steps, best of a learning-rate sweep) the final
relative loss was 1.7e-10 damped, 7.4e-9 trace, 1.8e-6 frobenius, 2.6e-4 schatten. "trace" stays
the default: the paper's rule, exact for rank-1 statistics.

Every function works on stacks ``[N, d, d]`` in any orthonormal basis (all the scales are basis
invariant), which lets the optimizer keep ``X`` in its own eigenbasis like every other factor.
"""

from __future__ import annotations

import torch

DOMINATION_SCALES = ("trace", "frobenius", "schatten", "damped")


def domination_scale(x_times_a: torch.Tensor, rule: str = "trace") -> torch.Tensor:
    """The scale ``s`` (``[N]``) for each ``M = X A`` in a stack, by ``rule`` (see the module)."""
    trace = x_times_a.diagonal(dim1=-2, dim2=-1).sum(-1)
    if rule == "trace":
        return 1.0 + trace
    if rule == "damped":
        return x_times_a.shape[-1] * (1.0 + trace)
    if rule == "frobenius":  # ||X^1/2 A X^1/2||_F^2 = tr(XAXA) = sum(M o M^T)
        return 1.0 + (x_times_a * x_times_a.mT).sum((-2, -1)).clamp_min(0).sqrt()
    if rule == "schatten":  # (tr (XA)^8)^(1/8), on M / tr(M) so that nothing overflows
        normalised = x_times_a / trace.clamp_min(torch.finfo(trace.dtype).tiny)[:, None, None]
        squared = normalised @ normalised
        fourth = squared @ squared
        eighth = (fourth * fourth.mT).sum((-2, -1)).clamp_min(0)
        return 1.0 + trace * eighth.pow(0.125)
    raise ValueError(f"domination_scale must be one of {DOMINATION_SCALES}, got {rule!r}")


def dominated_downdate(x: torch.Tensor, a: torch.Tensor, rule: str = "trace") -> torch.Tensor:
    """``X - X A X / s`` for every member of a stack, symmetrised (no input is modified).

    >>> import torch
    >>> x, g = torch.eye(2, dtype=torch.float64)[None], torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    >>> new = dominated_downdate(x, (g @ g.T)[None])  # rank 1: exactly (I + g g^T)^-1
    >>> torch.allclose(new[0], torch.linalg.inv(torch.eye(2, dtype=torch.float64) + g @ g.T))
    True
    """
    product = x @ a
    scale = domination_scale(product, rule)
    new = x - (product @ x) / scale[:, None, None]
    return 0.5 * (new + new.mT)


def isotropic_downdate(x: torch.Tensor, amount) -> torch.Tensor:
    """Dominated downdate by ``amount * I``: ``X - c X^2 / (1 + c * bound)`` (``amount``: a float, or
    one per member, ``[N]``).

    ``bound`` is the Gershgorin bound on ``lambda_max(X)`` (largest absolute row sum). It is tight
    when ``X`` is nearly diagonal, which it is in its own eigenbasis, and it is tightest exactly
    for the largest eigenvalues, the ones this damping is there to hold down.
    """
    if isinstance(amount, torch.Tensor):
        amount = amount[:, None, None]
    bound = x.abs().sum(-1).amax(-1)[:, None, None]
    new = x - amount * (x @ x) / (1.0 + amount * bound)
    return 0.5 * (new + new.mT)


def krad_update(x: torch.Tensor, a: torch.Tensor, beta: float, eps: float, rule: str = "trace",
                relative: bool = False) -> torch.Tensor:
    """One statistics step on inverse factors: the AdaGrad sum (``beta = 1``) or an EMA.

    ``beta = 1``: ``X^-1 <- X^-1 + A``, i.e. one dominated downdate by ``A``.
    ``beta < 1``: ``X^-1 <- beta X^-1 + (1 - beta) (A + eps I)``: scale ``X <- X / beta``, downdate
    by ``(1 - beta) A``, then by ``(1 - beta) eps I``. Design decision: the last, damping term is
    not in the paper's recipe (docs/algorithms.md §4). Without it the damping decays like
    ``beta^t eps`` and ``X`` grows like ``beta^-t / eps`` along directions the gradients leave
    empty, which overflows fp32
    within a few thousand steps for beta = 0.95 (tests/test_kradagrad.py shows it). With it
    ``X`` stays below ``I / eps`` and tends to ``(eps I + L_ema)^-1``.

    ``relative=True``: the damping is ``eps tr(L) / d``, scale invariant: each step adds
    ``A + eps tr(A) / d I`` (weighted as ``A``), the isotropic part as a second downdate (per member).
    """
    weight = 1.0 if beta == 1.0 else 1.0 - beta
    if relative:
        damping = weight * eps * a.diagonal(dim1=-2, dim2=-1).sum(-1) / a.shape[-1]
        x = dominated_downdate(x if beta == 1.0 else x / beta, weight * a, rule)
        return isotropic_downdate(x, damping)
    if beta == 1.0:
        return dominated_downdate(x, a, rule)
    x = dominated_downdate(x / beta, (1.0 - beta) * a, rule)
    return isotropic_downdate(x, (1.0 - beta) * eps) if eps > 0 else x


def exact_from_isotropic(factor: torch.Tensor, eps: float, weight: float, relative: bool = False):
    """The first update from ``X_0 = I / eps``, exactly: ``X_1 = (eps I + weight A)^-1 = V diag(x) V^T``
    for ``A = F F^T`` given by its factor ``F`` (``[N, d, n]``, e.g. the unfolded gradient).

    Returns ``(V, x, ok)`` with ``x`` descending (the order a refresh sorts by) and ``ok`` the
    members whose decomposition succeeded. This is where a dominated downdate is at its worst
    (``XA`` has eigenvalues up to ``a / eps``, so ``s = 1 + tr(XA)`` shrinks ``X`` by only about
    ``1 - 1/rank(A)`` and the first steps would be ~``eps^-1/2`` too long), and it costs one
    decomposition, which the first refresh pays anyway. It is an SVD of ``F``, not an eigh of
    ``F F^T``: forming ``A`` squares the condition number, and in fp32 a statistic with condition
    beyond ~1e7 loses its small eigenvalues, the very directions ``X`` must get right (measured in
    scripts/illconditioned.py). The reciprocals are of ``eps + weight a >= eps``: bounded.
    ``relative=True`` uses ``weight eps tr(A) / d`` as the damping; a member with ``A = 0`` has no
    scale and is reported not ``ok`` (the caller keeps its fallback).

    >>> import torch
    >>> f = torch.tensor([[[1.0, 1.0], [1.0, -1.0]]], dtype=torch.float64)  # A = F F^T = 2 I
    >>> vectors, x, ok = exact_from_isotropic(f, eps=1.0, weight=1.0)
    >>> torch.allclose(vectors @ torch.diag_embed(x) @ vectors.mT, torch.eye(2, dtype=torch.float64) / 3)
    True
    >>> f = torch.tensor([[[3.0], [0.0]]], dtype=torch.float64)  # rank 1: A = diag(9, 0)
    >>> [round(value, 12) for value in exact_from_isotropic(f, eps=1.0, weight=1.0)[1][0].tolist()]
    [1.0, 0.1]
    """
    count, size, columns = factor.shape
    try:
        vectors, singular, _ = torch.linalg.svd(factor, full_matrices=size > columns)
        ok = torch.isfinite(vectors).flatten(1).all(1) & torch.isfinite(singular).all(1)
    except RuntimeError:  # a non-finite factor can make LAPACK fail outright
        vectors = torch.eye(size, dtype=factor.dtype, device=factor.device).expand(count, size, size)
        singular = torch.zeros(count, min(size, columns), dtype=factor.dtype, device=factor.device)
        ok = torch.zeros(count, dtype=torch.bool, device=factor.device)
    values = torch.zeros(count, size, dtype=factor.dtype, device=factor.device)
    values[:, : singular.shape[1]] = torch.where(torch.isfinite(singular), singular, 0.0).square()
    if relative:
        damping = (weight * eps / size) * values.sum(-1, keepdim=True)
        ok = ok & (damping[:, 0] > 0)
        damping = torch.where(damping > 0, damping, 1.0)
    else:
        damping = eps
    # singular values come descending; X = (eps + weight a)^-1 is descending when a is ascending
    return vectors.flip(-1), 1.0 / (damping + weight * values.flip(-1)), ok


def positive_definite(x: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool mask: finite and numerically positive definite (a Cholesky succeeds).

    Batched and on the device: no host synchronisation. Non-finite members are replaced by the
    identity before the factorisation so LAPACK never sees a NaN.
    """
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    safe = torch.where(finite[:, None, None], x, eye)
    return finite & (torch.linalg.cholesky_ex(safe).info == 0)
