"""The owner interface of :class:`~lightning_kron.methods.kron_optimizer.KronOptimizer`: what the
code around an optimizer reads from it and asks of it.

An owner (``KronCallback``, a :class:`~lightning_kron.scheduling.scheduler.RefreshScheduler`, the
DDP ownership of ``scheduling/ownership.py``, or user code) needs readable factor names, per-factor
telemetry and a way to refresh chosen factors now, by name or by stack rows. None of it is part of
a step, so it lives here, apart from the step skeleton, as a mixin of ``KronOptimizer``: it relies
on the optimizer's ``factor_groups()``, ``update_staleness()``, ``global_step``, ``shard_layout``,
``solver``, ``shifted_qr_refresh``, ``_orthonormalizer_for``, its stacks ``_groups``, its parameter
names ``_names``, and on the optimizer being the refresh's basis-change hooks itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable, Optional

import torch

from lightning_kron.engine.basis_refresh import SOLVERS, RefreshRequest, refresh_factor
from lightning_kron.engine.blocking import factor_label
from lightning_kron.engine.factor_group import TELEMETRY_KEYS, FactorGroup, Member
from lightning_kron.engine.factor_info import FactorInfo
from lightning_kron.engine.precision import cuda_matmul_precision
from lightning_kron.engine.solvers import FALLBACK
from lightning_kron.engine.validation import check_choice, check_positive_int, check_unit_interval


def _plain(value):
    """A one-element tensor as the number it holds (a tolerance computed on the device)."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


#: what ``kron_optimizer._split_named`` calls an unnamed parameter (``adopt_names`` replaces these)
GENERATED_NAME = re.compile(r"group\d+\.param\d+")


@dataclass(frozen=True)
class PendingFallback:
    """Members of one refreshed stack and dim, and which of them the orthonormalizer solved (a
    device bool per row): the others kept their basis until :meth:`OwnerInterface.refresh_fallbacks`."""

    group: FactorGroup
    dim: int
    rows: list[int]
    succeeded: torch.Tensor
    request: RefreshRequest


