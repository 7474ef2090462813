"""Keeping buffers that live in the eigenbasis consistent when the basis changes.

A buffer stored in rotated coordinates (SOAP's first moment ``M'`` and second moment ``V``) is
only meaningful together with the basis it was accumulated in. When a refresh changes the basis by
``P = Q_old^T Q_new``, the first moment is re-expressed exactly (``M' <- M' x_i P^T``); the second
moment is carried over approximately with the squared rotation (``"rotate"``,
``V <- V x_i (P^T o P^T)``, which keeps it non-negative), or by position, following the eigenvalue
ranking of old and new columns (``"keep"``: the default of SOAP and EShampoo, and the SOAP
reference's choice).
"""

from __future__ import annotations

from typing import Optional

import torch

from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.mode_products import permute_mode


def permute_buffer(group: FactorGroup, key: str, rows: Optional[torch.Tensor], dim: int, order: torch.Tensor) -> None:
    buffer = group.tensors[key]
    group.write_rows(buffer, rows, permute_mode(group.read_rows(buffer, rows), dim, order))


def rotate_buffer(group: FactorGroup, key: str, rows: Optional[torch.Tensor], dim: int, matrix: torch.Tensor) -> None:
    """``buffer x_dim matrix`` for the selected members."""
    buffer = group.tensors[key]
    group.write_rows(buffer, rows, group.mode_product(group.read_rows(buffer, rows), dim, matrix))
