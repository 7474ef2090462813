"""Parity with the reference SOAP: ``pytorch_optimizer.SOAP``, a port of the SOAP authors' code.

``lk.SOAP(..., **REFERENCE_OPTIONS)`` must compute the reference's trajectory: the parameters after
every one of 60 steps, with refreshes every step or every 7 steps, at the reference's default
hyperparameters (weight decay included). What differs is only how the same numbers are computed:
our warm QR step works on the factor in its basis (``Q orth(B)``, the reference ``orth(L Q)``), our
moments live in the basis (the reference keeps the first one in parameter coordinates), our QR fixes
the signs of R, and size-1 dims get no factor instead of a 1x1 one. All of that is exact in exact
arithmetic, so the tolerance comes from fp64 round-off: measured 5e-14 on parameters of size ~0.5,
asserted at 1e-10.

The reference rounds the input of its QR to fp32 (a comment in its code says why: bf16 support).
The main test runs that QR in fp64 by pointing the reference module's ``torch.float32`` at
``torch.float64``; a second test runs it as shipped, where the fp32 round-off of its bases (~6e-8)
bounds the agreement. A third checks that the options of ``REFERENCE_OPTIONS`` that undo a deviation
matter here (all but ``max_precond_dim``, ``refresh`` and ``solver``, which only restate the
reference's sizes and clock): undoing any one of them moves the trajectory by far more than the
tolerance, so the test can fail.

The model has a conv with a single input channel (a size-1 dim), a conv, two *square* linear layers
and biases. Square on purpose: the first eigenbasis comes from one gradient, and the factor of a
non-square matrix's longer side is then rank-deficient, its null-space eigenvectors arbitrary; two
correct implementations may pick different ones and their trajectories part.
"""

from __future__ import annotations

import types

import pytest
import torch

import lightning_kron as lk
from lightning_kron.methods.soap import REFERENCE_OPTIONS

reference_soap = pytest.importorskip("pytorch_optimizer.optimizer.soap")

HYPERPARAMETERS = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=1e-2)  # the reference's defaults
STEPS = 60
TOLERANCE = 1e-10


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3), torch.nn.Tanh(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
    ).double()


def _trajectory(make_optimizer, steps: int = STEPS) -> torch.Tensor:
    """All parameters after each step, ``[steps, n]``: fresh fp64 batches from a fixed stream."""
    model = _model()
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(1)
    after_each_step = []
    for _ in range(steps):
        inputs = torch.randn(32, 1, 8, 8, generator=generator, dtype=torch.float64)
        targets = torch.randn(32, 8, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        after_each_step.append(torch.cat([param.detach().flatten() for param in model.parameters()]))
    return torch.stack(after_each_step)


def _reference(every: int):
    return lambda params: reference_soap.SOAP(params, **HYPERPARAMETERS, precondition_frequency=every)


def _ours(every: int, **changes):
    options = {**REFERENCE_OPTIONS, "refresh": lk.FixedRefresh(every=every), **changes}
    return lambda params: lk.SOAP(params, **HYPERPARAMETERS, **options)


@pytest.fixture(autouse=True)
def one_thread():
    """8x8 matrices: extra threads only add overhead (10x on a loaded two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_qr_in_fp64(monkeypatch):
    """The reference module sees a ``torch`` whose ``float32`` is ``float64`` (its one fp32 cast)."""
    fp64_torch = types.SimpleNamespace(**{**vars(torch), "float32": torch.float64})
    monkeypatch.setattr(reference_soap, "torch", fp64_torch)


def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("every", [1, 7])
def test_matched_soap_follows_the_reference_trajectory(reference_qr_in_fp64, every):
    reference, ours = _trajectory(_reference(every)), _trajectory(_ours(every))
    moved = _largest_difference(reference[-1], reference[0])
    assert moved > 0.05  # the run goes somewhere: a frozen pair would match trivially
    assert _largest_difference(reference, ours) < TOLERANCE


def test_reference_as_shipped_differs_only_by_its_fp32_qr():
    """Its bases are rounded to fp32 at each refresh: the trajectories agree to that precision
    (measured 8e-8 at every=7), not to fp64's."""
    difference = _largest_difference(_trajectory(_reference(7)), _trajectory(_ours(7)))
    assert 100 * TOLERANCE < difference < 1e-6


@pytest.mark.parametrize("change", [
    {"merge_dims": True}, {"refresh_timing": "in_step"}, {"second_moment_on_refresh": "rotate"},
    {"update_at_start": True}, {"bias_corrected_eps": True}, {"weight_decay_mode": "decoupled"},
], ids=lambda change: next(iter(change)))
def test_every_reference_option_is_needed(reference_qr_in_fp64, change):
    """8 steps, refreshing from step 2: the smallest effect, the order of the weight decay
    (lr^2 wd relative), is measured at 1.1e-6, the others at 3e-4 to 3e-2."""
    steps = 8
    difference = _largest_difference(_trajectory(_reference(1), steps), _trajectory(_ours(1, **change), steps))
    assert difference > 1000 * TOLERANCE


@pytest.mark.parametrize("bad", [{"update_at_start": "no"}, {"bias_corrected_eps": 1}])
def test_reference_flags_must_be_bools(bad):
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be True or False"):
        lk.SOAP(torch.nn.Linear(3, 2).parameters(), **bad)


def test_without_update_at_start_that_step_only_sets_the_bases():
    """Two AdamW steps, then the step at start_preconditioning_step: statistics and exact bases,
    no update; the moments' bias correction goes on counting moment updates (2, not 3)."""
    model = _model()
    optimizer = lk.SOAP(model.parameters(), start_preconditioning_step=3, update_at_start=False,
                        refresh=lk.FixedRefresh(every=10))  # no scheduled refresh in these 4 steps
    params = list(model.parameters())
    inputs, targets = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    snapshots = []
    for _ in range(4):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        snapshots.append([param.detach().clone() for param in params])
    groups = optimizer.factor_groups()
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # step 3: no update
    assert not any(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # step 4: an update
    assert all(group.steps.tolist() == [3] * len(group) for group in groups)
    assert all(info.refreshes == 1 for info in optimizer.factors())  # the exact bases of step 3
