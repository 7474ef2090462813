"""Refreshing the eigenbasis of one factor dim for some members of a group.

This is where a basis changes, so it is also where everything expressed in the old basis is told:
the caller passes ``on_basis_change`` hooks, and the optimizer moves its rotated-space moments
(``exp_avg``, ``exp_avg_sq``) along. A refresh always starts by sorting the basis by the estimated
eigenvalues ``diag(B)``; the permutation is reported first (moments must be permuted with the
columns) and then each rotation ``P = Q_old^T Q_new``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from lightning_kron.factor_group import FactorGroup
from lightning_kron.solvers import (
    ORTHONORMALIZERS,
    eigh_in_basis,
    householder_qr,
    qr_step_in_basis,
    sort_by_estimated_eigenvalues,
)

SOLVERS = ("qr", "eigh")


class BasisChangeHooks(Protocol):
    def permute_rows(self, group: FactorGroup, rows: Optional[torch.Tensor], dim: int, order: torch.Tensor) -> None: ...

    def rotate_rows(self, group: FactorGroup, rows: Optional[torch.Tensor], dim: int, rotation: torch.Tensor) -> None: ...

    def after_refresh(self, group: FactorGroup, rows: Optional[torch.Tensor], dim: int) -> None: ...

    def factor_staleness(self, stats: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RefreshRequest:
    """How to refresh: ``solver`` is "qr" (warm power step) or "eigh"; QR repeats while any member
    is above ``tolerance``, at most ``max_iters`` times."""

    solver: str = "qr"
    orthonormalizer: str = "householder"
    tolerance: float = 0.0
    max_iters: int = 1


def take(tensor: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The selected members of a stack (all of them when ``rows`` is None)."""
    return tensor if rows is None else tensor.index_select(0, rows)


def put(tensor: torch.Tensor, rows: Optional[torch.Tensor], value: torch.Tensor) -> None:
    """Write ``value`` back into the selected members, in place (state views stay valid)."""
    if rows is None:
        tensor.copy_(value)
    else:
        tensor.index_copy_(0, rows, value)


REORTHONORMALIZE_EVERY = 32  # refreshes; Q <- Q P accumulates ~eps of orthogonality loss per refresh


def _solve(stats: torch.Tensor, request: RefreshRequest):
    if request.solver == "eigh":
        return eigh_in_basis(stats)
    return qr_step_in_basis(stats, ORTHONORMALIZERS[request.orthonormalizer])


def refresh_factor(
    group: FactorGroup,
    dim: int,
    rows: Optional[torch.Tensor],
    request: RefreshRequest,
    hooks: BasisChangeHooks,
    step: int,
) -> None:
    """Recompute ``basis.dim`` (and re-express ``stats.dim``) for ``rows`` of ``group``."""
    started = time.perf_counter()
    basis, stats, order = sort_by_estimated_eigenvalues(take(group.basis(dim), rows), take(group.stats(dim), rows))
    hooks.permute_rows(group, rows, dim, order)
    failed = torch.zeros(basis.shape[0], dtype=torch.bool, device=basis.device)
    iterations = 1 if request.solver == "eigh" else request.max_iters
    for _ in range(iterations):
        rotation, stats, ok = _solve(stats, request)
        hooks.rotate_rows(group, rows, dim, rotation)
        basis, failed = basis @ rotation, failed | ~ok
        if iterations == 1 or not bool((hooks.factor_staleness(stats) > request.tolerance).any()):
            break
    basis = _reorthonormalize_if_due(basis, take(group.tensors[f"refreshes.{dim}"], rows))
    _store(group, dim, rows, basis, stats, failed, step, time.perf_counter() - started, hooks.factor_staleness(stats))
    hooks.after_refresh(group, rows, dim)


def _reorthonormalize_if_due(basis: torch.Tensor, refreshes: torch.Tensor) -> torch.Tensor:
    """Every few refreshes of a factor, wash out the round-off that ``Q <- Q P`` accumulates.

    The correction is of round-off size, so B and the rotated moments need no re-expression. Keyed
    on the checkpointed refresh counter, so a resumed run re-orthonormalises at the same steps.
    """
    due = (refreshes + 1) % REORTHONORMALIZE_EVERY == 0
    if not bool(due.any()):
        return basis
    basis = basis.clone()
    basis[due] = householder_qr(basis[due])[0]
    return basis


def _store(group, dim, rows, basis, stats, failed, step, seconds, stale) -> None:
    put(group.basis(dim), rows, basis)
    put(group.stats(dim), rows, stats)
    put(group.tensors[f"staleness.{dim}"], rows, stale)
    count = basis.shape[0]
    put(group.tensors[f"refreshes.{dim}"], rows, take(group.tensors[f"refreshes.{dim}"], rows) + 1)
    put(group.tensors[f"failures.{dim}"], rows, take(group.tensors[f"failures.{dim}"], rows) + failed.long())
    put(group.tensors[f"last_refresh.{dim}"], rows, torch.full_like(take(group.tensors[f"last_refresh.{dim}"], rows), step))
    seconds_so_far = take(group.tensors[f"refresh_seconds.{dim}"], rows)
    put(group.tensors[f"refresh_seconds.{dim}"], rows, seconds_so_far + seconds / count)
