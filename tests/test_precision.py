"""Tensor-core defaults: the optimizer's scoped CUDA matmul precision, the TF32 emulation a CPU
run uses, and the ``"auto"`` options resolving by device. No GPU needed: the precision switch is a
flag a CPU build of torch has too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_kron as lk
from lightning_kron.engine.precision import cuda_matmul_precision, round_to_tf32

MATMUL = torch.backends.cuda.matmul


def _user_view():
    return MATMUL.allow_tf32, torch.get_float32_matmul_precision()


@pytest.mark.parametrize("user_setting", ["default", "legacy allow_tf32", "set_float32_matmul_precision"])
def test_the_precision_scope_restores_the_users_setting(user_setting):
    """The optimizer runs its statistics in IEEE and its directions in TF32 inside one step; the
    user's setting, made by either API, reads the same before and after (PyTorch raises when the
    legacy and the new API disagree, so a wrong restore would show as an error here)."""
    if user_setting == "legacy allow_tf32":
        MATMUL.allow_tf32 = True
    elif user_setting == "set_float32_matmul_precision":
        torch.set_float32_matmul_precision("high")
    try:
        before = _user_view()
        with cuda_matmul_precision("ieee", on_cuda=True):
            assert MATMUL.fp32_precision == "ieee"
            with cuda_matmul_precision("tf32", on_cuda=True):
                assert MATMUL.fp32_precision == "tf32"
            assert MATMUL.fp32_precision == "ieee"
        assert _user_view() == before
    finally:
        torch.set_float32_matmul_precision("highest")
    assert MATMUL.allow_tf32 is False


def test_round_to_tf32_keeps_ten_mantissa_bits_rounding_ties_away():
    half_ulp = 2.0 ** -11
    x = torch.tensor([1 + half_ulp, 1 + 3 * half_ulp, 1 + half_ulp / 2, -(1 + half_ulp), float("inf"), 0.0])
    assert round_to_tf32(x).tolist() == [1 + 2 * half_ulp, 1 + 4 * half_ulp, 1.0, -(1 + 2 * half_ulp), float("inf"), 0.0]
    values = torch.randn(10_000)
    relative = ((round_to_tf32(values) - values) / values).abs()
    assert relative.max() <= half_ulp and relative.max() > half_ulp / 2


def test_auto_options_resolve_by_device():
    """``rotation_dtype`` and ``orthonormalizer`` default to ``"auto"``: TF32 directions and
    Cholesky-QR2 on CUDA, plain fp32 and Householder (unchanged) elsewhere; explicit values win."""
    model = nn.Linear(4, 3)
    auto = lk.SOAP(model.parameters())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (auto._rotation_for(cuda), auto._rotation_for(cpu)) == ((None, True), (None, False))
    assert (auto._orthonormalizer_for(cuda), auto._orthonormalizer_for(cpu)) == ("cholesky_qr3", "householder")
    assert not any(group.tf32_directions for group in auto.factor_groups())
    explicit = lk.SOAP(model.parameters(), rotation_dtype="tf32", orthonormalizer="householder")
    assert explicit._orthonormalizer_for(cuda) == "householder"
    assert all(group.tf32_directions for group in explicit.factor_groups() if group.factored_dims)
    assert lk.SOAP(model.parameters(), rotation_dtype=torch.float32)._rotation_for(cuda) == (torch.float32, False)


def test_emulated_tf32_changes_only_the_direction_rounding():
    """On a CPU ``"tf32"`` really rounds (the step differs from fp32's) and only a little (the
    rounding of the direction's rotation: ~2^-11 relative)."""
    steps = {}
    for option in (None, "tf32"):
        torch.manual_seed(0)
        model = nn.Linear(8, 6)
        optimizer = lk.SOAP(model.parameters(), lr=1e-2, rotation_dtype=option)
        before = model.weight.detach().clone()
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 8)).square().mean().backward()
            optimizer.step()
        steps[option] = model.weight.detach() - before
    difference = (steps["tf32"] - steps[None]).norm() / steps[None].norm()
    assert 0 < difference < 1e-2
