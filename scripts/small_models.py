"""Three small models with data that is already on the machine, for studies across models.

No schedule or default of the library was tuned on them, which is their point: a policy chosen on
the recipes is checked here on models it has not seen. Each is small enough for a few hundred CPU
steps in seconds:

- ``cnn``: two 3x3 convolutions (weights 16x1x3x3 and 32x16x3x3) and a linear head on
  scikit-learn's bundled handwritten digits (8x8, 10 classes), cross-entropy;
- ``lstm``: a byte-level LSTM language model (embedding 32, one LSTM layer of 64) on the running
  Python's standard library source, next-byte cross-entropy;
- ``mlp``: a 5-layer MLP (32 -> 128 -> 128 -> 128 -> 128 -> 8, tanh) regressing a fixed random
  teacher network on inputs with an ill-conditioned covariance (scales from 1 down to 0.01), MSE.

The data of a task is fixed (fixed-seed splits); ``seed`` changes the initialisation and the batch
order only, so seeds measure the spread of one optimizer on one problem.

>>> task = make_task("mlp", seed=0)
>>> loss = task.loss(task.model, task.batch(0)); loss.backward()
>>> task.name, loss.dim(), task.val_loss() > 0, task.train_loss() > 0
('mlp', 0, True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import nn

from recipes.text_data import stdlib_files

DATA_SEED = 1234  # the data side of every task: independent of the run's seed
TASKS = ("cnn", "lstm", "mlp")
LSTM_BYTES = 600_000  # of the standard library's source: the first files, in sorted order
LSTM_CONTEXT = 32
TRAIN_SAMPLE = 1024  # training examples (LSTM: windows) that train_loss evaluates


@dataclass
class SmallTask:
    """A model, its training batches (``batch(step)``, deterministic per seed), its loss, a fixed
    validation set and a fixed sample of the training set (how well the optimizer fits)."""

    name: str
    model: nn.Module
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor]
    training: tuple[torch.Tensor, torch.Tensor]

    def val_loss(self) -> float:
        """Loss on the whole validation set."""
        return self._evaluate(self.validation)

    def train_loss(self) -> float:
        """Loss on the fixed training sample (at most :data:`TRAIN_SAMPLE` examples)."""
        return self._evaluate(self.training)

    @torch.no_grad()
    def _evaluate(self, data) -> float:
        self.model.eval()
        try:
            return float(self.loss(self.model, data))
        finally:
            self.model.train()


def make_task(name: str, seed: int = 0, batch_size: int | None = None) -> SmallTask:
    """One of :data:`TASKS`, its model initialised from ``seed``."""
    builders = {"cnn": _cnn_task, "lstm": _lstm_task, "mlp": _mlp_task}
    if name not in builders:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {name!r}")
    return builders[name](seed, batch_size)


def _split(count: int, val_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(DATA_SEED))
    n_val = math.ceil(val_fraction * count)
    return order[n_val:], order[:n_val]


def _task(name, model, inputs, targets, train, val, batch_size, seed, loss) -> SmallTask:
    """A task over ``inputs``/``targets`` split into the ``train`` and ``val`` indices."""
    sample = train[:TRAIN_SAMPLE]
    return SmallTask(name, model, _sampler(inputs[train], targets[train], batch_size, seed), loss,
                     (inputs[val], targets[val]), (inputs[sample], targets[sample]))


def _sampler(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int):
    """``batch(step)``: a random minibatch whose draw depends only on (seed, step), so two
    optimizers of one comparison see the same batches in the same order."""
    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(len(inputs), (batch_size,), generator=generator)
        return inputs[index], targets[index]
    return batch


def _cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ----------------------------------------------------------------- cnn on digits
@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    return images, torch.as_tensor(digits.target).long()


def _cnn_task(seed: int, batch_size: int | None) -> SmallTask:
    images, labels = _digits()
    train, val = _split(len(labels))
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    return _task("cnn", model, images, labels, train, val, batch_size or 64, seed, _cross_entropy)


# ----------------------------------------------------------------- lstm language model
class ByteLSTM(nn.Module):
    """Embedding, one LSTM layer, a linear head over the 256 byte values."""

    def __init__(self, embedding: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, embedding)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


@lru_cache(maxsize=1)
def _stdlib_bytes() -> torch.Tensor:
    """The first :data:`LSTM_BYTES` bytes of the standard library's ``*.py`` files (sorted)."""
    chunks, total = [], 0
    for path in stdlib_files()[1]:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= LSTM_BYTES:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:LSTM_BYTES]), dtype=torch.uint8).long()


def _lstm_task(seed: int, batch_size: int | None) -> SmallTask:
    tokens = _stdlib_bytes()
    windows = tokens[: len(tokens) // (LSTM_CONTEXT + 1) * (LSTM_CONTEXT + 1)].reshape(-1, LSTM_CONTEXT + 1)
    train, val = _split(len(windows), val_fraction=0.05)
    torch.manual_seed(seed)
    return _task("lstm", ByteLSTM(), windows[:, :-1], windows[:, 1:], train, val[:TRAIN_SAMPLE],
                 batch_size or 32, seed, _cross_entropy)


# ----------------------------------------------------------------- deep mlp on a teacher
@lru_cache(maxsize=1)
def _teacher_data(count: int = 5120, width: int = 32, outputs: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with per-coordinate scales from 1 to 0.01 (an ill-conditioned covariance, where a
    Kronecker preconditioner has something to do), targets from a fixed random tanh network plus
    noise."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    scales = torch.logspace(0, -2, width)
    inputs = torch.randn(count, width, generator=generator) * scales
    first = torch.randn(width, 64, generator=generator) / scales[:, None] / math.sqrt(width)
    second = torch.randn(64, outputs, generator=generator) / math.sqrt(64)
    targets = torch.tanh(inputs @ first) @ second + 0.05 * torch.randn(count, outputs, generator=generator)
    return inputs, targets


def _mse(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.mse_loss(model(inputs), targets)


def _mlp_task(seed: int, batch_size: int | None) -> SmallTask:
    inputs, targets = _teacher_data()
    train, val = _split(len(inputs))
    torch.manual_seed(seed)
    widths = (32, 128, 128, 128, 128, 8)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return _task("mlp", nn.Sequential(*layers[:-1]), inputs, targets, train, val, batch_size or 64, seed, _mse)
