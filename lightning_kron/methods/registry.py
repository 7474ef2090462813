"""The one list of Kronecker methods, read by everything that offers a choice of method.

``KronCallback(method=...)``, the conversion of a module's AdamW (``lightning/adam_conversion.py``),
the recipes' optimizer names, ``scripts/compare.py``, ``scripts/bench_step.py`` and the shared
optimizer test matrix (``tests/conftest.py``) all iterate :data:`METHODS`; adding a method is a
class in ``methods/`` plus one :class:`MethodSpec` here (docs/design.md, "How to add a method").

>>> sorted(METHODS)
['eshampoo', 'kradagrad', 'shampoo', 'soap']
>>> method("soap").optimizer.__name__, method("kradagrad").adam_eps_option
('SOAP', 'graft_eps')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

import torch

from lightning_kron.methods.kradagrad import KrADagrad
from lightning_kron.methods.shampoo import Shampoo
from lightning_kron.methods.soap import SOAP, EShampoo
from lightning_kron.scheduling.policies import AdaptiveRefresh, FixedRefresh


@dataclass(frozen=True)
class Variant:
    """A named option set of a method worth testing and benchmarking on its own.

    ``lr_scale`` is the factor between an AdamW-scale learning rate and the rate this variant
    wants (ungrafted KrADagrad takes AdaGrad-normalised steps: about 10x).
    """

    options: Mapping[str, Any] = field(default_factory=dict)
    lr_scale: float = 1.0


@dataclass(frozen=True)
class MethodSpec:
    """Everything the layers above need to know about one method.

    Args:
        name: what users type (``KronCallback(method=name)``, the recipes' ``optimizer.name``).
        label: the readable name in tables and plots.
        optimizer: the ``torch.optim.Optimizer`` class.
        adam_eps_option: the keyword that receives AdamW's ``eps`` on conversion: ``"eps"`` where
            the method runs Adam in the eigenbasis (the number means the same), ``"graft_eps"``
            where the method's own ``eps`` is something else (Shampoo's eigenvalue damping,
            KrADagrad's initial inverse) and AdamW's goes to the Adam graft.
        from_adam: options a conversion from AdamW adds (KrADagrad is given ``graft="adam"`` so
            AdamW's learning rate carries over); the user's ``optimizer_options`` win.
        lr, betas: the recipes' defaults when a config leaves them unset (``None``: the class's own).
        recipe_refresh: the refresh the recipes give it unless told otherwise: ``"fixed"`` (every
            ``refresh_every`` steps), ``"budget"`` (``BudgetRefresh``: every=``refresh_budget_every``'s
            count, front-loaded over the run's known length, most stale factors first; the default
            chosen by scripts/refresh_study.py, docs/refresh-study.md), ``"adaptive"`` (staleness
            above ``tolerance``) or ``None`` (the class's own default).
        variants: named option sets that the shared test matrix and the benchmarks run.
    """

    name: str
    label: str
    optimizer: type[torch.optim.Optimizer]
    adam_eps_option: str = "eps"
    from_adam: Mapping[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None
    betas: Optional[tuple[float, float]] = None
    recipe_refresh: Optional[str] = None
    variants: Mapping[str, Variant] = field(default_factory=lambda: {"default": Variant()})


METHODS: Mapping[str, MethodSpec] = MappingProxyType({spec.name: spec for spec in (
    MethodSpec("soap", "SOAP", SOAP, lr=3e-3, betas=(0.95, 0.95), recipe_refresh="budget", variants={
        "budget": Variant(), "fixed": Variant({"refresh": FixedRefresh(every=10)}),
        "adaptive": Variant({"refresh": AdaptiveRefresh(tolerance=0.05)}),
    }),
    MethodSpec("eshampoo", "EShampoo", EShampoo, lr=1e-3, betas=(0.9, 0.999), recipe_refresh="budget"),
    MethodSpec("shampoo", "Shampoo + Adam graft", Shampoo, adam_eps_option="graft_eps",
               lr=1e-3, betas=(0.9, 0.999), recipe_refresh="fixed",
               variants={"adam_graft": Variant({"graft": "adam"})}),
    MethodSpec("kradagrad", "KrADagrad", KrADagrad, adam_eps_option="graft_eps", from_adam={"graft": "adam"},
               recipe_refresh="fixed", variants={
                   "star": Variant(lr_scale=10.0),
                   "alternating": Variant({"variant": "alternating"}, lr_scale=10.0),
                   "star_adam_graft": Variant({"graft": "adam"}),
               }),
)})


def method(name: str) -> MethodSpec:
    """The spec of ``name``; a one-line ValueError naming the choices when it is unknown."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
