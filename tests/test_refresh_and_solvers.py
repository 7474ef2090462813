"""Refresh machinery: staleness criterion, sorted warm QR, orthonormality, tolerance semantics, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lightning_kron as lk
from resume_helpers import continued_after_a_cut
from lightning_kron.engine import solvers
from lightning_kron.engine.staleness import staleness
from scripts import count_ops
from tests.conftest import set_grads


def _random_spd(size: int, generator: torch.Generator, spread: float = 100.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), size, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


def test_staleness_matches_definition_and_reconstruction_error():
    generator = torch.Generator().manual_seed(0)
    factor = _random_spd(6, generator)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    stats = basis.T @ factor @ basis
    expected = torch.linalg.matrix_norm(factor - basis @ torch.diag(stats.diagonal()) @ basis.T) / torch.linalg.matrix_norm(factor)
    torch.testing.assert_close(staleness(stats[None])[0], expected)
    eigenvalues, vectors = torch.linalg.eigh(factor)
    assert staleness((vectors.T @ factor @ vectors)[None])[0] < 1e-12


@pytest.mark.parametrize("size", [1024, 2048])
def test_staleness_of_a_large_fp32_factor_is_accurate_at_small_e(size):
    """Read as ``||B||^2 - ||diag B||^2`` from fp32 norms, the off-diagonal squares vanished in the
    diagonal's round-off: e = 0.05 read 0.011 at d = 2048, an exactly diagonal B 1.5e-3. The
    off-diagonal part reduced on its own is exact to the fp32 reduction's relative round-off
    (about log2(d^2) * 6e-8, under 2e-6), so 1e-3 relative is a wide bound."""
    generator = torch.Generator().manual_seed(size)
    diagonal = torch.diag(torch.logspace(0, -6, size, dtype=torch.float64))  # a power-law spectrum
    noise = torch.randn(size, size, generator=generator, dtype=torch.float64)
    noise = noise + noise.T
    noise.diagonal().zero_()
    assert staleness(diagonal.float()[None])[0] == 0
    for target in (0.005, 0.01, 0.05):
        stats = (diagonal + noise * (target * diagonal.norm() / noise.norm())).float()[None]
        exact64 = stats[0].double()  # the definition, on the same fp32 matrix, in fp64
        exact = (torch.linalg.matrix_norm(exact64 - torch.diag(exact64.diagonal())) / torch.linalg.matrix_norm(exact64)).item()
        assert abs(staleness(stats)[0].item() - exact) <= 1e-3 * exact, (target, exact)


def test_a_non_finite_factor_reads_nan_not_fresh_and_a_failed_eigh_keeps_its_b_exactly():
    """An overflowed factor read 0.0 (perfectly fresh); the member-by-member eigh fallback returned
    I B I for a failed member, which turns an Inf entry into NaN everywhere (0 * inf)."""
    from lightning_kron.engine.staleness import inverse_factor_staleness

    fine = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    overflowed = fine.clone()
    overflowed[0, 1] = float("inf")
    stack = torch.stack([fine, torch.full_like(fine, float("nan")), overflowed])
    for measure in (staleness, inverse_factor_staleness):
        read = measure(stack)
        assert read[0] > 0 and read[1:].isnan().all(), (measure.__name__, read)
    assert staleness(torch.zeros(1, 3, 3))[0] == 0  # an empty factor: nothing off the diagonal
    rotation, new_stats, ok = solvers.eigh_in_basis(stack)
    assert ok.tolist() == [True, False, False]
    assert torch.equal(new_stats[2], stack[2]) and new_stats[1].isnan().all()  # kept as they were
    assert staleness(new_stats[:1])[0] < 1e-12


def _warm_qr_step(basis, factor, orthonormalizer):
    """The refresh path: a QR-algorithm step on B with its columns sorted by diag(B)."""
    stats = (basis.T @ factor @ basis)[None]
    order = solvers.descending_diagonal_order(stats)
    rotation, new_stats, ok = solvers.qr_step_in_basis(stats, solvers.ORTHONORMALIZERS[orthonormalizer], order=order)
    return basis @ rotation[0], new_stats[0], basis[:, order[0]], bool(ok.all())


@pytest.mark.parametrize("orthonormalizer", ["householder", "cholesky_qr2", "cholesky_qr3"])
def test_qr_step_in_basis_equals_orthonormalizing_l_times_q(orthonormalizer):
    """... or ``(L + delta I) Q`` for a shifted orthonormalizer (Cholesky-QR's shift)."""
    generator = torch.Generator().manual_seed(7)
    factor = _random_spd(6, generator)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    new_basis, new_stats, sorted_basis, ok = _warm_qr_step(basis, factor, orthonormalizer)
    shift = solvers.ORTHONORMALIZERS[orthonormalizer].shift
    delta = 0.0 if shift is None else shift((basis.T @ factor @ basis)[None])[0]
    direct, _ = solvers.householder_qr(((factor + delta * torch.eye(6, dtype=factor.dtype)) @ sorted_basis)[None])
    assert ok
    torch.testing.assert_close(new_basis, direct[0])
    torch.testing.assert_close(new_stats, new_basis.T @ factor @ new_basis)


@pytest.mark.parametrize("orthonormalizer", ["householder", "cholesky_qr2", "cholesky_qr3"])
@pytest.mark.parametrize("seed", range(5))
def test_sorted_warm_qr_step_never_increases_staleness_and_converges(seed, orthonormalizer):
    generator = torch.Generator().manual_seed(seed)
    factor = _random_spd(8, generator)
    _, basis = torch.linalg.eigh(factor)
    for _ in range(10):  # the factor drifts; each refresh is one sorted power step
        drift = torch.randn(8, 3, generator=generator, dtype=torch.float64)
        factor = 0.9 * factor + drift @ drift.T
        before = staleness((basis.T @ factor @ basis)[None])[0]
        basis, new_stats, _, ok = _warm_qr_step(basis, factor, orthonormalizer)
        assert ok and staleness(new_stats[None])[0] <= before + 1e-12
    for _ in range(200):  # repeated steps on a fixed factor drive e below tau
        basis = _warm_qr_step(basis, factor, orthonormalizer)[0]
    assert staleness((basis.T @ factor @ basis)[None])[0] <= 0.01


# Orthonormality of fp32 bases after many refreshes, in units of eps32 = 2^-23. Each refresh's Q <- Q P
# adds rounding of a few eps (Householder re-orthonormalisation every 32 refreshes washes it out), so
# the defect max |Q^T Q - I| is a sum of at most 32 rounding increments whose size depends on the BLAS
# kernels: a statistical quantity, bounded here with a measured margin rather than derived. Measured
# (Xeon Sapphire Rapids, peak over every step; 150 refreshes: 8 seeds, 2 threads, qr also 1 thread;
# 600 refreshes: 4 seeds):
# qr <= 70, eigh <= 136 eps32 (the old 1e-5 = 84 eps32 failed eigh's 91 on seed 0). Without the
# re-orthonormalisation the defect grows about linearly: 150 (qr) / 231 (eigh) after 150 refreshes (seed 0), which no bound
# between the two could tell apart, and 451-580 (qr) / 541-744 (eigh) after 600, hence 600 refreshes
# against 256 eps32 (the test then fails for both solvers, 2 s each instead of 0.5 s).
ORTHONORMALITY_REFRESHES = 600
ORTHONORMALITY_TOLERANCE = 256 * torch.finfo(torch.float32).eps  # 2^-15 = 3.05e-5


@pytest.mark.parametrize("solver", ["qr", "eigh"])
def test_bases_stay_orthonormal_after_many_refreshes(solver):
    model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 8))
    optimizer = lk.SOAP(model.parameters(), lr=1e-3, solver=solver, refresh=lk.FixedRefresh(every=1))
    inputs, targets = torch.randn(64, 24), torch.randn(64, 8)
    for _ in range(ORTHONORMALITY_REFRESHES):  # Q <- Q P accumulates round-off unless re-orthonormalised
        optimizer.zero_grad()
        (model(inputs) - targets).square().mean().backward()
        optimizer.step()
    for group in optimizer.factor_groups():
        for dim in group.factored_dims:
            basis = group.basis(dim)
            assert basis.dtype == torch.float32
            assert int(group.tensors[f"refreshes.{dim}"].min()) == ORTHONORMALITY_REFRESHES
            exact = basis.double()  # products of fp32 entries summed in fp64: the check adds no fp32 round-off
            eye = torch.eye(basis.shape[-1], dtype=torch.float64).expand_as(exact)
            assert (exact.mT @ exact - eye).abs().max() <= ORTHONORMALITY_TOLERANCE


