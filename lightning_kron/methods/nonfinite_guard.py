"""The NaN/Inf guard of :class:`~lightning_kron.methods.kron_optimizer.KronOptimizer`.

A parameter group whose gradient holds a NaN or Inf skips its step whole: its parameters, moments,
statistics and bases stay exactly as they were, and the skip is counted. So does a finite gradient
so large that its products would overflow the statistics (``max |g|^2 * numel`` past the range of
the statistics dtype: a loss scaled by 1e25 in fp32): written into the statistics it would leave
them Inf/NaN for good, every later refresh failing on them. Everything is decided on
the device, so the guard costs no host sync (``nonfinite="raise"`` pays one, to raise); under FSDP2
the flags are all-reduced, so every rank skips the same groups. A mixin of ``KronOptimizer``: it
relies on the optimizer's ``param_groups``, ``shard_layout`` and ``nonfinite``, and on its
constructor setting ``skipped_steps = 0``; the step applies the flags it returns (the masked
gradient, the kept statistics and directions).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lightning_kron.engine.sharding import all_ranks_finite, local_tensor


def _all_of(flags: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool: every flag is true (one op, no host read)."""
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def _all_finite(values: torch.Tensor) -> torch.Tensor:
    """0-dim bool: no NaN or Inf in ``values``, and no entry so large that a statistics entry (a
    sum of at most ``numel`` products of two entries) or a squared moment could overflow their
    dtype. Its min and max in one reduction (10x faster than max |g| on a CPU: no |g|
    temporary): NaN and -Inf/+Inf show up in them and fail the comparison, and unlike a sum
    nothing finite overflows."""
    low, high = torch.aminmax(values)
    limit = math.sqrt(torch.finfo(values.dtype).max / max(values.numel(), 1))
    return torch.maximum(-low, high) < limit  # NaN compares False


class NonfiniteGuard:
    """Finite-gradient flags per parameter group, and the skip counter (see the module docstring)."""

    _skipped_on_device: Optional[torch.Tensor]  # this run's skips, counted on the device
    _skipped_before: int  # skips loaded from a checkpoint

    def _finite_param_groups(self, buffers: dict[int, list[torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Each parameter group's finite-gradient flag, on the device: one reduction per gradient
        buffer and no host sync (``nonfinite="raise"`` syncs once to raise). A group with a NaN/Inf
        is skipped whole. Under FSDP2 the flags are all-reduced, so every rank skips the same groups."""
        local = {index: _all_of([_all_finite(flat) for flat in flats]) for index, flats in buffers.items()}
        finite = self._finite_on_all_ranks(local) if self.shard_layout is not None else local
        if self.nonfinite == "raise":
            if finite and not bool(_all_of(list(finite.values()))):  # the one sync this mode pays
                raise FloatingPointError("non-finite gradient (NaN or Inf, or so large that its statistics "
                                         "would overflow); the step was not applied")
            return {}
        return finite

    def _count_skips(self, finite: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``~finite`` of every parameter group, added to the device-side skip counter (every flag,
        so that under FSDP2 a rank without a group's rows counts its skip too)."""
        skipped = {index: ~flag for index, flag in finite.items()}
        for flag in skipped.values():
            self._skipped_on_device = flag.long() if self._skipped_on_device is None else self._skipped_on_device.add_(flag)
        return skipped

    def _finite_on_all_ranks(self, local: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """One flag per parameter group that has a gradient on any rank, the same on every rank: a
        rank that holds no rows of a group (empty shards) or no gradient contributes "finite", and
        every rank joins the all-reduce, whatever it holds."""
        with_grads = [index for index, group in enumerate(self.param_groups)
                      if any(param.grad is not None for param in group["params"])]
        if not with_grads:
            return {}
        device = local_tensor(self.param_groups[with_grads[0]]["params"][0]).device
        true = torch.ones((), dtype=torch.bool, device=device)
        flags = all_ranks_finite(torch.stack([local.get(index, true) for index in with_grads]), self.shard_layout)
        return dict(zip(with_grads, flags.unbind(0)))

    @property
    def skipped_steps(self) -> int:
        """Parameter-group steps skipped for a non-finite gradient (read from the device: a sync)."""
        on_device = 0 if self._skipped_on_device is None else int(self._skipped_on_device)
        return self._skipped_before + on_device

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_before, self._skipped_on_device = int(value), None
