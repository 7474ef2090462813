"""Eigenbasis solvers for stacks of symmetric PSD factors, with a fallback chain that never crashes.

Two ways to refresh a basis (ALGORITHMS.md §3):

* ``eigh``: exact, eigenpairs sorted by descending eigenvalue.
* warm-started QR: sort the current basis by its estimated eigenvalues ``diag(Q^T L Q)`` and take
  one power step ``Q <- orth(L Q)``. The sort is what makes a step never increase the staleness.
  ``orth`` is Householder QR, or Cholesky-QR2 (two rounds of ``R = chol(Y^T Y); Y <- Y R^-1``),
  which is mostly matmuls and much faster on a GPU; members whose Cholesky fails fall back to
  Householder.

Failure handling: a batched call that raises or returns non-finite values is retried member by
member with growing diagonal damping, then in fp64; a member that still fails keeps its old basis
and is reported in the returned ``ok`` mask so the caller can count it.
"""

from __future__ import annotations

from typing import Callable

import torch

DAMPING_STEPS = (1e-6, 1e-4)
Orthonormalizer = Callable[[torch.Tensor], torch.Tensor]


def _finite_per_member(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).flatten(1).all(dim=1)


def _sorted_eigh(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    order = eigenvalues.argsort(dim=-1, descending=True)
    return torch.gather(vectors, -1, order.unsqueeze(-2).expand_as(vectors))


def _damped(matrix: torch.Tensor, relative: float) -> torch.Tensor:
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return matrix + relative * scale[:, None, None] * eye


def _eigh_one(matrix: torch.Tensor) -> torch.Tensor | None:
    """One ``[d, d]`` matrix through the fallback chain; ``None`` if everything failed."""
    attempts = [(matrix, 0.0)] + [(matrix, d) for d in DAMPING_STEPS] + [(matrix.double(), DAMPING_STEPS[-1])]
    for candidate, damping in attempts:
        try:
            damped = _damped(candidate[None], damping) if damping else candidate[None]
            vectors = _sorted_eigh(damped)[0].to(matrix.dtype)
        except RuntimeError:
            continue
        if torch.isfinite(vectors).all():
            return vectors
    return None


def eigh_basis(factor: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact eigenbases of a ``[N, d, d]`` stack; failed members get ``fallback`` (their old basis).

    Returns ``(bases, ok)`` with ``ok`` a ``[N]`` bool mask of members that succeeded.
    """
    symmetric = 0.5 * (factor + factor.mT)
    try:
        vectors = _sorted_eigh(symmetric)
        ok = _finite_per_member(vectors) & _finite_per_member(symmetric)
        if bool(ok.all()):
            return vectors, ok
    except RuntimeError:
        pass
    return _member_by_member(symmetric, fallback)


def _member_by_member(symmetric: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    results, ok = [], []
    for matrix, old in zip(symmetric, fallback):
        vectors = _eigh_one(matrix) if torch.isfinite(matrix).all() else None
        ok.append(vectors is not None)
        results.append(old if vectors is None else vectors)
    return torch.stack(results), torch.tensor(ok, device=symmetric.device)


def householder_orth(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal factor of a QR decomposition, signs fixed so ``diag(R) >= 0`` (deterministic)."""
    q, r = torch.linalg.qr(y)
    signs = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    return q * torch.where(signs == 0, 1.0, signs).unsqueeze(-2)


def cholesky_qr2_orth(y: torch.Tensor) -> torch.Tensor:
    """Cholesky-QR2: two Gram-Cholesky rounds; members whose Cholesky fails use Householder."""
    q = y
    failed = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    for _ in range(2):
        upper, info = torch.linalg.cholesky_ex(q.mT @ q, upper=True)
        failed |= info != 0
        q = torch.linalg.solve_triangular(upper, q, upper=True, left=False)
    failed |= ~_finite_per_member(q)
    if bool(failed.any()):
        q = q.clone()
        q[failed] = householder_orth(y[failed])
    return q


ORTHONORMALIZERS: dict[str, Orthonormalizer] = {
    "householder": householder_orth,
    "cholesky_qr2": cholesky_qr2_orth,
}


def sort_by_estimated_eigenvalues(basis: torch.Tensor, stats: torch.Tensor):
    """Order basis columns by ``diag(B)`` descending; returns ``(basis, stats, order)``."""
    order = stats.diagonal(dim1=-2, dim2=-1).argsort(dim=-1, descending=True)
    basis = torch.gather(basis, -1, order.unsqueeze(-2).expand_as(basis))
    rows = torch.gather(stats, -2, order.unsqueeze(-1).expand_as(stats))
    stats = torch.gather(rows, -1, order.unsqueeze(-2).expand_as(stats))
    return basis, stats, order


def warm_qr_basis(
    basis: torch.Tensor, stats: torch.Tensor, orth: Orthonormalizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """One power step from a *sorted* basis: ``orth(L Q)`` with ``L Q = Q B``.

    Returns ``(new_basis, ok)``; members with a non-finite result keep ``basis``.
    """
    try:
        new_basis = orth(basis @ stats)
    except RuntimeError:
        new_basis = torch.full_like(basis, float("nan"))
    ok = _finite_per_member(new_basis)
    if not bool(ok.all()):
        new_basis = torch.where(ok[:, None, None], new_basis, basis)
    return new_basis, ok
