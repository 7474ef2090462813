"""The approximation-error probe (docs/algorithms.md §5): how far is the Kronecker preconditioner from
full-matrix Adam, per block?

For every fully factored block with at most ``max_numel`` entries the probe keeps the full second
moment ``C = EMA(vec(G) vec(G)^T)`` (``n x n``, the statistics' own EMA rate) and compares it with

* Shampoo's Kronecker approximation ``L_1 kron ... kron L_k`` (``L_i = Q_i B_i Q_i^T``; KrADagrad,
  which tracks the inverse factor, gives its ``L_i`` back from it), and
* the eigenvalue-corrected one ``K diag(vec V) K^T`` with ``K = Q_1 kron ... kron Q_k``
  (eigenvalue-corrected optimizers only),

logging ``||C - C_approx||_F / ||C||_F`` for each.

Order of the Kronecker product: docs/algorithms.md writes ``L_k kron ... kron L_1`` for ``vec`` stacking
*columns*; PyTorch flattens row-major, which reverses it, so with ``vec = G.flatten()`` the product is
``L_1 kron ... kron L_k`` (a rank-1 gradient ``u v^T`` has ``vec = u kron v``).

Every matrix is normalised to unit trace before comparing. This removes the normalisation
``tr(L_1)^(k-1)`` of docs/algorithms.md, the bias corrections and the different EMA rates of ``V``, and
also the different windows when the probe starts later than the optimizer (it is not checkpointed:
its memory is ``n^2`` per block, so it restarts with the run). The error then measures the *shape*
of the approximation, which is what the preconditioner uses up to its learning rate.

Cost: one ``n x n`` rank-1 update per probed block per step, and the comparison only when logged.

>>> import torch
>>> from lightning_kron import SOAP
>>> model = torch.nn.Linear(4, 3, bias=False)
>>> optimizer = SOAP(model.named_parameters())
>>> probe = ApproximationProbe(optimizer, max_numel=64)
>>> model.weight.grad = torch.randn(3, 1) @ torch.randn(1, 4)  # rank 1: a Kronecker covariance
>>> optimizer.step(); probe.update()
>>> {name: round(value, 4) for name, value in probe.errors().items()}
{'kron/approx_error/shampoo/weight': 0.0, 'kron/approx_error/corrected/weight': 0.0}
"""

from __future__ import annotations

import math
from functools import reduce

import torch

from lightning_kron.engine.validation import check_positive_int
from lightning_kron.lightning.metrics import PREFIX


class ApproximationProbe:
    """Full second moments of small blocks, compared with their Kronecker approximations."""

    def __init__(self, optimizer, max_numel: int) -> None:
        self.optimizer = optimizer
        self.max_numel = check_positive_int("max_numel", max_numel)
        self.moments: dict[str, torch.Tensor] = {}

    def _probed(self):
        """``(name, group, row, member)`` of every block the probe covers."""
        for group in self.optimizer.factor_groups():
            if not all(group.factored) or math.prod(group.shape) > self.max_numel:
                continue
            for row, member in enumerate(group.members):
                yield self.optimizer.block_name(member), group, row, member

    def after_step(self, optimizer, args, kwargs) -> None:
        """The optimizer's step post-hook: :meth:`update`. A bound method, not a closure, so that a
        copy of the optimizer (``copy.deepcopy``) feeds a probe of its own."""
        self.update()

    def update(self) -> None:
        """Fold the current gradients into ``C`` (call once per optimizer step, after it)."""
        for name, group, _, member in self._probed():
            if member.param.grad is None or self._skipped(group):
                continue
            vec = member.grad_block().reshape(-1).to(group.state_dtype)
            if not bool(torch.isfinite(vec).all()):  # the optimizer skipped this step; so does C
                continue
            beta = self._beta(group)
            moment = self.moments.get(name)
            if moment is None:
                moment = self.moments[name] = torch.zeros(vec.numel(), vec.numel(), dtype=vec.dtype, device=vec.device)
            moment.mul_(beta if beta < 1 else 1.0).addr_(vec, vec, alpha=1.0 - beta if beta < 1 else 1.0)

    def _skipped(self, group) -> bool:
        """Whether the last step skipped ``group``'s parameter group: a NaN anywhere in it skips the
        whole group, finite blocks included (one host read of the optimizer's flag)."""
        finite = getattr(self.optimizer, "step_finite", {}).get(group.param_group)
        return finite is not None and not bool(finite)

    def _beta(self, group) -> float:
        options = self.optimizer.param_groups[group.param_group]
        beta = options.get("shampoo_beta")
        return beta if beta is not None else options["betas"][1]

    def errors(self) -> dict[str, float]:
        """``kron/approx_error/{shampoo,corrected}/<block>`` for every block seen so far."""
        metrics = {}
        for name, group, row, _ in self._probed():
            moment = self.moments.get(name)
            if moment is None or not bool(moment.trace() > 0):
                continue
            target = _unit_trace(moment)
            bases = [group.basis(dim)[row] for dim in range(group.order)]
            factors = [self._factor(group, dim, row, basis) for dim, basis in enumerate(bases)]
            metrics[f"{PREFIX}/approx_error/shampoo/{name}"] = _relative_error(target, reduce(torch.kron, factors))
            if "exp_avg_sq" in group.tensors:
                kron_basis = reduce(torch.kron, bases)
                corrected = kron_basis * group.tensors["exp_avg_sq"][row].reshape(1, -1) @ kron_basis.mT
                metrics[f"{PREFIX}/approx_error/corrected/{name}"] = _relative_error(target, corrected)
        return metrics

    def _factor(self, group, dim: int, row: int, basis: torch.Tensor) -> torch.Tensor:
        """``Q L Q^T`` of one member in parameter coordinates, in the probe's dtype."""
        factor = self.optimizer.factor_in_basis(group, dim, row).to(basis.dtype)
        return basis @ factor @ basis.mT


def _unit_trace(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.trace().clamp_min(1e-30)


def _relative_error(target: torch.Tensor, approximation: torch.Tensor) -> float:
    difference = torch.linalg.matrix_norm(target - _unit_trace(approximation))
    return float(difference / torch.linalg.matrix_norm(target))
