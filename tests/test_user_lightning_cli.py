"""A user's own LightningCLI: a lightning_kron optimizer chosen with ``--optimizer`` takes its refresh
policy by ``class_path`` (the optimizers' ``refresh`` is typed by the RefreshPolicy protocol)."""

import pytest
import torch
from callback_helpers import EveryOtherStep
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

import lightning_kron as lk


@pytest.mark.parametrize("optimizer", ["SOAP", "EShampoo", "Shampoo", "KrADagrad"])
@pytest.mark.parametrize("policy, expected", [
    ('{"class_path": "lightning_kron.BudgetRefresh", "init_args": {"every": 10}}', lk.BudgetRefresh),
    ('{"class_path": "callback_helpers.EveryOtherStep"}', EveryOtherStep),
], ids=["BudgetRefresh", "user-written"])
def test_optimizer_flag_takes_a_refresh_policy_by_class_path(optimizer, policy, expected, tmp_path):
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, save_config_callback=None, args=[
        "--trainer.max_steps", "3", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path), "--optimizer", f"lightning_kron.{optimizer}",
        "--optimizer.lr", "0.01", "--optimizer.refresh", policy])
    cli.trainer.fit(cli.model, cli.datamodule)
    built = cli.trainer.optimizers[0]
    assert type(built).__name__ == optimizer and isinstance(built.refresh, expected) and built.global_step == 3
    assert torch.isfinite(torch.cat([param.detach().flatten() for param in cli.model.parameters()])).all()
