"""The numbers KronCallback logs, checked against values worked out by hand."""

import math
from functools import reduce

import pytest
import torch

from lightning_kron import SOAP
from lightning_kron.lightning.approximation_probe import ApproximationProbe
from lightning_kron.lightning.metrics import eigenvalue_misscaling, refresh_metrics
from lightning_kron.scheduling.scheduler import RefreshCounters


def unit(size: int, index: int) -> torch.Tensor:
    vector = torch.zeros(size, 1)
    vector[index] = 1.0
    return vector


def two_orthogonal_rank_one_steps(**options):
    """Step 1: G = e1 f1^T, step 2: G = e2 f2^T on a 3x4 weight (no refresh after step 1's exact basis)."""
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = SOAP([("w", weight)], lr=0.0, weight_decay=0.0, shampoo_beta=1.0, **options)
    probe = ApproximationProbe(optimizer, max_numel=12)
    for index in (0, 1):
        weight.grad = unit(3, index) @ unit(4, index).T
        optimizer.step()
        probe.update()
    return optimizer, probe


def test_shampoo_approximation_error_of_two_orthogonal_rank_one_gradients():
    # C = a a^T + b b^T with a = e1 kron f1, b = e2 kron f2; L kron R also spans the cross terms
    # e1 kron f2 and e2 kron f1. Unit-trace: C/2 against P4/4 gives sqrt(1/4) / sqrt(1/2) = 1/sqrt(2).
    _, probe = two_orthogonal_rank_one_steps()
    assert probe.errors()["kron/approx_error/shampoo/w"] == pytest.approx(1 / math.sqrt(2), abs=1e-6)


def test_probe_uses_the_row_major_kronecker_order():
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = SOAP([("w", weight)])
    probe = ApproximationProbe(optimizer, max_numel=12)
    weight.grad = torch.randn(3, 1) @ torch.randn(1, 4)
    optimizer.step()
    probe.update()
    assert probe.errors()["kron/approx_error/shampoo/w"] < 1e-5
    # the column-stacking order (R kron L) would be far off for the same rank-1 gradient:
    group = optimizer.factor_groups()[0]
    factors = [group.basis(d)[0] @ group.stats(d)[0] @ group.basis(d)[0].mT for d in (0, 1)]
    wrong = reduce(torch.kron, factors[::-1])
    moment = probe.moments["w"]
    error = torch.linalg.matrix_norm(moment / moment.trace() - wrong / wrong.trace()) / torch.linalg.matrix_norm(moment / moment.trace())
    assert error > 0.1


def test_probe_skips_blocks_above_its_size_bound():
    optimizer = SOAP([("big", torch.nn.Parameter(torch.zeros(5, 6))), ("small", torch.nn.Parameter(torch.zeros(2, 3)))])
    probe = ApproximationProbe(optimizer, max_numel=29)
    for param in (p for group in optimizer.param_groups for p in group["params"]):
        param.grad = torch.randn_like(param)
    optimizer.step()
    probe.update()
    assert set(probe.moments) == {"small"}
    with pytest.raises(ValueError, match="max_numel"):
        ApproximationProbe(optimizer, max_numel=0)


def test_eigenvalue_misscaling_of_two_orthogonal_rank_one_gradients():
    # Shampoo: diag(L) o diag(R) spreads 1/4 over {e1, e2} x {f1, f2}. Adam's V (beta2 = 0.5) holds
    # beta2 (1 - beta2) at (e1, f1) and (1 - beta2) at (e2, f2): normalised (1/3, 2/3).
    # ||S - V|| / ||V|| = sqrt((1/12^2 + 5^2/12^2 + 2 * 3^2/12^2) / (5/9)) = sqrt(0.55).
    optimizer, _ = two_orthogonal_rank_one_steps(betas=(0.9, 0.5))
    assert eigenvalue_misscaling(optimizer)["kron/misscaling/w"] == pytest.approx(math.sqrt(0.55), abs=1e-6)


def test_refresh_metrics_window_and_savings():
    before = RefreshCounters(checks=2, refreshes=5, seconds=0.5)
    now = RefreshCounters(checks=6, refreshes=9, seconds=1.25)
    metrics = refresh_metrics(now, before, steps=4, factor_count=6, tolerance=0.05, deferred=1)
    assert metrics["kron/refresh/count"] == 4 and metrics["kron/refresh/fraction"] == pytest.approx(4 / 24)
    assert metrics["kron/refresh/seconds"] == pytest.approx(0.75)
    assert metrics["kron/refresh/saved_vs_fixed"] == 6 * 6 - 9 and metrics["kron/refresh/deferred"] == 1


