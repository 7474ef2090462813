r"""``KronCallback``: one callback turns a Lightning module's AdamW into SOAP / EShampoo / Shampoo /
KrADagrad, owns the per-factor eigenbasis refresh, and logs how stale each factor is.

This is the only module of the package that imports Lightning. The pieces it glues together are
Lightning-free: ``adam_conversion`` (AdamW -> Kronecker optimizer, schedulers re-pointed),
``lightning_kron.scheduling`` (which factor to refresh when: ``scheduler``; DDP ownership:
``ownership``), ``metrics`` and ``approximation_probe`` (the numbers) and ``wandb_views`` (the
W&B-only views).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_kron.engine.sharding import gather_over_shards
from lightning_kron.engine.validation import check_positive_int
from lightning_kron.lightning.adam_conversion import (
    check_options,
    convert_adam,
    repoint_schedulers,
)
from lightning_kron.lightning.approximation_probe import ApproximationProbe
from lightning_kron.lightning.metrics import (
    ModelTelemetry,
    eigenvalue_misscaling,
    factor_metrics,
    rank_metrics,
    refresh_metrics,
    summary_metrics,
)
from lightning_kron.lightning.wandb_views import StalenessHistory, staleness_payload
from lightning_kron.methods.kron_optimizer import KronOptimizer
from lightning_kron.methods.registry import METHODS
from lightning_kron.scheduling.ownership import gather_from_all
from lightning_kron.scheduling.policies import (
    AdaptiveRefresh,
    RefreshPolicy,
    check_policy,
)
from lightning_kron.scheduling.scheduler import RefreshCounters, RefreshScheduler

WANDB_TABLE_EVERY_N_LOGS = 10  # the table and heatmap are heavier than scalars: every 10th log and at the end


class KronCallback(Callback):
    r"""Kronecker-factored preconditioning for a LightningModule, with per-factor adaptive refresh.

    Drop-in: when ``configure_optimizers`` returns one ``torch.optim.AdamW`` or ``Adam`` (automatic or
    manual optimization), the callback replaces it at ``on_fit_start`` with the ``method`` optimizer
    over the same parameter groups, lr, betas, eps and weight decay, with the module's parameter
    names, and re-points the LR schedulers at it. When it returns a lightning_kron optimizer, the
    callback takes that one over. Either way the callback then owns the refresh schedule (see
    :class:`~lightning_kron.scheduling.scheduler.RefreshScheduler`), keeps DDP ranks bit-identical
    while splitting the refresh work between them, and logs telemetry every ``log_every_n_steps``
    optimizer steps to every logger (docs/callback.md lists each metric), plus rich views in W&B.

    Args:
        method: ``"soap"``, ``"eshampoo"``, ``"shampoo"`` or ``"kradagrad"``; ``None`` means
            ``"soap"`` when replacing Adam, and "whatever the module returned" when taking over.
        refresh: ``BudgetRefresh(every=...)``, ``AdaptiveRefresh(tolerance=..., check_every=...)``,
            ``FixedRefresh(every=...)`` or any ``RefreshPolicy`` (in a LightningCLI config, any of
            them by ``class_path``, a user-written class included); ``None`` keeps the optimizer's own
            (SOAP and EShampoo: ``BudgetRefresh()``, every=20's count of refreshes on the factors
            most stale for their age, which the callback front-loads and tapers over the Trainer's
            planned steps; chosen by the ten-model study of docs/refresh-study.md).
        tolerance_schedule: e.g. ``TighterEarly(early_tolerance=0.01, early_fraction=0.1)``: a tighter
            tolerance early in training, when basis accuracy matters most (needs
            ``refresh=AdaptiveRefresh(...)``, or a taken-over optimizer built with one: the optimizers'
            default refreshes have no tolerance; refused at ``on_fit_start`` otherwise).
        max_refreshes_per_step: at most this many factor refreshes per optimizer step (over all
            ranks), most stale first; the rest wait for the next steps, so no step stalls.
        log_every_n_steps: telemetry interval in optimizer steps; ``None`` uses the Trainer's.
        approximation_probe_max_numel: opt-in probe of the error to full-matrix Adam (docs/algorithms.md
            §5) for blocks with at most this many entries (memory ``numel**2`` each); 0 turns it off.
        optimizer_options, \**options: passed to the optimizer that replaces Adam
            (``max_precond_dim``, ``solver``, ``shampoo_beta``, ``start_preconditioning_step``, ...);
            the dict form is for LightningCLI/YAML configs, which cannot pass ``**options``. Its lr,
            betas, weight decay and (for SOAP/EShampoo) eps come from the module's own optimizer.

    Sharded training: under ``ModelParallelStrategy`` with ``tensor_parallel_size=1`` and a module
    that applies FSDP2's ``fully_shard`` in ``configure_model``, each rank preconditions, refreshes
    and checkpoints the rows of its own shards (``max_refreshes_per_step`` is then a budget per
    rank), and the logged telemetry is gathered from every rank (docs/scaling-out.md).

    Raises:
        ValueError: for a bad argument, here, and at ``on_fit_start`` for an Adam option the method
            has no counterpart for (``amsgrad``, ``maximize``); MisconfigurationException at
            ``setup``/``on_fit_start`` for setups it does not support (FSDP1's FSDPStrategy,
            DeepSpeed, tensor parallelism; several optimizers; an optimizer other than Adam/AdamW or
            a lightning_kron one).

    Example::

        >>> import torch, lightning as L
        >>> from lightning_kron import KronCallback
        >>> class Regression(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(8, 4)
        ...     def training_step(self, batch, batch_idx):
        ...         return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=1e-2)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randn(32, 4))
        >>> trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False, callbacks=[KronCallback()])
        >>> trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> type(trainer.optimizers[0]).__name__, trainer.optimizers[0].factor_names()
        ('SOAP', ['layer.weight[L]', 'layer.weight[R]'])
    """

    def __init__(
        self,
        method: Optional[str] = None,
        refresh: Optional[RefreshPolicy] = None,
        tolerance_schedule=None,
        max_refreshes_per_step: Optional[int] = None,
        log_every_n_steps: Optional[int] = None,
        approximation_probe_max_numel: int = 0,
        optimizer_options: Optional[dict[str, Any]] = None,
        **options: Any,
    ) -> None:
        if optimizer_options is not None and not isinstance(optimizer_options, dict):
            raise ValueError(f"optimizer_options must be a dict of optimizer arguments, got {optimizer_options!r}")
        optimizer_options = {**(optimizer_options or {}), **options}
        if method is not None and method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))} or None; got {method!r}")
        if refresh is not None:
            check_policy(refresh)
        if refresh is not None and "refresh" in optimizer_options:
            raise ValueError("refresh is given twice, as KronCallback(refresh=...) and in optimizer_options: "
                             "keep one (the callback's scheduler runs the policy either way)")
        if tolerance_schedule is not None and not callable(tolerance_schedule):
            raise ValueError(f"tolerance_schedule must be callable(step, total_steps, tolerance), got {tolerance_schedule!r}")
        given_policy = refresh if refresh is not None else optimizer_options.get("refresh")
        if tolerance_schedule is not None and given_policy is not None and not isinstance(given_policy, AdaptiveRefresh):
            raise ValueError("tolerance_schedule needs refresh=AdaptiveRefresh(...) (in KronCallback or in "
                             "optimizer_options): a budget or a fixed frequency has no tolerance")
        for name, value in (("max_refreshes_per_step", max_refreshes_per_step), ("log_every_n_steps", log_every_n_steps)):
            if value is not None:
                check_positive_int(name, value)
        check_positive_int("approximation_probe_max_numel", approximation_probe_max_numel, minimum=0)
        if optimizer_options:
            check_options(method or "soap", optimizer_options)
        self.method = method
        self.refresh = refresh
        self.tolerance_schedule = tolerance_schedule
        self.max_refreshes_per_step = max_refreshes_per_step
        self.log_every_n_steps = log_every_n_steps
        self.approximation_probe_max_numel = approximation_probe_max_numel
        self.optimizer_options = optimizer_options
        self.optimizer: Optional[KronOptimizer] = None
        self.scheduler: Optional[RefreshScheduler] = None
        self.probe: Optional[ApproximationProbe] = None
        self.history: Optional[StalenessHistory] = None
        self._held_state: Optional[dict] = None
        self._window = (RefreshCounters(), 0)  # counters and optimizer step at the last log
        self._seen_step = -1
        self._logs = 0
        self._table_logged_at = -1  # the step of the last table and heatmap sent to W&B
        self._hooks: list = []

    # ----------------------------------------------------------------- refusals and setup
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._forget_previous_fit()
        strategy = trainer.strategy
        if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise MisconfigurationException(
                f"KronCallback does not support {type(strategy).__name__}: its flat-parameter sharding cuts the "
                "Kronecker factors' matrices apart. Use strategy='ddp', or ModelParallelStrategy("
                "tensor_parallel_size=1) with FSDP2's fully_shard in configure_model."
            )
        if isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_tensor_parallel_size", 1) not in (1, "auto"):
            raise MisconfigurationException(
                f"KronCallback supports ModelParallelStrategy with tensor_parallel_size=1 (FSDP2 data parallel), "
                f"got tensor_parallel_size={strategy._tensor_parallel_size}: tensor parallelism splits a matrix "
                "over ranks, so its Kronecker factors would span devices."
            )

    def _forget_previous_fit(self) -> None:
        """A callback passed to a second ``fit`` (a resume with the same instance) starts bare:
        ``setup`` runs before Lightning restores callbacks, so a checkpoint's scheduler state is
        then held for this fit's scheduler instead of being loaded into the last fit's, which
        ``on_fit_start`` replaces."""
        self.optimizer, self.scheduler, self.probe, self.history, self._held_state = None, None, None, None, None
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.optimizer = self._install_optimizer(trainer, pl_module)
        if self.tolerance_schedule is not None and not isinstance(self.refresh or self.optimizer.refresh, AdaptiveRefresh):
            # refresh=None is known only now: a taken-over optimizer may have an AdaptiveRefresh
            raise MisconfigurationException(
                f"KronCallback(tolerance_schedule=...) needs refresh=AdaptiveRefresh(...) or an optimizer built "
                f"with one; {type(self.optimizer).__name__} refreshes with {self.optimizer.refresh!r}, which has no "
                "tolerance")
        self.scheduler = RefreshScheduler(self.optimizer, self.refresh, tolerance_schedule=self.tolerance_schedule,
                                          max_per_step=self.max_refreshes_per_step)
        # the planned length (inf when unknown): fraction-based schedules and BudgetRefresh use it
        self.scheduler.total_steps = trainer.estimated_stepping_batches
        self.scheduler.tolerance_at(0)  # a schedule that cannot work with this trainer fails now, not mid-run
        if self._held_state is not None:  # restored before the optimizer existed (resume)
            self.scheduler.load_state_dict(self._held_state)
            self._held_state = None
        self._seen_step, self._logs, self._table_logged_at = trainer.global_step, 0, -1
        if self.approximation_probe_max_numel and trainer.is_global_zero:
            self.probe = ApproximationProbe(self.optimizer, self.approximation_probe_max_numel)
            self._hooks.append(self.optimizer.register_step_post_hook(self.probe.after_step))
        self.history = StalenessHistory() if self._wandb_loggers(trainer) else None

    def _install_optimizer(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> KronOptimizer:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"KronCallback works with exactly one optimizer, configure_optimizers gave {len(trainer.optimizers)}. "
                "Return one torch.optim.AdamW (or a lightning_kron optimizer) over all parameters, using parameter "
                "groups for different hyperparameters."
            )
        current = trainer.optimizers[0]
        if isinstance(current, _MockOptimizer):  # what Lightning puts in when configure_optimizers gives None
            raise MisconfigurationException(
                "KronCallback replaces the module's AdamW, but configure_optimizers returned no optimizer. "
                "Return torch.optim.AdamW(self.parameters(), ...) (or a lightning_kron optimizer)."
            )
        if isinstance(current, KronOptimizer):
            return self._take_over(current, pl_module)
        if not isinstance(current, torch.optim.Adam):
            raise MisconfigurationException(
                f"KronCallback replaces torch.optim.Adam/AdamW, but configure_optimizers returned "
                f"{type(current).__name__}. Return AdamW, or a lightning_kron optimizer "
                f"({', '.join(spec.optimizer.__name__ for spec in METHODS.values())})."
            )
        names = dict(pl_module.named_parameters())
        replacement = convert_adam(current, self.method or "soap", names, **self.optimizer_options)
        trainer.strategy.optimizers = [replacement]
        repoint_schedulers([config.scheduler for config in trainer.lr_scheduler_configs], current, replacement)
        return replacement

    def _take_over(self, optimizer: KronOptimizer, pl_module: "pl.LightningModule") -> KronOptimizer:
        if self.optimizer_options:
            raise MisconfigurationException(
                "configure_optimizers returned a lightning_kron optimizer, so KronCallback builds none and "
                f"optimizer_options {sorted(self.optimizer_options)} would be ignored; pass them to that optimizer"
            )
        if self.method is not None and type(optimizer) is not METHODS[self.method].optimizer:
            raise MisconfigurationException(
                f"KronCallback(method={self.method!r}) but configure_optimizers returned {type(optimizer).__name__}; "
                "drop method= to take over the module's optimizer, or return torch.optim.AdamW to have it replaced"
            )
        optimizer.adopt_names(pl_module.named_parameters())
        return optimizer

    # ----------------------------------------------------------------- telemetry
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The first log's window starts here: a resumed run's optimizer step count and the
        scheduler's counters are restored by now, not yet at ``on_fit_start`` (nor, under
        ModelParallelStrategy, at ``load_state_dict``). Under FSDP2 the counters are every rank's,
        summed as the logs sum them (a collective: every rank runs this hook)."""
        self._window = (self._counters_of_every_rank(), self.optimizer.global_step)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._seen_step:  # accumulating: no optimizer step in this batch
            return
        self._seen_step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:  # Trainer(log_every_n_steps=0): no logging
            self._log(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.history is not None and len(self.history) and trainer.is_global_zero \
                and self._table_logged_at != trainer.global_step:  # not the same views twice at the last step
            self._log_views(trainer, with_table=True)

    def _log(self, trainer: "pl.Trainer") -> None:
        if not trainer.loggers:
            return
        counters = self.scheduler.counters
        per_rank = gather_from_all([counters.computed_here, counters.seconds_here])  # collective: every rank
        telemetry = self._telemetry()  # a collective too under FSDP2
        before, step_before = self._window
        self._window = (replace(telemetry.counters), self.optimizer.global_step)
        if not trainer.is_global_zero:
            return
        infos = telemetry.infos
        metrics = factor_metrics(infos)
        metrics.update(summary_metrics(infos, self.optimizer.skipped_steps))
        relative = self.optimizer.global_step - self.optimizer.start_preconditioning_step
        metrics.update(refresh_metrics(telemetry.counters, before, self.optimizer.global_step - step_before, len(infos),
                                       self.scheduler.tolerance_at(max(relative, 0)), telemetry.deferred))
        metrics.update(rank_metrics(per_rank))
        metrics.update(telemetry.misscaling)
        if self.probe is not None:
            metrics.update(self.probe.errors())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        if self.history is not None:
            self.history.record(trainer.global_step, {info.name: info.staleness for info in infos})
            self._logs += 1
            self._log_views(trainer, with_table=self._logs % WANDB_TABLE_EVERY_N_LOGS == 0)

    def _telemetry(self) -> ModelTelemetry:
        """This process's figures; under FSDP2 every rank's, combined, so they describe the whole model."""
        local = ModelTelemetry(self.optimizer.factors(), eigenvalue_misscaling(self.optimizer),
                               replace(self.scheduler.counters), self.scheduler.deferred_count)
        layout = self.optimizer.shard_layout
        return local if layout is None else ModelTelemetry.combine(gather_over_shards(local, layout))

    def _counters_of_every_rank(self) -> RefreshCounters:
        """The scheduler's counters, summed over FSDP2 ranks as :meth:`_telemetry` sums them, without
        reading the factors (a collective under FSDP2)."""
        local = ModelTelemetry([], {}, replace(self.scheduler.counters), 0)
        layout = self.optimizer.shard_layout
        return local.counters if layout is None else ModelTelemetry.combine(gather_over_shards(local, layout)).counters

    def _log_views(self, trainer: "pl.Trainer", with_table: bool) -> None:
        payload = staleness_payload(self.history, with_table=with_table)
        if with_table:
            self._table_logged_at = trainer.global_step
        for logger in self._wandb_loggers(trainer):
            logger.experiment.log({**payload, "trainer/global_step": trainer.global_step})

    @staticmethod
    def _wandb_loggers(trainer: "pl.Trainer") -> list[WandbLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]

    # ----------------------------------------------------------------- lifecycle and checkpoints
    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self.scheduler is not None:
            self.scheduler.detach()
            for handle in self._hooks:
                handle.remove()
            self._hooks = []

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is not None:
            return {"scheduler": self.scheduler.state_dict()}
        return {"scheduler": self._held_state} if self._held_state is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores callbacks before ``configure_optimizers``: hold the state until
        ``on_fit_start`` has an optimizer to schedule. Strategies that restore after setup
        (``ModelParallelStrategy``) call this once the scheduler exists: applied at once."""
        held = state_dict.get("scheduler")
        if self.scheduler is not None and held is not None:
            self.scheduler.load_state_dict(held)  # the log window is taken at on_train_start
        else:
            self._held_state = held