def _run(refresh, steps=30, solver="qr"):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    optimizer = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=refresh, solver=solver)
    inputs, targets = torch.randn(40, 10), torch.randn(40, 4)
    for _ in range(steps):
        optimizer.zero_grad()
        (model(inputs) - targets).square().mean().backward()
        optimizer.step()
    return model, optimizer


def test_zero_tolerance_reproduces_fixed_frequency_exactly():
    fixed_model, fixed = _run(lk.FixedRefresh(every=4))
    adaptive_model, adaptive = _run(lk.AdaptiveRefresh(tolerance=0.0, check_every=4))
    for a, b in zip(fixed_model.parameters(), adaptive_model.parameters()):
        assert torch.equal(a, b)
    assert [f.refreshes for f in fixed.factors()] == [f.refreshes for f in adaptive.factors()] == [8] * 4


def test_huge_tolerance_refreshes_only_once():
    _, optimizer = _run(lk.AdaptiveRefresh(tolerance=1.0))
    assert [f.refreshes for f in optimizer.factors()] == [1] * 4


def test_adaptive_refresh_decides_per_factor_and_saves_work():
    _, every_step = _run(lk.FixedRefresh(every=1), steps=40)
    _, adaptive = _run(lk.AdaptiveRefresh(tolerance=0.02), steps=40)
    counts = [f.refreshes for f in adaptive.factors()]
    assert sum(counts) < sum(f.refreshes for f in every_step.factors())
    assert len(set(counts)) > 1, counts


def test_refresh_budget_takes_the_most_stale_first():
    """The policy says what is due; the scheduler's budget (the optimizer's own scheduler here)
    refreshes the most stale first and defers the rest."""
    policy = lk.AdaptiveRefresh(tolerance=0.1, max_per_step=2)
    staleness = torch.tensor([0.5, 0.05, 0.9, 0.2, 0.3])
    assert policy.select(staleness).tolist() == [True, False, True, True, True]
    scheduler = lk.SOAP(nn.Linear(2, 2).parameters(), refresh=policy).scheduler
    assert scheduler._within_budget(policy.select(staleness), staleness).tolist() == [True, False, True, False, False]


def test_external_owner_can_refresh_named_factors():
    model, optimizer = _run(lk.FixedRefresh(every=1000), steps=5)
    before = {f.name: f.refreshes for f in optimizer.factors()}
    assert optimizer.refresh_factors(["2.weight[L]"]) == 1
    after = {f.name: f.refreshes for f in optimizer.factors()}
    assert after["2.weight[L]"] == before["2.weight[L]"] + 1
    assert all(after[name] == count for name, count in before.items() if name != "2.weight[L]")
    with pytest.raises(KeyError, match="unknown factor"):
        optimizer.refresh_factors(["nope[L]"])
    stale = optimizer.stale_factors(0.0)
    assert set(stale) <= set(optimizer.factor_names()) and stale
    assert optimizer.stale_factors(np.float32(0.0)) == optimizer.stale_factors(torch.tensor(0.0)) == stale


