"""Keep dependencies' deprecation warnings and vendor tips out of the entry points' output.

Lightning and torch print ``FutureWarning``/``DeprecationWarning`` lines about their own internals
(e.g. ``isinstance(treespec, LeafSpec)`` from ``lightning/pytorch/utilities/_pytree.py``, which
also breaks ``kron-compare``'s progress bar) and Lightning logs advertising "💡 Tip" lines
(litlogger, litmodels). Nothing a user of these recipes can act on. :func:`quiet_dependencies` hides
them while an entry point runs; warnings raised by this project's own code still show. It is applied
by ``kron-gpt``/``kron-vision``/``kron-compare``, never when ``lightning_kron`` is imported.

Inside it, a warning raised from this project's own files prints as one line, ``UserWarning:
<message>``, without the path and source line Python adds: those name our internals (e.g.
``recipes/recipe_module.py:37``), not anything in the user's config. Other warnings keep Python's
format, whose location is the useful part.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator

OWN_MODULES = r"(lightning_kron|recipes|scripts)(\..*)?$"
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
TIP = re.compile(r"^\W*tip\b", re.IGNORECASE)  # "💡 Tip: For seamless cloud logging ..."
OWN_FOLDERS = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("lightning_kron", "recipes", "scripts"))
LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
           "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TIP.match(record.getMessage())


def _format_own_warnings_in_one_line(python_format):
    """``warnings.formatwarning`` that shortens warnings from :data:`OWN_FOLDERS` to one line."""
    def format_warning(message, category, filename, lineno, line=None):
        if str(Path(filename).resolve()).startswith(OWN_FOLDERS):
            return f"{category.__name__}: {message}\n"
        return python_format(message, category, filename, lineno, line)
    return format_warning


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Inside: dependencies' deprecation warnings are ignored, Lightning's tip log lines dropped,
    and our own warnings print in one line."""
    import lightning.pytorch  # noqa: F401  (attaches the handlers the tip filter goes on)

    tips = _DropTips()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    python_format = warnings.formatwarning  # catch_warnings does not restore it
    with warnings.catch_warnings():
        warnings.formatwarning = _format_own_warnings_in_one_line(python_format)
        for category in DEPRECATIONS:
            warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("default", category=category, module=OWN_MODULES)
        handlers = {handler for logger in loggers for handler in logger.handlers}
        for target in [*loggers, *handlers]:
            target.addFilter(tips)
        try:
            yield
        finally:
            warnings.formatwarning = python_format
            for target in [*loggers, *handlers]:
                target.removeFilter(tips)
