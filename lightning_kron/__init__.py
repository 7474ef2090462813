"""lightning_kron: Kronecker-factored optimizers (SOAP, EShampoo, Shampoo, KrADagrad) for PyTorch,
with a Lightning callback that schedules per-factor eigenbasis refreshes and logs their health.

The optimizers are plain ``torch.optim.Optimizer`` subclasses and importing this package does not
import Lightning; ``KronCallback`` is loaded on first access. The subpackages are layers, each
importing only the ones below it: ``engine`` (blocks, factor groups, the staleness criterion, the
basis refresh; pure torch) <- ``scheduling`` (refresh policies and the scheduler) <- ``methods``
(the optimizers and the method registry) <- ``lightning`` (the callback; the only Lightning
imports). See docs/design.md.
"""

from lightning_kron.engine.factor_info import FactorInfo
from lightning_kron.methods.kradagrad import KrADagrad
from lightning_kron.methods.kron_optimizer import KronOptimizer
from lightning_kron.methods.shampoo import Shampoo
from lightning_kron.methods.soap import SOAP, EShampoo
from lightning_kron.scheduling.budget_policies import BudgetRefresh
from lightning_kron.scheduling.policies import AdaptiveRefresh, FixedRefresh, RefreshPolicy
from lightning_kron.scheduling.tolerance_schedule import LinearRamp, TighterEarly

__all__ = ["SOAP", "EShampoo", "Shampoo", "KrADagrad", "KronCallback", "KronOptimizer", "FixedRefresh", "AdaptiveRefresh", "BudgetRefresh", "RefreshPolicy", "TighterEarly", "LinearRamp", "FactorInfo"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Load ``KronCallback`` (which imports Lightning) only when first used."""
    if name == "KronCallback":
        from lightning_kron.lightning.callback import KronCallback

        return KronCallback
    raise AttributeError(f"module 'lightning_kron' has no attribute {name!r}")
