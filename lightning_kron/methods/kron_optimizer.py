"""``KronOptimizer``: the torch.optim front end shared by SOAP, EShampoo, Shampoo and KrADagrad.

It owns what every Kronecker method has in common: named parameters and parameter groups, cutting
parameters into blocks and stacking same-shaped blocks into :class:`FactorGroup`s, the step
skeleton, the exact first refresh and the scheduler that decides every later one
(:class:`~lightning_kron.scheduling.scheduler.RefreshScheduler` over its own ``refresh=`` policy,
until an owner such as ``KronCallback`` attaches its own). Three mixins hold what is not the step
itself: the NaN/Inf guard (``nonfinite_guard.py``), factor names, telemetry and refreshes on request
(``owner_interface.py``), and checkpoints (``checkpointing.py``). Subclasses supply the math through
four hooks: ``_init_state`` (extra buffers), ``_update_statistics``, ``_direction`` and the
basis-change hooks ``permute_rows``/``rotate_rows``.

A step runs in two phases so the refresh decision for *all* factors costs one host sync:
1. for every group: gather gradients, rotate them into the current bases and update the factor
   statistics (the staleness criterion is computed from them when someone reads it);
2. the scheduler picks stale factors from one concatenated staleness tensor and refreshes them (the
   refreshed groups rotate their gradient in flight again); every group computes its direction
   and updates its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from lightning_kron.engine.basis_refresh import SOLVERS, RefreshRequest, refresh_factor
from lightning_kron.engine.blocking import plan_blocks
from lightning_kron.engine.factor_group import (
    FactorGroup,
    Member,
    apply_updates,
    gather_grads,
    share_step_counts,
    update_parameters,
)
from lightning_kron.engine.mode_products import unfold
from lightning_kron.engine.precision import cuda_matmul_precision
from lightning_kron.engine.sharding import ShardLayout, local_tensor, shard_layout
from lightning_kron.engine.solvers import ORTHONORMALIZERS
from lightning_kron.engine.staleness import staleness
from lightning_kron.engine.validation import (
    check_betas,
    check_choice,
    check_dtype,
    check_flag,
    check_nonnegative,
    check_positive_int,
    check_unit_interval,
)
from lightning_kron.methods.checkpointing import Checkpointing
from lightning_kron.methods.nonfinite_guard import NonfiniteGuard
from lightning_kron.methods.owner_interface import OwnerInterface
from lightning_kron.methods.step_hyperparameters import StepHyperparameters
from lightning_kron.scheduling.policies import (
    FixedRefresh,
    RefreshPolicy,
    check_policy,
)
from lightning_kron.scheduling.ownership import check_replicated
from lightning_kron.scheduling.scheduler import RefreshScheduler

REFRESH_TIMINGS = ("in_step", "after_step")
#: "decoupled": W <- W (1 - lr wd) - lr D, on the pre-update weights as torch.optim.AdamW;
#: "decoupled_after_update": W <- (W - lr D)(1 - lr wd), the SOAP reference's order; "l2": wd W into G.
WEIGHT_DECAY_MODES = ("decoupled", "l2", "decoupled_after_update")


@dataclass
class _PendingGroup:
    """One stack's part of a step: its gradient (a view of the parameter group's gradient buffer),
    then that gradient in the eigenbases (``rotated_low``: as the rotation produced it, in
    ``rotation_dtype``), and the hyperparameters of its parameter group."""

    group: FactorGroup
    source: FactorGroup
    rows: Optional[list[int]]
    grad: Optional[torch.Tensor] = None
    rotated: Optional[torch.Tensor] = None
    rotated_low: Optional[torch.Tensor] = None
    hyper: Optional[StepHyperparameters] = None


class _InFlightHooks:
    """Basis-change hooks used inside a step: the optimizer's own hooks, and the rotated gradient of
    the step in flight is re-expressed in the new basis too (one mode product instead of rotating
    the whole gradient again)."""

    def __init__(self, optimizer: "KronOptimizer", item: _PendingGroup) -> None:
        self.optimizer, self.item = optimizer, item

    def permute_rows(self, group, rows, dim, order) -> None:
        self.optimizer.permute_rows(group, rows, dim, order)

    def rotate_rows(self, group, rows, dim, rotation) -> None:
        self.item.rotated = _replace_rows(self.item.rotated, rows, lambda x: group.mode_product(x, dim, rotation.mT))
        self.optimizer.rotate_rows(group, rows, dim, rotation)

    def after_refresh(self, group, rows, dim) -> None:
        self.optimizer.after_refresh(group, rows, dim)

    def factor_staleness(self, stats: torch.Tensor) -> torch.Tensor:
        return self.optimizer.factor_staleness(stats)


def _by_param_group(pending: list[_PendingGroup]) -> dict[int, list[_PendingGroup]]:
    by_group: dict[int, list[_PendingGroup]] = {}
    for item in pending:
        by_group.setdefault(item.source.param_group, []).append(item)
    return by_group


def _step_counters(items: list[_PendingGroup]) -> list[torch.Tensor]:
    """The step counts to advance: the shared buffer of a parameter group (``share_step_counts``)
    when every stack in it takes this step whole, else each stack's own counts."""
    whole: dict[int, int] = {}
    for item in items:
        if item.rows is None and item.group.step_buffer is not None:
            whole[id(item.group.step_buffer)] = whole.get(id(item.group.step_buffer), 0) + len(item.group)
    counters, seen = [], set()
    for item in items:
        buffer = item.group.step_buffer
        if item.rows is None and buffer is not None and whole[id(buffer)] == buffer.numel():
            if id(buffer) not in seen:
                seen.add(id(buffer))
                counters.append(buffer)
        else:
            counters.append(item.group.steps)
    return counters


