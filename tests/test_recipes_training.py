"""Both recipes build, train a few steps and validate with every optimizer name (tiny, CPU)."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from recipes.gpt import CausalLM
from recipes.image_data import ImageDataModule
from recipes.optimizers import OPTIMIZER_NAMES, OptimizerConfig
from recipes.text_data import TextDataModule
from recipes.vision import ImageClassifier

TEXT_FOLDER = str(Path(json.__file__).parent)  # five real .py files, present wherever Python is


def fit_briefly(model: L.LightningModule, data: L.LightningDataModule, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None, limit_val_batches=2,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    return trainer


def assert_trained(model: L.LightningModule, before: dict, trainer: L.Trainer, optimizer_name: str) -> None:
    assert trainer.global_step == 3
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, before[name])]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors moved"
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))
    expected = "AdamW" if optimizer_name == "adamw" else None
    if expected:
        assert type(trainer.optimizers[0]).__name__ == expected
    else:
        assert hasattr(trainer.optimizers[0], "factor_names") and trainer.optimizers[0].factor_names()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("optimizer_name", OPTIMIZER_NAMES)
def test_gpt_recipe_trains_and_validates(family, optimizer_name, tmp_path):
    def build():
        L.seed_everything(0, verbose=False)
        data = TextDataModule(source=TEXT_FOLDER, context_length=16, batch_size=8, val_windows=8, cache_dir=str(tmp_path))
        config = OptimizerConfig(name=optimizer_name, warmup_steps=3)
        model = CausalLM(family=family, size="tiny", context_length=16, optimizer=config)
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        trainer = fit_briefly(model, data)
        assert_trained(model, before, trainer, optimizer_name)
        perplexity = float(trainer.callback_metrics["val_perplexity"])
        assert perplexity == pytest.approx(math.exp(float(trainer.callback_metrics["val_loss"])), rel=0.05)

    build()


@pytest.mark.parametrize("family", ["vit", "resnet"])
@pytest.mark.parametrize("optimizer_name", OPTIMIZER_NAMES)
def test_vision_recipe_trains_and_validates(family, optimizer_name):
    def build():
        L.seed_everything(0, verbose=False)
        data = ImageDataModule(image_size=8, batch_size=16)
        model = ImageClassifier(family=family, size="tiny", num_classes=data.num_classes, channels=data.channels,
                                image_size=8, optimizer=OptimizerConfig(name=optimizer_name, warmup_steps=1))
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        trainer = fit_briefly(model, data)
        assert_trained(model, before, trainer, optimizer_name)
        assert 0.0 <= float(trainer.callback_metrics["val_accuracy"]) <= 1.0

    build()


def test_gpt_recipe_learns_the_text(tmp_path):
    """Forty steps of SOAP on a small corpus must beat the uniform-byte loss ln(256) clearly."""
    L.seed_everything(0, verbose=False)
    data = TextDataModule(source=TEXT_FOLDER, context_length=32, batch_size=8, val_windows=16, cache_dir=str(tmp_path))
    model = CausalLM(size="tiny", context_length=32, optimizer=OptimizerConfig(name="soap", warmup_steps=5))
    trainer = fit_briefly(model, data, steps=40)
    assert float(trainer.callback_metrics["val_loss"]) < math.log(256) - 1.5


def test_gpt_sizes_reach_gpt2_small():
    """The 124m size is GPT-2 small's shape (85M parameters with a 256-byte vocabulary)."""
    from recipes.gpt import build_network

    with torch.device("meta"):
        network = build_network("gpt2", "124m", context_length=1024)
    count = sum(param.numel() for param in network.parameters())
    assert 80e6 < count < 90e6
    assert (network.config.n_layer, network.config.n_embd, network.config.n_head) == (12, 768, 12)
