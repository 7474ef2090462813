"""lightning_kron: Kronecker-factored optimizers (SOAP, EShampoo, Shampoo, KrADagrad) for PyTorch,
with a Lightning callback that schedules per-factor eigenbasis refreshes and logs their health.

The optimizers are plain ``torch.optim.Optimizer`` subclasses and importing this package does not
import Lightning; ``KronCallback`` is loaded on first access.
"""

from lightning_kron.kron_optimizer import KronOptimizer
from lightning_kron.refresh import AdaptiveRefresh, FixedRefresh
from lightning_kron.shampoo import Shampoo
from lightning_kron.soap import SOAP, EShampoo
from lightning_kron.telemetry import FactorInfo
from lightning_kron.tolerance_schedule import LinearRamp, TighterEarly

__all__ = ["SOAP", "EShampoo", "Shampoo", "KrADagrad", "KronCallback", "KronOptimizer", "FixedRefresh", "AdaptiveRefresh", "TighterEarly", "LinearRamp", "FactorInfo"]
__version__ = "0.1.0"

_LAZY = {
    "KrADagrad": ("lightning_kron.kradagrad", "KrADagrad"),
    "KronCallback": ("lightning_kron.callback", "KronCallback"),
}


def __getattr__(name: str):
    """Load ``KronCallback`` (which imports Lightning) and ``KrADagrad`` only when first used."""
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'lightning_kron' has no attribute {name!r}")