def _replace_rows(stack: torch.Tensor, rows, transform) -> torch.Tensor:
    if rows is None:
        return transform(stack)
    stack = stack.clone()
    stack[rows] = transform(stack[rows])
    return stack


def _split_named(params: Any, first_group: int = 0, taken: Optional[set[str]] = None) -> tuple[list[dict], dict[int, str]]:
    """Accept tensors, (name, tensor) pairs or group dicts; return plain groups and names by id.
    ``taken``: names already in use (a group added later must not reuse them)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, not a tensor")
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    names: dict[int, str] = {}
    taken = set() if taken is None else taken
    plain_groups = []
    for group_index, group in enumerate(groups, start=first_group):
        group = dict(group)
        items = group["params"]
        items = [items] if isinstance(items, torch.Tensor) else list(items)
        kept = []
        for position, item in enumerate(items):
            name, param = item if isinstance(item, tuple) else (None, item)
            if id(param) in names:  # tied weights: one Parameter, handled once
                continue
            name = name or f"group{group_index}.param{position}"
            _check_parameter(name, param)
            names[id(param)] = _unique_name(name, group_index, taken)
            kept.append(param)
        group["params"] = kept
        group.pop("param_names", None)
        plain_groups.append(group)
    return plain_groups, names


def _check_parameter(name: str, param: Any) -> None:
    """Refuse, before any state exists, what the step could not precondition."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"parameter {name!r} is a {type(param).__name__}, not a tensor")
    if not param.is_floating_point():
        raise ValueError(f"parameter {name!r} is {param.dtype}: only floating-point parameters can be optimized")


def _unique_name(name: str, group_index: int, taken: set[str]) -> str:
    """``name``, or, when another parameter already has it (two modules' ``named_parameters()`` in
    two groups), the name with its group as a prefix, so factor names and metrics stay apart."""
    unique, copy = name, 1
    while unique in taken:
        unique = f"group{group_index}.{name}" if copy == 1 else f"group{group_index}.{name}#{copy}"
        copy += 1
    taken.add(unique)
    return unique


