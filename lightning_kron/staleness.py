"""The staleness criterion of an eigenbasis (ALGORITHMS.md §3, Purifying Shampoo).

Factors are stored in their own eigenbasis, ``B = Q^T L Q``, so the criterion
``e(Q, L) = ||B - Diag(B)||_F / ||B||_F`` needs no matmul: it is an elementwise pass over B.
It is 0 when Q diagonalises L exactly and grows as L drifts away from the basis.
"""

from __future__ import annotations

import torch


def staleness(stats: torch.Tensor) -> torch.Tensor:
    """Relative off-diagonal Frobenius mass of each ``[d, d]`` matrix in a ``[N, d, d]`` stack.

    The off-diagonal part is formed explicitly rather than as ``||B||^2 - ||diag B||^2``: the
    subtraction cancels catastrophically in fp32 exactly when the basis is fresh (e ~ 1e-3), which
    is the regime a tolerance of 0.01 has to resolve.
    """
    diagonal = torch.diag_embed(stats.diagonal(dim1=-2, dim2=-1))
    off_diagonal = torch.linalg.matrix_norm(stats - diagonal)
    total = torch.linalg.matrix_norm(stats)
    return torch.where(total > 0, off_diagonal / total.clamp_min(torch.finfo(stats.dtype).tiny), 0.0)
