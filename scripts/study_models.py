"""The models of the refresh study (scripts/refresh_study.py): a registry, :data:`STUDY_MODELS`,
of name -> ``build(seed) -> Task`` plus each model's step budget and SOAP settings. Another model
is one ``register(StudyModel(name, build, steps, lr, warmup_steps, note))`` line; any of them at another
learning rate is ``study_model("name@lrX")``.

The recipes' GPT (gpt2 and llama families) and vision (ViT, ResNet) modules on the data of this
machine, two models written for the study that no schedule was tuned on (a byte LSTM language model
and a deep GELU MLP on a noisy random teacher), the 300-step GPT recipe at the compare script's
length, and the issue's three held-out small models (``scripts/small_models.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from scripts.small_models import make_task


@dataclass
class Task:
    """What one run trains: the network, an endless iterator of training batches, the fixed
    validation batches and ``loss(network, batch) -> scalar``."""

    network: torch.nn.Module
    batches: Iterator
    val_batches: list
    loss: Callable[[torch.nn.Module, object], torch.Tensor]


@dataclass(frozen=True)
class StudyModel:
    """A registered study model: ``build(seed) -> Task`` plus its step budget and SOAP settings."""

    name: str
    build: Callable[[int], Task]
    steps: int
    lr: float
    warmup_steps: int
    note: str
    weight_decay: float = 0.05


STUDY_MODELS: dict[str, StudyModel] = {}
#: Models that probe one question (is the ResNet's gap to the reference its BatchNorm?), trained by
#: name (``--models conv-bn``) but not part of the study's tables or its default list.
PROBE_MODELS: dict[str, StudyModel] = {}


def register(model: StudyModel, probe: bool = False) -> StudyModel:
    (PROBE_MODELS if probe else STUDY_MODELS)[model.name] = model
    return model


def study_model(name: str) -> StudyModel:
    """A registered model, or one at another learning rate: ``"resnet@lr1.5e-3"`` is the ResNet at
    lr 1.5e-3, named ``"resnet@lr0.0015"`` (the lr as ``:.12g`` writes it, so one model has one
    name in the stored runs). Unknown names fail with the registered ones listed."""
    base, at, lr = name.partition("@lr")
    known = {**STUDY_MODELS, **PROBE_MODELS}
    if base not in known:
        raise ValueError(f"unknown study model {base!r}; registered: {', '.join(known)}")
    if not at:
        return known[base]
    try:
        rate = float(lr)
    except ValueError:
        raise ValueError(f"{name!r}: the learning rate after '@lr' must be a number, e.g. {base}@lr1e-3") from None
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"{name!r}: the learning rate must be a positive finite number")
    return dataclasses.replace(known[base], name=f"{base}@lr{rate:.12g}", lr=rate)


def _forever(make_loader: Callable[[], object]) -> Iterator:
    while True:
        yield from make_loader()


def _text_task(network: torch.nn.Module, seed: int, forward: Callable, context: int = 64, batch: int = 16) -> Task:
    """Byte-level next-token prediction on Python's standard library (the GPT recipe's data)."""
    from recipes.text_data import TextDataModule

    data = TextDataModule(context_length=context, batch_size=batch, val_windows=64, seed=seed)
    data.setup("fit")

    def loss(net, tokens):
        logits = forward(net, tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    return Task(network, _forever(data.train_dataloader), list(data.val_dataloader()), loss)


def _gpt(family: str, context: int = 64, batch: int = 16) -> Callable[[int], Task]:
    def build(seed: int) -> Task:
        from recipes.gpt import CausalLM

        module = CausalLM(family=family, size="tiny", context_length=context)
        return _text_task(module.network, seed, lambda net, x: net(input_ids=x, use_cache=False).logits, context, batch)
    return build


def _digits_task(make_network: Callable[[int, int], torch.nn.Module], forward: Callable, seed: int) -> Task:
    """Classification of the vision recipe's data (scikit-learn digits at 16x16, batch 64);
    ``make_network(channels, classes)`` is built after the data, so the seed's init follows it."""
    from recipes.image_data import ImageDataModule

    data = ImageDataModule(image_size=16, batch_size=64, seed=seed)
    data.setup("fit")
    network = make_network(data.channels, data.num_classes)
    loss = lambda net, batch: F.cross_entropy(forward(net, batch[0]), batch[1])  # noqa: E731
    return Task(network, _forever(data.train_dataloader), list(data.val_dataloader()), loss)


def _recipe_classifier(family: str, channels: int, classes: int) -> torch.nn.Module:
    from recipes.vision import ImageClassifier

    return ImageClassifier(family=family, size="tiny", num_classes=classes, channels=channels, image_size=16).network


def _vision(family: str, adapt: Callable[[torch.nn.Module], torch.nn.Module] = lambda network: network
            ) -> Callable[[int], Task]:
    """The vision recipe's ``family`` (tiny) on its data; ``adapt`` changes the network (a probe's)."""
    def build(seed: int) -> Task:
        make = lambda channels, classes: adapt(_recipe_classifier(family, channels, classes))  # noqa: E731
        return _digits_task(make, lambda net, images: net(pixel_values=images).logits, seed)
    return build