class KronOptimizer(OwnerInterface, Checkpointing, NonfiniteGuard, torch.optim.Optimizer):
    """Base class; see the module docstring. Not used directly: pick SOAP, EShampoo or Shampoo."""

    #: Solver of each factor's exact first refresh (at ``start_preconditioning_step``, or at its
    #: first gradient after it). "eigh" finds the bases from
    #: scratch; a subclass whose statistics update already produces exact eigenbases may use "qr".
    initial_refresh_solver = "eigh"
    #: Whether ``_direction`` itself returns 0 for a parameter group skipped this step (a non-finite
    #: gradient); otherwise ``_finish`` masks the direction, one more pass over the stack.
    masks_skipped_direction = False
    #: Whether a warm QR refresh with Cholesky-QR factors ``B + delta I`` (robust to rank-deficient
    #: B; ``engine.solvers.cholesky_qr3_step_shift``). The shift slows the separation of the
    #: eigenvalues below ~delta: for statistics L their directions carry little of the factor, but
    #: a method that stores inverses needs them most (they are L's largest, KrADagrad) and, its X
    #: being damped and full-rank, needs no shift (gpt-mini's X: no failures unshifted; shifted,
    #: 8% more inverse staleness after one shifted Cholesky-QR3 step, 56% after Cholesky-QR2's).
    shifted_qr_refresh = True
    #: The pure per-parameter-group functions that ``compile=True`` hands to ``torch.compile``, by
    #: name (a method adds its direction, e.g. SOAP's ``"direction"``).
    compilable: dict[str, Callable] = {"update": update_parameters}

    def __init__(
        self,
        params: Any,
        defaults: dict,
        *,
        max_precond_dim: int = 4096,
        merge_dims: bool = True,
        split_large_dims: bool = False,
        precondition_1d: bool = False,
        start_preconditioning_step: int = 1,
        refresh: Optional[RefreshPolicy] = None,
        solver: str = "qr",
        orthonormalizer: str = "auto",
        nonfinite: str = "skip",
        statistics_dtype: Optional[torch.dtype] = None,
        rotation_dtype: Union[str, torch.dtype, None] = "auto",
        statistics_product_dtype: Optional[torch.dtype] = None,
        compile: bool = False,
        refresh_timing: str = "in_step",
        replicated: bool = True,
    ) -> None:
        check_positive_int("max_precond_dim", max_precond_dim, minimum=0)
        check_choice("refresh_timing", refresh_timing, REFRESH_TIMINGS)
        check_positive_int("start_preconditioning_step", start_preconditioning_step)
        check_choice("solver", solver, SOLVERS)
        check_choice("orthonormalizer", orthonormalizer, ("auto", *ORTHONORMALIZERS))
        check_choice("nonfinite", nonfinite, ("skip", "raise"))
        check_flag("compile", compile)
        #: under a process group, plain (unsharded) parameters are taken to be DDP replicas: the
        #: refreshes are split between ranks and shared (checked once: scheduling/ownership.py)
        self.replicated = check_flag("replicated", replicated)
        self._replicas_checked = False
        refresh = check_policy(refresh if refresh is not None else FixedRefresh(every=10))
        statistics_dtype = check_dtype("statistics_dtype", statistics_dtype, (torch.float32, torch.float64))
        # no float16 for either: a rotation concentrates a gradient's norm into a few entries, which
        # overflowed fp16 on finite gradients the guard passed (largest entry 1.5e4 on a 64x48 weight),
        # and squared gradients overflow it sooner
        rotation_dtype = check_dtype("rotation_dtype", rotation_dtype,
                                     (torch.float32, torch.float64, torch.bfloat16), modes=("auto", "tf32"))
        statistics_product_dtype = check_dtype("statistics_product_dtype", statistics_product_dtype,
                                               (torch.float32, torch.float64, torch.bfloat16))
        self.max_precond_dim = max_precond_dim
        self.merge_dims = check_flag("merge_dims", merge_dims)  # "no" from a config would merge
        self.split_large_dims = check_flag("split_large_dims", split_large_dims)
        self.precondition_1d = check_flag("precondition_1d", precondition_1d)
        self.start_preconditioning_step = start_preconditioning_step
        self.refresh = refresh
        self.solver = solver
        self.orthonormalizer = orthonormalizer
        self.nonfinite = nonfinite
        self.statistics_dtype = statistics_dtype
        self.rotation_dtype = rotation_dtype
        self.statistics_product_dtype = statistics_product_dtype
        self.refresh_timing = refresh_timing
        #: The RefreshScheduler in charge: :attr:`own_scheduler`, or an owner's while attached. Its
        #: ``in_step()`` runs inside ``step`` after the statistics update (``_run_scheduler``), or
        #: its post-step hook after the step (``refresh_timing="after_step"``).
        self.scheduler: Optional[RefreshScheduler] = None
        self.step_finite: dict[int, torch.Tensor] = {}
        self.global_step = 0
        self._skipped_on_device: Optional[torch.Tensor] = None
        self.skipped_steps = 0
        self._host_steps: dict[int, int] = {}  # steps each parameter group took part in (host)
        self._unshared_steps: set[int] = set()  # parameter groups whose stacks' step counts differ
        #: ``compile=True``: the :attr:`compilable` functions, compiled (never the whole ``step``:
        #: Dynamo drops the attribute updates of an Optimizer subclass, e.g. ``global_step``)
        self.compile = compile
        self._compiled_functions = self._compile_functions()
        groups, self._names = _split_named(params)
        #: Where the FSDP2-sharded parameters live (None when no parameter is a DTensor): each rank
        #: then preconditions its own rows, and the step all-reduces its finite-gradient flags.
        self.shard_layout: Optional[ShardLayout] = self._check_sharding(groups)
        self._groups: Optional[list[FactorGroup]] = None
        self._staleness_current = True  # every factor is still zero, and so is its staleness
        super().__init__(groups, defaults)
        self._entry_hook_id = self.register_state_dict_post_hook(self._add_optimizer_entry, prepend=True).id
        #: The optimizer's own scheduler over ``refresh``; an owner's scheduler replaces it in
        #: :attr:`scheduler` while attached.
        self.own_scheduler = RefreshScheduler(self, self.refresh)
        # The state exists from the start (build the optimizer once the model is on its device, as
        # for torch.optim.Adagrad): torch.distributed.checkpoint then loads into it instead of
        # running a zero-gradient step to create it.
        self.factor_groups()

    # ----------------------------------------------------------------- hyperparameters
    def add_param_group(self, param_group: dict) -> None:
        """Add a group (also after construction, e.g. Lightning's ``BaseFinetuning`` unfreezing):
        its parameters are named and stacked on their own; existing state is kept."""
        plain, names = _split_named([param_group], first_group=len(self.param_groups), taken=set(self._names.values()))
        # checked before anything is recorded: a refused group leaves no trace, and a corrected retry works
        self._validate_group({**self.defaults, **{key: value for key, value in plain[0].items() if key != "params"}})
        added_names = [key for key in names if key not in self._names]
        for key in added_names:
            self._names[key] = names[key]
        try:
            if getattr(self, "_groups", None) is not None:  # the constructor checked its own groups already
                self._check_sharding([*self.param_groups, plain[0]])
            super().add_param_group(plain[0])
        except Exception:
            for key in added_names:
                del self._names[key]
            raise
        if getattr(self, "_groups", None) is not None:
            added = self._build_groups([len(self.param_groups) - 1])
            # a new list, not extend(): the scheduler rebuilds its factor layout when the list changes
            self._groups = [*self._groups, *added]
            self._expose_state_views(added)

    def _validate_group(self, group: dict) -> None:
        check_nonnegative("lr", group["lr"])
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_choice("weight_decay_mode", group["weight_decay_mode"], WEIGHT_DECAY_MODES)
        if group["shampoo_beta"] is not None:
            check_unit_interval("shampoo_beta", group["shampoo_beta"], closed_right=True)

    def _check_sharding(self, groups: list[dict]) -> Optional[ShardLayout]:
        layout = shard_layout((self._names[id(param)], param) for group in groups for param in group["params"])
        if getattr(self, "_groups", None) is not None and layout != self.shard_layout:
            raise ValueError("a parameter group added later must be sharded like the optimizer's other parameters")
        return layout

    def _hyperparameters(self, group: dict, finite: Optional[torch.Tensor] = None,
                         step: Optional[torch.Tensor] = None) -> StepHyperparameters:
        beta1, beta2 = group["betas"]
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else beta2
        return StepHyperparameters(
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=group["weight_decay_mode"] != "l2",
            shampoo_beta=shampoo_beta, finite=finite, step=step,
            decay_after_update=group["weight_decay_mode"] == "decoupled_after_update",
        )

    # ----------------------------------------------------------------- grouping
    def _state_dtype(self, param: torch.Tensor) -> torch.dtype:
        if self.statistics_dtype is not None:
            return self.statistics_dtype
        return torch.float64 if param.dtype == torch.float64 else torch.float32

    def factor_groups(self) -> list[FactorGroup]:
        """The stacked groups (built at construction; rebuilt by :meth:`load_state_dict`)."""
        if self._groups is None:
            self._groups = self._build_groups()
            self.state.clear()
            self._expose_state_views(self._groups)
        return self._groups

    def _build_groups(self, group_indices: Optional[list[int]] = None) -> list[FactorGroup]:
        buckets: dict[tuple, list[Member]] = {}
        indices = range(len(self.param_groups)) if group_indices is None else group_indices
        for group_index in indices:
            for param in self.param_groups[group_index]["params"]:
                local_shape = tuple(local_tensor(param).shape)  # an FSDP2 shard is blocked on its own rows
                if 0 in local_shape:  # an empty shard (fewer rows than ranks) has nothing to precondition
                    continue
                plan = plan_blocks(
                    local_shape, max_precond_dim=self.max_precond_dim, merge_dims=self.merge_dims,
                    split_large_dims=self.split_large_dims, precondition_1d=self.precondition_1d,
                )
                for number, block in enumerate(plan.blocks):
                    # frozen parameters get stacks of their own, so they never force a gather/scatter
                    key = (group_index, block.shape, block.factored, param.dtype, param.device, param.requires_grad)
                    member = Member(param, self._names[id(param)], number, block, plan.view_shape)
                    buckets.setdefault(key, []).append(member)
        groups = []
        for (group_index, *_), members in buckets.items():
            rotation_dtype, tf32 = self._rotation_for(members[0].param.device)
            group = FactorGroup(members, self._state_dtype(members[0].param), group_index, rotation_dtype, tf32)
            self._init_state(group)
            groups.append(group)
        share_step_counts(groups)
        return groups

    def _rotation_for(self, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
        """``(rotation dtype, TF32 directions)`` of the stacks on ``device``. ``"tf32"`` rotates the
        direction back on TF32 tensor cores, the one rotation whose TF32 rounding was measured to
        leave the loss unchanged (``FactorGroup.rotate_out``); the gradient's rotation, the
        statistics, the bases and the refresh stay IEEE fp32. ``"auto"``: that on CUDA, plain fp32
        elsewhere (a CPU has no TF32; its emulation is slower than fp32)."""
        option = self.rotation_dtype
        if option == "auto":
            option = "tf32" if device.type == "cuda" else None
        return (None, True) if option == "tf32" else (option, False)

    def _orthonormalizer_for(self, device: torch.device) -> str:
        """``"auto"``: batched shifted Cholesky-QR3 on CUDA (matmuls and a batched Cholesky, where
        ``geqrf`` of a large matrix runs one matrix at a time), Householder QR elsewhere."""
        if self.orthonormalizer != "auto":
            return self.orthonormalizer
        return "cholesky_qr3" if device.type == "cuda" else "householder"

    def _expose_state_views(self, groups: list[FactorGroup]) -> None:
        for group in groups:
            for member, views in group.member_views():
                entry = self.state[member.param]
                entry.update({self._state_key(member.block_number, key): view for key, view in views.items()})
        if self.shard_layout is not None:  # every sharded parameter has an entry, empty shards too
            for param in {id(p): p for group in self.param_groups for p in group["params"]}.values():
                self.state[param][self._state_key(None, "shard")] = self._shard_record(param)

    def _state_key(self, block_number: Optional[int], key: str) -> str:
        """``block{b}.{key}``; under FSDP2 prefixed with the rank (see ``ShardLayout.state_prefix``)."""
        name = key if block_number is None else f"block{block_number}.{key}"
        return name if self.shard_layout is None else self.shard_layout.state_prefix() + name

    def _shard_record(self, param: torch.Tensor) -> torch.Tensor:
        """``[rank, world size, local rows]`` of a sharded parameter: a resume checks it."""
        rows = local_tensor(param).shape[0] if param.dim() else 1
        return torch.tensor([self.shard_layout.rank, self.shard_layout.world_size, rows])

    # ----------------------------------------------------------------- hooks for subclasses
    def _init_state(self, group: FactorGroup) -> None:
        """Register method-specific stacked buffers with ``group.add``."""

    def _update_statistics(self, items: list[_PendingGroup], hyper: StepHyperparameters) -> None:
        """Default: EMA of ``unfold_i(G') unfold_i(G')^T`` into each ``B_i = Q_i^T L_i Q_i``, for
        the stacks of one parameter group (``item.rotated`` is ``G'``).

        ``G'`` is the gradient in the current bases; because the other modes' bases are orthogonal,
        that product equals ``Q_i^T (G_i G_i^T) Q_i``, so B stays the factor in its own eigenbasis.
        ``shampoo_beta = 1`` makes it AdaGrad's running sum. With a skip mask the decay of every B
        of the parameter group is one foreach op (a skipped group keeps B: its ``G'`` is 0).
        """
        beta = hyper.shampoo_beta
        keep, add = (1.0, 1.0) if beta == 1.0 else (beta, 1.0 - beta)
        if hyper.finite is not None and keep != 1.0:
            stats = [item.group.stats(dim) for item in items for dim in item.group.factored_dims]
            if stats:
                torch._foreach_mul_(stats, hyper.keep(beta, stats[0]))
            keep = 1.0
        for item in items:
            self._accumulate_statistics(item, keep, add)

    def _accumulate_statistics(self, item: _PendingGroup, keep: float, add: float) -> None:
        """``B_i <- keep B_i + add unfold_i(G') unfold_i(G')^T`` for one stack.

        ``statistics_product_dtype=bf16`` runs the product in bf16 (5x faster on a CPU with
        AVX512-BF16; B still accumulates in fp32): measured +0.6% final loss on the GPT recipe, so
        it is opt-in and separate from ``rotation_dtype`` (+0.1% there). With bf16 rotations the
        bf16 product reads ``item.rotated_low`` and needs no cast.
        """
        group, rotated, low = item.group, item.rotated, None
        product_dtype = self.statistics_product_dtype
        if product_dtype not in (None, group.state_dtype):
            low = item.rotated_low if item.rotated_low is not None and item.rotated_low.dtype == product_dtype \
                else rotated.to(product_dtype)
        for dim in group.factored_dims:
            stats = group.stats(dim)
            if low is None:
                unfolded = unfold(rotated, dim)
                stats.baddbmm_(unfolded, unfolded.mT, beta=keep, alpha=add)
            else:  # the product in low precision, accumulated into the full-precision statistics
                unfolded = unfold(low, dim)
                (stats if keep == 1.0 else stats.mul_(keep)).add_(torch.bmm(unfolded, unfolded.mT), alpha=add)

    def _directions(self, items: list[_PendingGroup]) -> list[torch.Tensor]:
        """The directions of the stacks of one parameter group. Default: :meth:`_direction` per
        stack; a method whose direction is elementwise across stacks overrides this with foreach
        ops (SOAP)."""
        return [self._direction(item.group, item.grad, item.rotated, item.hyper) for item in items]

    def _direction(self, group: FactorGroup, grad: torch.Tensor, rotated: torch.Tensor, hyper: StepHyperparameters) -> torch.Tensor:
        raise NotImplementedError

    def permute_rows(self, group, rows, dim, order) -> None:
        """A refresh ranked new column ``j`` after old column ``order[j]``: buffers carried over by
        position (not rotated) follow this correspondence."""

    def rotate_rows(self, group, rows, dim, rotation) -> None:
        """A refresh changed the basis by ``rotation = Q_old^T Q_new``: re-express rotated buffers."""

    def after_refresh(self, group, rows, dim) -> None:
        """A refresh finished (``stats.dim`` now holds the factor in its new basis)."""

    def factor_staleness(self, stats: torch.Tensor) -> torch.Tensor:
        """``e(Q, L)`` of each member from its stored ``stats`` (overridden for inverse factors)."""
        return staleness(stats)

    def factor_in_basis(self, group: FactorGroup, dim: int, row: int) -> torch.Tensor:
        """The statistic ``L`` of one member, expressed in its basis (what ``stats`` holds here;
        overridden for inverse factors): the approximation probe compares ``Q L Q^T`` with Adam's."""
        return group.stats(dim)[row]

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One step. On CUDA the statistics, the refresh and everything else run in IEEE fp32
        whatever the process-wide TF32 setting is (the rotations alone may use TF32:
        ``rotation_dtype``); the setting is restored on return."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.factor_groups()
        if not self._replicas_checked:  # on every rank from its first step, before any collective relies on it
            self._replicas_checked = not (self.replicated and self.shard_layout is None) or check_replicated(self)
        if self.scheduler is not None:  # a schedule that cannot run here fails before any state changes
            self.scheduler.tolerance_at(max(self.global_step + 1 - self.start_preconditioning_step, 0))
        self.global_step += 1
        with cuda_matmul_precision("ieee", any(group.device.type == "cuda" for group in groups)):
            try:
                pending = self._gather_and_update_statistics(groups)
            except FloatingPointError:  # nonfinite="raise" refused the step before any state changed
                self.global_step -= 1
                raise
            self._first_refresh(pending)
            self._run_scheduler(pending)
            for items in _by_param_group(pending).values():
                self._finish(items)
        return loss

    def _run_scheduler(self, pending: list[_PendingGroup]) -> None:
        """Let the scheduler decide and refresh between the statistics and the moment update.

        With the squared-rotation carry-over of SOAP's V, measured on the GPT recipe: refreshing here
        rather than after the step (the moments then take this step's gradient already in the new
        basis, instead of carrying it through the squared-rotation approximation) ends 0.7% lower at
        every=10. With the positional carry-over the other order wins, and refreshing here can
        diverge (docs/algorithms.md, "Deviations from the reference SOAP"). The gradients in flight of
        the groups it refreshed are rotated again from scratch: simpler than carrying each
        rotation over, and identical on every DDP rank whoever computed the refresh. A stack that is
        only partly gradded (a copy of its gradded rows is in flight) first writes that copy's
        statistics back, so the scheduler refreshes whole stacks; a refreshed one is copied again
        from its new bases. ``refresh_timing="after_step"`` leaves the scheduler to its post-step
        hook instead (the SOAP reference's order: the step is taken in the old bases, then the
        refreshed factors include this step's gradient and the moments are carried into the new
        bases).
        """
        if self.refresh_timing == "after_step" or self.scheduler is None:
            return
        if self.scheduler.decides_now():  # else nothing reads the statistics before the step ends
            for item in pending:  # the in-flight rows' updated statistics, where the scheduler reads them
                if item.rows is not None:
                    item.source.absorb(item.group, item.rows)
        refreshed = {id(group) for group in self.scheduler.in_step()}
        for item in pending:
            if id(item.source) not in refreshed:
                continue
            if item.rows is not None:  # the copy in flight holds the old bases: take it again
                item.group = item.source.subset(item.rows)
            item.rotated = item.group.rotate_in(item.grad)

    def _gather_and_update_statistics(self, groups: list[FactorGroup]) -> list[_PendingGroup]:
        """Phase 1 of the step, per parameter group: gather the gradients into one buffer, check
        and mask them on the device, count the step, rotate each stack's gradient into its bases
        and update the factor statistics."""
        pending, buffers = self._gather(groups)
        finite = self._finite_param_groups(buffers)
        #: this step's finite-gradient flag per parameter group (device bools; empty when none can
        #: be skipped): the scheduler refreshes no factor of a skipped group.
        self.step_finite = finite
        skipped = self._count_skips(finite)
        for index, items in _by_param_group(pending).items():
            hyper = self._hyperparameters(self.param_groups[index], finite.get(index),
                                          self._advance_steps(index, items, finite.get(index)))
            if hyper.weight_decay and not hyper.decoupled:
                for item in items:
                    item.grad.add_(item.group.gather_params(), alpha=hyper.weight_decay)
            if hyper.finite is not None:  # a skipped group's gradient enters every update as 0
                for buffer in buffers[index]:
                    buffer.masked_fill_(skipped[index], 0.0)
            for item in items:
                item.hyper = hyper
                item.rotated_low = item.group.rotate_in(item.grad, keep_rotation_dtype=True)
                item.rotated = item.rotated_low.to(item.group.state_dtype)  # no copy without a rotation_dtype
            self._update_statistics(items, hyper)
        self._staleness_current = False
        return pending

    def _gather(self, groups: list[FactorGroup]) -> tuple[list[_PendingGroup], dict[int, list[torch.Tensor]]]:
        """Every stack with a gradient (a partly gradded one as a copy of its gradded rows), with its
        gradient as a view of one buffer per parameter group (and parameter dtype and device)."""
        pending, buckets = [], {}
        for source in groups:
            present = source.has_grads()
            if not any(present):
                continue
            rows = None if all(present) else [row for row, ok in enumerate(present) if ok]
            item = _PendingGroup(source if rows is None else source.subset(rows), source, rows)
            param = source.members[0].param
            buckets.setdefault((source.param_group, param.dtype, param.device), []).append(item)
            pending.append(item)
        buffers: dict[int, list[torch.Tensor]] = {}
        for (index, *_), items in buckets.items():
            buffer, grads = gather_grads([item.group for item in items], items[0].group.state_dtype)
            for item, grad in zip(items, grads):
                item.grad = grad
            buffers.setdefault(index, []).append(buffer)
        return pending, buffers

    def _advance_steps(self, index: int, items: list[_PendingGroup], finite: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Count this step in every gradded member (one foreach op for the parameter group; a
        skipped group's count stays) and return the group's shared step count, if it has one."""
        for counts in _step_counters(items):
            if finite is None:
                counts.add_(1)
            else:  # bool into int64: no cast kernel
                counts.add_(finite)
        self._host_steps[index] = self._host_steps.get(index, 0) + 1
        for item in items:
            if item.rows is None:
                item.source.host_steps += 1
        if index not in self._unshared_steps and not self._steps_still_shared(index, items):
            self._unshared_steps.add(index)
        return None if index in self._unshared_steps else items[0].group.steps[0]

    def _steps_still_shared(self, index: int, items: list[_PendingGroup]) -> bool:
        """Whether every stack of parameter group ``index`` has the same per-member step counts
        (known on the host, no sync): each stack took part, fully gradded, in every step of the
        group or in none (skips hit every stack of a group alike). Once lost it stays lost, until
        a checkpoint load re-reads the counts (:meth:`_reset_shared_steps`)."""
        count = self._host_steps[index]
        return all(item.rows is None for item in items) and all(
            group.host_steps in (0, count) for group in self.factor_groups() if group.param_group == index)

    def _reset_shared_steps(self) -> None:
        """After a load: a parameter group shares its step count iff all its members' counts are
        equal (one host read per parameter group)."""
        self._host_steps, self._unshared_steps = {}, set()
        for index in range(len(self.param_groups)):
            groups = [group for group in self.factor_groups() if group.param_group == index]
            if not groups:
                continue
            low, high = torch.stack(torch.aminmax(torch.cat([group.steps for group in groups]))).tolist()
            if low != high:
                self._unshared_steps.add(index)
            self._host_steps[index] = high
            for group in groups:  # each stack its own count: one never gradded yet keeps 0
                group.host_steps = int(group.steps.max())

    def update_staleness(self) -> None:
        """Bring every factor's ``staleness`` up to date with its statistics.

        The criterion is a pure function of the stored ``B``, so it is computed only when it is
        read (the scheduler's check steps, telemetry, checkpoints), not after every statistics
        update: on an ordinary step of a fixed clock nobody reads it (it was a third of the step's
        kernels on GPT-2-small shapes).
        """
        if self._staleness_current:
            return
        for group in self.factor_groups():
            for dim in group.factored_dims:
                group.staleness(dim).copy_(self.factor_staleness(group.stats(dim)))
        self._staleness_current = True

    def _finish(self, items: list[_PendingGroup]) -> None:
        """Phase 2 for the stacks of one parameter group: directions, then one foreach update of
        all their parameters."""
        hyper = items[0].hyper
        directions = self._directions(items)
        decay = hyper.weight_decay if hyper.decoupled else 0.0
        shrink = 1.0 - hyper.lr * decay
        # decaying the updated weights, (W - lr D) s, is W s - (lr s) D: the same update, a shorter step
        lr = hyper.lr * shrink if hyper.decay_after_update else hyper.lr
        if hyper.finite is not None:  # a skipped group's parameters stay exactly as they are
            if not self.masks_skipped_direction:  # where, not a product: 0/0 before a group's first step
                directions = [torch.where(hyper.finite, direction, 0.0) for direction in directions]
            shrink = hyper.keep(shrink, items[0].group.members[0].param) if decay else 1.0
        apply_updates([item.group for item in items], directions, lr, shrink, self._compiled("update"))
        for item in items:
            if item.rows is not None:
                item.source.absorb(item.group, item.rows)

    def _compile_functions(self) -> dict[str, Callable]:
        """The :attr:`compilable` functions, each ``torch.compile``d, with ``compile=True`` (else none);
        built at construction and again in a copy (``checkpointing.py``)."""
        return {name: torch.compile(function) for name, function in self.compilable.items()} if self.compile else {}

    def _compiled(self, name: str) -> Optional[Callable]:
        """The ``torch.compile``d copy of a pure per-group function (``compile=True``), else None
        (the caller runs the eager function)."""
        return self._compiled_functions.get(name)

    # ----------------------------------------------------------------- the first refresh
    def _first_refresh(self, pending: list[_PendingGroup]) -> None:
        """Exact bases for every factor at its first preconditioned step: at
        ``start_preconditioning_step`` for every stack with a gradient, later for a member first
        gradded after it (a group added by ``add_param_group``, a layer unfrozen, an expert without
        a gradient until then, a step skipped for a non-finite gradient), which used to wait in the
        identity basis until the policy picked it (10 steps of AdamW at every=10). The scheduler
        decides every other refresh."""
        if self.global_step < self.start_preconditioning_step:
            return
        if self.global_step == self.start_preconditioning_step:
            todo = [(item, dim, None) for item in pending for dim in item.group.factored_dims]
        else:  # host-side: which members still hold the identity basis (a late one is rare)
            todo = [(item, dim, rows) for item in pending if not item.source.first_refreshes_done
                    for dim in item.group.factored_dims for rows in [item.group.identity_rows(dim)] if rows]
            for item in pending:  # a stack with no identity basis left is not scanned again
                source = item.source
                if not source.first_refreshes_done and not any(source.identity_rows(dim) for dim in source.factored_dims):
                    source.first_refreshes_done = True
        if not todo:
            return
        # Householder, not "auto": a one-time refresh gains nothing from a fallback's second pass
        request = RefreshRequest(solver=self.initial_refresh_solver, orthonormalizer="householder")
        masked = list({id(item): item for item, _, _ in todo if item.hyper.finite is not None}.values())
        flags = torch.stack([item.hyper.finite for item in masked]).tolist() if masked else []  # one sync, on such steps only
        skipped = {id(item) for item, flag in zip(masked, flags) if not flag}
        for item, dim, rows in todo:
            if id(item) in skipped:  # a skipped group gets its exact bases at its next finite step
                continue
            count = len(item.group) if rows is None else len(rows)  # a first refresh is never due for re-orthonormalisation
            refresh_factor(item.group, dim, rows, request, _InFlightHooks(self, item), self.global_step,
                           reorthonormalize=[False] * count)
