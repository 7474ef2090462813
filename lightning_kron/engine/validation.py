"""Argument checks shared by every optimizer and policy.

Each check raises ``ValueError`` naming the argument, so a bad hyperparameter fails at
construction with a message the user can act on instead of surfacing as NaNs later.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Union

import torch


def is_number(value: object) -> bool:
    """A real number (Python's or numpy's), not a bool (``True`` is no learning rate) and not a
    string from a config."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's bool is no Real


def check_nonnegative(name: str, value: float) -> float:
    """A finite number >= 0 (learning rates, eps, weight decay)."""
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: float, *, closed_right: bool = False) -> float:
    """A decay rate in [0, 1) (or [0, 1] when ``closed_right``)."""
    if not is_number(value) or not (0 <= value and (value <= 1 if closed_right else value < 1)):
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_betas(betas: Iterable[float]) -> tuple[float, float]:
    """Two decay rates, each in [0, 1)."""
    # any iterable (a list from a config, OmegaConf's ListConfig); a lone number or string is not a pair
    betas = tuple(betas) if isinstance(betas, Iterable) and not isinstance(betas, str) else (betas,)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return (check_unit_interval("betas[0]", betas[0]), check_unit_interval("betas[1]", betas[1]))


def check_positive_int(name: str, value: int, *, minimum: int = 1) -> int:
    """An integer >= ``minimum``, Python's or numpy's (bools are refused: ``True`` is not a step
    count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_flag(name: str, value: bool) -> bool:
    """``True`` or ``False`` (a string such as "false" from a config would otherwise be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """One of a fixed set of strings."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_dtype(name: str, value: Union[None, str, torch.dtype], allowed: Iterable[torch.dtype],
                modes: tuple[str, ...] = ()) -> Union[None, str, torch.dtype]:
    """``None``, one of ``allowed``, given as a ``torch.dtype`` or by name ("bfloat16",
    "torch.bfloat16", "bf16"), so YAML and command-line configs can set it, or one of the named
    ``modes`` (returned as given).

    >>> check_dtype("rotation_dtype", "bf16", (torch.bfloat16,))
    torch.bfloat16
    """
    if value in modes:
        return value
    allowed = tuple(allowed)
    resolved = value
    if isinstance(value, str):
        short = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
        attribute = value.removeprefix("torch.")
        resolved = getattr(torch, short.get(attribute, attribute), None)
    if value is not None and resolved not in allowed:
        names = ", ".join([repr(mode) for mode in modes] + [str(dtype) for dtype in allowed])
        raise ValueError(f"{name} must be None or one of {names}, got {value!r}")
    return resolved
