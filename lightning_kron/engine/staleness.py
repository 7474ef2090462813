"""The staleness criterion of an eigenbasis (docs/algorithms.md §3, Purifying Shampoo).

Factors are stored in their own eigenbasis, ``B = Q^T L Q``, so the criterion
``e(Q, L) = ||B - Diag(B)||_F / ||B||_F`` needs no matmul: it is an elementwise pass over B.
It is 0 when Q diagonalises L exactly and grows as L drifts away from the basis.
"""

from __future__ import annotations

import torch


def staleness(stats: torch.Tensor) -> torch.Tensor:
    """Relative off-diagonal Frobenius mass of each ``[d, d]`` matrix in a ``[N, d, d]`` stack.

    Computed as ``sqrt(||B||^2 - ||diag B||^2) / ||B||`` from two reductions (no d x d temporary:
    this runs every step). The subtraction is done in fp64 on the reduced norms, so in fp32 the
    result is accurate to about ``1e-7 / e`` absolute: 1e-5 at e = 0.01, ample for tolerances of
    0.005 and up.
    """
    total = torch.linalg.matrix_norm(stats).double()
    diagonal = torch.linalg.vector_norm(stats.diagonal(dim1=-2, dim2=-1), dim=-1).double()
    off_diagonal = (total.square() - diagonal.square()).clamp_min(0).sqrt()
    ratio = torch.where(total > 0, off_diagonal / total.clamp_min(1e-300), 0.0)
    return ratio.to(stats.dtype)


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
    return torch.where(total > 0, off / total.clamp_min(torch.finfo(stats.dtype).tiny), 0.0)
