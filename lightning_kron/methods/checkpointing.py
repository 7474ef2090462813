"""Checkpoints and copies of :class:`~lightning_kron.methods.kron_optimizer.KronOptimizer`:
``state_dict``, an all-or-nothing ``load_state_dict``, and ``copy.deepcopy`` / pickle.

The per-parameter state is views of the stacked tensors (``optimizer.state[param]``), so
torch.optim's own ``state_dict`` and ``torch.distributed.checkpoint`` see ordinary per-parameter
tensors. What belongs to the optimizer as a whole travels in the first parameter group. A load
checks every shape before it writes a tensor, then rebuilds the stacks. A mixin of
``KronOptimizer``, listed before ``torch.optim.Optimizer`` so that its methods wrap torch's; it
relies on the optimizer's ``param_groups``, ``state``, ``_groups``, ``_names``, ``_build_groups``,
``_expose_state_views``, ``_state_key``, ``_reset_shared_steps``, ``update_staleness``,
``_staleness_current``, ``own_scheduler``, ``shard_layout``, ``global_step``, ``skipped_steps``
and ``_compile_functions``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from lightning_kron.engine.factor_group import FactorGroup
from lightning_kron.engine.sharding import gather_over_shards

STATE_FORMAT = 2  # 2: the optimizer-wide entry moved from the top level into param_groups[0]
META_KEY = "lightning_kron"
#: why a saved entry's keys can differ from the ones this optimizer expects (said when they do)
_OTHER_LAYOUT = ("it was saved by another model, or with another blocking (max_precond_dim, merge_dims, "
                 "split_large_dims, precondition_1d) or method options (graft)")


class Checkpointing:
    """``state_dict`` / ``load_state_dict`` (see the module docstring)."""

    def state_dict(self) -> dict:
        """torch.optim's state (per parameter: views of its rows of every stacked tensor) and
        param_groups. What belongs to the optimizer as a whole (the format, the class, the global
        and skipped step counts, its own scheduler's deferred factors) travels in the first
        parameter group under ``"lightning_kron"``: ``torch.distributed.checkpoint`` keeps only
        ``state`` and ``param_groups`` (``get_optimizer_state_dict`` drops other top-level keys).
        That entry is added by the first state_dict post-hook (:meth:`_add_optimizer_entry`), which
        stays first, so every hook a user registers sees the whole state, ``prepend=True`` or not.
        Under FSDP2 it is a collective (the scheduler gathers every rank's counters): call it on
        every rank, as ``get_optimizer_state_dict`` does."""
        self.update_staleness()
        return super().state_dict()  # param_groups are fresh dicts: the live groups stay as they are

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        """torch.optim's, except that a ``prepend=True`` hook runs second: after the hook that
        adds the optimizer-wide entry, so it sees what will be saved."""
        handle = super().register_state_dict_post_hook(hook, prepend=prepend)
        entry_hook = getattr(self, "_entry_hook_id", None)  # None while the entry's own is registered
        if entry_hook in self._optimizer_state_dict_post_hooks:
            self._optimizer_state_dict_post_hooks.move_to_end(entry_hook, last=False)
        return handle

    def _add_optimizer_entry(self, optimizer, state: dict) -> dict:
        """The state_dict post-hook, registered first at construction: the optimizer-wide entry."""
        state["param_groups"][0][META_KEY] = {
            "format": STATE_FORMAT, "optimizer": type(self).__name__,
            "global_step": self.global_step, "skipped_steps": self.skipped_steps,
            "scheduler": self.own_scheduler.state_dict(),  # deferred factors of its budget
            "world_size": None if self.shard_layout is None else self.shard_layout.world_size,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load all or nothing: everything is checked before any tensor is written. Hooks registered
        with ``register_load_state_dict_pre_hook`` / ``_post_hook`` run as torch.optim runs them: a
        pre-hook sees (and may replace) a shallow copy of ``state_dict``, a post-hook runs after the
        load."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict (an optimizer's state_dict()), got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            replaced = pre_hook(self, state_dict)
            if replaced is not None:
                state_dict = replaced
        self._load(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load(self, state_dict: dict) -> None:
        """The load itself: the class, the world size, the counts of groups and parameters and
        every shape checked, then fresh stacks filled and the counters restored."""
        mine = type(self).__name__
        if not isinstance(state_dict.get("state"), Mapping) or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError(f"state_dict must hold 'state' (a dict) and 'param_groups' (a list), as an optimizer's "
                             f"state_dict() does; got the keys {sorted(map(str, state_dict))} (cannot load it into {mine})")
        groups = state_dict["param_groups"] or [{}]
        meta = groups[0].get(META_KEY, state_dict.get(META_KEY))  # top level: checkpoints before format 2
        if meta is None:
            raise ValueError(f"this state_dict was not saved by a lightning_kron optimizer; cannot load it into {mine} "
                             "(to go on from an AdamW run, load the model's weights only: the optimizer starts afresh)")
        self._check_meta(meta)
        self._check_world_size(meta.get("world_size"))
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("state_dict has a different number of parameter groups or parameters than this optimizer")
        for live, saved in zip(self.param_groups, saved_groups):  # the constructor's checks, on what the load would set
            self._validate_group(_as_numbers({**live, **saved}))
        fresh = self._build_groups()
        # saved ids by position, as torch.optim does: indices from state_dict(), parameter names
        # from torch.distributed.checkpoint's set_optimizer_state_dict
        saved_key = {id(param): key for live, saved in zip(self.param_groups, saved_groups)
                     for param, key in zip(live["params"], saved["params"])}
        if self.shard_layout is not None:
            self._check_every_rank_saved(fresh, saved_key, state_dict["state"], meta["global_step"])
        plan = self._copy_plan(fresh, saved_key, state_dict["state"])
        for target, source in plan:
            target.copy_(source)
        for group in fresh:  # host reads per stack, on load only
            for dim in group.factored_dims:
                group.mark_refreshed(dim, [row for row, count in enumerate(group.refreshes(dim).tolist()) if count])
            group.any_deferred = any(bool(group.deferred(dim).any()) for dim in group.factored_dims)
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({key: value for key, value in saved.items() if key not in ("params", META_KEY)})
        self._groups = fresh
        self.state.clear()
        self._expose_state_views(fresh)
        self.global_step, self.skipped_steps = meta["global_step"], meta["skipped_steps"]
        self._staleness_current = False  # recomputed from the loaded statistics when read
        self._reset_shared_steps()
        if "scheduler" in meta:  # absent from checkpoints made before the scheduler was the one path
            self.own_scheduler.load_state_dict(meta["scheduler"])
        for scheduler in {id(s): s for s in (self.own_scheduler, self.scheduler) if s is not None}.values():
            scheduler.optimizer_state_replaced()  # an attached one too: a rollback must not skip a refresh

    def __getstate__(self) -> dict:
        """Everything the optimizer holds, for ``copy.deepcopy`` and pickle (torch.optim keeps only
        ``defaults``, ``state`` and ``param_groups``, which would leave a copy without its stacks,
        counters and scheduler). Parameter names travel by position, since ``_names`` is keyed by
        ``id``, which a copy changes; compiled functions are compiled again in the copy. Left
        behind, as torch.optim leaves them: the ``step`` wrapper a torch LR scheduler installs on
        the instance (it holds a reference to this optimizer, so a copy's ``step`` would step the
        original) and its ``_opt_called`` flag. Hooks travel with the copy (the scheduler's and the
        state_dict hook are the optimizer's own); pickling needs the user's to be picklable. A
        sharded optimizer (FSDP2) cannot be copied: its layout holds a process group."""
        if self.shard_layout is not None:
            raise TypeError("a sharded (FSDP2) lightning_kron optimizer cannot be copied or pickled: its state "
                            "follows this rank's shard rows; save it with torch.distributed.checkpoint instead")
        state = dict(self.__dict__)
        state["_names"] = [[self._names[id(param)] for param in group["params"]] for group in self.param_groups]
        for key in ("_compiled_functions", "step", "_opt_called"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        names = state.pop("_names")
        super().__setstate__(state)
        self._names = {id(param): name for group, group_names in zip(self.param_groups, names)
                       for param, name in zip(group["params"], group_names)}
        self._compiled_functions = self._compile_functions()

    def _check_world_size(self, saved: Optional[int]) -> None:
        """Under FSDP2 each rank's state covers its own rows: it only fits the same world size."""
        current = None if self.shard_layout is None else self.shard_layout.world_size
        if saved != current:
            def describe(size):
                return "unsharded" if size is None else f"sharded over {size} ranks"
            raise ValueError(f"this state_dict was saved {describe(saved)} and cannot be loaded {describe(current)}: "
                             "the Kronecker blocks follow the shard rows, so resume at the world size it was saved at")

    def _check_every_rank_saved(self, groups: list[FactorGroup], saved_key: dict[int, Any], saved_state: dict,
                                saved_step: int) -> None:
        """Under FSDP2, refuse a state in which the ranks' step counts disagree (a collective: every
        rank refuses together). Every rank updates the rows of the same parameters at the same steps,
        so a saved state has one step count per parameter on all ranks. A *full* (single-file) state
        dict holds rank 0's ``rank0.`` entries alone, and ``set_optimizer_state_dict`` hands every
        other rank its current state as if it were the saved one: the counts then differ, a fresh
        optimizer's being 0. The saved keys and shapes stay as they are, so older sharded
        checkpoints still load."""
        counts: dict[int, int] = {}
        for group in groups:
            for member in group.members:
                key = saved_key[id(member.param)]
                value = saved_state.get(key, {}).get(self._state_key(member.block_number, "step"))
                if value is not None:
                    counts[key] = max(counts.get(key, 0), int(value))
        gathered = gather_over_shards(counts, self.shard_layout)
        reference = {}
        for rank_counts in gathered:  # the lowest rank that holds rows of a parameter is its reference
            for key, count in rank_counts.items():
                reference.setdefault(key, count)
        bad = [rank for rank, rank_counts in enumerate(gathered)
               if any(count != reference[key] for key, count in rank_counts.items())]
        if bad:
            found = sorted({count for key, count in gathered[bad[0]].items() if count != reference[key]})
            raise ValueError(
                f"this state_dict holds no saved state for the shards of rank(s) {bad}: their step counts "
                f"({', '.join(map(str, found[:3]))}) are not the other ranks' (the checkpoint is from step {saved_step}). "
                "A full (single-file) state dict of a sharded lightning_kron optimizer keeps rank 0's rows only; save "
                "the sharded state dict (torch.distributed.checkpoint with full_state_dict=False; in Lightning, "
                "ModelParallelStrategy(save_distributed_checkpoint=True), the default)")

    def _check_meta(self, meta: Any) -> None:
        """The optimizer-wide entry: its class and counts, and its scheduler's state, checked before
        anything is written (a malformed one used to fail after the stacks were replaced)."""
        mine = type(self).__name__
        missing = [key for key in ("optimizer", "global_step", "skipped_steps") if not isinstance(meta, Mapping) or key not in meta]
        if missing:
            raise ValueError(f"state_dict's {META_KEY!r} entry lacks {', '.join(missing)}; it is damaged or was not "
                             f"written by a lightning_kron optimizer (cannot load it into {mine})")
        if meta["optimizer"] != mine:
            raise ValueError(f"state_dict was saved by lightning_kron.{meta['optimizer']}, cannot load it into {mine}")
        if "scheduler" in meta:
            self.own_scheduler.check_state_dict(meta["scheduler"])

    def _copy_plan(self, groups: list[FactorGroup], saved_key: dict[int, Any], saved_state: dict) -> list:
        plan, expected = [], {}
        for group in groups:
            for member, views in group.member_views():
                saved = saved_state.get(saved_key[id(member.param)], {})
                names = expected.setdefault(id(member.param), (member.name, saved, {self._state_key(None, "shard")}))[2]
                for key, view in views.items():
                    name = self._state_key(member.block_number, key)
                    names.add(name)
                    value = saved.get(name)
                    if value is None and key.startswith("deferred."):  # saved before the queue was state
                        continue
                    if value is None:
                        raise ValueError(f"state_dict does not match parameter {member.name!r}: it has no {name}; "
                                         f"{_OTHER_LAYOUT}")
                    if not isinstance(value, torch.Tensor) or (view.dtype.is_floating_point and not value.dtype.is_floating_point) \
                            or (view.dtype == torch.bool) != (value.dtype == torch.bool):  # an int64 basis would truncate to 0/±1
                        found = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                        raise ValueError(f"state_dict does not match parameter {member.name!r}: {name} "
                                         f"expected a {view.dtype} tensor, found {found}")
                    if tuple(value.shape) != tuple(view.shape):
                        raise ValueError(f"state_dict does not match parameter {member.name!r}: {name} "
                                         f"expected shape {tuple(view.shape)}, found {tuple(value.shape)}")
                    plan.append((view, value))
        self._refuse_unknown_state(expected.values())
        return plan

    @staticmethod
    def _refuse_unknown_state(expected) -> None:
        """A saved entry with blocks or factors this optimizer does not have was saved with another
        layout: loading the rest would leave moments expressed in bases that are dropped."""
        for name, saved, names in expected:
            unknown = sorted(set(saved) - names)
            if unknown:
                raise ValueError(
                    f"state_dict does not match parameter {name!r}: it holds {', '.join(unknown[:3])}"
                    f"{' ...' if len(unknown) > 3 else ''}, which this optimizer does not have; {_OTHER_LAYOUT}")


def _as_numbers(group: dict) -> dict:
    """A group's one-element tensors as numbers, also inside ``betas``, for the hyperparameter
    checks: an LR scheduler or a user may set ``lr`` or ``betas`` to 0-d tensors mid-run, which a
    checkpoint then carries."""
    def number(value):
        return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value

    return {key: type(value)(number(item) for item in value) if isinstance(value, (tuple, list)) and key != "params"
            else number(value) for key, value in group.items()}