@pytest.mark.parametrize("call, error, match", [
    (lambda o: o.refresh_factors(solver="svd"), ValueError, "solver must be one of 'qr', 'eigh'"),
    (lambda o: o.refresh_factors(max_iters=0), ValueError, "max_iters must be an integer >= 1"),
    (lambda o: o.refresh_factors(tolerance=-1.0), ValueError, r"tolerance must be in \[0, 1\]"),
    (lambda o: o.refresh_factors("2.weight[L]"), TypeError, "not one string"),
    (lambda o: o.stale_factors("0.1"), ValueError, r"tolerance must be in \[0, 1\]"),
])
def test_an_owners_bad_refresh_request_fails_before_any_refresh(call, error, match):
    _, optimizer = _run(lk.FixedRefresh(every=1000), steps=2)
    before = [f.refreshes for f in optimizer.factors()]
    with pytest.raises(error, match=match):
        call(optimizer)
    assert [f.refreshes for f in optimizer.factors()] == before


def test_failed_eigendecomposition_keeps_old_basis_and_is_counted(monkeypatch):
    param = nn.Parameter(torch.zeros(5, 4))
    optimizer = lk.SOAP([param], lr=1e-3, solver="eigh", refresh=lk.FixedRefresh(every=1))
    set_grads([param], [torch.randn(5, 4)])
    optimizer.step()
    basis_before = optimizer.state[param]["block0.basis.0"].clone()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    set_grads([param], [torch.randn(5, 4)])
    optimizer.step()
    infos = {f.name: f for f in optimizer.factors()}
    assert infos["group0.param0[L]"].failures == 1 and infos["group0.param0[R]"].failures == 1
    assert torch.isfinite(param).all()
    # the basis is the old one, at most with columns re-sorted by the estimated eigenvalues
    overlap = (optimizer.state[param]["block0.basis.0"].T @ basis_before).abs()
    assert torch.allclose(overlap.sort(dim=1).values[:, -1], torch.ones(5), atol=1e-6)


def test_eigh_falls_back_member_by_member(monkeypatch):
    real_eigh = torch.linalg.eigh
    calls = {"count": 0}

    def flaky(matrix, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 1:
            raise torch.linalg.LinAlgError("batched call failed")
        return real_eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    generator = torch.Generator().manual_seed(0)
    factors = torch.stack([_random_spd(4, generator).float() for _ in range(3)])
    rotations, new_stats, ok = solvers.eigh_in_basis(factors)
    assert ok.all() and calls["count"] == 4
    for factor, rotation, stats in zip(factors, rotations, new_stats):
        assert staleness((rotation.T @ factor @ rotation)[None])[0] < 1e-5
        torch.testing.assert_close(stats, rotation.T @ factor @ rotation, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("solve", [solvers.eigh_in_basis,
                                   lambda stats: solvers.qr_step_in_basis(stats, solvers.ORTHONORMALIZERS["householder"]),
                                   lambda stats: solvers.qr_step_in_basis(stats, solvers.ORTHONORMALIZERS["cholesky_qr2"]),
                                   lambda stats: solvers.qr_step_in_basis(stats, solvers.ORTHONORMALIZERS["cholesky_qr3"])])
def test_nonfinite_factor_gets_the_identity_rotation(solve):
    """Also with Cholesky-QR's shifts: a NaN member is still flagged (its shifts are NaN too)."""
    factors = torch.diag(torch.tensor([3.0, 2.0, 1.0])).repeat(2, 1, 1)
    factors[1, 0, 0] = float("nan")
    rotations, new_stats, ok = solve(factors)
    assert ok.tolist() == [True, False]
    assert torch.equal(rotations[1], torch.eye(3)) and torch.isfinite(rotations[0]).all()


def test_cholesky_qr2_flags_the_members_it_cannot_orthonormalise_without_a_host_sync():
    """A singular member fails its Cholesky; a badly conditioned one (cond 1e7, far above fp32's
    u^-1/2 = 3e3, and not a mere column scaling, which Cholesky absorbs) passes it with a Q far from
    orthogonal, caught by the Gram check of round two."""
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, 5, dtype=torch.float64, generator=generator)
    y[1, :, 0] = 0.0
    u, v = (torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=generator))[0] for _ in range(2))
    y[2] = u @ torch.diag(torch.logspace(0, -7, 5, dtype=torch.float64)) @ v
    counter = count_ops.OpCounter()
    with counter, counter.host_reads():
        q, r, solved = solvers.cholesky_qr2(y.float())
    assert counter.counts.host_syncs == 0
    assert solved.tolist() == [True, False, False]
    torch.testing.assert_close(q[0].T @ q[0], torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(q[0] @ r[0], y[0].float(), atol=1e-5, rtol=1e-5)


U32 = 2.0**-24  # fp32's unit roundoff


def test_shifted_cholesky_qr3_orthonormalises_what_cholesky_qr2_cannot_without_a_host_sync():
    """Full-rank fp32 Y = U diag(sigma) V^T of size 64 with cond 1e4 in random bases (no column
    scaling): above Cholesky-QR2's limit 0.1 u^(-1/2) = 410, so it is flagged; inside the range that
    shifted Cholesky-QR3's s guarantees, ``cond(Y) <= ||Y||_2 / (32.4 sqrt(beta) u ||Y||_F)`` (see
    ``cholesky_qr3_step_shift``; 2.4e4 here), so it is solved.

    Tolerances (u = 2^-24, d = 64): the last round orthonormalises a near-orthonormal Q2, so each
    entry of ``Q^T Q - I`` collects a length-d inner product (<= d u), the Cholesky (<= d u), the
    triangular solve (<= d u) and the test's product (<= d u): 4 d u (measured 0.09 d u). Residual:
    each round's triangular solve has backward error <= d u ||Q_k|| ||R_k|| (3 rounds, every
    ``||Q_k||, ||R_k R_(k-1)...|| <= ~||Y||``), the products R3 R2 R1 <= d u ||Y|| each (2), the
    test's Q R <= d u ||Y||: 6 d u ||Y||_2 (measured 0.01 d u)."""
    size, u = 64, U32
    generator = torch.Generator().manual_seed(1)
    left, right = (torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))[0] for _ in range(2))
    y = (left @ torch.diag(torch.logspace(0, -4, size, dtype=torch.float64)) @ right).float()[None]
    beta = 11 * (size**0.5 + (size + 1) ** 0.5)
    assert 1e4 <= 0.1 * u**-0.5 / (3.24 * (beta * u) ** 0.5 * float(torch.linalg.matrix_norm(y))) < 1e5 / 4
    assert not solvers.cholesky_qr2(y)[2].any()
    counter = count_ops.OpCounter()
    with counter, counter.host_reads():
        q, r, solved = solvers.shifted_cholesky_qr3(y)
    assert counter.counts.host_syncs == 0 and solved.all()
    assert (q.mT @ q - torch.eye(size)).abs().amax() <= 4 * size * u
    assert (q @ r - y).abs().amax() <= 6 * size * u * float(torch.linalg.matrix_norm(y, ord=2))


