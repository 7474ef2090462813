"""How a parameter tensor is cut into blocks and which block dims get a Kronecker factor.

Rules (docs/algorithms.md "Notation"): size-1 dims are dropped; with ``merge_dims`` the trailing dims of
a tensor of order > 2 are merged from the right while their product stays <= ``max_precond_dim``
(the leading dim is never merged, so a matrix stays a matrix; a conv weight
``[out, in, kh, kw]`` becomes ``[out, in*kh*kw]``); a dim larger than ``max_precond_dim`` is
either left unrotated (one-sided preconditioning, the default) or, with ``split_large_dims``, cut
into chunks of at most ``max_precond_dim``; 0-D and 1-D tensors get no factor unless
``precondition_1d`` asks for a full d x d one.

>>> plan = plan_blocks((50304, 768), max_precond_dim=4096)
>>> plan.view_shape, plan.blocks[0].factored
((50304, 768), (False, True))
>>> len(plan_blocks((50304, 768), max_precond_dim=4096, split_large_dims=True).blocks)
13
>>> plan_blocks((64, 3, 3, 3), max_precond_dim=1024).view_shape
(64, 27)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """One block of a parameter: where it sits in the parameter's view, and its factored dims."""

    index: tuple[slice, ...]
    shape: tuple[int, ...]
    factored: tuple[bool, ...]


@dataclass(frozen=True)
class BlockPlan:
    """The parameter is viewed as ``view_shape`` and cut into ``blocks``."""

    view_shape: tuple[int, ...]
    blocks: tuple[Block, ...]


def _merge_from_right(shape: tuple[int, ...], limit: int) -> tuple[int, ...]:
    merged: list[int] = []
    for size in reversed(shape):
        if merged and merged[-1] * size <= limit:
            merged[-1] *= size
        else:
            merged.append(size)
    return tuple(reversed(merged))


def _view_shape(shape: tuple[int, ...], max_precond_dim: int, merge_dims: bool) -> tuple[int, ...]:
    kept = tuple(size for size in shape if size != 1)
    if not kept:
        return (1,)
    if merge_dims and len(kept) > 2:  # matrices stay matrices; the leading (output) dim stays its own
        kept = kept[:1] + _merge_from_right(kept[1:], max_precond_dim)
    return kept


def _chunks(size: int, limit: int, split: bool) -> list[slice]:
    if not split or size <= limit:
        return [slice(0, size)]
    return [slice(start, min(start + limit, size)) for start in range(0, size, limit)]


def plan_blocks(
    shape: tuple[int, ...],
    *,
    max_precond_dim: int,
    merge_dims: bool = True,
    split_large_dims: bool = False,
    precondition_1d: bool = False,
) -> BlockPlan:
    """Decide the view, the blocks and the factored dims of a parameter of ``shape``."""
    view = _view_shape(tuple(shape), max_precond_dim, merge_dims)
    diagonal_only = len(view) == 1 and (not precondition_1d or math.prod(shape) <= 1)
    split = split_large_dims and max_precond_dim > 0 and not diagonal_only
    per_dim = [_chunks(size, max_precond_dim, split) for size in view]
    blocks = []
    for index in _cartesian(per_dim):
        block_shape = tuple(s.stop - s.start for s in index)
        factored = tuple(
            (not diagonal_only) and 1 < size <= max_precond_dim for size in block_shape
        )
        blocks.append(Block(index=index, shape=block_shape, factored=factored))
    return BlockPlan(view_shape=view, blocks=tuple(blocks))


def _cartesian(per_dim: list[list[slice]]) -> list[tuple[slice, ...]]:
    combos: list[tuple[slice, ...]] = [()]
    for options in per_dim:
        combos = [combo + (option,) for combo in combos for option in options]
    return combos


def factor_label(dim: int, order: int) -> str:
    """Readable name of a block dim's factor: L/R for matrices, the dim index otherwise."""
    if order == 2:
        return "LR"[dim]
    return str(dim)
