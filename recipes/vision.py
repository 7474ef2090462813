"""Image classification recipe: ViT or ResNet from a ``transformers`` config, trained from scratch.

Nothing is downloaded (random init, ``HF_HUB_OFFLINE``-safe); the default data is scikit-learn's
bundled digits (see :mod:`recipes.image_data`). ``tiny`` sizes train in seconds on a CPU; ``small``
is ViT-Tiny's width (192) and ResNet-18's stage layout.

Command line (LightningCLI; see ``recipes/configs/vision_*.yaml``)::

    kron-vision fit --config recipes/configs/vision_vit_tiny.yaml --model.optimizer.name soap
    kron-vision fit                              # no --config: recipes/configs/vision_vit_tiny.yaml

>>> import torch
>>> module = ImageClassifier(family="resnet", size="tiny", num_classes=10, channels=1, image_size=16)
>>> module(torch.zeros(2, 1, 16, 16)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from recipes.errors import OptionError, RecipeInputError
from recipes.optimizers import OptimizerConfig
from recipes.recipe_module import RecipeModule

Family = Literal["vit", "resnet"]
Size = Literal["tiny", "small"]
FAMILIES: tuple[str, ...] = Family.__args__
MODEL_CLASSES = {"vit": "ViTForImageClassification", "resnet": "ResNetForImageClassification"}

VIT_SIZES = {  # hidden width, layers, heads, MLP width, patch side
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, patch_size=4),
    "small": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, patch_size=4),
}
RESNET_SIZES = {
    "tiny": dict(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1]),
    "small": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2]),  # ResNet-18 layout
}


def vision_config(family: str, size: str, num_classes: int, channels: int, image_size: int):
    """The ``transformers`` config of one family and size; unknown or inconsistent -> RecipeInputError."""
    if family not in FAMILIES:
        raise RecipeInputError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    sizes = VIT_SIZES if family == "vit" else RESNET_SIZES
    if size not in sizes:
        raise RecipeInputError(f"unknown model size {size!r} for {family}; choose one of {', '.join(sizes)}")
    if num_classes < 2 or channels < 1:
        raise RecipeInputError(f"need at least 2 classes and 1 channel, got {num_classes} and {channels}")
    labels = {index: str(index) for index in range(num_classes)}
    if family == "vit":
        from transformers import ViTConfig

        shape = VIT_SIZES[size]
        if image_size % shape["patch_size"]:
            raise RecipeInputError(f"image_size {image_size} is not a multiple of the ViT patch size {shape['patch_size']}")
        return ViTConfig(image_size=image_size, num_channels=channels, id2label=labels, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, **shape)
    from transformers import ResNetConfig

    return ResNetConfig(num_channels=channels, layer_type="basic", id2label=labels, **RESNET_SIZES[size])


def build_classifier(family: str, size: str, num_classes: int, channels: int, image_size: int) -> torch.nn.Module:
    """A randomly initialised ``ViTForImageClassification`` or ``ResNetForImageClassification``."""
    import transformers

    config = vision_config(family, size, num_classes, channels, image_size)
    return getattr(transformers, MODEL_CLASSES[family])(config)


class ImageClassifier(RecipeModule):
    """Cross-entropy classification; logs ``train_loss``, ``val_loss`` and ``val_accuracy``.

    Args:
        family: "vit" or "resnet".
        size: "tiny" or "small".
        num_classes, channels, image_size: the data's (the CLI links them from the data module).
        label_smoothing: cross-entropy label smoothing.
        optimizer: which optimizer and schedule (see :class:`recipes.optimizers.OptimizerConfig`).
    """

    def __init__(self, family: Family = "vit", size: Size = "tiny", num_classes: int = 10, channels: int = 1,
                 image_size: int = 32, label_smoothing: float = 0.0, optimizer: OptimizerConfig = OptimizerConfig()) -> None:
        super().__init__(optimizer)
        if not 0.0 <= label_smoothing <= 1.0:
            raise OptionError.refused("model.label_smoothing", label_smoothing, "a number in [0, 1]")
        self.network = build_classifier(family, size, num_classes, channels, image_size)
        self.label_smoothing = label_smoothing
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(pixel_values=images).logits

    def training_step(self, batch, batch_index: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_index: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_accuracy.update(logits, labels)
        self.log("val_loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.log("val_accuracy", self.val_accuracy, prog_bar=True)


def main(args=None) -> None:
    """``kron-vision``: LightningCLI over :class:`ImageClassifier` and :class:`~recipes.image_data.ImageDataModule`."""
    from recipes.cli import run_cli
    from recipes.image_data import ImageDataModule

    links = [("data.image_size", "model.image_size"), ("data.num_classes", "model.num_classes", "instantiate"),
             ("data.channels", "model.channels", "instantiate")]
    run_cli(ImageClassifier, ImageDataModule, links=links, args=args,
            default_config=str(Path(__file__).parent / "configs" / "vision_vit_tiny.yaml"))


if __name__ == "__main__":
    main()
