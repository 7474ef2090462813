"""Parameter shapes: 0-D/1-D, conv, GPT-2 Conv1D, over-size embeddings (one-sided and split), tied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_kron as lk
from lightning_kron.engine.blocking import plan_blocks


def _step(model, optimizer, inputs, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        model(inputs).float().square().mean().backward()
        optimizer.step()


def test_plans():
    assert plan_blocks((), max_precond_dim=8).blocks[0].factored == (False,)
    assert plan_blocks((7,), max_precond_dim=8).blocks[0].factored == (False,)
    assert plan_blocks((7,), max_precond_dim=8, precondition_1d=True).blocks[0].factored == (True,)
    assert plan_blocks((1, 6, 1, 5), max_precond_dim=8).view_shape == (6, 5)
    conv = plan_blocks((16, 8, 3, 3), max_precond_dim=100)
    assert conv.view_shape == (16, 72) and conv.blocks[0].factored == (True, True)
    assert plan_blocks((16, 8, 3, 3), max_precond_dim=100, merge_dims=False).view_shape == (16, 8, 3, 3)
    split = plan_blocks((10, 4), max_precond_dim=4, split_large_dims=True)
    assert [b.shape for b in split.blocks] == [(4, 4), (4, 4), (2, 4)]
    assert all(b.factored == (True, True) for b in split.blocks)


def test_conv_weights_are_merged_on_request_and_trained():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    optimizer = lk.SOAP(model.named_parameters(), lr=1e-3, merge_dims=True)
    _step(model, optimizer, torch.randn(2, 3, 10, 10))
    assert "0.weight[L]" in optimizer.factor_names() and "0.weight[R]" in optimizer.factor_names()
    assert optimizer.state[model[0].weight]["block0.basis.1"].shape == (27, 27)


def test_soap_gives_each_conv_dim_its_own_factor_by_default():
    model = nn.Conv2d(3, 8, (3, 2))
    optimizer = lk.SOAP(model.named_parameters(), lr=1e-3)
    _step(model, optimizer, torch.randn(2, 3, 10, 10))
    assert {f.name: f.size for f in optimizer.factors()} == {
        "weight[0]": 8, "weight[1]": 3, "weight[2]": 3, "weight[3]": 2}


def test_gpt2_conv1d_is_a_matrix():
    layer = Conv1D(12, 6)  # weight is [in=6, out=12], used as x @ W
    optimizer = lk.SOAP(layer.named_parameters(), lr=1e-3)
    _step(layer, optimizer, torch.randn(5, 6))
    shapes = {f.name: f.size for f in optimizer.factors()}
    assert shapes == {"weight[L]": 6, "weight[R]": 12}


@pytest.mark.parametrize("split", [False, True])
def test_embedding_larger_than_max_precond_dim(split):
    embedding = nn.Embedding(50, 6)
    optimizer = lk.SOAP(embedding.named_parameters(), lr=1e-3, max_precond_dim=16, split_large_dims=split)
    _step(embedding, optimizer, torch.randint(0, 50, (4, 7)))
    names = optimizer.factor_names()
    if split:
        assert len(names) == 8 and names[0] == "weight.block0[L]" and names[-1] == "weight.block3[R]"
    else:
        assert names == ["weight[R]"]
    assert torch.isfinite(embedding.weight).all()


def test_tied_weights_are_handled_once():
    embedding = nn.Embedding(20, 8)
    head = nn.Linear(8, 20, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head)
    optimizer = lk.SOAP(list(model.parameters()) + [embedding.weight], lr=1e-3)
    assert len(optimizer.param_groups[0]["params"]) == 1
    named = lk.SOAP(model.named_parameters(), lr=1e-3)
    assert named.factor_names() == ["0.weight[L]", "0.weight[R]"]
    before = embedding.weight.detach().clone()
    _step(model, named, torch.randint(0, 20, (3, 5)), steps=1)
    assert not torch.equal(before, embedding.weight)


def test_scalars_and_vectors_use_adamw_unless_asked():
    scale = nn.Parameter(torch.tensor(1.0))
    vector = nn.Parameter(torch.ones(6))
    optimizer = lk.SOAP([scale, vector], lr=1e-2)
    assert optimizer.factor_names() == []
    full = lk.SOAP([vector], lr=1e-2, precondition_1d=True)
    assert full.factor_names() == ["group0.param0[0]"]


def test_parameters_without_gradients_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].requires_grad_(False)
    optimizer = lk.SOAP(model.parameters(), lr=1e-2, weight_decay=0.1)
    frozen = model[1].weight.detach().clone()
    _step(model, optimizer, torch.randn(8, 4), steps=4)
    assert torch.equal(frozen, model[1].weight)
    steps = optimizer.state[model[1].weight]["block0.step"]
    assert steps == 0 and optimizer.state[model[0].weight]["block0.step"] == 4


def test_higher_order_tensor_without_merging():
    param = nn.Parameter(torch.randn(3, 4, 5))
    optimizer = lk.SOAP([param], lr=1e-2, merge_dims=False)
    for _ in range(3):
        param.grad = torch.randn(3, 4, 5)
        optimizer.step()
    assert [f.size for f in optimizer.factors()] == [3, 4, 5]
    assert optimizer.factor_names() == ["group0.param0[0]", "group0.param0[1]", "group0.param0[2]"]


def test_channels_last_convolution_matches_contiguous():
    torch.manual_seed(3)
    contiguous = nn.Conv2d(3, 6, 3)
    channels_last = nn.Conv2d(3, 6, 3)
    channels_last.load_state_dict(contiguous.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last)
    assert not channels_last.weight.is_contiguous()
    inputs = torch.randn(2, 3, 8, 8)
    runs = []
    for model in (contiguous, channels_last):
        optimizer = lk.SOAP(model.parameters(), lr=1e-2)
        _step(model, optimizer, inputs, steps=4)
        runs.append(model.weight.detach().contiguous())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)
    assert not torch.equal(runs[0], contiguous.weight.detach() * 0)
