"""The staleness criterion of an eigenbasis (docs/algorithms.md §3, Purifying Shampoo).

Factors are stored in their own eigenbasis, ``B = Q^T L Q``, so the criterion
``e(Q, L) = ||B - Diag(B)||_F / ||B||_F`` needs no matmul: it is an elementwise pass over B.
It is 0 when Q diagonalises L exactly and grows as L drifts away from the basis.
"""

from __future__ import annotations

import math

import torch


def staleness(stats: torch.Tensor) -> torch.Tensor:
    """Relative off-diagonal Frobenius mass of each ``[d, d]`` matrix in a ``[N, d, d]`` stack.

    B is symmetric, so its off-diagonal norm is ``sqrt(2)`` times that of its strict upper
    triangle, reduced on its own, and ``||B||`` is its ``hypot`` with the diagonal's norm. The
    shortcut ``sqrt(||B||^2 - ||diag B||^2)`` cancels catastrophically in fp32: the diagonal
    dominates the sum, and the many small off-diagonal squares vanish in its round-off, so a factor
    of d = 2048 at e = 0.05 read 0.011, and an exactly diagonal one 1.5e-3. Reduced on its own,
    ``e`` is accurate to the reduction's relative round-off at any e, in a few kernels per stack.

    The norms square B's entries, so a factor whose statistics pass the square root of their
    dtype's range (1.8e19 in fp32, after a gradient spike) reads NaN until they decay below it.
    Scaling B first would avoid that, but it cost 25% more kernels and 12% more memory traffic
    in every step of an adaptive policy (``scripts/count_ops.py``, gpt-mini), for a case the
    NaN guard's overflow test bounds: statistics themselves never overflow.
    """
    off_diagonal = torch.linalg.vector_norm(stats.triu(1), dim=(-2, -1)).mul_(math.sqrt(2.0))
    total = torch.hypot(off_diagonal, torch.linalg.vector_norm(stats.diagonal(dim1=-2, dim2=-1), dim=-1))
    return _ratio_or_nan(off_diagonal, total)


def inverse_factor_staleness(stats: torch.Tensor) -> torch.Tensor:
    """``e(Q, L)`` estimated from ``B = Q^T X Q`` with ``X ~ L^-1`` (KrADagrad's inverse factors).

    ``staleness(B)`` of an inverse factor would be dominated by X's largest eigenvalues, which are
    L's *smallest*: the damped, near-empty directions the preconditioner cares least about. To first
    order in the off-diagonal part ``O`` of ``B = D + O``, ``B^-1 = D^-1 - D^-1 O D^-1``, so the
    staleness of ``L`` in the same basis is computed from ``O_ij / (d_i d_j)`` and ``1 / d_i``
    elementwise, with no inverse: a tolerance then means the same for KrADagrad as for Shampoo/SOAP.
    The first-order estimate is exact in the limit that matters (a fresh basis, e -> 0).

    >>> import torch
    >>> L = torch.tensor([[[4.0, 0.1], [0.1, 1.0]]], dtype=torch.float64)
    >>> exact, estimate = staleness(L), inverse_factor_staleness(torch.linalg.inv(L))
    >>> bool(abs(exact - estimate) < 1e-3 * exact)
    True
    """
    diagonal = stats.diagonal(dim1=-2, dim2=-1)
    reciprocal = 1.0 / diagonal.clamp_min(torch.finfo(stats.dtype).tiny)
    off_diagonal = (stats - torch.diag_embed(diagonal)) * reciprocal[..., :, None] * reciprocal[..., None, :]
    off = torch.linalg.matrix_norm(off_diagonal)
    total = torch.sqrt(off.square() + reciprocal.square().sum(-1))
    return _ratio_or_nan(off, total)


def _ratio_or_nan(off_diagonal: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``off / total``; 0 where ``total`` is 0, NaN where it is not finite (an overflowed factor
    must not read as perfectly fresh: NaN is above no tolerance, so no tolerance-based policy
    refreshes it, the budgets rank it last, and it shows in the logged staleness)."""
    ratio = torch.where(total > 0, off_diagonal / total, 0.0)
    return torch.where(torch.isfinite(total), ratio, torch.nan)