def _rank_deficient_fp32_stack(size, rank):
    """Three rank-``rank`` PSD members of ``size`` in random bases, a full-rank one, an all-zero one."""
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, size, rank, generator=generator)
    full = _random_spd(size, generator).float()[None]
    return torch.cat([vectors @ vectors.mT, full, torch.zeros(1, size, size)])


@pytest.mark.parametrize("size, rank", [(64, 8), (256, 16)])
def test_shifted_cholesky_qr3_first_round_meets_the_condition_its_shift_was_derived_for(size, rank):
    """``cholesky_qr3_step_shift``'s derivation, checked on rank-deficient fp32 members: Y = (B +
    delta I) Pi has ``sigma_min >= delta``, and round one (Gram shift s) leaves ``cond(Q1) <= 3.24
    sqrt(1 + s / delta^2)`` (Fukaya et al.'s bound), which delta makes at most Cholesky-QR2's limit
    0.1 u^(-1/2) (up to the neglected ``+1``, a 3e-5 relative term). Measured: cond(Q1) ~ 126,
    ``sqrt(s) / delta`` itself; the 3.24 is the bound's room for round-off."""
    stats = _rank_deficient_fp32_stack(size, rank)
    order = solvers.descending_diagonal_order(stats)
    delta = solvers.cholesky_qr3_step_shift(stats)
    y = solvers.rows_in_order(solvers._plus_diagonal(stats, delta), order).mT
    s = solvers.cholesky_qr3_gram_shift(y)
    q1 = solvers._cholesky_qr(y, 1, s)[0]  # (its flag is the one-round Gram check, meaningless here)
    singular_values = torch.linalg.svdvals(q1.double())
    condition = singular_values[:, 0] / singular_values[:, -1]
    bound = 3.24 * (1 + s.double() / delta.double() ** 2).sqrt()
    assert (condition <= bound).all()
    assert (bound <= 0.1 * U32**-0.5 * (1 + 1e-4)).all()


@pytest.mark.parametrize("orthonormalizer, rounds", [("cholesky_qr2", 2), ("cholesky_qr3", 3)])
def test_shifted_cholesky_qr_step_solves_rank_deficient_members_exactly_in_q_space(orthonormalizer, rounds):
    """Rank-8 PSD members of size 64 (and a full-rank and an all-zero one) in fp32, in random bases:
    unshifted Cholesky-QR (Cholesky-QR3 with its Gram shift s too) fails the rank-deficient ones; the
    shifted step solves every member, P is orthonormal and ``P (R P - delta I) P^T`` gives B back.

    Tolerances, from fp32 arithmetic (u = 2^-24, d = 64, k rounds): the shift makes the input of
    the last round near-orthonormal (Cholesky-QR2: cond(B + delta I) <= 411, so round one leaves
    ``||Q1^T Q1 - I|| ~ u cond^2 <= 1e-2``; Cholesky-QR3: see the test above). Each entry of ``P^T
    P - I`` then collects the rounding of a length-d inner product of unit vectors (<= d u, the
    standard gamma_d bound), of the Cholesky of the Gram (<= d u) and of the triangular solve (<= d
    u), plus the test's own product (<= d u): 4 d u (1.5e-5; measured 0.13 d u for both).
    Reconstruction: the k triangular solves' backward errors and the k - 1 products of the R_j
    each err by <= d u ||Y||, the product R P by d u ||Y||, the test's two products by d u ||Y||
    each, and P's defect enters twice (8 d u ||Y||): (2k + 10) d u ||Y||_2, bounded with ``||Y||_2
    <= ||B||_inf + delta`` (measured 0.02 and 0.04 d u ||Y||_inf; without the ``- delta I``,
    Cholesky-QR2's step errs by 640 d u ||Y||_inf, Cholesky-QR3's delta is itself only ~1 d u ||B||,
    below the worst-case round-off, so only the Cholesky-QR2 case checks the subtraction). The zero
    member: Y = Pi, each round rounds the one value of its Gram, Cholesky and solve (and Cholesky-QR3
    adds s): P within 3k u of Pi and the new B within (6k + 1) u of 0 (measured: exact)."""
    size = 64
    stats = _rank_deficient_fp32_stack(size, 8)
    order = solvers.descending_diagonal_order(stats)
    orth = solvers.ORTHONORMALIZERS[orthonormalizer]
    assert not orth.factor(solvers.rows_in_order(stats, order).mT)[2][:3].any()  # unshifted
    counter = count_ops.OpCounter()
    with counter, counter.host_reads():
        rotation, new_stats, ok = solvers.qr_step_in_basis(stats, orth, order=order)
    assert counter.counts.host_syncs == 0 and ok.all()
    eye = torch.eye(size)
    assert (rotation.mT @ rotation - eye).abs().amax() <= 4 * size * U32
    scale = torch.linalg.matrix_norm(stats, ord=float("inf")) + orth.shift(stats)
    error = (rotation @ new_stats @ rotation.mT - stats).abs().amax(dim=(-2, -1))
    assert (error <= (2 * rounds + 10) * size * U32 * scale).all()
    assert (rotation[-1] - eye[:, order[-1]]).abs().amax() <= 3 * rounds * U32
    assert new_stats[-1].abs().amax() <= (6 * rounds + 1) * U32


