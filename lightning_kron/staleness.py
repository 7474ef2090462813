"""The staleness criterion of an eigenbasis (ALGORITHMS.md §3, Purifying Shampoo).

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
