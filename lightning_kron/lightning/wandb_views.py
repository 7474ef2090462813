"""Rich W&B views of factor staleness: a histogram each log, a table and a heatmap over factors x steps.

Scalars go to every logger; these views only make sense in W&B, so ``wandb`` is imported here, in
the functions, and only ever called when a ``WandbLogger`` is attached. The history behind the table
and heatmap is bounded (the latest ``max_steps`` logged steps), so memory does not grow with the run.

>>> history = StalenessHistory(max_steps=2)
>>> for step in (10, 20, 30):
...     history.record(step, {"w[L]": 0.1 * step, "w[R]": 0.0})
>>> history.steps, history.names
([20, 30], ['w[L]', 'w[R]'])
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Mapping

from lightning_kron.lightning.metrics import PREFIX

HISTOGRAM = f"{PREFIX}/views/staleness_histogram"
TABLE = f"{PREFIX}/views/staleness_table"
HEATMAP = f"{PREFIX}/views/staleness_heatmap"
_MAX_LABELLED_FACTORS = 40
TABLE_ROWS = 10_000  # wandb.Table.MAX_ROWS: a logged table keeps its first 10,000 rows, drops the rest


class StalenessHistory:
    """Staleness of every factor at the latest ``max_steps`` logged steps."""

    def __init__(self, max_steps: int = 256) -> None:
        self._entries: deque[tuple[int, dict[str, float]]] = deque(maxlen=max_steps)

    def record(self, step: int, staleness: Mapping[str, float]) -> None:
        self._entries.append((step, dict(staleness)))

    @property
    def steps(self) -> list[int]:
        return [step for step, _ in self._entries]

    @property
    def names(self) -> list[str]:
        return list(self._entries[-1][1]) if self._entries else []

    def matrix(self) -> list[list[float]]:
        """``[factor][step]`` staleness (NaN where a factor did not exist yet)."""
        return [[values.get(name, float("nan")) for _, values in self._entries] for name in self.names]

    def __len__(self) -> int:
        return len(self._entries)


def staleness_payload(history: StalenessHistory, *, with_table: bool) -> dict[str, Any]:
    """The W&B objects for one log call: the histogram (when any factor's latest staleness is
    finite), the table and heatmap on request.

    A non-finite staleness (an overflowed factor reads NaN; the scalars show it) is left out of
    the histogram: W&B bins with numpy, which refuses a NaN or infinite range, and that error
    would end the run."""
    import wandb

    latest = history.matrix()
    finite = [row[-1] for row in latest if math.isfinite(row[-1])]
    payload: dict[str, Any] = {HISTOGRAM: wandb.Histogram(finite)} if finite else {}
    if with_table:
        columns = table_columns(len(history.steps), len(history.names))
        rows = [[history.steps[column], name, row[column]] for name, row in zip(history.names, latest)
                for column in columns]
        payload[TABLE] = wandb.Table(columns=["step", "factor", "staleness"], data=rows)
        payload[HEATMAP] = wandb.Image(_heatmap(history))
    return payload


def table_columns(steps: int, factors: int) -> list[int]:
    """Which logged steps the table holds: all of them while factors x steps fits W&B's row limit,
    else every k-th counting back from the newest, so every factor keeps a row per kept step (the
    rows are factor by factor, and W&B's truncation would drop whole factors).

    >>> table_columns(4, 3), table_columns(256, 100)[-3:], len(table_columns(256, 100))
    ([0, 1, 2, 3], [249, 252, 255], 86)
    """
    fits = max(1, TABLE_ROWS // max(factors, 1))
    stride = math.ceil(steps / fits) if steps > fits else 1
    return list(range(steps - 1, -1, -stride))[::-1]


def _heatmap(history: StalenessHistory):
    """RGB pixels of a factors x steps staleness image (a private Agg canvas: no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.array(history.matrix(), dtype=float)
    names = history.names
    figure = Figure(figsize=(8, min(2 + 0.2 * len(names), 12)), dpi=80)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap="magma")
    figure.colorbar(image, ax=axes, label="staleness e(Q, L)")
    axes.set_xlabel("optimizer step")
    ticks = np.linspace(0, len(history.steps) - 1, num=min(len(history.steps), 8)).astype(int)
    axes.set_xticks(ticks, [str(history.steps[t]) for t in ticks])
    if len(names) <= _MAX_LABELLED_FACTORS:
        axes.set_yticks(range(len(names)), names, fontsize=7)
    else:
        axes.set_ylabel(f"{len(names)} factors")
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