@pytest.mark.parametrize("orthonormalizer, smallest_delta", [("cholesky_qr2", 1e-8), ("cholesky_qr3", 1e-14)])
def test_shifted_step_is_the_qr_step_of_b_plus_delta_and_as_good_as_householders(orthonormalizer, smallest_delta):
    """fp64, a warm full-rank B (cond 100): the shifted Cholesky-QR step's P is Householder's QR
    of ``(B + delta I) Pi`` and its stored factor is exactly ``P^T B P`` (for Cholesky-QR2, missing
    the ``- delta I`` would be off by ``delta ~ 1e-7 ||B||``, 1e5 times the tolerance; Cholesky-QR3's
    delta is ~3e-14 ||B||); it ranks the columns as Householder's unshifted step does, and each
    off-diagonal entry of the new B changes by the factor ``(1 + delta/lambda_j) / (1 +
    delta/lambda_i)`` (first order), so the staleness is Householder's within ``delta / lambda_min``
    (plus fp64 round-off, ~1e-13 relative, for Cholesky-QR3's tiny delta)."""
    size = 16
    generator = torch.Generator().manual_seed(3)
    factor = _random_spd(size, generator)
    _, vectors = torch.linalg.eigh(factor)
    basis, _ = torch.linalg.qr(vectors + 0.05 * torch.randn(size, size, generator=generator, dtype=torch.float64))
    stats = (basis.T @ factor @ basis)[None]
    order = solvers.descending_diagonal_order(stats)
    orth = solvers.ORTHONORMALIZERS[orthonormalizer]
    rotation, new_stats, ok = solvers.qr_step_in_basis(stats, orth, order=order)
    plain_rotation, plain_stats, _ = solvers.qr_step_in_basis(stats, solvers.ORTHONORMALIZERS["householder"], order=order)
    delta = orth.shift(stats)
    shifted = stats + delta[:, None, None] * torch.eye(size, dtype=stats.dtype)
    expected, _ = solvers.householder_qr(solvers.rows_in_order(shifted, order).mT)
    norm = float(torch.linalg.matrix_norm(stats, ord=2)[0])
    assert ok.all() and float(delta[0]) > smallest_delta * norm
    torch.testing.assert_close(rotation, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(new_stats, rotation.mT @ stats @ rotation, atol=1e-12 * norm, rtol=0)
    diagonal = lambda b: b.diagonal(dim1=-2, dim2=-1).argsort(dim=-1, descending=True)  # noqa: E731
    assert torch.equal(diagonal(new_stats), diagonal(plain_stats))
    change = float(staleness(new_stats)[0] / staleness(plain_stats)[0] - 1)
    assert abs(change) <= float(delta[0]) / float(torch.linalg.eigvalsh(factor)[0]) + 1e-12


def _soap_on_a_singular_factor(orthonormalizer, poison=False):
    """SOAP on a linear layer whose input feature 0 is always zero (its right factor L is singular),
    refreshing at steps 1 and 3; ``poison`` puts a NaN into that factor before step 3. Returns the
    optimizer and each step's host syncs."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    optimizer = lk.SOAP(model.parameters(), refresh=lk.FixedRefresh(every=2), orthonormalizer=orthonormalizer)
    syncs = []
    for step in range(3):
        optimizer.zero_grad()
        inputs = torch.randn(16, 6)
        inputs[:, 0] = 0.0
        model(inputs).square().mean().backward()
        if poison and step == 2:
            optimizer.state[model.weight]["block0.stats.1"][0, 0] = float("nan")
        counter = count_ops.OpCounter()
        with counter, counter.host_reads():
            optimizer.step()
        syncs.append(counter.counts.host_syncs)
    return optimizer, syncs


@pytest.mark.parametrize("orthonormalizer", ["cholesky_qr2", "cholesky_qr3"])
def test_a_singular_factor_needs_no_householder_fallback_with_the_shift(orthonormalizer):
    """The shifted Cholesky-QR refresh solves the singular factor (unshifted, it failed and fell back
    to Householder): no failure, so nothing to refresh again (the flags are still read, the refresh
    step's second host read), and the same L = Q B Q^T as Householder's run."""
    optimizer, syncs = _soap_on_a_singular_factor(orthonormalizer)
    reference, _ = _soap_on_a_singular_factor("householder")
    state, expected = (next(iter(o.state.values())) for o in (optimizer, reference))
    assert (int(state["block0.failures.1"]), syncs[2]) == (0, 2)
    factor = lambda s: s["block0.basis.1"] @ s["block0.stats.1"] @ s["block0.basis.1"].T  # noqa: E731
    torch.testing.assert_close(factor(state), factor(expected))


@pytest.mark.parametrize("orthonormalizer", ["cholesky_qr2", "cholesky_qr3", "householder"])
def test_a_failed_cholesky_refresh_falls_back_to_householder_with_one_more_host_read(orthonormalizer):
    """A factor whose Cholesky-QR fails (a NaN in it) is refreshed again with Householder: both keep
    the basis of a Householder run, every failed attempt is counted (Cholesky's and Householder's
    retry), and the refresh step reads the host once for the decision and once for all of
    Cholesky's failures."""
    optimizer, syncs = _soap_on_a_singular_factor(orthonormalizer, poison=True)
    reference, _ = _soap_on_a_singular_factor("householder", poison=True)
    state, expected = (next(iter(o.state.values())) for o in (optimizer, reference))
    torch.testing.assert_close(state["block0.basis.1"], expected["block0.basis.1"])
    failures = int(state["block0.failures.1"])
    assert (failures, syncs[2]) == ((1, 1) if orthonormalizer == "householder" else (2, 2))
    # the retry is the same refresh: counted once (it used to count twice), and the failed factor
    # keeps the step of its last good refresh, so an age-ranked budget picks it first next time
    assert int(state["block0.refreshes.1"]) == int(expected["block0.refreshes.1"]) == 2  # steps 1 and 3
    first, second = int(state["block0.last_refresh.1"]), int(state["block0.last_refresh.0"])
    assert (first, second) == (optimizer.start_preconditioning_step, optimizer.global_step), (first, second)


@pytest.mark.parametrize("kwargs, match", [
    ({"tolerance": 1.5}, "tolerance"), ({"tolerance": -0.1}, "tolerance"),
    ({"check_every": 0}, "check_every"), ({"max_iters": 0}, "max_iters"), ({"max_per_step": 0}, "max_per_step"),
])
def test_invalid_policy_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lk.AdaptiveRefresh(**kwargs)
    with pytest.raises(ValueError, match="every"):
        lk.FixedRefresh(every=0)


@pytest.mark.parametrize("timing", ["in_step", "after_step"])
@pytest.mark.parametrize("solver", ["qr", "eigh"])
def test_refreshes_keep_factors_and_moments_consistent_with_parameter_space(solver, timing):
    """Through many refreshes (sorts, QR steps, rotations), in or after the step, Q B Q^T stays the
    parameter-space factor and the rotated first moment rotated back stays the parameter-space momentum."""
    generator = torch.Generator().manual_seed(11)
    param = nn.Parameter(torch.zeros(5, 4, dtype=torch.float64))
    beta1, beta_s = 0.8, 0.9
    optimizer = lk.SOAP([param], lr=0.0, betas=(beta1, 0.95), shampoo_beta=beta_s, solver=solver,
                        refresh=lk.FixedRefresh(every=2), weight_decay=0.0, refresh_timing=timing)
    left, right = torch.zeros(5, 5, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    momentum = torch.zeros(5, 4, dtype=torch.float64)
    for step in range(40):
        drift = torch.randn(5, 5, generator=generator, dtype=torch.float64) * (1 + step / 10)
        grad = drift @ torch.randn(5, 4, generator=generator, dtype=torch.float64)  # changing covariance
        left = beta_s * left + (1 - beta_s) * grad @ grad.T
        right = beta_s * right + (1 - beta_s) * grad.T @ grad
        momentum = beta1 * momentum + (1 - beta1) * grad
        set_grads([param], [grad])
        optimizer.step()
        state = optimizer.state[param]
        q_left, q_right = state["block0.basis.0"], state["block0.basis.1"]
        torch.testing.assert_close(q_left @ state["block0.stats.0"] @ q_left.T, left, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(q_right @ state["block0.stats.1"] @ q_right.T, right, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(q_left @ state["block0.exp_avg"] @ q_right.T, momentum, rtol=1e-9, atol=1e-9)
    assert {f.refreshes for f in optimizer.factors()} == {20}


@pytest.mark.parametrize("second_moment", ["keep", "rotate"])
def test_second_moment_follows_the_eigenvalue_ranking_and_first_moment_the_rotation(second_moment):
    """A refresh that only reorders the basis: both second-moment rules reduce to the permutation."""
    param = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    optimizer = lk.SOAP([param], lr=0.0, solver="eigh", refresh=lk.FixedRefresh(every=1000),
                        second_moment_on_refresh=second_moment)
    set_grads([param], [torch.randn(3, 2, dtype=torch.float64)])
    optimizer.step()
    state = optimizer.state[param]
    state["block0.stats.0"].copy_(torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)))
    second = torch.arange(6, dtype=torch.float64).reshape(3, 2) + 1
    first = -torch.arange(6, dtype=torch.float64).reshape(3, 2)
    state["block0.exp_avg_sq"].copy_(second)
    state["block0.exp_avg"].copy_(first)
    basis_before = state["block0.basis.0"].clone()
    optimizer.refresh_factors(["group0.param0[L]"], solver="eigh")
    order = [1, 2, 0]  # eigenvalues 3, 2, 1
    torch.testing.assert_close(state["block0.exp_avg_sq"], second[order])
    torch.testing.assert_close(state["block0.exp_avg"].abs(), first[order].abs())
    torch.testing.assert_close(state["block0.basis.0"].abs(), basis_before[:, order].abs())
    torch.testing.assert_close(state["block0.stats.0"], torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)))


def test_rotated_second_moment_uses_the_squared_rotation():
    param = nn.Parameter(torch.zeros(2, 1, dtype=torch.float64))
    optimizer = lk.SOAP([param], lr=0.0, solver="eigh", refresh=lk.FixedRefresh(every=1000), precondition_1d=True,
                        second_moment_on_refresh="rotate")
    set_grads([param], [torch.tensor([[1.0], [0.0]], dtype=torch.float64)])
    optimizer.step()
    state = optimizer.state[param]
    state["block0.stats.0"].copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64))  # eigvecs at 45 deg
    state["block0.exp_avg_sq"].copy_(torch.tensor([4.0, 0.0], dtype=torch.float64))
    optimizer.refresh_factors(solver="eigh")
    torch.testing.assert_close(state["block0.exp_avg_sq"], torch.tensor([2.0, 2.0], dtype=torch.float64))


