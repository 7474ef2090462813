"""``KronOptimizer``: the torch.optim front end shared by SOAP, EShampoo, Shampoo and KrADagrad.

It owns what every Kronecker method has in common: named parameters and parameter groups, cutting
parameters into blocks and stacking same-shaped blocks into :class:`FactorGroup`s, the NaN/Inf
guard, the step skeleton, the exact first refresh and the scheduler that decides every later one
(:class:`~lightning_kron.scheduling.scheduler.RefreshScheduler` over its own ``refresh=`` policy,
until an owner such as ``KronCallback`` attaches its own), factor telemetry, and checkpoints. Subclasses supply the math through
four hooks: ``_init_state`` (extra buffers), ``_update_statistics``, ``_direction`` and the
basis-change hooks ``permute_rows``/``rotate_rows``.

A step runs in two phases so the refresh decision for *all* factors costs one host sync:
1. for every group: gather gradients, rotate them into the current bases, update the factor
   statistics and the (free) staleness criterion;
2. the scheduler picks stale factors from one concatenated staleness tensor and refreshes them (the
   refreshed groups rotate their gradient in flight again); every group computes its direction
   and updates its parameters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Union

import torch

from lightning_kron.engine.basis_refresh import SOLVERS, RefreshRequest, refresh_factor
from lightning_kron.engine.blocking import factor_label, plan_blocks
from lightning_kron.engine.factor_group import (
    TELEMETRY_KEYS,
    FactorGroup,
    Member,
    apply_updates,
    gather_grads,
    share_step_counts,
    update_parameters,
)
from lightning_kron.engine.factor_info import FactorInfo
from lightning_kron.engine.mode_products import unfold
from lightning_kron.engine.precision import cuda_matmul_precision
from lightning_kron.engine.sharding import ShardLayout, all_ranks_finite, local_tensor, shard_layout
from lightning_kron.engine.solvers import FALLBACK, ORTHONORMALIZERS
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
from lightning_kron.methods.step_hyperparameters import StepHyperparameters
from lightning_kron.scheduling.policies import (
    AdaptiveRefresh,
    FixedRefresh,
    check_policy,
)
from lightning_kron.scheduling.scheduler import RefreshScheduler

REFRESH_TIMINGS = ("in_step", "after_step")
#: "decoupled": W <- W (1 - lr wd) - lr D, on the pre-update weights as torch.optim.AdamW;
#: "decoupled_after_update": W <- (W - lr D)(1 - lr wd), the SOAP reference's order; "l2": wd W into G.
WEIGHT_DECAY_MODES = ("decoupled", "l2", "decoupled_after_update")
STATE_FORMAT = 2  # 2: the optimizer-wide entry moved from the top level into param_groups[0]
META_KEY = "lightning_kron"
_GENERATED_NAME = re.compile(r"group\d+\.param\d+")  # what _split_named calls an unnamed parameter


@dataclass(frozen=True)
class PendingFallback:
    """Members of one refreshed stack and dim, and which of them the orthonormalizer solved (a
    device bool per row): the others kept their basis until :meth:`KronOptimizer.refresh_fallbacks`."""

    group: FactorGroup
    dim: int
    rows: list[int]
    succeeded: torch.Tensor
    request: RefreshRequest


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


def _all_of(flags: list[torch.Tensor]) -> torch.Tensor:
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def _all_finite(values: torch.Tensor) -> torch.Tensor:
    """0-dim bool: no NaN or Inf in ``values``. Its min and max in one reduction (10x faster than
    max |g| on a CPU: no |g| temporary): NaN and -Inf/+Inf show up in them and fail a comparison,
    and unlike a sum nothing finite overflows."""
    low, high = torch.aminmax(values)
    return (low > -math.inf) & (high < math.inf)


def _replace_rows(stack: torch.Tensor, rows, transform) -> torch.Tensor:
    if rows is None:
        return transform(stack)
    stack = stack.clone()
    stack[rows] = transform(stack[rows])
    return stack


def _split_named(params: Any, first_group: int = 0) -> tuple[list[dict], dict[int, str]]:
    """Accept tensors, (name, tensor) pairs or group dicts; return plain groups and names by id."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, not a tensor")
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    names: dict[int, str] = {}
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
            names[id(param)] = name or f"group{group_index}.param{position}"
            kept.append(param)
        group["params"] = kept
        group.pop("param_names", None)
        plain_groups.append(group)
    return plain_groups, names


