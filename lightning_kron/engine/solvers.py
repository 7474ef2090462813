"""Eigenbasis solvers that work *inside* the current basis, with a fallback chain that never crashes.

Every factor is stored as ``B = Q^T L Q``. A refresh therefore never forms ``L``: it finds a rotation
``P`` of the small matrix ``B`` and then ``Q <- Q P`` and ``B <- P^T B P``. Two ways (docs/algorithms.md §3):

* ``eigh``: ``B = P diag(w) P^T`` exactly, so ``B <- diag(w)``.
* warm-started QR (power) step: with the basis sorted by ``diag(B)``, ``orth(L Q) = Q orth(B)``
  because ``L Q = Q B`` and Q is orthogonal. So one step is the QR of B itself, ``B = P R``, after
  which ``P^T B P = R P``: literally one step of the QR algorithm, whose termination test (the
  off-diagonal mass of B) is the staleness criterion. This avoids the 4 d^3 of forming ``L Q`` and
  the rotation ``Q_old^T Q_new`` and of re-expressing B. ``orth`` is Householder QR or Cholesky-QR
  (two or three rounds of ``R = chol(Y^T Y); Y <- Y R^-1``, mostly matmuls, much faster on a GPU).
* Cholesky-QR2 needs ``cond(Y)`` well below ``u^(-1/2)``, and B is often rank-deficient (fewer
  gradients than its size). So the Cholesky step is *shifted*: it factors ``B + delta I = P R``,
  which is the QR algorithm's step with shift ``-delta``: the same eigenvectors, B re-expressed
  exactly as ``P^T B P = R P - delta I``; only the separation of eigenvalues below ~delta slows
  (docs/algorithms.md). ``"cholesky_qr3"`` (the CUDA default) is *shifted Cholesky-QR3* (Fukaya et
  al. 2020): a first round on ``Y^T Y + s I`` with a tiny ``s`` brings a ``cond(Y)`` far above
  Cholesky-QR2's limit (~2e4 in fp32 at d = 1024) down to what two more rounds orthonormalise, so
  its ``delta`` is 400-900 ``u ||B||_F`` (d = 64..1024, :func:`cholesky_qr3_step_shift`).
  ``"cholesky_qr2"`` needs ``cond(Y) <= 411`` in fp32, a ``delta`` of 0.24% of ``||B||_inf``
  (:func:`cholesky_qr2_step_shift`). Householder takes no shift. Both Cholesky variants report the
  members they could still not orthonormalise (non-finite ones) on the device; those keep their
  basis, and the optimizer refreshes just them again with Householder after one host read for the
  whole refresh step (``refresh_fallbacks`` of ``methods/owner_interface.py``).

Failure handling: a batched call that raises or returns non-finite values is retried member by
member with growing diagonal damping, then in fp64; a member that still fails gets the identity
rotation (it keeps its old basis) and is reported in the ``ok`` mask so the caller can count it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

DAMPING_STEPS = (1e-6, 1e-4)
#: the orthonormalizer a failed member is refreshed again with
FALLBACK = {"cholesky_qr2": "householder", "cholesky_qr3": "householder"}
#: ``||Q^T Q - I||_F`` before Cholesky-QR's last round: the last round repairs less
CHOLESKY_QR2_GRAM_TOLERANCE = 0.5
#: Cholesky-QR2's shifted QR step: ``delta / ||B||_inf``, in units of ``sqrt(u)`` (u: the unit roundoff)
QR_SHIFT_PER_SQRT_ROUNDOFF = 10.0
#: the largest ``cond(Y)`` that Cholesky-QR2 orthonormalises, in units of ``u^(-1/2)``: ``u cond^2 <=
#: 1/100`` (in fp32 411; random rank-deficient B failed its Gram check from cond ~600 on, passed to 432)
CHOLESKY_QR2_CONDITION_PER_INVERSE_SQRT_ROUNDOFF = 0.1
#: Fukaya et al.'s bound on the first round of shifted Cholesky-QR:
#: ``cond(Q1) <= 3.24 sqrt(1 + s / sigma_min(Y)^2)``
SHIFTED_CHOLESKY_QR_CONDITION_FACTOR = 3.24


@dataclass(frozen=True)
class Orthonormalizer:
    """How a QR step orthonormalises its ``[N, d, d]`` input.

    ``factor``: ``y -> (q, r, solved)``; ``solved`` (a per-member bool on the device, or None when
    the method cannot fail short of non-finite values) marks the members whose ``q`` can be trusted.
    ``shift``: ``B -> delta`` per member, or None: the step then factors ``B + delta I`` instead of B
    (for a method that needs ``cond(Y)`` bounded, see :func:`cholesky_qr3_step_shift`).
    """

    factor: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]
    shift: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _finite_per_member(x: torch.Tensor) -> torch.Tensor:
    """One reduction instead of an elementwise isfinite pass: a NaN or Inf anywhere makes the sum
    non-finite (a finite overflow would be flagged too, which only means a harmless fallback)."""
    return torch.isfinite(x.sum(dim=tuple(range(1, x.dim()))))


def _eye_like(stack: torch.Tensor) -> torch.Tensor:
    return torch.eye(stack.shape[-1], dtype=stack.dtype, device=stack.device).expand_as(stack)


def _sorted_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    order = eigenvalues.argsort(dim=-1, descending=True)
    vectors = torch.gather(vectors, -1, order.unsqueeze(-2).expand_as(vectors))
    return torch.gather(eigenvalues, -1, order), vectors


def _damped(matrix: torch.Tensor, relative: float) -> torch.Tensor:
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)
    return matrix + relative * scale[..., None, None] * _eye_like(matrix)


def _eigh_one(matrix: torch.Tensor) -> torch.Tensor | None:
    """Eigenvectors of one ``[d, d]`` matrix through the fallback chain; ``None`` if all failed."""
    attempts = [(matrix, 0.0)] + [(matrix, d) for d in DAMPING_STEPS] + [(matrix.double(), DAMPING_STEPS[-1])]
    for candidate, damping in attempts:
        try:
            _, vectors = _sorted_eigh(_damped(candidate, damping) if damping else candidate)
        except RuntimeError:
            continue
        if torch.isfinite(vectors).all():
            return vectors.to(matrix.dtype)
    return None


def eigh_in_basis(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact refresh of a ``[N, d, d]`` stack: returns ``(rotation, new_stats, ok)``.

    ``eigh`` reads only the lower triangle, so round-off asymmetry of B needs no symmetrising pass.
    """
    symmetric = stats
    try:
        eigenvalues, vectors = _sorted_eigh(symmetric)
        ok = _finite_per_member(vectors) & _finite_per_member(eigenvalues)
        if bool(ok.all()):
            return vectors, torch.diag_embed(eigenvalues), ok
    except RuntimeError:
        pass
    return _eigh_member_by_member(symmetric)