class OwnerInterface:
    """Factor names, telemetry and refreshes on request (see the module docstring)."""

    def _factor_index(self) -> list[tuple[str, FactorGroup, int, int]]:
        index = []
        for group in self.factor_groups():
            for row, member in enumerate(group.members):
                prefix = self.block_name(member)
                for dim in group.factored_dims:
                    index.append((f"{prefix}[{factor_label(dim, group.order)}]", group, row, dim))
        return index

    def block_name(self, member: Member) -> str:
        """Readable name of one block: the parameter's name, plus ``.shard{r}`` for rank ``r``'s rows
        under FSDP2 and ``.block{b}`` when it was split.

        Factor names are this plus ``[L]``/``[R]``/``[i]``; per-block telemetry (the approximation
        probe, eigenvalue mis-scaling) uses it alone. Names are unique over all ranks.
        """
        name = member.name if self.shard_layout is None else self.shard_layout.shard_name(member.name)
        split = member.block.shape != member.view_shape
        return f"{name}.block{member.block_number}" if split else name

    def adopt_names(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Name parameters that were passed without names (e.g. ``model.parameters()``).

        Lets an owner that knows the module (``KronCallback``) make telemetry readable for an
        optimizer the user built from bare tensors. Names given at construction are kept.
        """
        for name, param in named_parameters:
            if GENERATED_NAME.fullmatch(self._names.get(id(param), "")):
                self._names[id(param)] = name
        for group in self._groups or []:
            group.members = [replace(member, name=self._names[id(member.param)]) for member in group.members]

    def factor_names(self) -> list[str]:
        """Stable, readable names of every Kronecker factor, e.g. ``h.0.mlp.c_fc.weight[L]``."""
        return [name for name, *_ in self._factor_index()]

    def factors(self) -> list[FactorInfo]:
        """Telemetry of every factor; one host transfer per telemetry tensor, none per factor."""
        self.update_staleness()
        host = {id(group): {key: group.tensors_on_host(key) for key in TELEMETRY_KEYS} for group in self.factor_groups()}
        infos = []
        for name, group, row, dim in self._factor_index():
            values = {key: host[id(group)][key][dim][row] for key in TELEMETRY_KEYS}
            infos.append(FactorInfo(
                name=name, parameter=group.members[row].name, dim=dim, size=group.shape[dim],
                staleness=float(values["staleness"]),
                steps_since_refresh=self.global_step - int(values["last_refresh"]),
                refreshes=int(values["refreshes"]), failures=int(values["failures"]),
                refresh_seconds=float(values["refresh_seconds"]),
            ))
        return infos

    def stale_factors(self, tolerance: float) -> list[str]:
        """Names of factors whose staleness after the last step exceeds ``tolerance``."""
        tolerance = check_unit_interval("tolerance", _plain(tolerance), closed_right=True)
        return [info.name for info in self.factors() if info.staleness > tolerance]

    def refresh_factors(self, names: Optional[Iterable[str]] = None, *, tolerance: float = 0.0,
                        max_iters: int = 1, solver: Optional[str] = None) -> int:
        """Refresh the named factors now (all when ``names`` is None); returns how many.

        For code that refreshes on its own terms; the :attr:`scheduler` keeps deciding as well.
        """
        tolerance = check_unit_interval("tolerance", _plain(tolerance), closed_right=True)
        check_positive_int("max_iters", max_iters)
        if solver is not None:
            check_choice("solver", solver, SOLVERS)
        if isinstance(names, str):  # set("a.weight[L]") would be its characters
            raise TypeError(f"names must be a list of factor names, not one string; use [{names!r}]")
        wanted = None if names is None else set(names)
        index = self._factor_index()
        if wanted is not None and (unknown := wanted - {name for name, *_ in index}):
            raise KeyError(f"unknown factor names: {sorted(unknown)[:5]}")
        selected: dict[tuple[int, int], list[int]] = {}
        groups = {}
        for name, group, row, dim in index:
            if wanted is None or name in wanted:
                selected.setdefault((id(group), dim), []).append(row)
                groups[id(group)] = group
        fallbacks = [self.refresh_rows(groups[group_id], dim, rows, tolerance=tolerance, max_iters=max_iters,
                                       solver=solver, defer_fallback=True) for (group_id, dim), rows in selected.items()]
        self.refresh_fallbacks(fallbacks)
        return sum(len(rows) for rows in selected.values())

    def refresh_rows(self, group: FactorGroup, dim: int, rows: list[int], *, tolerance: float = 0.0,
                     max_iters: int = 1, solver: Optional[str] = None,
                     reorthonormalize: Optional[list[bool]] = None, orthonormalizer: Optional[str] = None,
                     defer_fallback: bool = False, retry: bool = False) -> Optional["PendingFallback"]:
        """Refresh factor ``dim`` of the members ``rows`` of one of :meth:`factor_groups`.

        The index-based form of :meth:`refresh_factors`, for owners that decide on the stacked
        staleness tensors directly (no name lookup per step) and then move the refreshed rows
        themselves (``lightning_kron.scheduling.ownership``). ``reorthonormalize``: which of
        ``rows`` are due for re-orthonormalisation, when the owner already read it (else one host
        read). With Cholesky-QR the members it could not orthonormalise are refreshed again with
        Householder (:meth:`refresh_fallbacks`, one host read); ``defer_fallback`` returns them
        instead, so that a caller refreshing many stacks reads all their failures at once.
        ``retry``: that second attempt, counted as the same refresh.
        """
        request = RefreshRequest(solver=solver or self.solver, tolerance=tolerance, max_iters=max_iters,
                                 orthonormalizer=orthonormalizer or self._orthonormalizer_for(group.device),
                                 shift=self.shifted_qr_refresh, retry=retry)
        with cuda_matmul_precision("ieee", group.device.type == "cuda"):
            succeeded = refresh_factor(group, dim, rows, request, self, self.global_step, reorthonormalize)
        if succeeded is None:
            return None
        pending = PendingFallback(group, dim, rows, succeeded, request)
        if defer_fallback:
            return pending
        self.refresh_fallbacks([pending])
        return None

    def refresh_fallbacks(self, pending: Iterable[Optional["PendingFallback"]]) -> int:
        """Refresh again, with the fallback orthonormalizer (Householder), the members of ``pending``
        (from :meth:`refresh_rows`) whose Cholesky-QR failed: one host read of all their flags
        (on a scheduler's refresh step the second and last host sync), nothing for the members that
        succeeded. Returns how many were refreshed again."""
        pending = [item for item in pending if item is not None]
        if not pending:
            return 0
        flags = iter(torch.cat([item.succeeded for item in pending]).tolist())
        count = 0
        for item in pending:
            failed = [row for row in item.rows if not next(flags)]
            if failed:
                self.refresh_rows(item.group, item.dim, failed, tolerance=item.request.tolerance,
                                  max_iters=item.request.max_iters, solver=item.request.solver,
                                  reorthonormalize=[False] * len(failed),
                                  orthonormalizer=FALLBACK[item.request.orthonormalizer], retry=True)
                count += len(failed)
        return count
