"""The LightningModule base both recipes share: optimizer choice, schedule and hyperparameters.

Subclasses build ``self.network`` and define the steps; this class turns the module's
:class:`~recipes.optimizers.OptimizerConfig` into the optimizer and per-step schedule over that
network (so factor names read ``transformer.h.0.attn.c_attn.weight[L]``, without a prefix), and
stores every ``__init__`` argument as plain data in ``hparams`` so checkpoints load with
``weights_only=True`` and ``load_from_checkpoint`` rebuilds the module.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Union

import lightning as L
import torch

from recipes.optimizers import (
    OptimizerConfig,
    as_optimizer_config,
    configure_optimization,
)


class RecipeModule(L.LightningModule):
    """Call ``super().__init__(optimizer)`` first in the subclass ``__init__``, then set ``network``."""

    network: torch.nn.Module

    def __init__(self, optimizer: Union[OptimizerConfig, dict, None]) -> None:
        super().__init__()
        self.optimizer_config = as_optimizer_config(optimizer)
        self.save_hyperparameters(ignore=["optimizer"])  # collects the subclass's arguments too
        self.hparams["optimizer"] = asdict(self.optimizer_config)

    def configure_optimizers(self) -> dict:
        return configure_optimization(self.optimizer_config, self.network, self.trainer.estimated_stepping_batches)
