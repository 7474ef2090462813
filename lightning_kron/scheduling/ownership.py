"""Refresh ownership under ``torch.distributed``: who computes which refresh, and sharing the result.

Data-parallel ranks hold identical optimizer state (their gradients are all-reduced), so every rank
could compute every refresh; that only multiplies the most expensive part of the step by the world
size. Instead each refreshed *block* gets one owner rank: the owner recomputes all of that block's
chosen factors and then broadcasts the block's rows of every stacked tensor of its group (basis,
stats, moments, root scales, telemetry), so every rank ends bit-identical to the owner.

Ownership is per block, not per factor: refreshing the left factor of a block rotates the same
moment tensors as refreshing its right factor, so two owners for one block would overwrite each
other's rotations.

Everything here is a no-op in a single process, so the same code path runs with and without DDP.

>>> assign_owners([8, 1, 1, 1, 8], world_size=2)
[0, 0, 1, 0, 1]
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each job: largest first, each to the least-loaded rank (ties: lowest rank).

    Deterministic, so every rank computes the same assignment from the same decisions without any
    communication.
    """
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[job] = rank
        loads[rank] += costs[job]
    return owners


def check_replicated(optimizer) -> bool:
    """Refuse ranks that are not DDP replicas, with the way out, at the optimizer's first step (on
    every rank, before any collective relies on it). Taken for replicas, the ranks of independent
    runs under one launcher (an ensemble, a sweep), or experts and pipeline stages on different
    ranks, were silently given rank 0's decisions and the owners' bases (0.06 off), or aborted the
    process group where their factor counts differed (a hang under NCCL). Compared: the parameters'
    shapes in order (a hash) and a position-weighted sum of the first gradients, which DDP's
    all-reduce makes equal on every rank (relative tolerance 1e-6, for reductions that differ in
    round-off). One host read per device and one all-gather of three numbers, at the first step
    whose gradients every rank has and are finite. Returns whether the gradients were compared
    (the same answer on every rank: it is read from what they all gathered)."""
    _, world = rank_and_world()
    if world == 1:
        return True
    params = [param for group in optimizer.param_groups for param in group["params"]]
    layout = zlib.crc32(repr([tuple(param.shape) for param in params]).encode())
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for position, param in enumerate(params):
        if param.grad is not None:
            by_device.setdefault(param.grad.device, []).append(param.grad.double().sum() * (position + 1))
    checksum = sum(float(torch.stack(sums).sum()) for sums in by_device.values())
    every = gather_from_all([float(layout), float(sum(map(len, by_device.values()))), checksum])
    first = every[0]
    if any(theirs[0] != first[0] for theirs in every):
        raise _not_replicas(optimizer, "shapes")
    if any(theirs[1] == 0 or not math.isfinite(theirs[2]) for theirs in every):
        return False  # no gradient yet, or a non-finite one: compared again at the next step
    if any(theirs[1] != first[1] or abs(theirs[2] - first[2]) > 1e-6 * max(abs(first[2]), abs(theirs[2]))
           for theirs in every):
        raise _not_replicas(optimizer, "gradients")
    return True


def _not_replicas(optimizer, what: str) -> RuntimeError:
    return RuntimeError(
        f"{type(optimizer).__name__}: the ranks of this process group hold parameters of different {what}, so they "
        "are not DDP replicas. For independent runs, experts or pipeline stages, build the optimizer with "
        "replicated=False: each rank then refreshes its own factors, with no communication")


def broadcast_from_first(tensor: torch.Tensor) -> torch.Tensor:
    """Make every rank hold rank 0's ``tensor`` (in place); identical decisions everywhere."""
    if rank_and_world()[1] > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def gather_from_all(values: Sequence[float]) -> list[list[float]]:
    """Every rank's ``values``, indexed by rank (a collective: call it on all ranks)."""
    _, world = rank_and_world()
    local = torch.tensor(list(values), dtype=torch.float64)
    if world == 1:
        return [local.tolist()]
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else local.device
    local = local.to(backend_device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return [item.tolist() for item in gathered]


@dataclass(frozen=True)
class OwnedRows:
    """Rows ``rows`` of every stacked tensor in ``tensors`` are authoritative on rank ``owner``."""

    tensors: dict[str, torch.Tensor]
    rows: torch.Tensor
    owner: int


def share_rows(pieces: Sequence[OwnedRows]) -> None:
    """Broadcast each piece's rows from its owner to every other rank, one collective per
    (owner, dtype, device) with all rows packed into one flat buffer."""
    rank, world = rank_and_world()
    if world == 1:
        return
    for owner in sorted({piece.owner for piece in pieces}):
        buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for piece in (p for p in pieces if p.owner == owner):
            rows = piece.rows
            for key in sorted(piece.tensors):
                tensor = piece.tensors[key]
                buckets.setdefault((tensor.dtype, tensor.device), []).append((tensor, rows.to(tensor.device)))
        for items in buckets.values():
            _broadcast_bucket(items, owner, rank)


def _broadcast_bucket(items: list[tuple[torch.Tensor, torch.Tensor]], owner: int, rank: int) -> None:
    if rank == owner:
        flat = torch.cat([tensor.index_select(0, rows).reshape(-1) for tensor, rows in items])
    else:
        total = sum(rows.numel() * tensor[0].numel() for tensor, rows in items)
        flat = torch.empty(total, dtype=items[0][0].dtype, device=items[0][0].device)
    dist.broadcast(flat, src=owner)
    if rank == owner:
        return
    offset = 0
    for tensor, rows in items:
        size = rows.numel() * tensor[0].numel()
        tensor.index_copy_(0, rows, flat[offset: offset + size].view(rows.numel(), *tensor.shape[1:]))
        offset += size
