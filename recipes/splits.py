"""Deterministic train/validation splits shared by the text and image data modules.

Two rules, both independent of the training seed so every run and every optimizer validates on
exactly the same examples:

- by name (files): rank items by a hash of their name and validate on the first ``val_fraction``
  of them; an item keeps its side when others are added or removed;
- by position (arrays without names): a permutation from a fixed seed.

>>> split_by_name(["a.py", "b.py", "c.py", "d.py"], 0.25)
([0, 2, 3], [1])
>>> split_by_position(5, 0.4)
([1, 2, 3], [0, 4])
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

SPLIT_SEED = 1234


def _validation_count(total: int, val_fraction: float) -> int:
    """At least one item on each side whenever there are two or more."""
    return min(total - 1, max(1, math.ceil(val_fraction * total)))


def split_by_name(names: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of training and validation items (each sorted), chosen by a hash of the name."""
    ranked = sorted(range(len(names)), key=lambda index: hashlib.sha1(names[index].encode()).hexdigest())
    n_val = _validation_count(len(names), val_fraction)
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


def split_by_position(total: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of training and validation items (each sorted), from a fixed-seed permutation."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_val = _validation_count(total, val_fraction)
    return sorted(order[n_val:]), sorted(order[:n_val])
