"""``RefreshScheduler``: decides, factor by factor, when each eigenbasis is recomputed, and does it.

This is the one place where a refresh is decided (docs/design.md). Every
:class:`~lightning_kron.KronOptimizer` builds one over its own ``refresh=`` policy, so an optimizer
used alone runs exactly this code; ``KronCallback`` (or any owner) builds another over its policy,
which takes the optimizer's place until :meth:`RefreshScheduler.detach`. Besides the scheduler,
only the optimizer's exact first refresh of each factor (at ``start_preconditioning_step``, or at a
factor's first gradient after it) changes a basis. A factor whose parameter has had no gradient yet
is never refreshed here (nor one still in the identity basis for another reason): its first basis
comes from its first finite gradient.
The scheduler runs inside every optimizer step that really happened; a step that AMP's GradScaler
skips never calls ``optimizer.step``, so it neither touches the statistics nor triggers a refresh.

Where in the step: after the statistics update (the staleness then includes this step's
gradient) and before the moment update, so the moments take this step's gradient in the new basis.
Measured on the GPT recipe with the squared-rotation carry-over of V, deciding after the whole step
instead ends 0.7% higher at every=10 and 3.5% instead of 1.2% higher for the adaptive contender.
SOAP, which carries V over by rank, decides after the step by default (``refresh_timing``;
docs/algorithms.md, "Deviations from the reference SOAP"); the step post-hook then decides. Decisions
per step:

1. on the policy's check steps, the policy's ``select`` says which factors are *due* (for
   ``AdaptiveRefresh``: staleness ``e(Q, L)`` above the tolerance in force, which
   ``tolerance_schedule`` may make tighter early; ``FixedRefresh``: all);
2. factors deferred by the budget at earlier steps stay due until refreshed;
3. at most ``max_per_step`` due factors are refreshed, most stale first; the rest are deferred.

The whole decision is taken on device on one concatenated staleness tensor and moved to the host
once per checked step. Under ``torch.distributed`` rank 0's decision is broadcast (identical
decisions everywhere), each refreshed block gets one owner rank, and the owners broadcast the
refreshed rows (``lightning_kron.scheduling.ownership``): the ranks stay bit-identical while each computes
only its share. That is for replicated state (DDP). Under FSDP2 each rank holds the factors of its
own shard rows (``optimizer.shard_layout``): it decides and refreshes them alone, with no
communication, and ``max_per_step`` is a budget per rank.

>>> import torch
>>> from lightning_kron import SOAP, AdaptiveRefresh
>>> model = torch.nn.Linear(6, 4)
>>> optimizer = SOAP(model.named_parameters(), lr=1e-2)
>>> scheduler = RefreshScheduler(optimizer, AdaptiveRefresh(tolerance=0.01))
>>> for _ in range(5):
...     model(torch.randn(8, 6)).square().mean().backward(); optimizer.step(); optimizer.zero_grad()
>>> scheduler.counters.checks, optimizer.scheduler is scheduler
(4, True)
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional

import torch

from lightning_kron.engine.basis_refresh import reorthonormalization_due
from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.sharding import gather_over_shards
from lightning_kron.engine.validation import check_positive_int, is_number
from lightning_kron.scheduling.budget_policies import most_stale
from lightning_kron.scheduling.ownership import (
    OwnedRows,
    assign_owners,
    broadcast_from_first,
    rank_and_world,
    share_rows,
)
from lightning_kron.scheduling.policies import AdaptiveRefresh, check_policy

ToleranceSchedule = Callable[[int, Optional[float], float], float]
STATE_FORMAT = 2  # 2: the deferred queue moved into the optimizer's state (FactorGroup.deferred)
_DEFERRED, _CHOSEN, _REORTHONORMALIZE = 1, 2, 4  # codes of the decision sent to the host


@dataclass
class RefreshCounters:
    """Cumulative counts since the scheduler started (``refreshes``/``checks`` survive a resume;
    the ``*_here`` figures are this process's own work and restart with it)."""

    checks: int = 0
    refreshes: int = 0
    seconds: float = 0.0
    computed_here: int = 0
    seconds_here: float = 0.0


@dataclass(frozen=True)
class _Slot:
    """One ``(group, dim)`` stack of factors and where it sits in the flat factor order."""

    group_index: int
    dim: int
    start: int
    count: int


class RefreshScheduler:
    """Per-factor refresh scheduling for one optimizer; see the module docstring.

    Args:
        optimizer: a ``KronOptimizer`` (SOAP, EShampoo, Shampoo, KrADagrad).
        policy: ``AdaptiveRefresh`` / ``FixedRefresh`` / any
            :class:`~lightning_kron.scheduling.policies.RefreshPolicy`; ``None`` uses the
            optimizer's own ``refresh`` policy.
        tolerance_schedule: ``schedule(step, total_steps, tolerance) -> tolerance`` (e.g.
            :class:`~lightning_kron.scheduling.tolerance_schedule.TighterEarly`); needs an
            AdaptiveRefresh, whose own ``schedule`` it replaces.
        max_per_step: refresh budget per optimizer step over all ranks (most stale first);
            ``None`` uses the policy's ``max_per_step``, if any.
        total_steps: planned number of optimizer steps, for fraction-based schedules.
    """

    def __init__(self, optimizer, policy=None, *, tolerance_schedule: Optional[ToleranceSchedule] = None,
                 max_per_step: Optional[int] = None, total_steps: Optional[float] = None) -> None:
        self.optimizer = optimizer
        policy = check_policy(policy if policy is not None else optimizer.refresh)
        if tolerance_schedule is not None:
            if not isinstance(policy, AdaptiveRefresh):
                raise ValueError(f"tolerance_schedule needs an AdaptiveRefresh policy, got {policy!r}")
            policy = replace(policy, schedule=tolerance_schedule)
        self.policy = policy
        if max_per_step is not None:
            check_positive_int("max_per_step", max_per_step)
        self.max_per_step = max_per_step if max_per_step is not None else getattr(policy, "max_per_step", None)
        if total_steps is not None and not (is_number(total_steps) and total_steps > 0):
            raise ValueError(f"total_steps must be None (unknown) or a number of optimizer steps > 0 (inf: unknown), "
                             f"got {total_steps!r}")
        self.total_steps = total_steps
        self.counters = RefreshCounters()
        #: whether any factor waits in the budget's queue (known on the host from each decision, so
        #: an unchecked step needs no read of the queue itself)
        self._any_deferred = False
        self._saved_deferred: Optional[tuple[int, list[int]]] = None  # a format-1 state's queue
        self._layout_for: Optional[list[FactorGroup]] = None
        self._slots: list[_Slot] = []
        self._decided_at = -1  # the optimizer step whose refreshes were already decided
        self._refreshed_groups: list[FactorGroup] = []  # changed at that step, on any rank
        self._replaced = getattr(optimizer, "scheduler", None)
        if self._replaced is not None:
            self._replaced._release()
        self._attach()

    def _attach(self) -> None:
        self.optimizer.scheduler = self
        self._layout_for = None  # another scheduler may have changed the queue meanwhile: reread it
        self._handle = self.optimizer.register_step_post_hook(self._post_step_hook)

    def _post_step_hook(self, optimizer, args, kwargs) -> None:
        """The step post-hook: a bound method, not a closure, so that a copy of the optimizer
        (``copy.deepcopy``, pickle) gets a hook of its own scheduler, not the original's."""
        self.after_step()

    def _release(self) -> None:
        self._handle.remove()
        if self.optimizer.scheduler is self:
            self.optimizer.scheduler = None

    def detach(self) -> None:
        """Hand the decision back to the scheduler this one replaced (the optimizer's own)."""
        self._release()
        if self._replaced is not None:
            self._replaced._attach()

    # ----------------------------------------------------------------- what is due
    @property
    def factor_count(self) -> int:
        return sum(slot.count for slot in self._layout())

    @property
    def deferred_count(self) -> int:
        """Factors due but not yet refreshed (the budget's queue; a host read)."""
        slots = self._layout()
        return int(self._deferred_mask(slots).sum()) if slots else 0

    def _deferred_mask(self, slots: list[_Slot]) -> torch.Tensor:
        return self._flat(slots, lambda group, dim: group.deferred(dim))

    def _note_deferred(self, slots: list[_Slot], codes: list[int]) -> None:
        """Store the queue of the decision just read into the groups' ``deferred`` flags, and keep
        their host-side ``any_deferred`` in step. Stacks with nothing queued before or now are
        left alone: without a budget no kernel runs here."""
        groups = self.optimizer.factor_groups()
        had = {id(group) for group in groups if group.any_deferred}
        queued = {}
        for slot in slots:
            flags = [code % _REORTHONORMALIZE == _DEFERRED for code in codes[slot.start: slot.start + slot.count]]
            group = groups[slot.group_index]
            if any(flags) or id(group) in had:
                group.deferred(slot.dim).copy_(torch.tensor(flags, device=group.device))
            queued[id(group)] = queued.get(id(group), False) or any(flags)
        for group in groups:
            group.any_deferred = queued.get(id(group), False)
        self._any_deferred = any(queued.values())

    @property
    def needs_training_length(self) -> bool:
        """Whether the policy's tolerance schedule may need ``total_steps``."""
        return getattr(self.policy, "schedule", None) is not None

    def tolerance_at(self, step: int) -> float:
        """The tolerance in force at ``step`` (counted from the first preconditioned step); 0 for a
        policy without ``tolerance_at``."""
        tolerance_at = getattr(self.policy, "tolerance_at", None)
        return 0.0 if tolerance_at is None else float(tolerance_at(step, self.policy_length))

    @property
    def policy_length(self) -> Optional[float]:
        """The planned length on the policies' clock, which starts at ``start_preconditioning_step``
        (step 0 there, the optimizer's exact refresh): the policy decides its steps 1 to
        ``policy_length - 1``. ``total_steps`` (this scheduler's, else the policy's own) counts
        optimizer steps from the start of training; passed as it is, a late start made the budget
        plan for steps that never come and spend up to 2.8x the clock's refreshes. ``None`` or inf:
        unknown."""
        length = self.total_steps
        if length is None or not math.isfinite(length):
            own = getattr(self.policy, "total_steps", None)
            length = own if own is not None else length
        if length is None or not math.isfinite(length):
            return length
        return max(length - self.optimizer.start_preconditioning_step + 1, 1)

    def _layout(self) -> list[_Slot]:
        """Flat factor order: for each group, for each factored dim, its rows. Rebuilt only when
        the optimizer rebuilt its groups (``load_state_dict``)."""
        groups = self.optimizer.factor_groups()
        if groups is not self._layout_for:
            self._slots, start = [], 0
            for group_index, group in enumerate(groups):
                for dim in group.factored_dims:
                    self._slots.append(_Slot(group_index, dim, start, len(group)))
                    start += len(group)
            self._layout_for = groups
            self._restore_deferred(start)
            self._any_deferred = any(groups[s.group_index].any_deferred for s in self._slots)
        return self._slots

    def _flat(self, slots: list[_Slot], read: Callable[[FactorGroup, int], torch.Tensor]) -> torch.Tensor:
        """One per-factor tensor of every stack, ``read(group, dim)``, in the flat factor order: one
        concatenation on the device, the layout every decision of a step is taken on."""
        groups = self.optimizer.factor_groups()
        return torch.cat([read(groups[s.group_index], s.dim) for s in slots])

    def _staleness(self, slots: list[_Slot]) -> torch.Tensor:
        self.optimizer.update_staleness()
        return self._flat(slots, lambda group, dim: group.staleness(dim).float())

    def _due(self, staleness: torch.Tensor, step: int, slots: list[_Slot]) -> torch.Tensor:
        ages = {"steps_since_refresh": self._ages(slots)} if getattr(self.policy, "uses_refresh_age", False) else {}
        due = self.policy.select(staleness, step, self.policy_length, **ages)
        if not isinstance(due, torch.Tensor) or due.dtype != torch.bool or due.shape != staleness.shape:
            # shapes and dtypes are metadata: checking them costs no host sync
            got = f"{due.dtype} of shape {tuple(due.shape)}" if isinstance(due, torch.Tensor) else type(due).__name__
            raise ValueError(f"{type(self.policy).__name__}.select must return a bool tensor of shape "
                             f"{tuple(staleness.shape)} (one entry per factor), got {got}")
        return due.to(device=staleness.device)

    def _ages(self, slots: list[_Slot]) -> torch.Tensor:
        """Optimizer steps since each factor's last refresh (its ``last_refresh`` state), on device."""
        last = self._flat(slots, lambda group, dim: group.last_refresh(dim))
        return (self.optimizer.global_step - last).float()

    def _refreshable(self, slots: list[_Slot], like: torch.Tensor) -> Optional[torch.Tensor]:
        """Factors whose group took this step: a group skipped for a non-finite gradient keeps its
        bases (its due factors are deferred). None when no group could have been skipped."""
        flags = getattr(self.optimizer, "step_finite", {})
        if not flags:
            return None
        groups = self.optimizer.factor_groups()
        took = torch.ones((), dtype=torch.bool, device=like.device)
        return torch.cat([flags.get(groups[s.group_index].param_group, took).expand(s.count) for s in slots])

    def _within_budget(self, due: torch.Tensor, staleness: torch.Tensor) -> torch.Tensor:
        if self.max_per_step is None:
            return due
        return most_stale(staleness, self.max_per_step, due)  # a NaN (overflowed) factor last

    # ----------------------------------------------------------------- the step hook
    def in_step(self) -> list[FactorGroup]:
        """Decide and run this step's refreshes from inside ``optimizer.step`` (after the
        statistics update, before the moments); returns the groups whose bases changed."""
        self.after_step()
        return self._refreshed_groups

    def decides_now(self) -> bool:
        """Whether this optimizer step has a decision still to make: a check step, or factors
        deferred earlier (not before preconditioning, nor at the optimizer's own exact refresh).
        The in-step path writes partly gradded stacks back only then."""
        step = self.optimizer.global_step - self.optimizer.start_preconditioning_step
        if self._decided_at == self.optimizer.global_step or step <= 0:
            return False
        if self.policy.checks_at(step):
            return True
        self._layout()  # a resumed run's deferred queue is restored when the layout is first built
        return self._any_deferred

    def after_step(self) -> None:
        """Decide and run this step's refreshes, once per optimizer step: normally from inside the
        step (:meth:`in_step`), else from the step post-hook."""
        if self._decided_at == self.optimizer.global_step:
            return
        decides = self.decides_now()
        self._decided_at = self.optimizer.global_step
        self._refreshed_groups = []
        if not decides:
            return
        step = self.optimizer.global_step - self.optimizer.start_preconditioning_step
        checking = self.policy.checks_at(step)
        slots = self._layout()
        if not slots:
            return
        started = time.perf_counter()
        staleness = self._staleness(slots)
        due = self._due(staleness, step, slots) if checking else torch.zeros_like(staleness, dtype=torch.bool)
        if self._any_deferred:
            due |= self._deferred_mask(slots)
        refreshable = self._refreshable(slots, due)
        chosen = self._within_budget(due if refreshable is None else due & refreshable, staleness)
        reorthonormalize = self._reorthonormalization_due(slots) & chosen
        decision = due.to(torch.uint8) + chosen.to(torch.uint8) + _REORTHONORMALIZE * reorthonormalize.to(torch.uint8)
        if self._replicated():
            decision = broadcast_from_first(decision)
        codes = decision.tolist()  # the one host sync of a checked step
        self._note_deferred(slots, codes)
        chosen = [index for index, code in enumerate(codes) if code % _REORTHONORMALIZE == _CHOSEN]
        chosen = self._with_first_bases(chosen, slots)
        self.counters.checks += int(checking)
        due_to_reorthonormalize = {index for index, code in enumerate(codes) if code >= _REORTHONORMALIZE}
        self._refresh(chosen, slots, self.tolerance_at(step), started, due_to_reorthonormalize)

    def _with_first_bases(self, chosen: list[int], slots: list[_Slot]) -> list[int]:
        """The chosen factors that already have their first bases (host-side, the same on every rank
        and rebuilt by a load from the refresh counts). A factor still in the identity basis has had
        no finite gradient yet: its first bases come from its first one (the optimizer's exact first
        refresh), not from here. A fixed clock chose those too: a frozen layer, or an expert before
        its first gradient, got a refresh of zero statistics, wasted work that also marked its
        identity basis as refreshed, so that its first gradient did not get exact bases."""
        groups, starts = self.optimizer.factor_groups(), [slot.start for slot in slots]
        kept = []
        for index in chosen:
            group_index, row, dim = self._position(index, slots, starts)
            if dim in groups[group_index].members[row].refreshed_dims:
                kept.append(index)
        return kept

    def _replicated(self) -> bool:
        """Whether every rank holds the same factors (DDP, or one process), not its own shard's
        (FSDP2) or its own model's (``replicated=False``; the optimizer's first step checks it)."""
        return getattr(self.optimizer, "shard_layout", None) is None and getattr(self.optimizer, "replicated", True)

    def _reorthonormalization_due(self, slots: list[_Slot]) -> torch.Tensor:
        """Per factor, whether its next refresh re-orthonormalises its basis (read with the decision)."""
        return self._flat(slots, lambda group, dim: reorthonormalization_due(group.refreshes(dim)))

    def _refresh(self, chosen: list[int], slots: list[_Slot], tolerance: float, started: float,
                 reorthonormalize: set[int]) -> None:
        if not chosen:
            return
        starts = [slot.start for slot in slots]
        flagged = {self._position(index, slots, starts) for index in reorthonormalize}
        blocks = self._chosen_blocks(chosen, slots)
        rank, world = rank_and_world() if self._replicated() else (0, 1)
        groups = self.optimizer.factor_groups()
        self._refreshed_groups = [groups[index] for index in sorted({g for g, _ in blocks})]
        costs = [sum(groups[g].shape[dim] ** 3 for dim in dims) for (g, _), dims in blocks.items()]
        owners = dict(zip(blocks, assign_owners(costs, world)))
        mine = [(block, dims) for block, dims in blocks.items() if owners[block] == rank]
        self._refresh_blocks(mine, groups, tolerance, flagged)
        if world > 1:
            share_rows(self._pieces(owners, groups))
            for (group_index, row), dims in blocks.items():  # every rank now holds these bases, not the identity
                for dim in dims:
                    groups[group_index].mark_refreshed(dim, [row])
        elapsed = time.perf_counter() - started
        self.counters.refreshes += len(chosen)
        self.counters.computed_here += sum(len(dims) for _, dims in mine)
        self.counters.seconds += elapsed
        self.counters.seconds_here += elapsed

    @staticmethod
    def _position(index: int, slots: list[_Slot], starts: list[int]) -> tuple[int, int, int]:
        """``(group_index, row, dim)`` of a flat factor index (``starts``: each slot's first index)."""
        slot = slots[bisect.bisect_right(starts, index) - 1]
        return slot.group_index, index - slot.start, slot.dim

    @classmethod
    def _chosen_blocks(cls, chosen: list[int], slots: list[_Slot]) -> dict[tuple[int, int], list[int]]:
        """``{(group_index, row): [dims]}`` for the chosen flat factor indices."""
        blocks: dict[tuple[int, int], list[int]] = {}
        starts = [slot.start for slot in slots]
        for index in chosen:  # ascending, so each block's dims come out in ascending order
            group_index, row, dim = cls._position(index, slots, starts)
            blocks.setdefault((group_index, row), []).append(dim)
        return dict(sorted(blocks.items()))

    def _refresh_blocks(self, mine, groups: list[FactorGroup], tolerance: float,
                        flagged: set[tuple[int, int, int]]) -> None:
        by_stack: dict[tuple[int, int], list[int]] = {}
        for (group_index, row), dims in mine:
            for dim in dims:
                by_stack.setdefault((group_index, dim), []).append(row)
        fallbacks = [
            self.optimizer.refresh_rows(groups[group_index], dim, rows, tolerance=tolerance,
                                        max_iters=getattr(self.policy, "max_iters", 1),
                                        reorthonormalize=[(group_index, row, dim) in flagged for row in rows],
                                        defer_fallback=True)
            for (group_index, dim), rows in sorted(by_stack.items())]
        self.optimizer.refresh_fallbacks(fallbacks)  # Cholesky-QR's failures: one host read for all

    @staticmethod
    def _pieces(owners: dict[tuple[int, int], int], groups: list[FactorGroup]) -> list[OwnedRows]:
        rows: dict[tuple[int, int], list[int]] = {}
        for (group_index, row), owner in owners.items():
            rows.setdefault((group_index, owner), []).append(row)
        return [OwnedRows(groups[g].tensors, torch.tensor(r, device=groups[g].device), owner)
                for (g, owner), r in sorted(rows.items())]

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Small: the counters. The deferred factors, needed for a bit-identical resume, are part
        of the optimizer's state (each factor's ``deferred`` flag), so they are saved with it, per
        rank under FSDP2.

        Under FSDP2 each rank counts its own refreshes, and checkpoints keep one copy of this
        state: every rank's counters are gathered into it (a collective, like every other part
        of saving a sharded checkpoint), and each rank takes its own back on load.
        """
        counters = {"checks": self.counters.checks, "refreshes": self.counters.refreshes, "seconds": self.counters.seconds}
        state = {"format": STATE_FORMAT, "counters": counters}
        layout = getattr(self.optimizer, "shard_layout", None)
        if layout is not None:
            state["counters_by_rank"] = gather_over_shards(counters, layout)
        if callable(getattr(self.policy, "state_dict", None)):  # a policy that keeps state (the study's RelativeRefresh)
            state["policy"] = self.policy.state_dict()
        return state

    @staticmethod
    def check_state_dict(state: Any) -> None:
        """Refuse a state this scheduler cannot load, before anything is written (the optimizer's
        load checks it with the rest)."""
        if not isinstance(state, dict) or state.get("format") not in (1, STATE_FORMAT):
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"unknown RefreshScheduler state format {found!r}")
        if not isinstance(state.get("counters"), dict):
            raise ValueError("a RefreshScheduler state needs its counters (a dict), got "
                             f"{type(state.get('counters')).__name__}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        counters = state["counters"]
        layout = getattr(self.optimizer, "shard_layout", None)
        if layout is not None and len(state.get("counters_by_rank", [])) == layout.world_size:
            counters = state["counters_by_rank"][layout.rank]
        self.counters = RefreshCounters(**{**asdict(RefreshCounters()), **counters})
        if "policy" in state and callable(getattr(self.policy, "load_state_dict", None)):
            self.policy.load_state_dict(state["policy"])
        saved = state.get("deferred")  # format 1 kept the queue here: applied once the layout is known
        self._saved_deferred = None if saved is None else tuple(saved)
        self.optimizer_state_replaced()

    def optimizer_state_replaced(self) -> None:
        """The optimizer loaded a state: reread its factor layout, and decide its next step afresh
        (its step counter may have moved back to a step this scheduler already decided)."""
        self._layout_for = None
        self._decided_at = -1

    def _restore_deferred(self, factor_count: int) -> None:
        """Apply a format-1 state's queue (flat factor indices) to the optimizer's factors."""
        if self._saved_deferred is None:
            return
        saved_count, indices = self._saved_deferred
        if saved_count != factor_count:
            raise ValueError(f"RefreshScheduler state is for {saved_count} factors, this optimizer has {factor_count}")
        codes = [0] * factor_count
        for index in indices:
            codes[index] = _DEFERRED
        self._note_deferred(self._slots, codes)
        self._saved_deferred = None
