"""The scalar telemetry ``KronCallback`` logs, computed without Lightning.

Names are hierarchical and stable, ``kron/<what>/<factor or block>``; factor names come from
``optimizer.factor_names()`` (e.g. ``layer.0.weight[L]``) and block names from
``optimizer.block_name`` (the parameter name, ``.block{b}`` when it was split). The metric
table of docs/callback.md documents every name built here.

Eigenvalue mis-scaling (per block of an eigenvalue-corrected optimizer): Shampoo's implicit second
moment in the Kronecker eigenbasis is the outer product of the factor eigenvalues,
``S = diag(B_1) o ... o diag(B_k)``; the corrected one is Adam's ``V`` there (docs/algorithms.md §2).
Both are normalised to unit sum (they estimate the same ``E||G||^2`` up to the EMA windows and bias
corrections, which the normalisation removes) and compared as ``||S - V||_F / ||V||_F``: 0 when the
gradient covariance is a Kronecker product, large when Shampoo's eigenvalues are mis-scaled.

>>> import torch
>>> from lightning_kron import SOAP
>>> model = torch.nn.Linear(5, 3, bias=False)
>>> optimizer = SOAP(model.named_parameters())
>>> u, v = torch.randn(3, 1), torch.randn(1, 5)
>>> model.weight.grad = u @ v; optimizer.step()  # a rank-1 gradient has Kronecker covariance
>>> round(eigenvalue_misscaling(optimizer)["kron/misscaling/weight"], 4)
0.0
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Sequence

import torch

from lightning_kron.engine.factor_info import FactorInfo
from lightning_kron.scheduling.scheduler import RefreshCounters

PREFIX = "kron"


@dataclass(frozen=True)
class ModelTelemetry:
    """What one log reads from the optimizer and its scheduler: per-factor infos, per-block
    mis-scaling, the refresh counters and the budget's queue length."""

    infos: list[FactorInfo]
    misscaling: dict[str, float]
    counters: RefreshCounters
    deferred: int

    @classmethod
    def combine(cls, parts: Sequence["ModelTelemetry"]) -> "ModelTelemetry":
        """The whole model from every FSDP2 rank's part: its factors (names carry the shard, so they
        do not collide), and the refresh work summed over ranks."""
        counters = RefreshCounters(
            checks=parts[0].counters.checks,  # every rank checks at the same steps
            refreshes=sum(part.counters.refreshes for part in parts),
            seconds=sum(part.counters.seconds for part in parts),
        )
        misscaling = {key: value for part in parts for key, value in part.misscaling.items()}
        return cls([info for part in parts for info in part.infos], misscaling, counters,
                   sum(part.deferred for part in parts))


def factor_metrics(infos: Sequence[FactorInfo]) -> dict[str, float]:
    """Per factor: staleness, steps since its last refresh, refresh and failure counts."""
    metrics: dict[str, float] = {}
    for info in infos:
        metrics[f"{PREFIX}/staleness/{info.name}"] = info.staleness
        metrics[f"{PREFIX}/steps_since_refresh/{info.name}"] = float(info.steps_since_refresh)
        metrics[f"{PREFIX}/refreshes/{info.name}"] = float(info.refreshes)
        metrics[f"{PREFIX}/failures/{info.name}"] = float(info.failures)
    return metrics


def summary_metrics(infos: Sequence[FactorInfo], skipped_steps: int) -> dict[str, float]:
    """Across factors: how many, mean and max staleness, total solver failures, skipped steps."""
    values = [info.staleness for info in infos] or [0.0]
    return {
        f"{PREFIX}/summary/factors": float(len(infos)),
        f"{PREFIX}/summary/staleness_mean": sum(values) / len(values),
        f"{PREFIX}/summary/staleness_max": math.nan if any(math.isnan(v) for v in values) else max(values),
        f"{PREFIX}/summary/failures": float(sum(info.failures for info in infos)),
        f"{PREFIX}/summary/skipped_steps": float(skipped_steps),
    }


def refresh_metrics(now: RefreshCounters, before: RefreshCounters, steps: int, factor_count: int,
                    tolerance: float, deferred: int) -> dict[str, float]:
    """The scheduler's work in the window since ``before`` (``steps`` optimizer steps) and in total.

    ``saved_vs_fixed`` compares with the equivalent fixed frequency: refreshing every factor at
    every check step (what ``tolerance=0`` would do with the same ``check_every``).
    """
    count = now.refreshes - before.refreshes
    return {
        f"{PREFIX}/refresh/count": float(count),
        f"{PREFIX}/refresh/fraction": count / (steps * factor_count) if steps and factor_count else 0.0,
        f"{PREFIX}/refresh/seconds": now.seconds - before.seconds,
        f"{PREFIX}/refresh/total": float(now.refreshes),
        f"{PREFIX}/refresh/saved_vs_fixed": float(now.checks * factor_count - now.refreshes),
        f"{PREFIX}/refresh/deferred": float(deferred),
        f"{PREFIX}/refresh/tolerance": float(tolerance),
    }


def rank_metrics(per_rank: Sequence[Sequence[float]]) -> dict[str, float]:
    """Each rank's own refresh work: ``per_rank[r] = (factors computed, seconds)``."""
    metrics = {}
    for rank, (computed, seconds) in enumerate(per_rank):
        metrics[f"{PREFIX}/distributed/rank_{rank}/refreshes_computed"] = float(computed)
        metrics[f"{PREFIX}/distributed/rank_{rank}/refresh_seconds"] = float(seconds)
    return metrics


def eigenvalue_misscaling(optimizer) -> dict[str, float]:
    """``kron/misscaling/<block>`` for every fully factored block with an eigenbasis second moment
    (SOAP, EShampoo); empty for methods without one (Shampoo, KrADagrad). See the module docstring."""
    metrics: dict[str, float] = {}
    for group in optimizer.factor_groups():
        if "exp_avg_sq" not in group.tensors or not all(group.factored):
            continue
        eigenvalues = [group.stats(dim).diagonal(dim1=-2, dim2=-1) for dim in range(group.order)]
        shampoo = _normalised(_outer_product(eigenvalues))
        corrected = _normalised(group.tensors["exp_avg_sq"].flatten(1))
        difference = torch.linalg.vector_norm(shampoo - corrected, dim=1)
        error = difference / torch.linalg.vector_norm(corrected, dim=1).clamp_min(1e-30)
        valid = corrected.sum(dim=1) > 0
        for member, value, ok in zip(group.members, error.tolist(), valid.tolist()):
            if ok:
                metrics[f"{PREFIX}/misscaling/{optimizer.block_name(member)}"] = value
    return metrics


def _outer_product(diagonals: list[torch.Tensor]) -> torch.Tensor:
    """``[N, d_1 * ... * d_k]``: per member, the row-major flattening of ``d_1 o ... o d_k``."""
    product = diagonals[0].clamp_min(0)
    for diagonal in diagonals[1:]:
        product = (product[:, :, None] * diagonal.clamp_min(0)[:, None, :]).flatten(1)
    return product


def _normalised(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.sum(dim=1, keepdim=True).clamp_min(1e-30)
