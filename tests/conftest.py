"""Shared fixtures: the optimizer matrix every Kronecker optimizer must pass, and small helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning_kron as lk  # noqa: E402


def _ten_times_lr(overrides: dict) -> dict:
    return {**overrides, "lr": 10 * overrides["lr"]} if "lr" in overrides else overrides


# name -> factory(params, **overrides); every entry must pass tests/test_optimizer_matrix.py.
OPTIMIZER_FACTORIES = {
    "soap_fixed": lambda params, **kw: lk.SOAP(params, **{"lr": 1e-2, **kw}),
    "soap_adaptive": lambda params, **kw: lk.SOAP(params, **{"lr": 1e-2, "refresh": lk.AdaptiveRefresh(tolerance=0.05), **kw}),
    "eshampoo": lambda params, **kw: lk.EShampoo(params, **{"lr": 1e-2, **kw}),
    "shampoo_adam_graft": lambda params, **kw: lk.Shampoo(params, **{"lr": 1e-2, "graft": "adam", **kw}),
    # Ungrafted KrADagrad takes AdaGrad-normalised steps, which want ~10x the matrix's AdamW-scale rates.
    "kradagrad_star": lambda params, **kw: lk.KrADagrad(params, **_ten_times_lr(kw)),
    "kradagrad_alternating": lambda params, **kw: lk.KrADagrad(params, **{"variant": "alternating", **_ten_times_lr(kw)}),
    "kradagrad_star_adam_graft": lambda params, **kw: lk.KrADagrad(params, **{"lr": 1e-2, "graft": "adam", **kw}),
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
