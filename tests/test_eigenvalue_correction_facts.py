"""docs/algorithms.md facts for SOAP/EShampoo: AdamW limit, Kronecker covariance, U V^T, equivariance, scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_kron as lk
from tests.conftest import set_grads


def _orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _adamw(params):
    return torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)


def _adamw_and_identity_soap(make_model, steps: int, out_features: int, drop_grads=lambda model, step: None,
                             torch_optimizer=_adamw, after_step=lambda params: None, **soap_options):
    """Train a model with a torch optimizer (AdamW; ``after_step`` runs after each of its steps) and
    a copy with SOAP whose bases stay the identity; assert they agree."""
    reference, candidate = make_model(), make_model()
    candidate.load_state_dict(reference.state_dict())
    torch_optimizer = torch_optimizer(reference.parameters())
    soap = lk.SOAP(candidate.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1,
                   start_preconditioning_step=10**9, **soap_options)
    inputs, targets = torch.randn(32, 7), torch.randn(32, out_features)
    for step in range(steps):
        for model, optimizer in ((reference, torch_optimizer), (candidate, soap)):
            optimizer.zero_grad()
            (model(inputs) - targets).square().mean().backward()
            drop_grads(model, step)
            optimizer.step()
        with torch.no_grad():
            after_step(list(reference.parameters()))
    for a, b in zip(reference.parameters(), candidate.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_identity_bases_reproduce_adamw():
    torch.manual_seed(3)
    _adamw_and_identity_soap(lambda: nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)), 40, 3)


def test_identity_bases_reproduce_adamw_when_a_layer_misses_steps():
    """A layer without gradients for a few steps lags in its step count: its bias corrections must
    stay its own (the step shares one correction per parameter group only while every stack has
    taken the same steps). Its 6x6 weight and bias share stacks with the other layer's, so those
    steps update part of a stack."""
    def drop_grads(model, step):
        if 3 <= step < 8:  # torch.optim skips a parameter whose grad is None, step count included
            model[4].weight.grad = model[4].bias.grad = None

    torch.manual_seed(4)
    _adamw_and_identity_soap(lambda: nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)),
                             20, 6, drop_grads)


def test_decay_after_the_update_is_adam_then_decay():
    """``weight_decay_mode="decoupled_after_update"`` (the SOAP reference's order) decays the
    updated weights: W <- (W - lr D)(1 - lr wd)."""
    def decay(params):
        torch._foreach_mul_(params, 1.0 - 3e-3 * 0.1)

    torch.manual_seed(3)
    _adamw_and_identity_soap(lambda: nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)), 40, 3,
                             torch_optimizer=lambda params: torch.optim.Adam(params, lr=3e-3, betas=(0.9, 0.98), eps=1e-7),
                             after_step=decay, weight_decay_mode="decoupled_after_update")


def test_kronecker_covariance_is_recovered():
    """G = A^1/2 Z B^1/2: L -> tr(B) A, R -> tr(A) B, Q_L^T U_A a signed permutation, V -> lambda(A) mu(B)."""
    generator = torch.Generator().manual_seed(0)
    u_a, u_b = _orthogonal(4, generator), _orthogonal(3, generator)
    lam, mu = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 1.5, 0.5], dtype=torch.float64)
    a_half, b_half = u_a @ torch.diag(lam.sqrt()) @ u_a.T, u_b @ torch.diag(mu.sqrt()) @ u_b.T
    param = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    optimizer = lk.SOAP([param], lr=0.0, betas=(0.9, 0.999), shampoo_beta=1.0, refresh=lk.FixedRefresh(every=5), solver="eigh")
    steps = 4000
    for _ in range(steps):
        set_grads([param], [a_half @ torch.randn(4, 3, generator=generator, dtype=torch.float64) @ b_half])
        optimizer.step()
    state = optimizer.state[param]
    left = state["block0.basis.0"] @ state["block0.stats.0"] @ state["block0.basis.0"].T / steps
    right = state["block0.basis.1"] @ state["block0.stats.1"] @ state["block0.basis.1"].T / steps
    a_matrix, b_matrix = u_a @ torch.diag(lam) @ u_a.T, u_b @ torch.diag(mu) @ u_b.T
    torch.testing.assert_close(left, mu.sum() * a_matrix, rtol=0, atol=0.1 * float(mu.sum() * lam.max()))
    torch.testing.assert_close(right, lam.sum() * b_matrix, rtol=0, atol=0.1 * float(lam.sum() * mu.max()))
    overlap = (state["block0.basis.0"].T @ u_a).abs()
    torch.testing.assert_close(overlap, torch.eye(4, dtype=torch.float64), rtol=0, atol=0.1)
    corrected = state["block0.exp_avg_sq"] / (1 - 0.999 ** steps)
    expected = torch.outer(lam, mu)
    assert ((corrected - expected).abs() / expected).max() < 0.25


def test_constant_gradient_direction_tends_to_polar_factor():
    generator = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(5, 4, generator=generator))
    gradient = (u @ torch.diag(torch.tensor([5.0, 2.0, 1.0, 0.3])) @ v.T).double()
    param = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))  # fp32 round-off / eps ~ 1e-2 noise
    optimizer = lk.EShampoo([param], lr=1.0, eps=1e-4, weight_decay=0.0)
    for step in range(3):
        before = param.detach().clone()
        set_grads([param], [gradient])
        optimizer.step()
        direction = before - param.detach()
        # N = s / (s + eps) per singular value: the gap to U V^T is about eps / s_min = 3.3e-4.
        torch.testing.assert_close(direction, (u @ v.T).double(), rtol=0, atol=5e-4)


def _quadratic(a, b, c):
    return lambda w: 0.5 * (a @ w @ b - c).square().sum()


def _trajectory(optimizer_factory, loss_fn, start, steps):
    w = nn.Parameter(start.clone())
    optimizer = optimizer_factory([w])
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(w).backward()
        optimizer.step()
    return w.detach()


def test_rotation_equivariance_unlike_adamw():
    generator = torch.Generator().manual_seed(2)
    m, n = 5, 4
    a = torch.randn(m, m, generator=generator, dtype=torch.float64) + 2 * torch.eye(m, dtype=torch.float64)
    b = torch.randn(n, n, generator=generator, dtype=torch.float64) + 2 * torch.eye(n, dtype=torch.float64)
    c = torch.randn(m, n, generator=generator, dtype=torch.float64)
    start = torch.randn(m, n, generator=generator, dtype=torch.float64)
    u, v = _orthogonal(m, generator), _orthogonal(n, generator)
    loss = _quadratic(a, b, c)
    rotated_loss = lambda w: loss(u.T @ w @ v)  # noqa: E731  (coordinates w~ = U w V^T)

    # A basis built from the first gradient makes the rotated gradient diagonal; its round-off-sized
    # off-diagonal entries divided by (|.| + eps) are noise unless eps dwarfs them (here 1e-16 vs 1e-6).
    def soap(params):
        return lk.SOAP(params, lr=1e-2, eps=1e-6, weight_decay=0.0, solver="eigh", refresh=lk.FixedRefresh(every=1))

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    for factory, equivariant in ((soap, True), (adamw, False)):
        plain = _trajectory(factory, loss, start, 30)
        rotated = _trajectory(factory, rotated_loss, u @ start @ v.T, 30)
        gap = (u @ plain @ v.T - rotated).abs().max() / plain.abs().max()
        assert (gap < 1e-7) if equivariant else (gap > 1e-3), (factory.__name__, float(gap))


def test_loss_scale_invariance():
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 4, generator=generator, dtype=torch.float64), torch.randn(3, 3, generator=generator, dtype=torch.float64)
    c = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    start = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    loss = _quadratic(a, b, c)

    def factory(params):
        return lk.SOAP(params, lr=1e-2, eps=1e-14, weight_decay=0.0, start_preconditioning_step=3)

    plain = _trajectory(factory, loss, start, 25)
    scaled = _trajectory(factory, lambda w: 1000.0 * loss(w), start, 25)
    torch.testing.assert_close(plain, scaled, rtol=1e-7, atol=1e-9)
    # Adam is scale invariant too: the preconditioned steps must have taken this run elsewhere
    unpreconditioned = _trajectory(lambda params: lk.SOAP(params, lr=1e-2, eps=1e-14, weight_decay=0.0,
                                                          start_preconditioning_step=10**9), loss, start, 25)
    assert (plain - unpreconditioned).abs().max() > 1e-2


#: The refresh configuration the precision bounds below were measured with (SOAP's defaults of that
#: time). It is pinned because the precision of a rotation is what these tests resolve, and today's
#: defaults (the budget, V kept by rank after the step) make this 150-step curve about 3x more
#: chaotic: TF32 directions over seeds 0-15 gave +1.5% +- 1.3% with curve gaps up to 14.8%, against
#: -0.2% +- 0.4% and 3.3% here, too noisy on 8 seeds to tell a correct placement from a 9% error.
PRECISION_TEST_REFRESH = dict(refresh=lk.FixedRefresh(every=10), refresh_timing="in_step",
                              second_moment_on_refresh="rotate")


def _bf16_test_curve(options: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    optimizer = lk.SOAP(model.parameters(), lr=3e-3, **PRECISION_TEST_REFRESH, **options)
    inputs = torch.randn(256, 16)
    targets = torch.stack([inputs[:, :4].sum(1), inputs[:, 4:8].prod(1), inputs[:, 8].sin(), inputs[:, 9:].mean(1)], 1)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        loss = (model(inputs) - targets).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses)


_FP32_CURVES: dict[int, torch.Tensor] = {}  # the fp32 reference curves, shared by both parametrizations


def _fp32_curve(seed: int) -> torch.Tensor:
    if seed not in _FP32_CURVES:
        _FP32_CURVES[seed] = _bf16_test_curve({}, seed)
    return _FP32_CURVES[seed]


BF16_SEEDS = range(8)
BF16_MAX_CURVE_GAP = 0.50  # per seed, anywhere on the curve
BF16_MAX_MEAN_SHIFT = 0.25  # mean final loss over BF16_SEEDS, relative to fp32


@pytest.mark.parametrize("low_precision", [{"rotation_dtype": torch.bfloat16},
                                           {"rotation_dtype": torch.bfloat16, "statistics_product_dtype": torch.bfloat16}],
                         ids=["rotations", "rotations+statistics"])
def test_bf16_rotations_leave_the_loss_curve_unchanged(low_precision):
    """rotation_dtype=bf16 is opt-in for speed; it must not change training materially (docs/design.md).

    Not "unchanged" on every machine: on this 150-step MLP bf16 rotations cost final loss on an Intel
    Xeon (Sapphire Rapids, AMX-BF16): over seeds 0-15 (1 thread) +7.3% +- 1.9% (mean of per-seed ratios
    +- its standard error), 14 of 16 seeds worse; with the bf16 statistics product too +2.7% +- 1.6%.
    The same at commit 6aa5c0e, where an AMD EPYC had measured -3.8% / -2.2% over seeds 0-3, and with
    oneDNN switched off (+5.4% +- 1.8%): this CPU's bf16 bmm is correctly rounded (fp32 accumulation,
    one rounding, <= 0.5 ulp, checked against fp64), so the cost is bf16's own 8-bit rounding of the
    rotated gradient and direction, not the hardware's. One curve is chaotic: nudging fp32's initial
    weights by 2^-8 (one bf16 ulp, relative) moves single final losses by up to 12% but their mean by
    +0.2% +- 1.7%; the +7% is a real, small cost on this model (the GPT recipe measured +0.13%).

    An AMD EPYC without AVX512 (Zen 3, AVX2, 2 threads) measured more: +10.4% / +5.0% over seeds 0-7,
    per-seed ratios up to 1.30, curve gaps up to 30% / 19%.

    So the test bounds what holds with margin wherever bf16 matmuls accumulate in fp32, and catches
    real breakage: per seed the curves stay within 50% (measured <= 26% over 16 seeds on the Xeon,
    <= 30% on the AVX2 EPYC; a stale bf16 basis after a refresh gives 66-80% on every seed, moments
    not re-expressed at a refresh 24-96%), and over 8 seeds the mean final loss within 25% (measured
    +6.2% / +1.6% on 1 thread and +8.1% / +3.2% on 2 threads on the Xeon, +10.4% / +5.0% on the
    EPYC, sem ~2.6%, so the bound is 5 standard errors above the worst machine; the two bugs +18%,
    caught by the curve gap, and +46%). Costs ~25 s on 2 idle cores for both parametrizations (the
    fp32 curves are computed once and shared).
    """
    pairs = [(_fp32_curve(seed), _bf16_test_curve(low_precision, seed)) for seed in BF16_SEEDS]
    full_final = torch.stack([full[-1] for full, _ in pairs])
    bf16_final = torch.stack([bf16[-1] for _, bf16 in pairs])
    for full, bf16 in pairs:
        assert not torch.equal(full, bf16)  # the option really changes the arithmetic
        assert full[-1] < 0.3 * full[0] and bf16[-1] < 0.3 * bf16[0]
        assert ((full - bf16).abs() / full).max() < BF16_MAX_CURVE_GAP
    assert abs(bf16_final.mean() - full_final.mean()) / full_final.mean() < BF16_MAX_MEAN_SHIFT


TF32_MAX_CURVE_GAP = 0.10  # per seed, anywhere on the curve
TF32_MAX_MEAN_SHIFT = 0.02  # mean final loss over BF16_SEEDS, relative to fp32


def test_tf32_directions_leave_the_loss_curve_unchanged():
    """``rotation_dtype="tf32"`` (the CUDA default) on a CPU, whose emulation rounds the matmul
    inputs to TF32's 10-bit mantissa as a tensor core does: the loss of the bf16 test's MLP.

    Measured over seeds 0-15 and 16-31 (1 thread; mean of per-seed final-loss ratios +- its
    standard error): -0.2% +- 0.4% and +0.3% +- 0.3%, curve gaps <= 3.3%; seed noise (fp32 with its
    initial weights nudged by one TF32 ulp) -1.1% +- 1.5%. TF32 where it was measured to cost loss
    fails both bounds: on every rotation +9.3% +- 2.4% (gaps up to 20%), with the moments'
    re-expression at a refresh +14% +- 2.4% (gaps up to 34%). So over 8 seeds the mean within 2%
    (a 3x margin on the noise of an 8-seed mean, ~0.6%) and each curve within 10% (3x the largest
    gap measured).
    """
    pairs = [(_fp32_curve(seed), _bf16_test_curve({"rotation_dtype": "tf32"}, seed)) for seed in BF16_SEEDS]
    for full, tf32 in pairs:
        assert not torch.equal(full, tf32)  # the emulation really rounds
        assert ((full - tf32).abs() / full).max() < TF32_MAX_CURVE_GAP
    full_final, tf32_final = (torch.stack([pair[i][-1] for pair in pairs]) for i in (0, 1))
    assert abs(tf32_final.mean() - full_final.mean()) / full_final.mean() < TF32_MAX_MEAN_SHIFT


def test_eshampoo_makes_soaps_choices_around_a_refresh_and_blocks_a_conv_weight_per_dim():
    """The refresh study measured SOAP's choices (after the step, V by rank, one factor per conv
    dim) better for EShampoo too, at both sets of betas; only the solver and the hyperparameters differ."""
    conv = torch.nn.Conv2d(2, 3, 3)
    eshampoo, soap = lk.EShampoo(conv.named_parameters()), lk.SOAP(conv.named_parameters())
    for name in ("refresh_timing", "second_moment_on_refresh", "merge_dims"):
        assert getattr(eshampoo, name) == getattr(soap, name), name
    assert (eshampoo.solver, soap.solver) == ("eigh", "qr")
    conv(torch.randn(4, 2, 6, 6)).square().mean().backward()
    eshampoo.step()
    assert len([info for info in eshampoo.factors() if info.name.startswith("weight")]) == 4  # o, i, kh, kw