def test_adaptive_schedule_is_followed_inside_the_optimizer_step():
    from lightning_kron import TighterEarly

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    policy = lk.AdaptiveRefresh(tolerance=1.0, schedule=TighterEarly(early_tolerance=0.0, early_steps=3))
    optimizer = lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy)
    counts = []
    for _ in range(6):
        optimizer.zero_grad()
        model(torch.randn(16, 6)).square().mean().backward()
        optimizer.step()
        counts.append(sum(info.refreshes for info in optimizer.factors()))
    # step 1: exact bases; relative steps 1, 2 at tolerance 0 refresh both factors; from 3 on, 1.0: none
    assert counts == [2, 4, 6, 6, 6, 6]
    assert policy.tolerance_at(2) == 0.0 and policy.tolerance_at(3) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lk.AdaptiveRefresh(schedule=0.1)


@pytest.mark.parametrize("size", [5, 200, 600])
def test_symmetric_product_of_upper_equals_the_full_product(size):
    """The blocked product skips R's zero blocks and mirrors: same as ``R @ P`` for a QR step's
    symmetric ``R P``, and exactly symmetric."""
    generator = torch.Generator().manual_seed(size)
    factor = _random_spd(size, generator).unsqueeze(0)
    rotation, upper = solvers.householder_qr(factor)
    product = solvers.symmetric_product_of_upper(upper, rotation)
    torch.testing.assert_close(product, upper @ rotation)
    assert torch.equal(product, product.mT)


