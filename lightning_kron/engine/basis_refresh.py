"""Refreshing the eigenbasis of one factor dim for some members of a group.

This is where a basis changes, so it is also where everything expressed in the old basis is told,
through the hooks the caller passes:

* ``permute_rows(order)``: the positional correspondence. New column ``j`` takes over from old
  column ``order[j]`` (both ranked by eigenvalue estimate). Buffers that are carried over by
  position rather than rotated (SOAP's second moment ``V`` under ``"keep"``) follow it.
* ``rotate_rows(rotation)``: the exact change of basis, ``rotation = Q_old^T Q_new`` from the old
  (unsorted) basis, permutation included. Buffers kept in rotated coordinates (SOAP's first moment,
  the gradient of the step in flight) are re-expressed with it.

A warm QR refresh works on B sorted by its diagonal (the sort makes the power step monotone); the
permutation is folded into the rotation, so Q itself is never gathered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional, Protocol, Sequence

import torch

from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.solvers import (
    FALLBACK,
    ORTHONORMALIZERS,
    descending_diagonal_order,
    eigh_in_basis,
    householder_qr,
    qr_step_in_basis,
)
from lightning_kron.engine.staleness import staleness

SOLVERS = ("qr", "eigh")
REORTHONORMALIZE_EVERY = 32  # refreshes; Q <- Q P accumulates ~eps of orthogonality loss per refresh


class BasisChangeHooks(Protocol):
    def permute_rows(self, group: FactorGroup, rows: Optional[torch.Tensor], dim: int, order: torch.Tensor) -> None: ...

    def rotate_rows(self, group: FactorGroup, rows: Optional[torch.Tensor], dim: int, rotation: torch.Tensor) -> None: ...

    def after_refresh(self, group: FactorGroup, rows: Optional[torch.Tensor], dim: int) -> None: ...

    def factor_staleness(self, stats: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RefreshRequest:
    """How to refresh: ``solver`` is "qr" (warm power step) or "eigh"; QR repeats for each member
    while it is above ``tolerance``, at most ``max_iters`` times. ``shift=False`` declines the QR-step shift
    of an orthonormalizer that has one (Cholesky-QR's,
    :func:`~lightning_kron.engine.solvers.cholesky_qr3_step_shift`): for full-rank factors whose
    small eigenvalues matter most (KrADagrad's inverses). ``retry``: a second attempt, this step,
    at members whose first failed (Cholesky-QR's fallback to Householder), counted as the same
    refresh, so the refresh counter and the re-orthonormalisation clock keyed on it move once."""

    solver: str = "qr"
    orthonormalizer: str = "householder"
    tolerance: float = 0.0
    max_iters: int = 1
    shift: bool = True
    retry: bool = False


def _identity_order(order: torch.Tensor) -> torch.Tensor:
    return torch.arange(order.shape[-1], device=order.device).expand_as(order)


def _eigh(stats: torch.Tensor):
    """Exact: new column j is the j-th largest eigenvector; failed members keep their basis."""
    order = descending_diagonal_order(stats)
    rotation, stats, ok = eigh_in_basis(stats)
    return rotation, stats, ok, torch.where(ok[:, None], order, _identity_order(order))


def _warm_qr(stats: torch.Tensor, request: RefreshRequest, criterion=staleness):
    """Sorted power steps, each member's repeated while it is above tolerance (up to ``max_iters``),
    and the loop stops when none is.

    Per member, so that a member's result does not depend on which others share its batch: with
    the batch repeated while any member was above tolerance, DDP's split of the refreshes between
    owners and FSDP2's between shards changed the bases (by up to 0.1 of the parameters). With
    ``tolerance=0`` every step runs without asking: a member exactly at staleness 0 is diagonal
    already, where one more step is a no-op, so the test would only add a host sync per
    iteration."""
    orth = ORTHONORMALIZERS[request.orthonormalizer]
    if not request.shift:
        orth = replace(orth, shift=None)
    rotation = order = None
    original = stats
    failed = torch.zeros(stats.shape[0], dtype=torch.bool, device=stats.device)
    active = None  # the members still above tolerance after the first step (None: all of them)
    for iteration in range(request.max_iters):
        step_order = descending_diagonal_order(stats)
        step_rotation, stepped, ok = qr_step_in_basis(stats, orth, order=step_order)
        if active is not None:  # a member already below tolerance keeps what it has
            step_rotation = torch.where(active[:, None, None], step_rotation, _eye_like(step_rotation))
            stepped = torch.where(active[:, None, None], stepped, stats)
            step_order = torch.where(active[:, None], step_order, _identity_order(step_order))
            ok = ok | ~active
        stats = stepped
        rotation = step_rotation if rotation is None else rotation @ step_rotation
        order = step_order if order is None else torch.gather(order, -1, step_order)
        failed |= ~ok
        if iteration + 1 == request.max_iters or request.tolerance <= 0:
            continue
        active = criterion(stats) > request.tolerance
        if not bool(active.any()):
            break
    # a member that failed in any iteration keeps its basis: identity rotation, its B, no re-ranking
    # (after one iteration the QR step already returned the identity and the old B for it)
    keep = ~failed
    if request.max_iters > 1:
        rotation = torch.where(keep[:, None, None], rotation, _eye_like(rotation))
        stats = torch.where(keep[:, None, None], stats, original)
    return rotation, stats, keep, torch.where(keep[:, None], order, _identity_order(order))


def _eye_like(stack: torch.Tensor) -> torch.Tensor:
    """The identity of a stack's matrices (broadcast over the stack)."""
    return torch.eye(stack.shape[-1], dtype=stack.dtype, device=stack.device)


def refresh_factor(
    group: FactorGroup,
    dim: int,
    rows: Optional[list[int]],
    request: RefreshRequest,
    hooks: BasisChangeHooks,
    step: int,
    reorthonormalize: Optional[Sequence[bool]] = None,
) -> Optional[torch.Tensor]:
    """Recompute ``basis.dim`` (and re-express ``stats.dim``) for ``rows`` of ``group`` (all when
    None). Members that still hold the identity basis get an exact refresh (eigh), the others the
    requested one: a call mixing both refreshes each kind separately.

    Returns, for an orthonormalizer with a fallback (Cholesky-QR), which of the refreshed members
    succeeded (a bool per row, on the device; the others kept their basis and are counted as
    failures, to be refreshed again with the fallback), else None.

    No host sync when the caller says which rows are due for re-orthonormalisation
    (``reorthonormalize``, one flag per refreshed row, from :func:`reorthonormalization_due`):
    which members start from the identity is known on the host (``Member.refreshed_dims``), and
    members whose warm QR step fails (a non-finite result) keep their basis and are counted as
    failures.
    """
    selected = list(range(len(group))) if rows is None else list(rows)
    fresh = group.identity_rows(dim, selected)
    if fresh and len(fresh) < len(selected):  # e.g. after a skipped first step, refreshed a few at a time
        return _refresh_fresh_and_others(group, dim, selected, fresh, request, hooks, step, reorthonormalize)
    never_refreshed = bool(fresh)  # every selected basis still the identity: start exactly
    started = time.perf_counter()
    rows = None if len(selected) == len(group) else torch.tensor(selected, device=group.device)
    stats = group.read_rows(group.stats(dim), rows)
    if request.solver == "eigh" or never_refreshed:
        rotation, stats, ok, order = _eigh(stats)
    else:
        rotation, stats, ok, order = _warm_qr(stats, request, hooks.factor_staleness)
    hooks.permute_rows(group, rows, dim, order)
    hooks.rotate_rows(group, rows, dim, rotation)
    basis = rotation if never_refreshed else group.read_rows(group.basis(dim), rows) @ rotation
    if reorthonormalize is None:  # one host read, for callers outside the step
        reorthonormalize = reorthonormalization_due(group.read_rows(group.refreshes(dim), rows)).tolist()
    basis = _reorthonormalize(basis, reorthonormalize)
    _store(group, dim, rows, basis, stats, ~ok, step, time.perf_counter() - started, hooks.factor_staleness(stats),
           counted=not request.retry)
    group.mark_refreshed(dim, selected)
    hooks.after_refresh(group, rows, dim)
    exact = request.solver == "eigh" or never_refreshed
    return None if exact or request.orthonormalizer not in FALLBACK else ok


def _refresh_fresh_and_others(group, dim, selected, fresh, request, hooks, step, reorthonormalize):
    """:func:`refresh_factor` of a selection of which only ``fresh`` hold the identity basis: those
    exactly, then the others as requested. Returns the others' success flags (in their order among
    ``selected``), padded with True for the fresh rows, whose exact refresh has no fallback."""
    fresh_set = set(fresh)
    others = [row for row in selected if row not in fresh_set]
    flags = None if reorthonormalize is None else dict(zip(selected, reorthonormalize))
    refresh_factor(group, dim, fresh, request, hooks, step, None if flags is None else [False] * len(fresh))
    ok = refresh_factor(group, dim, others, request, hooks, step, None if flags is None else [flags[row] for row in others])
    if ok is None:
        return None
    by_row = dict(zip(others, ok.unbind(0)))
    true = torch.ones((), dtype=torch.bool, device=ok.device)
    return torch.stack([by_row.get(row, true) for row in selected])


def reorthonormalization_due(refreshes: torch.Tensor) -> torch.Tensor:
    """Which members' next refresh also re-orthonormalises their basis (on the device).

    Every few refreshes of a factor the round-off that ``Q <- Q P`` accumulates is washed out. Keyed
    on the checkpointed refresh counter, so a resumed run re-orthonormalises at the same steps.
    """
    return (refreshes + 1) % REORTHONORMALIZE_EVERY == 0


def _reorthonormalize(basis: torch.Tensor, due: Sequence[bool]) -> torch.Tensor:
    """Householder QR of the due members' bases. The correction is of round-off size, so B and the
    rotated moments need no re-expression."""
    positions = [position for position, flag in enumerate(due) if flag]
    if not positions:
        return basis
    basis = basis.clone()
    index = torch.tensor(positions, device=basis.device)
    basis[index] = householder_qr(basis[index])[0]
    return basis


def _store(group, dim, rows, basis, stats, failed, step, seconds, stale, counted: bool = True) -> None:
    """Write a refresh's results. A failed member keeps the step of its last successful refresh,
    so a policy ranking by age (BudgetRefresh) picks it again first, not last."""
    read, write = group.read_rows, group.write_rows
    write(group.basis(dim), rows, basis)
    write(group.stats(dim), rows, stats)
    write(group.staleness(dim), rows, stale)
    if counted:
        write(group.refreshes(dim), rows, read(group.refreshes(dim), rows) + 1)
    write(group.failures(dim), rows, read(group.failures(dim), rows) + failed.long())
    last = read(group.last_refresh(dim), rows)
    write(group.last_refresh(dim), rows, torch.where(failed, last, torch.full_like(last, step)))
    write(group.refresh_seconds(dim), rows, read(group.refresh_seconds(dim), rows) + seconds / basis.shape[0])
