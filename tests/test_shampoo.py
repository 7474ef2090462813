"""Shampoo facts: diagonal factors give AdaGrad, grafting borrows the grafted method's step size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_kron as lk
from lightning_kron.methods.grafting import graft_norm
from tests.conftest import set_grads


def test_diagonal_factors_reduce_to_adagrad():
    """Gradients that are always diagonal matrices: L^-1/4 G R^-1/4 = g / sqrt(sum g^2) on the diagonal."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.zeros(5, 5, dtype=torch.float64))
    optimizer = lk.Shampoo([param], lr=1.0, betas=(0.0, 0.999), eps=1e-30, graft="none", shampoo_beta=1.0,
                           refresh=lk.FixedRefresh(every=1), solver="eigh")
    accumulated = torch.zeros(5, dtype=torch.float64)
    for _ in range(6):
        values = torch.rand(5, generator=generator, dtype=torch.float64) + 0.5
        accumulated += values.square()
        before = param.detach().clone()
        set_grads([param], [torch.diag(values)])
        optimizer.step()
        torch.testing.assert_close(before - param.detach(), torch.diag(values / accumulated.sqrt()), rtol=1e-9, atol=1e-12)


def test_diagonal_factors_with_an_ema_reduce_to_bias_corrected_rmsprop():
    """``shampoo_beta < 1``: the factors are EMAs, bias-corrected before the root,
    ``L_hat = L / (1 - beta^t)``. Diagonal gradients then give ``g / sqrt(v_hat)`` with ``v_hat`` the
    bias-corrected EMA of ``g^2``; without the correction the first step would be
    ``sqrt(1 - beta)`` = 0.32 times too short. fp64: asserted to round-off."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.zeros(5, 5, dtype=torch.float64))
    beta = 0.9
    optimizer = lk.Shampoo([param], lr=1.0, betas=(0.0, 0.999), eps=1e-30, graft="none", shampoo_beta=beta,
                           refresh=lk.FixedRefresh(every=1), solver="eigh")
    average = torch.zeros(5, dtype=torch.float64)
    for step in range(1, 7):
        values = torch.rand(5, generator=generator, dtype=torch.float64) + 0.5
        average = beta * average + (1 - beta) * values.square()
        before = param.detach().clone()
        set_grads([param], [torch.diag(values)])
        optimizer.step()
        expected = values / (average / (1 - beta**step)).sqrt()
        torch.testing.assert_close(before - param.detach(), torch.diag(expected), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("graft, beta1, reference", [
    ("adam", 0.9, lambda params: torch.optim.Adam(params, lr=0.1, betas=(0.9, 0.99), eps=1e-8)),
    ("adagrad", 0.0, lambda params: torch.optim.Adagrad(params, lr=0.1, eps=1e-8)),
    ("rmsprop", 0.0, lambda params: torch.optim.RMSprop(params, lr=0.1, alpha=0.99, eps=1e-8)),
    ("sgd", 0.0, lambda params: torch.optim.SGD(params, lr=0.1)),
], ids=["adam", "adagrad", "rmsprop", "sgd"])
def test_each_graft_takes_its_methods_step_norm_per_block(graft, beta1, reference):
    """Each graft's step has exactly the norm of torch's own optimizer's step on the same gradients
    (fp64). Adam with its momentum, bias-corrected as torch does; the others without momentum
    (``betas[0] = 0``: the filtered gradient is the gradient), ``betas[1]`` being RMSprop's
    ``alpha``; the graft's eps sits outside the square root, as in torch."""
    generator = torch.Generator().manual_seed(1)
    shampoo_param = nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
    torch_param = nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
    shampoo = lk.Shampoo([shampoo_param], lr=0.1, betas=(beta1, 0.99), graft=graft, weight_decay=0.0)
    other = reference([torch_param])
    for _ in range(8):
        gradient = torch.randn(6, 4, generator=generator, dtype=torch.float64)
        before_s, before_t = shampoo_param.detach().clone(), torch_param.detach().clone()
        set_grads([shampoo_param], [gradient])
        set_grads([torch_param], [gradient])
        shampoo.step()
        other.step()
        step_s, step_t = shampoo_param.detach() - before_s, torch_param.detach() - before_t
        torch.testing.assert_close(step_s.norm(), step_t.norm(), rtol=1e-10, atol=0)
        assert not torch.allclose(step_s, step_t, atol=1e-3)  # same size, different direction


@pytest.mark.parametrize("graft", ["adam", "adagrad", "rmsprop", "sgd", "none"])
def test_every_graft_trains(graft):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    lr = {"sgd": 0.05, "none": 0.01}.get(graft, 0.01)
    optimizer = lk.Shampoo(model.parameters(), lr=lr, graft=graft)
    inputs = torch.randn(64, 8)
    targets = inputs[:, :1] * 2 - inputs[:, 1:2]
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = (model(inputs) - targets).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_graft_norm_handles_zero_direction():
    direction = torch.zeros(2, 3, 3)
    direction[0] = 1.0
    reference = torch.full((2, 3, 3), 2.0)
    scaled = graft_norm(direction, reference)
    torch.testing.assert_close(scaled[0].norm(), reference[0].norm())
    assert torch.equal(scaled[1], torch.zeros(3, 3))


def test_unknown_graft_is_refused():
    with pytest.raises(ValueError, match="graft"):
        lk.Shampoo(nn.Linear(2, 2).parameters(), graft="lion")


@pytest.mark.parametrize("optimizer", [lk.Shampoo, lk.KrADagrad])
def test_zero_damping_is_refused_where_it_would_take_an_infinite_root(optimizer):
    """A 3x6 weight's right factor (6x6, from rank-3 gradients) has zero eigenvalues: Shampoo at
    eps=0 took their inverse root and turned the weight into Inf after one step; an added parameter
    group is checked too."""
    model = nn.Linear(6, 3)
    with pytest.raises(ValueError, match=f"eps must be > 0 for {optimizer.__name__}"):
        optimizer(model.parameters(), eps=0.0)
    accepted = optimizer([model.weight], eps=1e-6)
    with pytest.raises(ValueError, match="eps must be > 0"):
        accepted.add_param_group({"params": [model.bias], "eps": 0.0})


@pytest.mark.parametrize("graft", ["adam", "sgd", "none"])
def test_vectors_take_adamw_steps_whatever_the_graft(graft):
    shampoo_bias = nn.Parameter(torch.zeros(4))
    adam_bias = nn.Parameter(torch.zeros(4))
    shampoo = lk.Shampoo([shampoo_bias], lr=0.1, betas=(0.9, 0.99), graft=graft, graft_eps=1e-8)
    adam = torch.optim.Adam([adam_bias], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(3):
        gradient = torch.tensor([100.0, 1.0, 0.01, 0.001])
        set_grads([shampoo_bias], [gradient])
        set_grads([adam_bias], [gradient])
        shampoo.step()
        adam.step()
    torch.testing.assert_close(shampoo_bias, adam_bias)