class KronOptimizer(torch.optim.Optimizer):
    """Base class; see the module docstring. Not used directly: pick SOAP, EShampoo or Shampoo."""

    #: Solver of the forced refresh at ``start_preconditioning_step``. "eigh" finds the bases from
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
        refresh: FixedRefresh | AdaptiveRefresh | None = None,
        solver: str = "qr",
        orthonormalizer: str = "auto",
        nonfinite: str = "skip",
        statistics_dtype: Optional[torch.dtype] = None,
        rotation_dtype: Union[str, torch.dtype, None] = "auto",
        statistics_product_dtype: Optional[torch.dtype] = None,
        compile: bool = False,
        refresh_timing: str = "in_step",
    ) -> None:
        check_positive_int("max_precond_dim", max_precond_dim, minimum=0)
        check_choice("refresh_timing", refresh_timing, REFRESH_TIMINGS)
        check_positive_int("start_preconditioning_step", start_preconditioning_step)
        check_choice("solver", solver, SOLVERS)
        check_choice("orthonormalizer", orthonormalizer, ("auto", *ORTHONORMALIZERS))
        check_choice("nonfinite", nonfinite, ("skip", "raise"))
        check_flag("compile", compile)
        refresh = check_policy(refresh if refresh is not None else FixedRefresh(every=10))
        statistics_dtype = check_dtype("statistics_dtype", statistics_dtype, (torch.float32, torch.float64))
        rotation_dtype = check_dtype("rotation_dtype", rotation_dtype,
                                     (torch.float32, torch.float64, torch.bfloat16, torch.float16), modes=("auto", "tf32"))
        # no float16: squared gradients overflow it
        statistics_product_dtype = check_dtype("statistics_product_dtype", statistics_product_dtype,
                                               (torch.float32, torch.float64, torch.bfloat16))
        self.max_precond_dim = max_precond_dim
        self.merge_dims = merge_dims
        self.split_large_dims = split_large_dims
        self.precondition_1d = precondition_1d
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
        self._compiled_functions = {name: torch.compile(function) for name, function in self.compilable.items()} if compile else {}
        groups, self._names = _split_named(params)
        #: Where the FSDP2-sharded parameters live (None when no parameter is a DTensor): each rank
        #: then preconditions its own rows, and the step all-reduces its finite-gradient flags.
        self.shard_layout: Optional[ShardLayout] = self._check_sharding(groups)
        self._groups: Optional[list[FactorGroup]] = None
        self._staleness_current = True  # every factor is still zero, and so is its staleness
        super().__init__(groups, defaults)
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
        plain, names = _split_named([param_group], first_group=len(self.param_groups))
        for key, name in names.items():
            self._names.setdefault(key, name)
        if getattr(self, "_groups", None) is not None:  # the constructor checked its own groups already
            self._check_sharding([*self.param_groups, plain[0]])
        super().add_param_group(plain[0])
        self._validate_group(self.param_groups[-1])
        if getattr(self, "_groups", None) is not None:
            added = self._build_groups([len(self.param_groups) - 1])
            self._groups.extend(added)
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
        self.global_step += 1
        with cuda_matmul_precision("ieee", any(group.device.type == "cuda" for group in groups)):
            pending = self._gather_and_update_statistics(groups)
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
        rotation over, and identical on every DDP rank whoever computed the refresh. Steps where some
        stack is only partly gradded (a copy of its rows is in flight) leave the scheduler to its
        post-step hook instead, and so does every step with ``refresh_timing="after_step"`` (the SOAP
        reference's order: the step is taken in the old bases, then the refreshed factors include
        this step's gradient and the moments are carried into the new bases).
        """
        after_step = self.refresh_timing == "after_step"
        if after_step or self.scheduler is None or any(item.rows is not None for item in pending):
            return
        refreshed = {id(group) for group in self.scheduler.in_step()}
        for item in pending:
            if id(item.group) in refreshed:
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

    def _finite_param_groups(self, buffers: dict[int, list[torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Each parameter group's finite-gradient flag, on the device: one reduction per gradient
        buffer and no host sync (``nonfinite="raise"`` syncs once to raise). A group with a NaN/Inf
        is skipped whole. Under FSDP2 the flags are all-reduced, so every rank skips the same groups."""
        local = {index: _all_of([_all_finite(flat) for flat in flats]) for index, flats in buffers.items()}
        finite = self._finite_on_all_ranks(local) if self.shard_layout is not None else local
        if self.nonfinite == "raise":
            if finite and not bool(_all_of(list(finite.values()))):  # the one sync this mode pays
                raise FloatingPointError("non-finite gradient (NaN or Inf); the step was not applied")
            return {}
        return finite

    def _count_skips(self, finite: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``~finite`` of every parameter group, added to the device-side skip counter (every flag,
        so that under FSDP2 a rank without a group's rows counts its skip too)."""
        skipped = {index: ~flag for index, flag in finite.items()}
        for flag in skipped.values():
            self._skipped_on_device = flag.long() if self._skipped_on_device is None else self._skipped_on_device.add_(flag)
        return skipped

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
            for group in groups:
                group.host_steps = high

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

    def _compiled(self, name: str) -> Optional[Callable]:
        """The ``torch.compile``d copy of a pure per-group function (``compile=True``), else None
        (the caller runs the eager function)."""
        return self._compiled_functions.get(name)

    # ----------------------------------------------------------------- the first refresh
    def _first_refresh(self, pending: list[_PendingGroup]) -> None:
        """At ``start_preconditioning_step``, exact bases for every factor; the scheduler decides
        every later refresh."""
        if self.global_step != self.start_preconditioning_step:
            return
        # Householder, not "auto": a one-time refresh gains nothing from a fallback's second pass
        request = RefreshRequest(solver=self.initial_refresh_solver, orthonormalizer="householder")
        masked = [item for item in pending if item.hyper.finite is not None]
        flags = torch.stack([item.hyper.finite for item in masked]).tolist() if masked else []  # one sync, this step only
        skipped = {id(item) for item, flag in zip(masked, flags) if not flag}
        for item in pending:
            if id(item) in skipped:  # a skipped group gets its exact bases at its next refresh
                continue
            for dim in item.group.factored_dims:  # a first refresh is never due for re-orthonormalisation
                refresh_factor(item.group, dim, None, request, _InFlightHooks(self, item), self.global_step,
                               reorthonormalize=[False] * len(item.group))

    # ----------------------------------------------------------------- the owner interface
    def _factor_index(self) -> list[tuple[str, FactorGroup, int, int]]:
        index = []
        for group in self.factor_groups():
            for row, member in enumerate(group.members):
                prefix = self.block_name(member)
                for dim in group.factored_dims:
                    index.append((f"{prefix}[{factor_label(dim, group.order)}]", group, row, dim))
        return index

    def block_name(self, member: Member) -> str:
        """Readable name of one block: the parameter's name, plus ``.shard{r}`` for rank ``r``'s rows
        under FSDP2 and ``.block{b}`` when it was split.

        Factor names are this plus ``[L]``/``[R]``/``[i]``; per-block telemetry (the approximation
        probe, eigenvalue mis-scaling) uses it alone. Names are unique over all ranks.
        """
        name = member.name if self.shard_layout is None else self.shard_layout.shard_name(member.name)
        split = member.block.shape != member.view_shape
        return f"{name}.block{member.block_number}" if split else name

    def adopt_names(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Name parameters that were passed without names (e.g. ``model.parameters()``).

        Lets an owner that knows the module (``KronCallback``) make telemetry readable for an
        optimizer the user built from bare tensors. Names given at construction are kept.
        """
        for name, param in named_parameters:
            if _GENERATED_NAME.fullmatch(self._names.get(id(param), "")):
                self._names[id(param)] = name
        for group in self._groups or []:
            group.members = [replace(member, name=self._names[id(member.param)]) for member in group.members]

    def factor_names(self) -> list[str]:
        """Stable, readable names of every Kronecker factor, e.g. ``h.0.mlp.c_fc.weight[L]``."""
        return [name for name, *_ in self._factor_index()]

    def factors(self) -> list[FactorInfo]:
        """Telemetry of every factor; one host transfer per telemetry tensor, none per factor."""
        self.update_staleness()
        host = {id(group): {key: group.tensors_on_host(key) for key in TELEMETRY_KEYS} for group in self.factor_groups()}
        infos = []
        for name, group, row, dim in self._factor_index():
            values = {key: host[id(group)][key][dim][row] for key in TELEMETRY_KEYS}
            infos.append(FactorInfo(
                name=name, parameter=group.members[row].name, dim=dim, size=group.shape[dim],
                staleness=float(values["staleness"]),
                steps_since_refresh=self.global_step - int(values["last_refresh"]),
                refreshes=int(values["refreshes"]), failures=int(values["failures"]),
                refresh_seconds=float(values["refresh_seconds"]),
            ))
        return infos

    def stale_factors(self, tolerance: float) -> list[str]:
        """Names of factors whose staleness after the last step exceeds ``tolerance``."""
        return [info.name for info in self.factors() if info.staleness > tolerance]

    def refresh_factors(self, names: Optional[Iterable[str]] = None, *, tolerance: float = 0.0,
                        max_iters: int = 1, solver: Optional[str] = None) -> int:
        """Refresh the named factors now (all when ``names`` is None); returns how many.

        For code that refreshes on its own terms; the :attr:`scheduler` keeps deciding as well.
        """
        wanted = None if names is None else set(names)
        index = self._factor_index()
        if wanted is not None and (unknown := wanted - {name for name, *_ in index}):
            raise KeyError(f"unknown factor names: {sorted(unknown)[:5]}")
        selected: dict[tuple[int, int], list[int]] = {}
        groups = {}
        for name, group, row, dim in index:
            if wanted is None or name in wanted:
                selected.setdefault((id(group), dim), []).append(row)
                groups[id(group)] = group
        fallbacks = [self.refresh_rows(groups[group_id], dim, rows, tolerance=tolerance, max_iters=max_iters,
                                       solver=solver, defer_fallback=True) for (group_id, dim), rows in selected.items()]
        self.refresh_fallbacks(fallbacks)
        return sum(len(rows) for rows in selected.values())

    def refresh_rows(self, group: FactorGroup, dim: int, rows: list[int], *, tolerance: float = 0.0,
                     max_iters: int = 1, solver: Optional[str] = None,
                     reorthonormalize: Optional[list[bool]] = None, orthonormalizer: Optional[str] = None,
                     defer_fallback: bool = False) -> Optional["PendingFallback"]:
        """Refresh factor ``dim`` of the members ``rows`` of one of :meth:`factor_groups`.

        The index-based form of :meth:`refresh_factors`, for owners that decide on the stacked
        staleness tensors directly (no name lookup per step) and then move the refreshed rows
        themselves (``lightning_kron.scheduling.ownership``). ``reorthonormalize``: which of
        ``rows`` are due for re-orthonormalisation, when the owner already read it (else one host
        read). With Cholesky-QR the members it could not orthonormalise are refreshed again with
        Householder (:meth:`refresh_fallbacks`, one host read); ``defer_fallback`` returns them
        instead, so that a caller refreshing many stacks reads all their failures at once.
        """
        row_index = None if len(rows) == len(group) else torch.tensor(rows, device=group.device)
        request = RefreshRequest(solver=solver or self.solver, tolerance=tolerance, max_iters=max_iters,
                                 orthonormalizer=orthonormalizer or self._orthonormalizer_for(group.device),
                                 shift=self.shifted_qr_refresh)
        with cuda_matmul_precision("ieee", group.device.type == "cuda"):
            succeeded = refresh_factor(group, dim, row_index, request, self, self.global_step, reorthonormalize)
        if succeeded is None:
            return None
        pending = PendingFallback(group, dim, rows, succeeded, request)
        if defer_fallback:
            return pending
        self.refresh_fallbacks([pending])
        return None

    def refresh_fallbacks(self, pending: Iterable[Optional["PendingFallback"]]) -> int:
        """Refresh again, with the fallback orthonormalizer (Householder), the members of ``pending``
        (from :meth:`refresh_rows`) whose Cholesky-QR failed: one host read of all their flags
        (on a scheduler's refresh step the second and last host sync), nothing for the members that
        succeeded. Returns how many were refreshed again."""
        pending = [item for item in pending if item is not None]
        if not pending:
            return 0
        flags = iter(torch.cat([item.succeeded for item in pending]).tolist())
        count = 0
        for item in pending:
            failed = [row for row in item.rows if not next(flags)]
            if failed:
                self.refresh_rows(item.group, item.dim, failed, tolerance=item.request.tolerance,
                                  max_iters=item.request.max_iters, solver=item.request.solver,
                                  reorthonormalize=[False] * len(failed),
                                  orthonormalizer=FALLBACK[item.request.orthonormalizer])
                count += len(failed)
        return count

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """torch.optim's state (per parameter: views of its rows of every stacked tensor) and
        param_groups. What belongs to the optimizer as a whole (the format, the class, the global
        and skipped step counts, its own scheduler's deferred factors) travels in the first
        parameter group under ``"lightning_kron"``: ``torch.distributed.checkpoint`` keeps only
        ``state`` and ``param_groups`` (``get_optimizer_state_dict`` drops other top-level keys).
        Under FSDP2 it is a collective (the scheduler gathers every rank's counters): call it on
        every rank, as ``get_optimizer_state_dict`` does."""
        self.update_staleness()
        state = super().state_dict()  # param_groups are fresh dicts: the live groups stay as they are
        state["param_groups"][0][META_KEY] = {
            "format": STATE_FORMAT, "optimizer": type(self).__name__,
            "global_step": self.global_step, "skipped_steps": self.skipped_steps,
            "scheduler": self.own_scheduler.state_dict(),  # deferred factors of its budget
            "world_size": None if self.shard_layout is None else self.shard_layout.world_size,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load all or nothing: everything is checked before any tensor is written."""
        groups = state_dict.get("param_groups") or [{}]
        meta = groups[0].get(META_KEY, state_dict.get(META_KEY))  # top level: checkpoints before format 2
        mine = type(self).__name__
        if meta is None:
            raise ValueError(f"this state_dict was not saved by a lightning_kron optimizer; cannot load it into {mine}")
        if meta["optimizer"] != mine:
            raise ValueError(f"state_dict was saved by lightning_kron.{meta['optimizer']}, cannot load it into {mine}")
        self._check_world_size(meta.get("world_size"))
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("state_dict has a different number of parameter groups or parameters than this optimizer")
        fresh = self._build_groups()
        # saved ids by position, as torch.optim does: indices from state_dict(), parameter names
        # from torch.distributed.checkpoint's set_optimizer_state_dict
        saved_key = {id(param): key for live, saved in zip(self.param_groups, saved_groups)
                     for param, key in zip(live["params"], saved["params"])}
        plan = self._copy_plan(fresh, saved_key, state_dict["state"])
        for target, source in plan:
            target.copy_(source)
        for group in fresh:  # host reads per stack, on load only
            group.refreshed_dims = {dim for dim in group.factored_dims if bool(group.refreshes(dim).any())}
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

    def _check_world_size(self, saved: Optional[int]) -> None:
        """Under FSDP2 each rank's state covers its own rows: it only fits the same world size."""
        current = None if self.shard_layout is None else self.shard_layout.world_size
        if saved != current:
            def describe(size):
                return "unsharded" if size is None else f"sharded over {size} ranks"
            raise ValueError(f"this state_dict was saved {describe(saved)} and cannot be loaded {describe(current)}: "
                             "the Kronecker blocks follow the shard rows, so resume at the world size it was saved at")

    def _copy_plan(self, groups: list[FactorGroup], saved_key: dict[int, Any], saved_state: dict) -> list:
        plan = []
        for group in groups:
            for member, views in group.member_views():
                saved = saved_state.get(saved_key[id(member.param)], {})
                for key, view in views.items():
                    name = self._state_key(member.block_number, key)
                    value = saved.get(name)
                    if value is None and key.startswith("deferred."):  # saved before the queue was state
                        continue
                    if value is None or tuple(value.shape) != tuple(view.shape):
                        found = None if value is None else tuple(value.shape)
                        raise ValueError(f"state_dict does not match parameter {member.name!r}: {name} "
                                         f"expected shape {tuple(view.shape)}, found {found}")
                    plan.append((view, value))
        return plan
