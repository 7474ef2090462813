"""Batched mode products: rotating stacked blocks into and out of their Kronecker eigenbases.

A stack ``x`` has shape ``[N, d_1, ..., d_k]`` (N blocks of one shape); ``bases[i]`` is
``[N, d_i, d_i]`` or ``None`` (dim left unrotated). ``rotate_in`` computes
``x x_1 Q_1^T ... x_k Q_k^T`` and ``rotate_out`` computes ``x x_1 Q_1 ... x_k Q_k``, one ``bmm``
per factored dim for the whole stack. Each round contracts the leading block dim and moves it to
the back, so after k rounds the dims are in their original order again without any permute.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

Bases = Sequence[Optional[torch.Tensor]]
BatchedMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # torch.bmm, or an emulation of TF32


def _apply(x: torch.Tensor, bases: Bases, transpose_basis: bool, bmm: BatchedMatmul = torch.bmm) -> torch.Tensor:
    if all(basis is None for basis in bases):
        return x
    count, dims = x.shape[0], x.shape[1:]
    for basis, size in zip(bases, dims):
        x = x.reshape(count, size, -1).transpose(1, 2)
        if basis is not None:
            x = bmm(x, basis.mT if transpose_basis else basis)
    return x.reshape(count, *dims)


def rotate_in(x: torch.Tensor, bases: Bases) -> torch.Tensor:
    """Coordinates of ``x`` in the eigenbases: ``x x_i Q_i^T`` for every factored dim."""
    return _apply(x, bases, transpose_basis=False)


def rotate_out(x: torch.Tensor, bases: Bases, bmm: BatchedMatmul = torch.bmm) -> torch.Tensor:
    """Back to parameter coordinates: ``x x_i Q_i`` for every factored dim (``bmm``: e.g. an
    emulation of TF32 tensor cores)."""
    return _apply(x, bases, transpose_basis=True, bmm=bmm)


def rotate_mode(x: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """``x x_dim matrix`` for one block dim: ``matrix`` is ``[N, d, d]`` and acts on that axis."""
    moved = x.movedim(dim + 1, 1)
    product = torch.bmm(matrix, moved.reshape(x.shape[0], x.shape[dim + 1], -1))
    return product.reshape(moved.shape).movedim(1, dim + 1)


def unfold(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mode-``dim`` unfolding of every block: ``[N, d_dim, prod(other dims)]``."""
    return x.movedim(dim + 1, 1).reshape(x.shape[0], x.shape[dim + 1], -1)


def permute_mode(x: torch.Tensor, dim: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder axis ``dim`` of every block by its own permutation (``order`` is ``[N, d]``)."""
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim + 1] = order.shape[1]
    index = order.reshape(shape).expand_as(x)
    return torch.gather(x, dim + 1, index)