def test_rows_in_order_reads_row_and_column_major_stacks_alike():
    generator = torch.Generator().manual_seed(3)
    stack = torch.randn(3, 7, 7, generator=generator)
    order = torch.stack([torch.randperm(7, generator=generator) for _ in range(3)])
    expected = torch.stack([member[perm] for member, perm in zip(stack, order)])
    column_major = stack.mT.contiguous().mT
    assert torch.equal(solvers.rows_in_order(stack, order), expected)
    assert torch.equal(solvers.rows_in_order(column_major, order), expected)


def test_low_precision_bases_follow_every_refresh():
    """bf16 rotations cache the bf16 bases between refreshes; a refresh must replace the copy."""
    model = nn.Linear(12, 6)
    optimizer = lk.SOAP(model.parameters(), rotation_dtype=torch.bfloat16, refresh=lk.FixedRefresh(every=2))
    inputs, targets = torch.randn(32, 12), torch.randn(32, 6)
    for _ in range(5):
        optimizer.zero_grad()
        (model(inputs) - targets).square().mean().backward()
        optimizer.step()
        for group in optimizer.factor_groups():
            cached = group._low_precision_bases()
            for basis, low in zip(group.bases(), cached):
                if basis is not None:
                    assert torch.equal(low, basis.to(torch.bfloat16))
    assert any(bool(group.tensors["refreshes.0"].gt(1).all()) for group in optimizer.factor_groups())


def test_bf16_rotations_leave_a_block_without_factors_at_adamws_step():
    """A bias has nothing to rotate: its gradient and step were rounded to bf16 all the same (1.8e-3
    of the update away from AdamW's, against 2.4e-6 in fp32)."""
    grads = [torch.randn(1000, generator=torch.Generator().manual_seed(seed)) for seed in range(5)]
    biases = []
    for rotation_dtype in (None, torch.bfloat16):
        bias = nn.Parameter(torch.ones(1000))
        optimizer = lk.SOAP([bias], lr=1e-2, rotation_dtype=rotation_dtype)
        for grad in grads:
            bias.grad = grad.clone()
            optimizer.step()
        biases.append(bias.detach())
    assert torch.equal(biases[0], biases[1])


def test_bf16_rotations_work_when_state_is_made_under_inference_mode():
    """Inference tensors keep no version counter, so the bf16 basis cache must not rely on one."""
    model = nn.Linear(6, 4)
    with torch.inference_mode():
        optimizer = lk.SOAP(model.parameters(), rotation_dtype=torch.bfloat16, refresh=lk.FixedRefresh(every=2))
        for _ in range(4):
            model.weight.grad, model.bias.grad = torch.randn(4, 6), torch.randn(4)
            optimizer.step()
    group = optimizer.factor_groups()[0]
    assert group.basis(0).is_inference() and bool(group.tensors["refreshes.0"].gt(1).all())


@pytest.mark.parametrize("max_iters", [1, 3])
def test_a_member_whose_warm_qr_fails_keeps_its_basis_and_the_others_refresh(max_iters):
    """No host round trip to retry a failed member: it keeps its basis (identity rotation, its own B,
    no re-ranking) over every QR iteration, and the rest of the batch is refreshed as usual."""
    from lightning_kron.engine import basis_refresh

    generator = torch.Generator().manual_seed(0)
    factors = torch.stack([_random_spd(5, generator).float() for _ in range(3)])
    factors[1, 0, 0] = float("nan")
    request = basis_refresh.RefreshRequest(max_iters=max_iters, tolerance=0.0)
    rotation, new_stats, ok, order = basis_refresh._warm_qr(factors.clone(), request)
    assert ok.tolist() == [True, False, True]
    assert torch.equal(rotation[1], torch.eye(5)) and order[1].tolist() == list(range(5))
    assert torch.equal(new_stats[1].nan_to_num(), factors[1].nan_to_num())
    for member in (0, 2):
        torch.testing.assert_close(rotation[member].T @ factors[member] @ rotation[member], new_stats[member],
                                   rtol=1e-4, atol=1e-4)
        assert staleness(new_stats[member:member + 1])[0] < staleness(factors[member:member + 1])[0]


