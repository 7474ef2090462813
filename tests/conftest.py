"""Shared fixtures: the optimizer matrix every Kronecker optimizer must pass, and small helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning_kron.methods.registry import METHODS, MethodSpec, Variant  # noqa: E402

MATRIX_LR = 1e-2  # an AdamW-scale rate for the matrix's small problems; a variant's lr_scale multiplies it


def _factory(spec: MethodSpec, variant: Variant):
    def make(params, **overrides):
        lr = variant.lr_scale * overrides.pop("lr", MATRIX_LR)
        return spec.optimizer(params, **{"lr": lr, **variant.options, **overrides})
    return make


# "method_variant" -> factory(params, **overrides), one per variant of every registered method
# (lightning_kron/methods/registry.py); every entry must pass tests/test_optimizer_matrix.py.
OPTIMIZER_FACTORIES = {
    f"{spec.name}_{name}" if len(spec.variants) > 1 or name != "default" else spec.name: _factory(spec, variant)
    for spec in METHODS.values() for name, variant in spec.variants.items()
}


@pytest.fixture(params=sorted(OPTIMIZER_FACTORIES))
def make_optimizer(request):
    return OPTIMIZER_FACTORIES[request.param]


def set_grads(params, grads) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad.clone().to(param.dtype)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
