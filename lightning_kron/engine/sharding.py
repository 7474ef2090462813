"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): what the optimizer sees.

FSDP2 turns each parameter (and its gradient) into a ``DTensor`` sharded ``Shard(0)`` over a 1-D
device mesh: rank ``r`` holds rows ``torch.chunk(W, world)[r]`` as an ordinary local tensor that
shares storage with the parameter (uneven chunks, and empty ones when a parameter has fewer rows
than ranks). The optimizer works on those local shards only: blocks are cut from each rank's own
rows, so no block, no factor and no communication crosses a shard. The one collective of a step is
the all-reduce of the finite-gradient flags (:func:`all_ranks_finite`), so that every rank skips
the same parameter groups.

Any other placement (tensor parallel ``Shard(1)``, ``Replicate``, HSDP's 2-D mesh) is refused up
front: it would need factors that span ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support: nothing can be sharded
    DTensor, Shard = None, None

SUPPORTED = "DTensor parameters sharded Shard(0) on a 1-D device mesh (FSDP2's fully_shard)"


def is_sharded(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (a view sharing its storage); a plain tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class ShardLayout:
    """The mesh every sharded parameter of one optimizer lives on."""

    group: "dist.ProcessGroup"
    rank: int
    world_size: int

    def shard_name(self, name: str) -> str:
        """A block name that says which rank's rows it covers (factor names stay unique over ranks)."""
        return f"{name}.shard{self.rank}"

    def state_prefix(self) -> str:
        """Prefix of this rank's state keys: ``torch.distributed.checkpoint`` stores plain tensors
        once per key, so rank-local state must carry the rank in its key to survive a save."""
        return f"rank{self.rank}."


def shard_layout(named_params: Iterable[tuple[str, torch.Tensor]]) -> Optional[ShardLayout]:
    """The common layout of the sharded parameters, None when none is sharded.

    Raises ValueError, naming the parameter, for a placement other than ``Shard(0)`` on a 1-D mesh,
    for parameters on different meshes, and for a mix of sharded and plain parameters (whose
    state could not tell which ranks hold the same values).
    """
    mesh, plain, sharded = None, [], 0
    for name, param in named_params:
        if not is_sharded(param):
            plain.append(name)
            continue
        sharded += 1
        if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise ValueError(f"parameter {name!r} is a DTensor with placements {tuple(param.placements)} on a "
                             f"{param.device_mesh.ndim}-D mesh; lightning_kron supports {SUPPORTED} (no tensor "
                             "parallel, Replicate or HSDP)")
        if mesh is None:
            mesh = param.device_mesh
        elif param.device_mesh != mesh:
            raise ValueError(f"parameter {name!r} lives on another device mesh than the others; {SUPPORTED}, one mesh")
    if not sharded:
        return None
    if plain:
        raise ValueError(f"parameters {plain[:3]} are plain tensors while others are FSDP2 DTensors; shard the "
                         "whole model with fully_shard (or give the plain ones their own optimizer, with "
                         "replicated=False unless their gradients are all-reduced)")
    group = mesh.get_group()
    return ShardLayout(group=group, rank=dist.get_rank(group), world_size=dist.get_world_size(group))


def all_ranks_finite(flags: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """Each flag true only where it is true on every rank (one all-reduce, no host sync)."""
    values = flags.to(torch.uint8)  # NCCL and gloo both reduce uint8 (not bool)
    dist.all_reduce(values, op=dist.ReduceOp.MIN, group=layout.group)
    return values.bool()


def gather_over_shards(value, layout: ShardLayout) -> list:
    """Every rank's ``value`` (any picklable object), indexed by rank: a collective, for telemetry."""
    gathered = [None] * layout.world_size
    dist.all_gather_object(gathered, value, group=layout.group)
    return gathered
