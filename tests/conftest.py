"""Shared fixtures: the optimizer matrix every Kronecker optimizer must pass, and small helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning_kron as lk  # noqa: E402

# name -> factory(params, **overrides); every entry must pass tests/test_optimizer_matrix.py.
OPTIMIZER_FACTORIES = {
    "soap_fixed": lambda params, **kw: lk.SOAP(params, **{"lr": 1e-2, **kw}),
    "soap_adaptive": lambda params, **kw: lk.SOAP(params, **{"lr": 1e-2, "refresh": lk.AdaptiveRefresh(tolerance=0.05), **kw}),
    "eshampoo": lambda params, **kw: lk.EShampoo(params, **{"lr": 1e-2, **kw}),
    "shampoo_adam_graft": lambda params, **kw: lk.Shampoo(params, **{"lr": 1e-2, "graft": "adam", **kw}),
    # KrADagrad grafted onto Adam so the matrix's AdamW-scale learning rates transfer; the ungrafted
    # (paper) form is run through the same checks with its own rates in tests/test_kradagrad.py.
    "kradagrad_star_adam_graft": lambda params, **kw: lk.KrADagrad(params, **{"lr": 1e-2, "graft": "adam", **kw}),
    "kradagrad_alternating_adam_graft": lambda params, **kw: lk.KrADagrad(
        params, **{"lr": 1e-2, "graft": "adam", "variant": "alternating", **kw}),
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
