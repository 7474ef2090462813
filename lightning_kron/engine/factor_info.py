"""A read-only snapshot of one Kronecker factor's health, for schedulers, loggers and users."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FactorInfo:
    """Telemetry of one factor (one dim of one block of one parameter).

    ``name`` is stable and readable, e.g. ``blocks.3.mlp.c_fc.weight[L]``; ``staleness`` is the
    criterion ``e(Q, L)`` after the last step (0 = the basis diagonalises the factor exactly).
    """

    name: str
    parameter: str
    dim: int
    size: int
    staleness: float
    steps_since_refresh: int
    refreshes: int
    failures: int
    refresh_seconds: float
