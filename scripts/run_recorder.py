"""A Lightning callback recording what ``scripts/compare.py`` tabulates and plots.

Per optimizer step: training wall time (the step itself, not validation or this bookkeeping; the
table uses the median step, which a loaded machine disturbs far less than the total), the
training loss, and, for the Kronecker optimizers, each factor's staleness and the running count of
eigenbasis refreshes, read through the optimizer's public ``factors()``. Per validation: the
validation loss at that step and wall time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import lightning as L
import torch
from tqdm.auto import tqdm


@dataclass
class RunRecord:
    """Everything measured in one training run (plain lists, easy to tabulate and plot)."""

    label: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    refreshes: list[int] = field(default_factory=list)
    staleness: list[list[float]] = field(default_factory=list)
    factor_names: list[str] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    refresh_seconds: float = 0.0
    optimizer_state_mb: float = 0.0
    peak_gpu_mb: Optional[float] = None
    threads: Optional[int] = None  # torch.get_num_threads() during the run

    @property
    def step_seconds(self) -> list[float]:
        """Each optimizer step's own wall time (``seconds`` is the running total)."""
        return [after - before for before, after in zip([0.0, *self.seconds[:-1]], self.seconds)]

    @property
    def median_step_seconds(self) -> float:
        """The median step time: robust to the slow steps a loaded machine or a refresh adds,
        unlike ``train_seconds / steps``.

        >>> RunRecord("x", steps=[1, 2, 3, 4], seconds=[0.1, 0.2, 1.2, 1.3]).median_step_seconds
        0.1
        """
        return round(statistics.median(self.step_seconds), 12) if self.seconds else 0.0

    @property
    def val_estimated_seconds(self) -> list[float]:
        """Training time at each validation, as steps x median step time (see ``median_step_seconds``)."""
        return [step * self.median_step_seconds for step in self.val_steps]

    @property
    def total_refreshes(self) -> int:
        return self.refreshes[-1] if self.refreshes else 0

    @property
    def train_seconds(self) -> float:
        return self.seconds[-1] if self.seconds else 0.0


def optimizer_state_megabytes(optimizer: torch.optim.Optimizer) -> float:
    """Bytes held in ``optimizer.state`` (Kronecker state entries are disjoint views, counted once)."""
    total = sum(value.numel() * value.element_size() for entry in optimizer.state.values()
                for value in entry.values() if torch.is_tensor(value))
    return total / 2**20


class RunRecorder(L.Callback):
    """Fills a :class:`RunRecord`; shows a progress bar over the run's optimizer steps."""

    def __init__(self, label: str, total_steps: int, progress: bool = True) -> None:
        self.record = RunRecord(label)
        self.total_steps = total_steps
        self.progress = progress
        self._elapsed = 0.0
        self._started = 0.0
        self._bar = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.record.threads = torch.get_num_threads()
        self._bar = tqdm(total=self.total_steps, desc=self.record.label, leave=False, disable=not self.progress)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._elapsed += time.perf_counter() - self._started
        record, optimizer = self.record, trainer.optimizers[0]
        record.steps.append(trainer.global_step)
        record.seconds.append(self._elapsed)
        record.train_loss.append(float(outputs["loss"]))
        if hasattr(optimizer, "factors"):
            infos = optimizer.factors()
            record.factor_names = [info.name for info in infos]
            record.refreshes.append(sum(info.refreshes for info in infos))
            record.refresh_seconds = sum(info.refresh_seconds for info in infos)
            record.staleness.append([info.staleness for info in infos])
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{record.train_loss[-1]:.3f}", refresh=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        self.record.val_steps.append(trainer.global_step)
        self.record.val_seconds.append(self._elapsed)
        self.record.val_loss.append(float(trainer.callback_metrics["val_loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.record.optimizer_state_mb = optimizer_state_megabytes(trainer.optimizers[0])
        if torch.cuda.is_available():
            self.record.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        if self._bar is not None:
            self._bar.close()