class LSTMLanguageModel(torch.nn.Module):
    """Held-out model 1: a one-layer byte LSTM (embedding 64, hidden 128), no schedule tuned on it."""

    def __init__(self, width: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, width)
        self.lstm = torch.nn.LSTM(width, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


def _lstm(seed: int) -> Task:
    return _text_task(LSTMLanguageModel(), seed, lambda net, x: net(x))


def deep_mlp(inputs: int = 32, width: int = 128, depth: int = 6, outputs: int = 8) -> torch.nn.Sequential:
    """Held-out model 2: a deep GELU MLP with LayerNorm, no schedule tuned on it."""
    layers: list[torch.nn.Module] = [torch.nn.Linear(inputs, width)]
    for _ in range(depth - 1):
        layers += [torch.nn.LayerNorm(width), torch.nn.GELU(), torch.nn.Linear(width, width)]
    return torch.nn.Sequential(*layers, torch.nn.GELU(), torch.nn.Linear(width, outputs))


def _teacher_batches(seed: int, batch: int = 128, inputs: int = 32, outputs: int = 8) -> tuple[Callable, list]:
    """A fixed random tanh teacher with correlated inputs and label noise 0.1: fresh batches every
    step (no overfitting), a fixed validation set of 2048; the data seed is the run's seed."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    mix = torch.randn(inputs, inputs, generator=generator) / math.sqrt(inputs)
    w1, w2 = torch.randn(inputs, 64, generator=generator), torch.randn(64, outputs, generator=generator) / 8

    def sample(count: int):
        x = torch.randn(count, inputs, generator=generator) @ mix
        y = torch.tanh(x @ w1) @ w2
        return x, y + 0.1 * torch.randn(y.shape, generator=generator)

    val = [sample(512) for _ in range(4)]
    return (lambda: iter([sample(batch)])), val


def _mlp(seed: int) -> Task:
    make, val = _teacher_batches(seed)
    loss = lambda net, batch: F.mse_loss(net(batch[0]), batch[1])  # noqa: E731
    return Task(deep_mlp(), _forever(make), val, loss)


register(StudyModel("gpt2", _gpt("gpt2"), 150, 1e-2, 15, "GPT recipe, gpt2 family, tiny (2x128), context 64, batch 16"))
register(StudyModel("llama", _gpt("llama"), 150, 1e-2, 15, "GPT recipe, llama family, tiny (2x128), context 64, batch 16"))
register(StudyModel("vit", _vision("vit"), 150, 3e-3, 15, "vision recipe, ViT tiny, digits at 16x16, batch 64"))
register(StudyModel("resnet", _vision("resnet"), 150, 3e-3, 15, "vision recipe, ResNet tiny, digits at 16x16, batch 64"))
register(StudyModel("lstm", _lstm, 150, 1e-2, 15, "held out: byte LSTM LM (64/128) on the stdlib text, context 64"))
register(StudyModel("mlp", _mlp, 200, 3e-3, 20, "held out: 7-layer MLP (width 128) on a noisy random teacher"))
register(StudyModel("gpt2-300", _gpt("gpt2", context=128, batch=32), 300, 1e-2, 30,
                    "the GPT recipe as scripts/compare.py trains it: context 128, batch 32, 300 steps",
                    weight_decay=0.1))


def _small(name: str) -> Callable[[int], Task]:
    """A model of scripts/small_models.py (the issue's held-out CNN, LSTM and MLP) as a study task."""
    def build(seed: int) -> Task:
        small = make_task(name, seed)
        return Task(small.model, (small.batch(step) for step in itertools.count()), [small.validation], small.loss)
    return build


for _name, _note in (("cnn", "held out (issue): CNN 16x1x3x3 + 32x16x3x3 on digits 8x8"),
                     ("lstm", "held out (issue): byte LSTM LM (32/64) on the stdlib text"),
                     ("mlp", "held out (issue): 5-layer tanh MLP on an ill-conditioned teacher")):
    register(StudyModel(f"small-{_name}", _small(_name), 300, 3e-3, 30, _note, weight_decay=0.0))


# ----------------------------------------------------------------- probes: is it the BatchNorm?
def group_norm_for_batch_norm(network: torch.nn.Module, groups: int = 4) -> torch.nn.Module:
    """Every ``BatchNorm2d`` of ``network`` replaced by a ``GroupNorm`` over the same channels (its
    scale 1 and shift 0, as the BatchNorm's at init): the same network without batch statistics."""
    for module in list(network.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, child_name, torch.nn.GroupNorm(min(groups, child.num_features), child.num_features))
    return network


def conv_stack(channels: int, classes: int, batch_norm: bool) -> torch.nn.Sequential:
    """A plain (not residual) CNN, 16-32-64 channels, the last two convolutions with stride 2, then
    global average pooling and a linear head; with or without BatchNorm after each convolution."""
    layers: list[torch.nn.Module] = []
    for inputs, outputs, stride in ((channels, 16, 1), (16, 32, 2), (32, 64, 2)):
        layers.append(torch.nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=not batch_norm))
        layers += [torch.nn.BatchNorm2d(outputs)] if batch_norm else []
        layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, classes))


def _conv(batch_norm: bool) -> Callable[[int], Task]:
    return lambda seed: _digits_task(lambda channels, classes: conv_stack(channels, classes, batch_norm),
                                     lambda net, images: net(images), seed)


register(StudyModel("resnet-gn", _vision("resnet", group_norm_for_batch_norm), 150, 3e-3, 15,
                    "probe: the ResNet with GroupNorm (4 groups) for every BatchNorm"), probe=True)
register(StudyModel("conv-bn", _conv(True), 150, 3e-3, 15, "probe: a plain 3-layer CNN with BatchNorm, digits 16x16"),
         probe=True)
register(StudyModel("conv-plain", _conv(False), 150, 3e-3, 15, "probe: the same CNN without BatchNorm"), probe=True)
