"""A stack of same-shaped parameter blocks whose optimizer state is stored and updated together.

Grouping blocks by (parameter group, block shape, factored dims, dtype, device) turns a Python loop
over hundreds of parameters into one batched op per group: one ``bmm`` rotates every block, one
``baddbmm`` updates every factor, one batched QR refreshes every stale basis. All per-block state
lives in ``FactorGroup.tensors`` as stacks with the member index first; the optimizer's per-parameter
``state`` holds views into them, so ``state_dict`` and checkpoints see ordinary tensors.

Each factored dim ``i`` owns ``basis.i`` (Q, ``[N, d, d]``) and ``stats.i`` (``B = Q^T L Q``: the
factor stored in its own eigenbasis, which makes the staleness criterion free), plus telemetry:
``staleness.i``, ``refreshes.i``, ``failures.i``, ``last_refresh.i``, ``refresh_seconds.i``, and
``deferred.i`` (due for a refresh but still waiting for the scheduler's budget).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from lightning_kron.engine.blocking import Block
from lightning_kron.engine.mode_products import rotate_in, rotate_mode, rotate_out
from lightning_kron.engine.precision import cuda_matmul_precision, tf32_bmm
from lightning_kron.engine.sharding import local_tensor

TELEMETRY_KEYS = ("staleness", "refreshes", "failures", "last_refresh", "refresh_seconds")


def factor_key(name: str, dim: int) -> str:
    """The state key of a per-factor stack, e.g. ``basis.0``: the one place that spells it (the
    keys appear in ``optimizer.state`` and so in checkpoints)."""
    return f"{name}.{dim}"


@dataclass(frozen=True)
class Member:
    """One block of one parameter inside a group (of this rank's shard, for an FSDP2 DTensor)."""

    param: torch.Tensor
    name: str
    block_number: int
    block: Block
    view_shape: tuple[int, ...]
    #: factored dims whose basis has been refreshed at least once (host-side, so a refresh needs no
    #: sync to know which members still start from the identity and need an exact first refresh);
    #: kept per member, which stacks and their in-step subsets share, and rebuilt on load
    refreshed_dims: set[int] = field(default_factory=set, compare=False, hash=False)

    def param_block(self) -> torch.Tensor:
        """The slice of the parameter that this block covers: a writable view when the parameter
        is contiguous, else a copy (channels-last convs) that :meth:`write_back` stores."""
        return self.local_param().reshape(self.view_shape)[self.block.index]

    def local_param(self) -> torch.Tensor:
        """The values this rank updates: the whole parameter, or its local shard under FSDP2."""
        return local_tensor(self.param.data)

    def write_back(self, block: torch.Tensor) -> None:
        """Store an updated copy from :meth:`param_block` (only needed for non-contiguous params)."""
        local = self.local_param()
        whole = local.reshape(self.view_shape).clone()
        whole[self.block.index] = block
        local.copy_(whole.reshape(local.shape))

    def grad_block(self) -> torch.Tensor:
        return local_tensor(self.param.grad).reshape(self.view_shape)[self.block.index]


class FactorGroup:
    """Stacked state of N blocks sharing one shape; see the module docstring."""

    def __init__(self, members: list[Member], state_dtype: torch.dtype, param_group: int,
                 rotation_dtype: torch.dtype | None = None, tf32_directions: bool = False) -> None:
        first = members[0]
        self.rotation_dtype = rotation_dtype if rotation_dtype not in (None, state_dtype) else None
        #: the direction's rotation back (:meth:`rotate_out`) on TF32 tensor cores (on CUDA;
        #: emulated on a CPU, see engine/precision.py); see :meth:`rotate_out` for why only that one
        self.tf32_directions = tf32_directions and self.rotation_dtype is None and state_dtype == torch.float32
        self.members = members
        self.param_group = param_group
        self.shape = first.block.shape
        self.factored = first.block.factored
        self.state_dtype = state_dtype
        self.device = first.param.device
        self.tensors: dict[str, torch.Tensor] = {}
        #: optimizer steps in which every member had a gradient (host-side; see
        #: ``KronOptimizer._steps_still_shared``): stacks of one parameter group with equal counts have
        #: equal per-member step counts, so they can share one bias correction
        self.host_steps = 0
        #: whether every member has had its exact first refresh in every factored dim (host-side:
        #: the step then stops looking for members first gradded late)
        self.first_refreshes_done = False
        #: the buffer whose slice :attr:`steps` is (see :func:`share_step_counts`), or None
        self.step_buffer: Optional[torch.Tensor] = None
        #: whether any member's ``deferred`` flag may be set (host-side for the same reason: an
        #: unchecked step then needs no read of the queue); kept by the scheduler, rebuilt on load
        self.any_deferred = False
        self._low_bases: dict[int, tuple] = {}
        self._allocate_factors()

    # ----------------------------------------------------------------- construction
    def _allocate_factors(self) -> None:
        count = len(self.members)
        self.add("step", torch.zeros(count, dtype=torch.int64, device=self.device))  # exact past 2^24
        for dim in self.factored_dims:
            size = self.shape[dim]
            eye = torch.eye(size, dtype=self.state_dtype, device=self.device)
            self.add_factor_tensor("basis", dim, eye.expand(count, size, size).clone())
            self.add_factor_tensor("stats", dim, torch.zeros(count, size, size, dtype=self.state_dtype, device=self.device))
            self.add_factor_tensor("staleness", dim, torch.zeros(count, dtype=self.state_dtype, device=self.device))
            for key in ("refreshes", "failures", "last_refresh"):
                self.add_factor_tensor(key, dim, torch.zeros(count, dtype=torch.int64, device=self.device))
            self.add_factor_tensor("refresh_seconds", dim, torch.zeros(count, dtype=torch.float64, device=self.device))
            self.add_factor_tensor("deferred", dim, torch.zeros(count, dtype=torch.bool, device=self.device))

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Register a stacked tensor (member index first) as part of this group's state."""
        if tensor.shape[0] != len(self.members):
            raise ValueError(f"{key}: leading dim {tensor.shape[0]} != {len(self.members)} members")
        self.tensors[key] = tensor

    def add_factor_tensor(self, name: str, dim: int, tensor: torch.Tensor) -> None:
        """Register a per-factor stack (one row per member) for factored dim ``dim``."""
        self.add(factor_key(name, dim), tensor)

    def factor_tensor(self, name: str, dim: int) -> torch.Tensor:
        """A per-factor stack registered with :meth:`add_factor_tensor` (e.g. Shampoo's ``root_scale``)."""
        return self.tensors[factor_key(name, dim)]

    def zeros_like_blocks(self) -> torch.Tensor:
        """A zero stack shaped like the blocks, in the state dtype (moments, accumulators)."""
        return torch.zeros(len(self.members), *self.shape, dtype=self.state_dtype, device=self.device)

    # ----------------------------------------------------------------- accessors
    @property
    def factored_dims(self) -> list[int]:
        return [dim for dim, factored in enumerate(self.factored) if factored]

    @property
    def order(self) -> int:
        return len(self.shape)

    def bases(self) -> list[Optional[torch.Tensor]]:
        """Q of every dim, ``None`` for the dims that have no factor."""
        return [self.tensors.get(factor_key("basis", dim)) for dim in range(self.order)]

    def basis(self, dim: int) -> torch.Tensor:
        """Q of factored dim ``dim``, ``[N, d, d]``."""
        return self.factor_tensor("basis", dim)

    def stats(self, dim: int) -> torch.Tensor:
        """The factor in its own eigenbasis, ``B = Q^T L Q``, ``[N, d, d]``."""
        return self.factor_tensor("stats", dim)

    def staleness(self, dim: int) -> torch.Tensor:
        """``e(Q, L)`` of each member after the last statistics update, ``[N]``."""
        return self.factor_tensor("staleness", dim)

    def refreshes(self, dim: int) -> torch.Tensor:
        """How often each member's basis was recomputed (int64, ``[N]``)."""
        return self.factor_tensor("refreshes", dim)

    def failures(self, dim: int) -> torch.Tensor:
        """How many of those refreshes fell back because a solver failed (int64, ``[N]``)."""
        return self.factor_tensor("failures", dim)

    def last_refresh(self, dim: int) -> torch.Tensor:
        """The optimizer step of each member's last refresh (int64, ``[N]``)."""
        return self.factor_tensor("last_refresh", dim)

    def refresh_seconds(self, dim: int) -> torch.Tensor:
        """Wall time spent refreshing each member, its share of batched calls (float64, ``[N]``)."""
        return self.factor_tensor("refresh_seconds", dim)

    def deferred(self, dim: int) -> torch.Tensor:
        """Which members are due for a refresh that the scheduler's budget postponed (bool, ``[N]``):
        state, so a resume, and under FSDP2 each rank, keeps its own queue."""
        return self.factor_tensor("deferred", dim)

    @property
    def steps(self) -> torch.Tensor:
        """Statistics updates each member has had (int64, ``[N]``: exact past 2^24); for SOAP with
        ``update_at_start=False`` its moment updates, one fewer."""
        return self.tensors["step"]

    @staticmethod
    def read_rows(tensor: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """The selected members of a stack (all of them, without a copy, when ``rows`` is None)."""
        return tensor if rows is None else tensor.index_select(0, rows)

    @staticmethod
    def write_rows(tensor: torch.Tensor, rows: Optional[torch.Tensor], value: torch.Tensor) -> None:
        """Write ``value`` into the selected members in place (the state views stay valid)."""
        if rows is None:
            tensor.copy_(value)
        else:
            tensor.index_copy_(0, rows, value)

    def __len__(self) -> int:
        return len(self.members)

    # ----------------------------------------------------------------- data movement
    def gather_params(self) -> torch.Tensor:
        return torch.stack([member.param_block() for member in self.members]).to(self.state_dtype)

    def rotate_in(self, x: torch.Tensor, keep_rotation_dtype: bool = False) -> torch.Tensor:
        """Coordinates in the eigenbases (see :meth:`_rotate` for the dtypes)."""
        return self._rotate(rotate_in, x, keep_rotation_dtype)

    def rotate_out(self, x: torch.Tensor, keep_rotation_dtype: bool = False) -> torch.Tensor:
        """Back to parameter coordinates (see :meth:`_rotate` for the dtypes).

        With ``tf32_directions`` on TF32 tensor cores. Only this rotation: its rounding is a relative
        error of 2^-11 on the step itself. Measured on the 150-step MLP of
        tests/test_eigenvalue_correction_facts.py (emulated TF32, 16 seeds, mean of per-seed
        final-loss ratios +- its standard error): this rotation in TF32 -0.2% +- 0.4% and +0.3% +-
        0.3% (two sets of seeds); the gradient's rotation in as well +2.1% +- 1.6% (it feeds the
        statistics, whose small eigenvalue estimates the leak of large ones corrupts); the moments'
        re-expression at a refresh as well +14% +- 2.4%; all three +9.3% +- 2.4%.
        """
        if self.tf32_directions and self.rotation_dtype is None:
            return self._on_tf32(lambda bmm: rotate_out(x, self.bases(), bmm))
        return self._rotate(rotate_out, x, keep_rotation_dtype)

    def _rotate(self, rotation, x: torch.Tensor, keep_rotation_dtype: bool) -> torch.Tensor:
        """With a ``rotation_dtype`` the matmuls run in it (bf16 is 2-5x faster on CPUs with
        AVX512-BF16 and on GPUs); the result comes back in the state dtype unless
        ``keep_rotation_dtype`` (a consumer that accepts it, such as :func:`apply_updates` or a bf16
        statistics product, then needs no copy). A block without a factor (a bias, a norm gain) has
        nothing to rotate and stays in the state dtype: AdamW's step, not one rounded to bf16."""
        if self.rotation_dtype is None or not self.factored_dims:
            return rotation(x, self.bases())
        result = rotation(x.to(self.rotation_dtype), self._low_precision_bases())
        return result if keep_rotation_dtype else result.to(self.state_dtype)

    def mode_product(self, x: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
        """``x x_dim matrix`` for re-expressing a rotated buffer after a refresh, in
        ``rotation_dtype`` when one is set: what lives in the eigenbasis (the moments, the gradient
        in flight) is then rounded like the per-step rotations that produced it."""
        if self.rotation_dtype is None:
            return rotate_mode(x, dim, matrix)
        return rotate_mode(x.to(self.rotation_dtype), dim, matrix.to(self.rotation_dtype)).to(self.state_dtype)

    def _on_tf32(self, product: Callable[[Callable], torch.Tensor]) -> torch.Tensor:
        """``product(bmm)`` on TF32 tensor cores on CUDA; a CPU rounds the matmul inputs as a
        tensor core would instead (slower than fp32: it shows a GPU run's numerics)."""
        if self.device.type != "cuda":
            return product(tf32_bmm)
        with cuda_matmul_precision("tf32", on_cuda=True):
            return product(torch.bmm)

    def _low_precision_bases(self) -> list[Optional[torch.Tensor]]:
        """The bases in ``rotation_dtype``, cast once per basis change rather than twice per step.

        A cached copy is reused while it was made from this very tensor (weak reference: a loaded
        checkpoint brings new tensors) at this version (in-place writes by a refresh or a
        re-orthonormalisation bump ``_version``). Not state: it is rebuilt after a resume.
        """
        bases = []
        for dim, basis in enumerate(self.bases()):
            if basis is None or basis.is_inference():  # inference tensors keep no version: no cache
                bases.append(None if basis is None else basis.to(self.rotation_dtype))
                continue
            cached = self._low_bases.get(dim)
            if cached is None or cached[0]() is not basis or cached[1] != basis._version:
                cached = (weakref.ref(basis), basis._version, basis.to(self.rotation_dtype))
                self._low_bases[dim] = cached
            bases.append(cached[2])
        return bases

    # ----------------------------------------------------------------- subsets
    def identity_rows(self, dim: int, rows: Optional[list[int]] = None) -> list[int]:
        """Which of ``rows`` (all when None) still hold the identity basis in ``dim`` (host-side)."""
        return [row for row in (range(len(self)) if rows is None else rows) if dim not in self.members[row].refreshed_dims]

    def mark_refreshed(self, dim: int, rows: Optional[list[int]] = None) -> None:
        """Record that ``rows`` (all when None) hold a refreshed basis in ``dim``."""
        for row in range(len(self)) if rows is None else rows:
            self.members[row].refreshed_dims.add(dim)

    def has_grads(self) -> list[bool]:
        return [member.param.grad is not None for member in self.members]

    def subset(self, rows: list[int]) -> "FactorGroup":
        """A detached copy holding only ``rows``; write it back with :meth:`absorb`."""
        index = torch.tensor(rows, device=self.device)
        sub = object.__new__(FactorGroup)
        sub.__dict__.update(self.__dict__)
        sub.members = [self.members[row] for row in rows]
        sub.tensors = {key: tensor.index_select(0, index) for key, tensor in self.tensors.items()}
        sub._low_bases = {}
        return sub

    def absorb(self, sub: "FactorGroup", rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.device)
        for key, tensor in self.tensors.items():
            tensor.index_copy_(0, index, sub.tensors[key])

    def tensors_on_host(self, key: str) -> dict[int, list]:
        """``{dim: per-member values}`` of a telemetry tensor, one device-to-host copy per dim."""
        return {dim: self.factor_tensor(key, dim).tolist() for dim in self.factored_dims}

    def member_views(self) -> Iterator[tuple[Member, dict[str, torch.Tensor]]]:
        """Each member with views of its rows in every stacked tensor (for ``optimizer.state``)."""
        for row, member in enumerate(self.members):
            yield member, {key: tensor[row] for key, tensor in self.tensors.items()}


def share_step_counts(groups: list[FactorGroup]) -> None:
    """Store the per-member step counts of the groups of each (parameter group, device) in one
    buffer, each group's ``step`` a view of its slice: a step that counts every member of a
    parameter group is then one ``add_`` instead of one per group (a foreach add of a 0-dim tensor
    to int64 tensors runs tensor by tensor on CUDA)."""
    by_key: dict[tuple, list[FactorGroup]] = {}
    for group in groups:
        by_key.setdefault((group.param_group, group.device), []).append(group)
    for members in by_key.values():
        buffer = torch.cat([group.steps for group in members])
        for group, view in zip(members, buffer.split([len(group) for group in members])):
            group.tensors["step"], group.step_buffer = view, buffer


def gather_grads(groups: list[FactorGroup], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The gradients of every member of ``groups`` copied into one flat buffer in ``dtype``, and a
    ``[N, *block shape]`` view of it per group.

    One copy kernel for a whole parameter group instead of a ``stack`` per group, and the
    finite-gradient check and its mask then read and write that one buffer. The groups must share
    the parameters' dtype and device. The buffer is a copy: the step may write into it (the L2
    decay, the mask) without touching ``param.grad``.
    """
    pieces = [member.grad_block().reshape(-1) for group in groups for member in group.members]
    flat = torch.cat(pieces).to(dtype)
    sizes = [len(group) * math.prod(group.shape) for group in groups]
    return flat, [part.view(len(group), *group.shape) for part, group in zip(flat.split(sizes), groups)]


def apply_updates(groups: list[FactorGroup], directions: list[torch.Tensor], lr: float,
                  shrink: float | torch.Tensor = 1.0, update: Optional[Callable] = None) -> None:
    """``W <- W * shrink - lr * D`` on every member of ``groups``: with ``shrink = 1 - lr * wd``,
    decoupled weight decay as ``torch.optim.AdamW`` does it (a 0-d tensor when it depends on the
    device). Two ``torch._foreach_*`` ops per parameter dtype for all the groups of a parameter
    group, not two per group. ``update``: :func:`update_parameters` or a compiled copy of it.
    """
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    copies = []  # blocks of non-contiguous parameters are copies: stored back after the update
    for group, direction in zip(groups, directions):
        dtype = group.members[0].param.dtype
        if torch.finfo(direction.dtype).bits >= torch.finfo(dtype).bits:
            direction = direction.to(dtype)  # a wider direction is rounded once, here
        # a narrower one (bf16 out of the rotations) is widened exactly inside the add: no copy
        blocks, updates = by_dtype.setdefault(dtype, ([], []))
        for member, row in zip(group.members, direction.unbind(0)):
            blocks.append(member.param_block())
            updates.append(row)
            if not member.local_param().is_contiguous():
                copies.append((member, blocks[-1]))
    for dtype, (blocks, updates) in by_dtype.items():
        factor = shrink.to(dtype) if isinstance(shrink, torch.Tensor) else shrink
        (update or update_parameters)(blocks, updates, lr, factor)
    for member, block in copies:
        member.write_back(block)


def update_parameters(blocks: list[torch.Tensor], updates: list[torch.Tensor], lr: float,
                      shrink: float | torch.Tensor) -> None:
    """The pure part of :func:`apply_updates` (what ``compile=True`` compiles): in place,
    ``blocks <- blocks * shrink - lr * updates``."""
    if isinstance(shrink, torch.Tensor) or shrink != 1.0:
        torch._foreach_mul_(blocks, shrink)
    torch._foreach_add_(blocks, updates, alpha=-lr)
