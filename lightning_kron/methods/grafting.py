"""Learning-rate grafting: borrow a simpler method's step size, keep Shampoo's direction.

Per block, ``D = P(M) * ||D_graft||_F / ||P(M)||_F`` where ``D_graft`` is the direction the grafted
method would take from the same filtered gradient ``M`` (docs/algorithms.md §1). Each grafted method
keeps its own diagonal accumulator ``graft_sq`` in parameter coordinates.
"""

from __future__ import annotations

import torch

GRAFTS = ("adam", "adagrad", "rmsprop", "sgd", "none")


def graft_direction(kind: str, momentum: torch.Tensor, grad: torch.Tensor, accumulator: torch.Tensor | None,
                    beta2: float, eps: float, bias_correction2: torch.Tensor,
                    keep2: float | torch.Tensor | None = None) -> torch.Tensor:
    """The grafted method's direction; updates ``accumulator`` in place. ``keep2`` (default
    ``beta2``) is what the EMA multiplies the accumulator by: 1 on a skipped step, whose ``grad`` is 0."""
    if kind == "sgd":
        return momentum
    if kind == "adagrad":
        accumulator.addcmul_(grad, grad)
        return momentum / (accumulator.sqrt() + eps)
    accumulator.mul_(beta2 if keep2 is None else keep2).addcmul_(grad, grad, value=1.0 - beta2)
    second = accumulator / bias_correction2 if kind == "adam" else accumulator
    return momentum / (second.sqrt() + eps)


def graft_norm(direction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Rescale each block of ``direction`` to the Frobenius norm of the matching block of ``reference``."""
    dims = tuple(range(1, direction.dim()))
    own = torch.linalg.vector_norm(direction, dim=dims, keepdim=True)
    target = torch.linalg.vector_norm(reference, dim=dims, keepdim=True)
    return direction * torch.where(own > 0, target / own.clamp_min(torch.finfo(own.dtype).tiny), 0.0)
