"""Small modules, data and trainers shared by the KronCallback tests (CPU, a few steps each)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

FAST_TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def make_data(count: int = 64, seed: int = 0) -> TensorDataset:
    """Inputs and targets of a fixed random linear-tanh teacher with anisotropic inputs."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 3.0, 6)
    inputs = torch.randn(count, 6, generator=generator) * scales
    teacher = torch.randn(6, 3, generator=generator)
    return TensorDataset(inputs, torch.tanh(inputs @ teacher) + 0.1 * torch.randn(count, 3, generator=generator))


def loader(batch_size: int = 8, count: int = 64) -> DataLoader:
    return DataLoader(make_data(count), batch_size=batch_size, shuffle=False)


def make_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3))


class TinyRegression(L.LightningModule):
    """A BoringModel-style regression whose ``configure_optimizers`` returns AdamW (+ StepLR).

    ``optimizer`` may be "adamw", "adam", "sgd", "two" (two optimizers, manual optimization) or a
    callable building one from the module.
    """

    def __init__(self, optimizer="adamw", lr: float = 1e-2, step_lr: int = 0, weight_decay: float = 0.01,
                 eps: float = 1e-7) -> None:
        super().__init__()
        self.net = make_net()
        self.optimizer_kind, self.lr, self.step_lr, self.weight_decay = optimizer, lr, step_lr, weight_decay
        self.eps = eps
        self.automatic_optimization = optimizer != "two"  # Lightning itself allows several only in manual mode

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self):
        kind = self.optimizer_kind
        if callable(kind):
            return kind(self)
        if kind == "two":
            return [torch.optim.AdamW(self.net[0].parameters()), torch.optim.AdamW(self.net[2].parameters())]
        if kind == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        adam = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        optimizer = adam(self.parameters(), lr=self.lr, betas=(0.9, 0.95), eps=self.eps, weight_decay=self.weight_decay)
        if not self.step_lr:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_lr, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(module: L.LightningModule, callbacks, batch_size: int = 8, count: int = 64, **trainer_options) -> L.Trainer:
    options = {**FAST_TRAINER, **trainer_options}
    trainer = L.Trainer(callbacks=callbacks, **options)
    trainer.fit(module, loader(batch_size, count))
    return trainer


def parameters_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class EveryOtherStep:
    """A user-written refresh policy (the protocol's two methods only): every factor on even steps.
    Configs name it by its import path, ``callback_helpers.EveryOtherStep``."""

    def checks_at(self, step: int) -> bool:
        return step % 2 == 0

    def select(self, staleness, step, total_steps=None):
        return staleness >= 0
