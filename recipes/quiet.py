"""Keep dependencies' deprecation warnings and vendor tips out of the entry points' output.

Lightning and torch print ``FutureWarning``/``DeprecationWarning`` lines about their own internals
(e.g. ``isinstance(treespec, LeafSpec)`` from ``lightning/pytorch/utilities/_pytree.py``, which
also breaks ``kron-compare``'s progress bar) and Lightning logs advertising "💡 Tip" lines
(litlogger, litmodels). Nothing a user of these recipes can act on. :func:`quiet_dependencies` hides
them while an entry point runs; warnings raised by this project's own code still show. It is applied
by ``kron-gpt``/``kron-vision``/``kron-compare``, never when ``lightning_kron`` is imported.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator

OWN_MODULES = r"(lightning_kron|recipes|scripts)(\..*)?$"
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
TIP = re.compile(r"^\W*tip\b", re.IGNORECASE)  # "💡 Tip: For seamless cloud logging ..."
LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
           "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TIP.match(record.getMessage())


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Inside: dependencies' deprecation warnings are ignored, Lightning's tip log lines dropped."""
    import lightning.pytorch  # noqa: F401  (attaches the handlers the tip filter goes on)

    tips = _DropTips()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    with warnings.catch_warnings():
        for category in DEPRECATIONS:
            warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("default", category=category, module=OWN_MODULES)
        handlers = {handler for logger in loggers for handler in logger.handlers}
        for target in [*loggers, *handlers]:
            target.addFilter(tips)
        try:
            yield
        finally:
            for target in [*loggers, *handlers]:
                target.removeFilter(tips)
