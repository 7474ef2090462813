"""KrADagrad / KrADagrad*: the approximation-domination math and the optimizer's own contract.

The shared checks (convergence on regression and an MLP, dtypes fp32/bf16/fp64, stable state
shapes, bit-identical checkpoint round trip, names, NaN/Inf skipping, bad input) run for both
variants, ungrafted and grafted, through tests/test_optimizer_matrix.py (factories in conftest.py).
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

import lightning_kron as lk
from resume_helpers import continued_after_a_cut
from lightning_kron.engine.staleness import inverse_factor_staleness, staleness
from lightning_kron.methods.inverse_factor_update import (
    DOMINATION_SCALES,
    dominated_downdate,
    krad_update,
    positive_definite,
)
from lightning_kron.scheduling.policies import FixedRefresh

VARIANTS = ("star", "alternating")


def _random_spd(d: int, condition: float, dtype=torch.float64, generator=None) -> torch.Tensor:
    basis, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator))
    values = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), d, dtype=torch.float64)
    return (basis * values) @ basis.T


def _min_eig(matrix: torch.Tensor) -> float:
    return torch.linalg.eigvalsh(0.5 * (matrix + matrix.mT).double()).min().item()


# ----------------------------------------------------------------------------- the downdate itself
def test_rank_one_trace_downdate_is_sherman_morrison():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = _random_spd(7, 1e3, generator=generator)
        g = torch.randn(7, 1, dtype=torch.float64, generator=generator)
        new = dominated_downdate(x[None], (g @ g.T)[None], "trace")[0]
        sherman_morrison = x - (x @ g @ g.T @ x) / (1.0 + (g.T @ x @ g))
        assert torch.allclose(new, sherman_morrison, rtol=0, atol=1e-12 * x.abs().max().item())
        assert torch.allclose(new, torch.linalg.inv(torch.linalg.inv(x) + g @ g.T), rtol=1e-9, atol=0)


@pytest.mark.parametrize("rule", DOMINATION_SCALES)
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_loewner_sandwich(rule, rank):
    """(X^-1 + A)^-1 <= X_new <= X for every safe scale s, whatever the rank of A."""
    generator = torch.Generator().manual_seed(rank)
    for _ in range(10):
        x = _random_spd(8, 1e4, generator=generator)
        u = torch.randn(8, rank, dtype=torch.float64, generator=generator) * 3.0
        a = u @ u.T
        new = dominated_downdate(x[None], a[None], rule)[0]
        exact = torch.linalg.inv(torch.linalg.inv(x) + a)
        scale = torch.linalg.eigvalsh(x).max().item()
        assert _min_eig(x - new) >= -1e-6 * scale
        assert _min_eig(new - exact) >= -1e-6 * scale


def test_tighter_scales_downdate_more():
    """frobenius and schatten are safe *and* closer to the exact inverse than trace; damped is loosest."""
    generator = torch.Generator().manual_seed(1)
    x = _random_spd(8, 1e2, generator=generator)
    u = torch.randn(8, 6, dtype=torch.float64, generator=generator)
    exact = torch.linalg.inv(torch.linalg.inv(x) + u @ u.T)
    gap = {rule: torch.trace(dominated_downdate(x[None], (u @ u.T)[None], rule)[0] - exact).item()
           for rule in DOMINATION_SCALES}
    assert gap["schatten"] < gap["frobenius"] < gap["trace"] < gap["damped"]


def test_stays_symmetric_positive_definite_in_fp32():
    generator = torch.Generator().manual_seed(2)
    x = torch.eye(16).expand(4, 16, 16).clone() / 1e-3
    for step in range(400):
        rank = 1 + step % 16
        u = torch.randn(4, 16, rank, generator=generator) * torch.logspace(-3, 1, 4)[:, None, None]
        x = krad_update(x, u @ u.mT, beta=1.0, eps=1e-3)
        assert x.dtype == torch.float32
        assert torch.equal(x, x.mT)
        assert bool(positive_definite(x).all())
    assert min(_min_eig(member) for member in x) > 0


def test_ema_keeps_the_damping_and_stays_bounded():
    """beta < 1 with rank-deficient statistics: X <= I/eps and X -> (eps I + A)^-1. The recipe
    without the damping term (X / beta, then downdate) overflows fp32 along the empty directions."""
    eps, beta = 1e-3, 0.9
    a = torch.zeros(1, 4, 4)
    a[0, 0, 0] = 1.0
    damped = undamped = torch.eye(4)[None] / eps
    for _ in range(1000):
        damped = krad_update(damped, a, beta=beta, eps=eps)
        undamped = dominated_downdate(undamped / beta, (1 - beta) * a)
    assert torch.isfinite(damped).all() and torch.linalg.eigvalsh(damped.double()).max() <= (1 + 1e-5) / eps
    target = torch.linalg.inv(eps * torch.eye(4) + a[0])
    assert torch.allclose(damped[0], target, rtol=1e-3, atol=1e-3)
    assert not torch.isfinite(undamped).all()


def test_qr_refresh_keeps_every_eigenvalue_of_a_graded_inverse_factor_in_fp32():
    """Why KrADagrad refreshes with "qr": X's small eigenvalues (L's large ones) must survive. A QR
    step of a stored B spanning 1e10 keeps each eigenvalue to ~1e-6 relative in fp32 (an eigh of the
    same B was measured 30% to 7000x off below ~1e-7 of the largest; not asserted, LAPACK's)."""
    from lightning_kron.engine.solvers import ORTHONORMALIZERS, qr_step_in_basis

    generator = torch.Generator().manual_seed(4)
    values = torch.logspace(0, -10, 48, dtype=torch.float64)
    noise = torch.randn(48, 48, dtype=torch.float64, generator=generator)
    relative = 1e-3 * (noise + noise.T)
    relative.fill_diagonal_(0)
    stats = (torch.diag(values) + relative * torch.sqrt(values[:, None] * values[None, :]))[None]
    truth = torch.linalg.eigvalsh(stats[0]).flip(0)
    refreshed = stats.float()
    for _ in range(3):
        _, refreshed, ok = qr_step_in_basis(refreshed, ORTHONORMALIZERS["householder"])
    assert bool(ok.all())
    assert ((refreshed[0].diagonal().double() - truth).abs() / truth).max() < 1e-4


def test_positive_definite_mask_flags_bad_members():
    stack = torch.eye(3).expand(4, 3, 3).clone()
    stack[1, 2, 2] = -1e-3
    stack[2, 0, 1] = float("nan")
    stack[3, 0, 0] = float("inf")
    assert positive_definite(stack).tolist() == [True, False, False, False]


def test_inverse_factor_staleness_tracks_the_staleness_of_L():
    """Reported e(Q, L) from X's stored B. Drift among L's large (gradient-heavy) directions is
    plain in e(Q, L) but nearly invisible in e(Q, X), whose norm is dominated by L's smallest."""
    generator = torch.Generator().manual_seed(3)
    values = torch.logspace(0, -6, 10, dtype=torch.float64)
    noise = torch.randn(10, 10, dtype=torch.float64, generator=generator)
    relative = torch.zeros(10, 10, dtype=torch.float64)
    relative[:4, :4] = 0.03 * (noise + noise.T)[:4, :4]  # drift among L's four largest directions
    relative.fill_diagonal_(0)
    l_stats = torch.diag(values) + relative * torch.sqrt(values[:, None] * values[None, :])
    x_stats = torch.linalg.inv(l_stats)[None]
    truth = staleness(l_stats[None]).item()
    assert abs(inverse_factor_staleness(x_stats).item() - truth) < 0.05 * truth
    assert staleness(x_stats).item() < 0.01 * truth


# ----------------------------------------------------------------------------- the optimizer
def _quadratic(d: int = 12, condition: float = 1e3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    h1 = _random_spd(d, condition, generator=generator)
    h2 = _random_spd(d, condition, generator=generator)
    w0 = torch.randn(d, d, dtype=torch.float64, generator=generator)
    return h1, h2, w0


def _run_quadratic(make, h1, h2, w0, dtype, steps: int, scale: float = 1.0) -> torch.Tensor:
    weight = nn.Parameter(w0.to(dtype).clone())
    optimizer = make([weight])
    h1, h2 = h1.to(dtype), h2.to(dtype)
    for _ in range(steps):
        weight.grad = scale * (h1 @ weight.detach() @ h2)
        optimizer.step()
    return weight.detach().double()


def test_first_update_is_exact_and_diagonal_in_its_basis():
    weight = nn.Parameter(torch.zeros(3, 5, dtype=torch.float64))
    optimizer = lk.KrADagrad([weight], eps=0.5)
    grad = torch.randn(3, 5, dtype=torch.float64)
    weight.grad = grad.clone()
    optimizer.step()
    state = optimizer.state[weight]
    for dim, statistic in ((0, grad @ grad.T), (1, grad.T @ grad)):
        basis, stats = state[f"block0.basis.{dim}"], state[f"block0.stats.{dim}"]
        assert torch.equal(stats, torch.diag_embed(stats.diagonal()))
        expected = torch.linalg.inv(0.5 * torch.eye(len(statistic), dtype=torch.float64) + statistic)
        assert torch.allclose(basis @ stats @ basis.T, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_the_ema_factor_is_bias_corrected_before_its_root(beta):
    """``shampoo_beta < 1``: ``X`` tracks ``(eps I + L)^-1`` of an EMA ``L``, and the root is of the
    bias-corrected EMA. At the first step the bias-corrected EMA is the gradient's own statistic,
    so the step equals the sum's (``shampoo_beta=1``) up to eps: ``eps / ((1 - beta) a)`` relative,
    ~1e-11 for eps 1e-12 (asserted at 1e-9). Without the correction it is ``(1 - beta)^-1/4`` per
    factor too long."""
    grad = torch.randn(4, 6, dtype=torch.float64)
    steps = {}
    for shampoo_beta in (1.0, beta):
        weight = nn.Parameter(torch.zeros(4, 6, dtype=torch.float64))
        optimizer = lk.KrADagrad([weight], lr=1.0, eps=1e-12, shampoo_beta=shampoo_beta)
        weight.grad = grad.clone()
        optimizer.step()
        steps[shampoo_beta] = weight.detach().clone()
    torch.testing.assert_close(steps[beta], steps[1.0], rtol=1e-9, atol=0)


def test_a_parameter_first_gradded_late_gets_the_exact_first_update():
    """The exact first downdate is each stack's own first step, not the optimizer's: a layer that
    gets its first gradient at step 4 (unfrozen, or added by add_param_group) gets ``X_1`` exactly,
    as if it had been there from the start."""
    early = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    late = nn.Parameter(torch.zeros(3, 5, dtype=torch.float64))
    optimizer = lk.KrADagrad([early, late], eps=0.5)
    grads = [torch.randn(3, 5, dtype=torch.float64) for _ in range(2)]
    for step in range(5):
        early.grad = torch.randn(4, 6, dtype=torch.float64)
        late.grad = grads[step - 3].clone() if step >= 3 else None
        optimizer.step()
    _assert_factors_as_if_alone(optimizer, late, grads, eps=0.5)


def _assert_factors_as_if_alone(optimizer, param, grads, eps):
    """``param``'s inverse factors (in parameter coordinates) equal those of a KrADagrad that saw
    only ``grads``, to fp64 round-off."""
    alone = nn.Parameter(torch.zeros_like(param))
    reference = lk.KrADagrad([alone], eps=eps)
    for grad in grads:
        alone.grad = grad.clone()
        reference.step()
    ours, theirs = optimizer.state[param], reference.state[alone]
    for dim in (0, 1):
        factor = ours[f"block0.basis.{dim}"] @ ours[f"block0.stats.{dim}"] @ ours[f"block0.basis.{dim}"].T
        expected = theirs[f"block0.basis.{dim}"] @ theirs[f"block0.stats.{dim}"] @ theirs[f"block0.basis.{dim}"].T
        assert torch.allclose(factor, expected, rtol=0, atol=1e-12), dim


def test_a_member_first_gradded_while_its_stack_partner_has_none_gets_the_exact_first_update():
    """Two weights of one shape share a stack; B's first gradient comes on a step where A has none
    (experts, branches): B gets ``X_1`` exactly. It took a dominated downdate from ``I / eps``
    instead (relative error 1.7, a 17x longer first step)."""
    torch.manual_seed(0)
    a, b = (nn.Parameter(torch.randn(6, 5, dtype=torch.float64)) for _ in range(2))
    optimizer = lk.KrADagrad([a, b], eps=0.1)
    grads = [3 * torch.randn(6, 5, dtype=torch.float64) for _ in range(2)]
    for a_grad, b_grad in ((torch.randn(6, 5, dtype=torch.float64), None), (None, grads[0]), (None, grads[1])):
        a.grad, b.grad = a_grad, None if b_grad is None else b_grad.clone()
        optimizer.step()
    assert len(optimizer.factor_groups()) == 1  # one stack
    _assert_factors_as_if_alone(optimizer, b, grads, eps=0.1)


def test_a_skipped_first_gradient_leaves_the_exact_first_update_to_the_next_finite_one():
    """A non-finite first gradient is skipped; the next finite one gets X_1 exactly, as if the
    skipped one had never come, and a resume between them does the same (a host count of gradded
    steps took it for a later step: dominated downdates straight, the exact update resumed, 1.2 apart)."""
    torch.manual_seed(0)
    start = torch.randn(4, 6, dtype=torch.float64)
    grads = [torch.randn(4, 6, dtype=torch.float64) for _ in range(4)]

    def build():
        param = nn.Parameter(start.clone())
        return [param], lk.KrADagrad([param], eps=0.5)

    def run(params, optimizer, steps):
        for step in steps:
            params[0].grad = torch.full_like(start, float("nan")) if step == 0 else grads[step].clone()
            optimizer.step()

    straight, optimizer = build()
    run(straight, optimizer, range(2))
    _assert_factors_as_if_alone(optimizer, straight[0], grads[1:2], eps=0.5)
    run(straight, optimizer, range(2, 4))
    assert torch.equal(straight[0], continued_after_a_cut(build, run, cut=1, total=4)[0])


def test_a_resume_before_a_parameters_first_gradient_continues_bit_identically():
    """A layer first gradded after a resume: the loaded optimizer must know that its stack has had
    no step yet (each stack's own host count, not the optimizer's), so it takes the same exact
    first downdate as the uninterrupted run."""
    torch.manual_seed(0)
    start_early, start_late = torch.randn(4, 6, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    early_grads = [torch.randn(4, 6, dtype=torch.float64) for _ in range(6)]
    late_grads = [torch.randn(3, 5, dtype=torch.float64) for _ in range(6)]

    def build():
        params = [nn.Parameter(start_early.clone()), nn.Parameter(start_late.clone())]
        return params, lk.KrADagrad(params, eps=0.5)

    def run(params, optimizer, steps):
        for step in steps:
            params[0].grad = early_grads[step].clone()
            params[1].grad = late_grads[step].clone() if step >= 3 else None
            optimizer.step()

    straight, straight_optimizer = build()
    run(straight, straight_optimizer, range(6))
    for a, b in zip(straight, continued_after_a_cut(build, run, cut=2, total=6)):
        assert torch.equal(a, b)


def test_a_resume_after_a_partly_first_updated_stack_continues_bit_identically():
    """A and B share a stack; A is first gradded alone (a copy of its row, its exact first update),
    then both: the stack's exact first update moves B's basis only. Marking the whole stack as
    refreshed made A's next refresh a warm QR step in the straight run and an exact one after a
    resume (which marks the rows with a refresh count): 2e-2 apart."""
    torch.manual_seed(0)
    shapes = [(4, 6), (4, 6), (3, 5)]
    starts = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    grads = [[torch.randn(*shape, dtype=torch.float64) for shape in shapes] for _ in range(14)]

    def build():
        params = [nn.Parameter(start.clone()) for start in starts]
        return params, lk.KrADagrad(params, eps=0.5, refresh=lk.FixedRefresh(every=4))

    def run(params, optimizer, steps):
        for step in steps:
            for param, grad, present in zip(params, grads[step], (step >= 1, step >= 2, True)):
                param.grad = grad.clone() if present else None
            optimizer.step()

    straight, straight_optimizer = build()
    run(straight, straight_optimizer, range(14))
    for a, b in zip(straight, continued_after_a_cut(build, run, cut=3, total=14)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant, eps", [("star", 1e-6), ("alternating", 1e-3)])
def test_fp32_and_fp64_runs_agree_on_an_ill_conditioned_problem(variant, eps):
    """Condition 1e3 per factor (1e6 for the Kronecker product), 60 steps with loss down ~100x: the
    fp32 run's parameters stay within 3% of the fp64 run's (measured 1.2% star, 0.9% alternating)
    and its loss within 1% (measured 0.3%), with no downdate rejected. For contrast (not asserted:
    it is Shampoo's property, not ours) fp32 Shampoo with eps=1e-12 is already 15% off its fp64
    run after 5 steps on this problem."""
    h1, h2, w0 = _quadratic()
    optimizers = {}

    def make(params):
        optimizers[params[0].dtype] = lk.KrADagrad(params, lr=0.3, eps=eps, variant=variant)
        return optimizers[params[0].dtype]

    w32 = _run_quadratic(make, h1, h2, w0, torch.float32, 60)
    w64 = _run_quadratic(make, h1, h2, w0, torch.float64, 60)
    assert (torch.linalg.norm(w32 - w64) / torch.linalg.norm(w64)).item() < 3e-2
    assert sum(info.failures for info in optimizers[torch.float32].factors()) == 0

    def loss(w):
        return 0.5 * torch.trace(w.T @ h1 @ w @ h2)

    assert abs(loss(w32) / loss(w64) - 1) < 1e-2
    assert loss(w64) < 0.02 * loss(w0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_is_invariant_to_the_loss_scale_as_eps_vanishes(variant):
    h1, h2, w0 = _quadratic(d=6, condition=10.0)

    def make(params):
        return lk.KrADagrad(params, lr=0.05, eps=1e-14, variant=variant)

    reference = _run_quadratic(make, h1, h2, w0, torch.float64, 12)
    scaled = _run_quadratic(make, h1, h2, w0, torch.float64, 12, scale=1e3)
    assert torch.allclose(reference, scaled, rtol=1e-6, atol=1e-9)


def test_alternating_updates_one_factor_per_step_star_updates_all():
    for variant, expected in (("star", [{0, 1}, {0, 1}]), ("alternating", [{1}, {0}])):
        weight = nn.Parameter(torch.randn(4, 6))
        optimizer = lk.KrADagrad([weight], variant=variant, refresh=FixedRefresh(every=100))
        weight.grad = torch.randn(4, 6)
        optimizer.step()
        for changed in expected:  # steps 2 and 3 (no refresh in between)
            before = {dim: optimizer.state[weight][f"block0.stats.{dim}"].clone() for dim in (0, 1)}
            weight.grad = torch.randn(4, 6)
            optimizer.step()
            after = {dim: optimizer.state[weight][f"block0.stats.{dim}"] for dim in (0, 1)}
            assert {dim for dim in (0, 1) if not torch.equal(before[dim], after[dim])} == changed


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _alternating_written_out(weight, grads, lr, beta1, eps):
    """The alternating variant as docs/algorithms.md section 4 states it, with full fp64 matrices:
    one inverse factor per step in turn, exact at its first update, then the Sherman-Morrison
    downdate and the trace-damped domination (bounded by the Gershgorin sum in X's eigenbasis),
    relative damping, and the step bound ``D / sqrt(1 + |D|^2)``."""
    inverses = [torch.eye(size, dtype=torch.float64) / eps for size in weight.shape]
    first, momentum = [True, True], torch.zeros_like(weight)
    for step, grad in enumerate(grads, 1):
        dim = (step - 1) % 2
        other = _psd_sqrt(inverses[1 - dim])
        factor = (grad @ other if dim == 0 else (other @ grad).T) / weight.shape[1 - dim] ** 0.5
        statistic = factor @ factor.T
        damping = eps * statistic.trace() / weight.shape[dim]
        inverse = inverses[dim]
        if first[dim]:
            inverse, first[dim] = torch.linalg.inv(damping * torch.eye(weight.shape[dim], dtype=torch.float64) + statistic), False
        else:
            product = inverse @ statistic
            downdated = inverse - product @ inverse / (1 + product.trace())
            basis = torch.linalg.eigh(inverse)[1]
            bound = (basis.T @ downdated @ basis).abs().sum(-1).max()
            inverse = downdated - damping * downdated @ downdated / (1 + damping * bound)
        inverses[dim] = (inverse + inverse.T) / 2
        momentum = beta1 * momentum + (1 - beta1) * grad
        direction = _psd_sqrt(inverses[0]) @ (momentum / (1 - beta1 ** step)) @ _psd_sqrt(inverses[1])
        weight = weight - lr * direction / (1 + direction.square().sum()).sqrt()
    return weight


def test_alternating_in_fp64_is_the_written_out_algorithm():
    """Refreshed exactly every step, the optimizer's stored-basis shortcuts are exact, so it must be
    the algorithm to fp64 round-off (6e-15 of the update measured; the step bound's sum was taken
    in fp32 and held it at 1e-8)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    left, right = (torch.randn(size, size, dtype=torch.float64, generator=generator) for size in (5, 4))
    grads = [left @ torch.randn(5, 4, dtype=torch.float64, generator=generator) @ right for _ in range(12)]
    weight = nn.Parameter(start.clone())
    optimizer = lk.KrADagrad([weight], lr=0.1, eps=1e-2, variant="alternating", solver="eigh", refresh=FixedRefresh(every=1))
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    expected = _alternating_written_out(start, grads, lr=0.1, beta1=0.9, eps=1e-2)
    assert ((weight.detach() - expected).abs().max() / (expected - start).abs().max()).item() < 1e-11


def test_nonfinite_gradient_leaves_every_factor_untouched():
    model = nn.Linear(6, 4)
    optimizer = lk.KrADagrad(model.parameters())
    for _ in range(3):
        model.weight.grad, model.bias.grad = torch.randn(4, 6), torch.randn(4)
        optimizer.step()
    before = {key: value.clone() for key, value in optimizer.state[model.weight].items()}
    model.weight.grad[1, 2] = float("nan")
    optimizer.step()
    assert optimizer.skipped_steps == 1
    for key, value in optimizer.state[model.weight].items():
        assert torch.equal(value, before[key]), key


def test_broken_downdate_is_reset_and_counted_for_that_member_only(monkeypatch):
    """A finite gradient whose statistic overflows (1e25^2 in fp32) makes X non-finite: that member
    keeps its previous X and failures.i counts it; its neighbour in the same stack updates normally.
    The NaN guard skips such a gradient's whole group first, so it is switched to NaN/Inf-only here:
    this is the last line of defence, for a downdate that breaks on a gradient the guard lets pass
    (some between 1e16 and 3e18 here, depending on rounding)."""
    import lightning_kron.methods.nonfinite_guard as guard

    monkeypatch.setattr(guard, "_all_finite", lambda values: values.isfinite().all())
    first, second = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4, 6))
    optimizer = lk.KrADagrad([("first", first), ("second", second)], refresh=FixedRefresh(every=100))
    for _ in range(2):
        first.grad, second.grad = torch.randn(4, 6), torch.randn(4, 6)
        optimizer.step()
    before = {name: {dim: optimizer.state[p][f"block0.stats.{dim}"].clone() for dim in (0, 1)}
              for name, p in (("first", first), ("second", second))}
    first.grad, second.grad = torch.full((4, 6), 1e25), torch.randn(4, 6)
    optimizer.step()
    failures = {info.name: info.failures for info in optimizer.factors()}
    assert failures == {"first[L]": 1, "first[R]": 1, "second[L]": 0, "second[R]": 0}
    for dim in (0, 1):
        assert torch.equal(optimizer.state[first][f"block0.stats.{dim}"], before["first"][dim])
        assert not torch.equal(optimizer.state[second][f"block0.stats.{dim}"], before["second"][dim])
        assert bool(positive_definite(optimizer.state[second][f"block0.stats.{dim}"][None]).all())


def test_reported_staleness_is_that_of_L_and_drives_adaptive_refresh():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(8, 5, dtype=torch.float64))
    optimizer = lk.KrADagrad([weight], refresh=lk.AdaptiveRefresh(tolerance=0.05))
    drift = torch.randn(8, 8, dtype=torch.float64)
    errors = []
    for step in range(30):
        weight.grad = (torch.eye(8, dtype=torch.float64) + 0.3 * step * drift) @ torch.randn(8, 5, dtype=torch.float64)
        optimizer.step()
        truth = staleness(torch.linalg.inv(optimizer.state[weight]["block0.stats.0"])[None]).item()
        if truth > 0.01:
            errors.append(abs(optimizer.factors()[0].staleness - truth) / truth)
    assert len(errors) > 20 and sum(errors) / len(errors) < 0.1 and max(errors) < 0.35  # first-order estimate
    assert 10 < optimizer.factors()[0].refreshes < 30  # decided per step by the tolerance


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split", [False, True])
def test_shapes_conv_embedding_tied_vectors_third_order_and_frozen(variant, split):
    """The engine's shape handling carries over: merged conv weights, a one-sided (or split)
    embedding larger than max_precond_dim with its tied head, full 1-D factors, an unmerged
    third-order tensor (the alternating variant cycles through 3 dims) and a frozen layer."""
    torch.manual_seed(0)
    embedding, conv, frozen = nn.Embedding(40, 6), nn.Conv2d(2, 3, 3), nn.Linear(6, 6)
    head = nn.Linear(6, 40, bias=False)
    head.weight = embedding.weight
    cube = nn.Parameter(torch.randn(3, 4, 5))
    frozen.requires_grad_(False)
    params = [("embedding", embedding.weight), ("head", head.weight), ("cube", cube)]
    params += [(f"conv.{n}", p) for n, p in conv.named_parameters()] + [(f"frozen.{n}", p) for n, p in frozen.named_parameters()]
    optimizer = lk.KrADagrad(params, variant=variant, max_precond_dim=16, split_large_dims=split,
                             merge_dims=False, precondition_1d=True, refresh=FixedRefresh(every=3))
    before = {name: p.detach().clone() for name, p in params}
    for _ in range(7):
        optimizer.zero_grad()
        tokens = torch.randint(0, 40, (4, 5))
        loss = head(frozen(embedding(tokens))).square().mean() + conv(torch.randn(2, 2, 5, 5)).square().mean()
        (loss + (cube ** 3).sum() * 1e-2).backward()
        optimizer.step()
    for name, p in params:
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, before[name]) == name.startswith("frozen"), name
    names = optimizer.factor_names()
    assert ("embedding[R]" in names) != split and "cube[2]" in names and "conv.bias[0]" in names
    assert sum(info.failures for info in optimizer.factors()) == 0
    for group in optimizer.factor_groups():
        for dim in group.factored_dims:
            assert bool(positive_definite(group.stats(dim)).all())


@pytest.mark.parametrize("bad, match", [
    ({"variant": "both"}, "variant"),
    ({"domination_scale": "spectral"}, "domination_scale"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1.0}, "eps"),
    ({"graft": "lion"}, "graft"),
    ({"shampoo_beta": 1.5}, "shampoo_beta"),
    ({"lr": -0.1}, "lr"),
    ({"graft_eps": -1.0}, "graft_eps"),
    ({"shampoo_beta": 0.0}, "shampoo_beta must be > 0"),  # X froze, one failure counted per step
    ({"shampoo_beta": None, "betas": (0.9, 0.0)}, "shampoo_beta must be > 0"),
    ({"statistics_product_dtype": torch.bfloat16}, "statistics_product_dtype has no effect"),
])
def test_invalid_arguments_fail_at_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        lk.KrADagrad(nn.Linear(3, 2).parameters(), **bad)


def test_parameter_group_with_zero_eps_is_refused():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="eps"):
        lk.KrADagrad([{"params": model[0].parameters()}, {"params": model[1].parameters(), "eps": 0.0}])


# ----------------------------------------------------------------------------- alternating defaults
def _ill_conditioned_least_squares(seed: int):
    """``0.5 ||A W B - C||^2`` with ``W`` 12 x 8 and ``C = A W* B`` (minimum 0): ``A`` (16 x 12) and
    ``B`` (8 x 10) have random singular vectors and singular values log-spaced over 1e2, so the
    Hessian ``B B^T kron A^T A`` has condition 1e4 per factor (1e8 overall)."""
    generator = torch.Generator().manual_seed(seed)

    def graded(rows: int, cols: int) -> torch.Tensor:
        left, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64, generator=generator))
        right, _ = torch.linalg.qr(torch.randn(cols, cols, dtype=torch.float64, generator=generator))
        count = min(rows, cols)
        return (left[:, :count] * torch.logspace(0, -2, count, dtype=torch.float64)) @ right[:, :count].T

    a, b = graded(16, 12), graded(8, 10)
    target = a @ torch.randn(12, 8, dtype=torch.float64, generator=generator) @ b
    return a, b, target, torch.randn(12, 8, dtype=torch.float64, generator=generator)


def _best_final_loss(make, learning_rates, a, b, target, w0, steps: int) -> float:
    def loss(w):
        return 0.5 * (a @ w.double() @ b - target).square().sum().item()

    finals = []
    a32, b32, target32 = a.float(), b.float(), target.float()
    for lr in learning_rates:
        weight = nn.Parameter(w0.float().clone())
        optimizer = make([weight], lr)
        for _ in range(steps):
            weight.grad = a32.T @ (a32 @ weight.detach() @ b32 - target32) @ b32.T
            optimizer.step()
        final = loss(weight.detach())
        finals.append(final if final == final else float("inf"))  # NaN counts as a failed run
    return min(finals)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alternating_at_defaults_beats_adamw_on_an_ill_conditioned_problem(seed):
    """The paper's main variant at library defaults (eps, damping, step bound, no grafting) against
    AdamW (weight decay 0), 150 fp32 steps, each the best of a half-decade learning-rate grid whose
    best rate is inside it on every seed (AdamW 0.3-1, KrADagrad 3-10; KrADagrad is within 3x over
    1-30). Required: a final loss at least 2x lower (the issue's bar). Measured on CPU, seeds 0-5:
    3.2x, 47x, 5.2x, 7.4x, 10x, 3.5x lower (seed 0: 6.5e-4 vs 2.1e-3, f(W0) 2.8). These are
    deterministic 150-step runs whose losses change smoothly with lr, so round-off or a different
    reduction order (another CPU, a GPU) moves them by far less than the 1.6x left on seed 0.
    Before the step bound and the relative damping the alternating variant lost to AdamW on 5 of
    those 6 seeds (best of lr 0.1-3 then)."""
    a, b, target, w0 = _ill_conditioned_least_squares(seed)
    adamw = _best_final_loss(lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
                             (0.03, 0.1, 0.3, 1.0, 3.0), a, b, target, w0, 150)
    alternating = _best_final_loss(lambda p, lr: lk.KrADagrad(p, lr=lr, variant="alternating"),
                                   (1.0, 3.0, 10.0, 30.0), a, b, target, w0, 150)
    assert alternating < 0.5 * adamw, (alternating, adamw)
