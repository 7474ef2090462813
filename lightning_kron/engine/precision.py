"""Matmul precision of the optimizer's own CUDA matmuls, and TF32's rounding emulated on a CPU.

On CUDA the rotations may run on TF32 tensor cores (``rotation_dtype="tf32"``, the CUDA default)
while the statistics, the refresh and everything the staleness criterion reads stay IEEE fp32
(TF32 there corrupts small eigenvalue estimates). PyTorch has no per-op switch, only the
process-wide ``torch.backends.cuda.matmul.fp32_precision``; :func:`cuda_matmul_precision` sets it
for a block of our ops and restores exactly the value it found, so the user's own setting (by the
new API, the legacy ``allow_tf32`` or ``torch.set_float32_matmul_precision``) is what their model
sees before and after every step. On a CPU there is no TF32: :func:`round_to_tf32` reproduces what
a tensor core does to a matmul's inputs, so a CPU run shows a GPU run's numerics (slower than fp32:
for tests and studies, not for speed).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

TF32_DROPPED_BITS = 13  # fp32 keeps 23 mantissa bits, TF32 10


@contextmanager
def cuda_matmul_precision(precision: str, on_cuda: bool) -> Iterator[None]:
    """CUDA fp32 matmuls in ``precision`` ("ieee" or "tf32") inside the block (nothing when not
    ``on_cuda``); the setting found is restored on exit."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision if on_cuda else precision
    if before == precision:
        yield
        return
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) rounded to TF32's 10-bit mantissa, to nearest with ties away from zero (what
    ``cvt.rna.tf32.f32`` does to a tensor-core input), still stored as fp32. Inf stays Inf."""
    half = 1 << (TF32_DROPPED_BITS - 1)
    bits = x.contiguous().view(torch.int32)
    return ((bits + half) & ~((1 << TF32_DROPPED_BITS) - 1)).view(torch.float32)


def tf32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm`` with both inputs rounded to TF32 and products accumulated in fp32: a TF32
    tensor-core ``bmm`` emulated on a CPU (up to the order of the accumulation)."""
    return torch.bmm(round_to_tf32(a), round_to_tf32(b))