def _eigh_member_by_member(symmetric: torch.Tensor):
    rotations, ok = [], []
    for matrix in symmetric:
        vectors = _eigh_one(matrix) if torch.isfinite(matrix).all() else None
        ok.append(vectors is not None)
        rotations.append(torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device) if vectors is None else vectors)
    rotation, solved = torch.stack(rotations), torch.tensor(ok, device=symmetric.device)
    # a failed member keeps its B exactly (I B I would turn an Inf entry into NaN everywhere: 0 * inf)
    return rotation, torch.where(solved[:, None, None], rotation.mT @ symmetric @ rotation, symmetric), solved


def householder_qr(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QR with signs fixed so ``diag(R) >= 0``, which makes the factorisation unique and deterministic.

    ``geqrf`` + ``householder_product`` is what ``torch.linalg.qr`` runs, minus its copies: 20%
    faster on a batch of 1024^2 matrices on a CPU core. R is read off the (column-major) geqrf
    output through its row-major transpose, where ``tril`` is the fast direction.
    """
    reflectors, scales = torch.geqrf(y)
    q = torch.linalg.householder_product(reflectors, scales)
    r = reflectors.mT.tril().mT
    signs = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, 1.0, signs)
    return q * signs.unsqueeze(-2), r * signs.unsqueeze(-1)


def _cholesky_qr(y: torch.Tensor, rounds: int, gram_shift: Optional[torch.Tensor] = None):
    """``rounds`` rounds of ``R = chol(Y^T Y); Y <- Y R^-1``, batched, no host sync; ``gram_shift``
    (``[N]``) is added to the diagonal of the first round's Gram matrix. ``solved``: every round's
    Cholesky succeeded (``info``), the results are finite, and the Gram matrix of the last round
    (formed anyway) is within ``CHOLESKY_QR2_GRAM_TOLERANCE`` of I, the condition under which one
    round orthonormalises."""
    q, r = y, _eye_like(y)
    solved = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    for round_ in range(rounds):
        gram = q.mT @ q
        if round_ == 0 and gram_shift is not None:
            gram.diagonal(dim1=-2, dim2=-1).add_(gram_shift[:, None])
        if round_ == rounds - 1:
            solved &= torch.linalg.matrix_norm(gram - _eye_like(gram)) < CHOLESKY_QR2_GRAM_TOLERANCE
        upper, info = torch.linalg.cholesky_ex(gram, upper=True)
        solved &= info == 0
        q = torch.linalg.solve_triangular(upper, q, upper=True, left=False)
        r = upper @ r
    return q, r, solved & _finite_per_member(q) & _finite_per_member(r)


def cholesky_qr2(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Cholesky-QR2 with no host sync: ``(q, r, solved)``.

    ``solved`` is False for a member whose Cholesky failed (``cholesky_ex`` reports it on the
    device), whose result is not finite, or whose first round left ``Q1`` too far from orthogonal
    (``||Q1^T Q1 - I||_F >= 0.5``, read off the Gram matrix that round two forms anyway): round two
    brings Q to orthogonality only when ``cond(Y)`` is below about ``u^(-1/2)``, which that Gram
    measures. Such members' ``q`` is garbage; the caller must not use it.
    """
    return _cholesky_qr(y, 2)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def cholesky_qr3_gram_shift(y: torch.Tensor) -> torch.Tensor:
    """Shifted Cholesky-QR3's ``s`` (``[N]``): ``11 (sqrt(m) + sqrt(n + 1)) u ||Y||_F^2``.

    Fukaya et al. take ``s = 11 (m n + n (n + 1)) u ||Y||_2^2``, which dominates the worst-case
    rounding of the Gram matrix (``gamma_m ||Y||_F^2 <= m u n ||Y||_2^2``) and of its Cholesky
    (``gamma_(n+1) n ...``), so that the Cholesky of ``Y^T Y + s I`` cannot break down. For d x d
    fp32 factors that is useless: at n = 1024 it is 1.4 ``||Y||_2^2``, above the spectrum it should
    sit under (their analysis needs ``m n u <= 1/64``, n <= 512). Two replacements: ``||Y||_F^2``
    for its bound ``n ||Y||_2^2`` (the rounding of ``Y^T Y`` scales with the column norms), and the
    probabilistic ``gamma_m ~ sqrt(m) u`` (Higham and Mary 2019; the same route as Guan and Fan's
    ``||X||_F``-based probabilistic s) for the worst-case ``m u``. That is ``4.2e-5 ||Y||_F^2`` at
    n = 1024 in fp32. A breakdown would still be caught (``info``) and fall back to Householder.
    """
    m, n = y.shape[-2:]
    return 11 * (m**0.5 + (n + 1) ** 0.5) * _unit_roundoff(y.dtype) * torch.linalg.matrix_norm(y).square()


def shifted_cholesky_qr3(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched shifted Cholesky-QR3 (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020) with no
    host sync: ``(q, r, solved)``, ``R = R3 R2 R1``.

    Round one factors ``Y^T Y + s I`` (:func:`cholesky_qr3_gram_shift`): its Cholesky runs to
    completion whatever ``cond(Y)``, and ``Q1 = Y R1^-1`` has singular values ``~ sigma /
    sqrt(sigma^2 + s)``, so ``cond(Q1) <= 3.24 sqrt(1 + s / sigma_min(Y)^2)`` (their bound), about
    ``u^(-1/2)`` even for ``cond(Y) ~ 1/u``. Rounds two and three are Cholesky-QR2 on ``Q1``. The
    flags are Cholesky-QR2's: each round's ``info``, finite results and ``||Q2^T Q2 - I||_F < 0.5``
    before the last round.
    """
    return _cholesky_qr(y, 3, cholesky_qr3_gram_shift(y))


def _householder(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    return (*householder_qr(y), None)


def _nonzero_or_one(scale: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """An all-zero B gets ``delta = 1``: Y is then I (times the sort's permutation) and B stays ~0."""
    return torch.where(scale > 0, delta, 1.0)


def cholesky_qr2_step_shift(stats: torch.Tensor) -> torch.Tensor:
    """The shift ``delta`` (``[N]``) that lets Cholesky-QR2 take a QR step of any PSD B: ``c ||B||_inf``.

    For PSD B, ``lambda_max <= ||B||_inf`` (any induced norm bounds it) and ``lambda_min >= 0``, so
    ``cond(B + delta I) <= (lambda_max + delta) / delta <= 1 + 1/c`` whatever B's rank. Cholesky-QR2
    loses about ``u cond^2`` of orthogonality in round one, and round two repairs it only while that
    is well below 1: ``c = 10 sqrt(u)`` bounds it by ``u (1 + 1/c)^2 ~ 1/100`` (``cond <= 411`` in
    fp32, ``1e7`` in fp64). Rank-deficient B in random bases failed the Gram check from cond ~600 on
    (d = 256..2048). On a warm (nearly diagonal) B, ``||B||_inf`` is within 1.5x of
    ``lambda_max`` (gpt-mini), so delta is ~0.3% of ``lambda_max`` in fp32.
    """
    relative = QR_SHIFT_PER_SQRT_ROUNDOFF * _unit_roundoff(stats.dtype) ** 0.5
    scale = torch.linalg.matrix_norm(stats, ord=float("inf"))
    return _nonzero_or_one(scale, relative * scale)


def cholesky_qr3_step_shift(stats: torch.Tensor) -> torch.Tensor:
    """The shift ``delta`` (``[N]``) that lets shifted Cholesky-QR3 take a QR step of any PSD B:
    ``c ||B||_F / (1 - c sqrt(d))``, ``c = 10 * 3.24 sqrt(beta) u``, ``beta = 11 (sqrt(d) +
    sqrt(d + 1))``.

    Derivation. Y = (B + delta I) Pi has ``sigma_min(Y) >= delta`` (B PSD; its computed
    eigenvalues are >= -u ||B||, negligible against delta). Round one leaves ``cond(Q1) ~ 3.24
    sqrt(s) / sigma_min(Y)`` (:func:`shifted_cholesky_qr3`), and rounds two and three orthonormalise
    Q1 when ``cond(Q1) <= 0.1 u^(-1/2)`` (Cholesky-QR2's limit, ``u cond^2 <= 1/100``). With ``s =
    beta u ||Y||_F^2`` (:func:`cholesky_qr3_gram_shift`) that asks for ``delta >= 32.4 sqrt(beta) u
    ||Y||_F``, and ``||Y||_F <= ||B||_F + sqrt(d) delta`` gives the formula. In fp32: ``c = 5.1e-5``
    at d = 1024 (``2.5e-5`` at d = 64), so ``cond(B + delta I) <= 1 + 1/c ~ 2e4`` whatever B's rank,
    against Cholesky-QR2's 411. On gpt-mini's factors ``delta`` is 3.8e-5 of ``lambda_max``
    (median), 80x below Cholesky-QR2's, and a ``delta`` 50x below this one still solved all 52 of
    them (150x below: 12 failed; measured once, not scripted).
    """
    size = stats.shape[-1]
    beta = 11 * (size**0.5 + (size + 1) ** 0.5)
    c = (SHIFTED_CHOLESKY_QR_CONDITION_FACTOR / CHOLESKY_QR2_CONDITION_PER_INVERSE_SQRT_ROUNDOFF
         * beta**0.5 * _unit_roundoff(stats.dtype))
    scale = torch.linalg.matrix_norm(stats)
    return _nonzero_or_one(scale, c / (1 - c * size**0.5) * scale)


def _plus_diagonal(stats: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    shifted = stats.clone()  # keeps the stack's layout, which rows_in_order relies on
    shifted.diagonal(dim1=-2, dim2=-1).add_(delta[:, None])
    return shifted


ORTHONORMALIZERS: dict[str, Orthonormalizer] = {
    "householder": Orthonormalizer(_householder),
    "cholesky_qr2": Orthonormalizer(cholesky_qr2, shift=cholesky_qr2_step_shift),
    "cholesky_qr3": Orthonormalizer(shifted_cholesky_qr3, shift=cholesky_qr3_step_shift),
}


def qr_step_in_basis(stats: torch.Tensor, orth: Orthonormalizer,
                     order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One warm power step on a ``[N, d, d]`` stack: returns ``(rotation, new_stats, ok)``.

    With ``order`` (the columns ranked by estimated eigenvalue), the step orthonormalises ``B Pi``
    (B with its columns in that order) rather than the symmetrically permuted ``Pi^T B Pi``: the
    two QRs share R and differ only by the row order of their Q, so the rotation comes out already
    relative to the unsorted basis and ``P^T B P = R (Pi^T P)`` needs only a row permutation of P.
    Rows, unlike the columns of a row-major stack, are contiguous, and B is symmetric, so
    ``B Pi = (Pi^T B)^T`` costs one row copy instead of two gathers (and a third to unsort P).

    A shifted orthonormalizer factors ``(B + delta I) Pi = P R`` instead; then
    ``P^T (B + delta I) P = R (Pi^T P)``, and subtracting ``delta I`` from it is the exact change of
    basis of B (an absolute error of ``u delta``, below the ``u ||B||`` of the product itself).
    """
    delta = None if orth.shift is None else orth.shift(stats)
    try:
        y = stats if delta is None else _plus_diagonal(stats, delta)
        rotation, upper, solved = orth.factor(y if order is None else rows_in_order(y, order).mT)
        new_stats = symmetric_product_of_upper(upper, rotation if order is None else rows_in_order(rotation, order))
        if delta is not None:
            new_stats.diagonal(dim1=-2, dim2=-1).sub_(delta[:, None])
        ok = _finite_per_member(rotation) & _finite_per_member(new_stats)
        if solved is not None:
            ok &= solved
    except RuntimeError:
        rotation, new_stats = _eye_like(stats), stats
        ok = torch.zeros(stats.shape[0], dtype=torch.bool, device=stats.device)
    keep = ok[:, None, None]  # failed members keep their basis; no host round trip to find them
    rotation, new_stats = torch.where(keep, rotation, _eye_like(stats)), torch.where(keep, new_stats, stats)
    return rotation, new_stats, ok


def descending_diagonal_order(stats: torch.Tensor) -> torch.Tensor:
    """Positions of ``diag(B)`` from largest to smallest estimated eigenvalue, ``[N, d]``."""
    return stats.diagonal(dim1=-2, dim2=-1).argsort(dim=-1, descending=True)


def rows_in_order(stack: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``stack[n][order[n]]`` for every member. A row-major stack copies whole rows; a column-major
    one (what LAPACK returns) is gathered along the rows of its row-major transpose instead."""
    if stack.mT.is_contiguous():
        return torch.gather(stack.mT, -1, order.unsqueeze(-2).expand_as(stack)).mT
    members = torch.arange(stack.shape[0], device=stack.device).unsqueeze(-1)
    return stack[members, order]


def symmetric_product_of_upper(upper: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``upper @ x`` for an upper-triangular ``upper`` whose product with ``x`` is symmetric (``R P``
    of a QR step is ``P^T B P``): only the row blocks' parts on and above the block diagonal are
    multiplied, skipping R's zero blocks, and the rest is mirrored. Half the flops of a full
    matmul at four blocks, and the stored factor comes out exactly symmetric.
    """
    size = x.shape[-1]
    blocks = 4 if size >= 512 else 2 if size >= 128 else 1
    if blocks == 1:
        product = upper @ x
        return 0.5 * (product + product.mT)
    edges = [size * k // blocks for k in range(blocks + 1)]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # row-major, like the stored factor
    for start, stop in zip(edges[:-1], edges[1:]):
        out[:, start:stop, start:] = upper[:, start:stop, start:] @ x[:, start:, start:]
        diagonal = out[:, start:stop, start:stop]
        diagonal.copy_(0.5 * (diagonal + diagonal.mT))
    for start, stop in zip(edges[1:-1], edges[2:]):
        out[:, start:stop, :start] = out[:, :start, start:stop].mT
    return out