def test_probe_errors_vanish_for_sampled_gradients_with_kronecker_covariance():
    # G = A^(1/2) Z B^(1/2): cov(vec G) = A kron B exactly, so only sampling noise remains
    torch.manual_seed(0)
    left, right = torch.randn(3, 3), torch.randn(4, 4)
    left_root = torch.linalg.cholesky(left @ left.T + 0.1 * torch.eye(3))
    right_root = torch.linalg.cholesky(right @ right.T + 0.1 * torch.eye(4))
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = SOAP([("w", weight)], lr=0.0, weight_decay=0.0, shampoo_beta=1.0, betas=(0.9, 0.999))
    probe = ApproximationProbe(optimizer, max_numel=12)
    for _ in range(400):
        weight.grad = left_root @ torch.randn(3, 4) @ right_root.T
        optimizer.step()
        probe.update()
    errors = probe.errors()
    assert errors["kron/approx_error/shampoo/w"] < 0.06 and errors["kron/approx_error/corrected/w"] < 0.12


def test_probe_ignores_a_skipped_nonfinite_step():
    weight = torch.nn.Parameter(torch.zeros(3, 2))
    optimizer = SOAP([("w", weight)], lr=1e-2)
    probe = ApproximationProbe(optimizer, max_numel=64)
    for _ in range(3):
        weight.grad = torch.randn(3, 2)
        optimizer.step()
        probe.update()
    before = probe.errors()
    weight.grad = torch.full((3, 2), float("nan"))
    optimizer.step()
    probe.update()
    assert optimizer.skipped_steps == 1
    assert probe.errors() == before and before


def test_probe_skips_the_block_of_a_group_the_optimizer_skipped():
    """A NaN in the bias skips the whole parameter group, the weight's finite gradient included: the
    probe must not fold that gradient into the weight's moment either."""
    weight, bias = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = SOAP([("w", weight), ("b", bias)], lr=1e-2)
    probe = ApproximationProbe(optimizer, max_numel=64)
    for _ in range(3):
        weight.grad, bias.grad = torch.randn(3, 2), torch.randn(3)
        optimizer.step()
        probe.update()
    before = probe.moments["w"].clone()
    weight.grad, bias.grad = torch.randn(3, 2), torch.full((3,), float("nan"))
    optimizer.step()
    probe.update()
    assert optimizer.skipped_steps == 1
    assert torch.equal(probe.moments["w"], before)


def test_probe_of_an_inverse_factor_method_compares_the_factor_not_its_inverse():
    """KrADagrad stores ``X = (eps I + L)^-1`` where SOAP stores ``L``: the probe compares ``L``. A
    rank-1 gradient has a Kronecker covariance, so the error is round-off (fp64; it read 1.08 when
    the probe took ``X`` for ``L``)."""
    from lightning_kron import KrADagrad

    weight = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    optimizer = KrADagrad([("w", weight)])
    probe = ApproximationProbe(optimizer, max_numel=12)
    weight.grad = torch.randn(3, 1, dtype=torch.float64) @ torch.randn(1, 4, dtype=torch.float64)
    optimizer.step()
    probe.update()
    assert probe.errors()["kron/approx_error/shampoo/w"] < 1e-10


@pytest.mark.parametrize("order", [(0.3, math.nan), (math.nan, 0.3)])
def test_a_nan_staleness_shows_in_the_logged_max_in_any_order(order):
    """Python's max() with a NaN depends on where it stands: [0.3, nan] gave 0.3, hiding the
    overflowed factor that now reads NaN."""
    from lightning_kron.engine.factor_info import FactorInfo
    from lightning_kron.lightning.metrics import summary_metrics

    infos = [FactorInfo(f"w[{i}]", "w", i, 4, value, 1, 1, 0, 0.0) for i, value in enumerate(order)]
    assert math.isnan(summary_metrics(infos, 0)["kron/summary/staleness_max"])
    assert summary_metrics(infos[:1] if not math.isnan(order[0]) else infos[1:], 0)["kron/summary/staleness_max"] == 0.3