def test_after_a_skipped_first_step_every_member_gets_an_exact_first_refresh():
    """The default budget refreshes the members of a stack a few at a time. Whether a refresh
    starts from the identity used to be known per stack, so after a skipped first step (NaN) only
    the first member refreshed got eigh; the others got one warm QR step from the identity
    (staleness 0.08-0.16 right after it). Now each member's first refresh is exact (fp64)."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6, bias=False, dtype=torch.float64) for _ in range(3)]  # one stack of 3
    optimizer = lk.SOAP([layer.weight for layer in layers], lr=1e-3)
    inputs = torch.randn(32, 6, dtype=torch.float64) * torch.linspace(0.2, 2, 6, dtype=torch.float64)
    group = optimizer.factor_groups()[0]
    first_staleness = {}
    for step in range(1, 16):
        optimizer.zero_grad()
        sum(layer(inputs).square().mean() for layer in layers).backward()
        if step == 1:
            layers[0].weight.grad[0, 0] = float("nan")  # the whole group skips its first step
        before = [group.refreshes(dim).clone() for dim in group.factored_dims]
        optimizer.step()
        optimizer.update_staleness()
        for dim in group.factored_dims:
            for row in range(len(group)):
                if before[dim][row] == 0 and group.refreshes(dim)[row] == 1:
                    first_staleness[(dim, row)] = float(group.staleness(dim)[row])
    assert len(first_staleness) == 6  # every factor of the stack had its first refresh
    assert max(first_staleness.values()) < 1e-10, first_staleness


def test_a_factor_first_gradded_after_the_start_gets_exact_bases_on_that_step():
    """A first step with no gradients at all, a stack member without a gradient until step 3 and a
    group added by add_param_group at step 4: each factor's exact first refresh comes on its own
    first gradded step (they waited in the identity basis until the policy picked them, up to 10
    steps of AdamW at every=10)."""
    generator = torch.Generator().manual_seed(0)

    def grad(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    first, partner = (nn.Parameter(grad(5, 4)) for _ in range(2))  # one stack
    late = nn.Parameter(grad(3, 4))
    optimizer = lk.SOAP([first, partner], lr=1e-3, refresh=lk.FixedRefresh(every=10))
    optimizer.step()  # before any backward
    first_refresh = {}
    for step in range(2, 7):
        if step == 4:
            optimizer.add_param_group({"params": [late]})
        for param, since in ((first, 2), (partner, 3), (late, 4)):
            param.grad = grad(*param.shape) if step >= since else None
        optimizer.step()
        for info in optimizer.factors():
            if info.refreshes and info.name not in first_refresh:
                first_refresh[info.name] = step
                assert info.staleness < 1e-12, info  # exact: the eigenbasis of the statistics
    assert first_refresh == {"group0.param0[L]": 2, "group0.param0[R]": 2, "group0.param1[L]": 3,
                             "group0.param1[R]": 3, "group1.param0[L]": 4, "group1.param0[R]": 4}


def test_a_members_repeated_qr_steps_do_not_depend_on_the_others_in_its_batch():
    """max_iters > 1 with a tolerance: each member steps while it is above the tolerance. The
    batch used to step while any member was, so DDP's split of the refreshes between owner ranks
    and FSDP2's between shards changed the bases (0.04-0.1 of the parameters)."""
    from lightning_kron.engine import basis_refresh

    generator = torch.Generator().manual_seed(0)
    rotate = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=generator))[0]
    near = torch.diag(torch.logspace(0, 2, 6, dtype=torch.float64)) + 1e-3 * _random_spd(6, generator)
    far = rotate @ near @ rotate.T  # far from diagonal: needs every step
    request = basis_refresh.RefreshRequest(max_iters=4, tolerance=0.05)
    batch = basis_refresh._warm_qr(torch.stack([near, far]), request)
    for row, member in enumerate((near, far)):
        alone = basis_refresh._warm_qr(member[None], request)
        for together, by_itself in zip(batch, alone):
            assert torch.equal(together[row], by_itself[0]), row
    one_step = basis_refresh._warm_qr(torch.stack([near, far]), basis_refresh.RefreshRequest(max_iters=1))[1]
    assert staleness(one_step[0:1])[0] < 0.05 < staleness(one_step[1:2])[0]  # one is done, the other steps on


def test_a_fixed_clock_refreshes_no_factor_before_its_first_gradient():
    """FixedRefresh chooses every factor at a check: one whose parameter had no gradient yet (an
    expert unused so far, a frozen layer) got a refresh of zero statistics, which also marked its
    identity basis as refreshed, so that its first gradient, after the check at step 11, did not
    get exact bases (staleness 0.38-0.68 right after it)."""
    generator = torch.Generator().manual_seed(0)
    used, later, frozen = (nn.Parameter(torch.randn(5, 4, dtype=torch.float64, generator=generator)) for _ in range(3))
    optimizer = lk.SOAP([("used", used), ("later", later), ("frozen", frozen)], lr=1e-3, refresh=lk.FixedRefresh(every=10))
    for step in range(1, 15):
        used.grad = torch.randn(5, 4, dtype=torch.float64, generator=generator)
        later.grad = torch.randn(5, 4, dtype=torch.float64, generator=generator) if step >= 13 else None
        optimizer.step()
        infos = {info.name: info for info in optimizer.factors()}
        if step == 13:
            assert infos["later[L]"].refreshes == infos["later[R]"].refreshes == 1
            assert infos["later[L]"].staleness < 1e-12 and infos["later[R]"].staleness < 1e-12
    assert infos["used[L]"].refreshes == 2 and infos["frozen[L]"].refreshes == infos["frozen[R]"].refreshes == 0


def test_a_factor_whose_first_gradient_was_skipped_gets_exact_bases_later_and_resumes_identically():
    """A first gradient that is non-finite is skipped, so the factor's statistics stay zero: a
    fixed-clock check before its next gradient must not refresh it (judged by whether it has its
    first bases, which a load rebuilds; judged by a host count of gradded steps, which a load could
    not rebuild, a resume in that window ended 0.018 away)."""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 4, dtype=torch.float64, generator=generator) for _ in range(2)]
    grads = [[torch.randn(5, 4, dtype=torch.float64, generator=generator) for _ in range(2)] for _ in range(9)]

    def build():
        used, late = (nn.Parameter(value.clone()) for value in start)
        optimizer = lk.SOAP([{"params": [("used", used)]}, {"params": [("late", late)]}], lr=1e-2,
                            refresh=lk.FixedRefresh(every=2))
        return (used, late), optimizer

    def run(params, optimizer, steps, seen=None):
        for step in steps:
            params[0].grad = grads[step][0].clone()
            params[1].grad = None if 1 <= step <= 3 else grads[step][1].clone()
            if step == 0:
                params[1].grad[0, 0] = float("nan")  # its group skips the step
            optimizer.step()
            if seen is not None:
                seen.append({info.name: info for info in optimizer.factors()})

    straight, straight_optimizer, seen = *build(), []
    run(straight, straight_optimizer, range(9), seen)
    assert [infos["late[L]"].refreshes for infos in seen[:4]] == [0, 0, 0, 0]  # the check at step 3 left it
    assert seen[4]["late[L]"].refreshes >= 1 and seen[4]["late[L]"].staleness < 1e-12  # exact at its first finite one
    resumed = continued_after_a_cut(build, run, cut=1, total=9)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
