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

from collections import deque
from typing import Any, Mapping

from lightning_kron.lightning.metrics import PREFIX

HISTOGRAM = f"{PREFIX}/views/staleness_histogram"
TABLE = f"{PREFIX}/views/staleness_table"
HEATMAP = f"{PREFIX}/views/staleness_heatmap"
_MAX_LABELLED_FACTORS = 40


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
    """The W&B objects for one log call: always the histogram, the table and heatmap on request."""
    import wandb

    latest = history.matrix()
    payload: dict[str, Any] = {HISTOGRAM: wandb.Histogram([row[-1] for row in latest])}
    if with_table:
        rows = [[step, name, row[column]] for name, row in zip(history.names, latest)
                for column, step in enumerate(history.steps)]
        payload[TABLE] = wandb.Table(columns=["step", "factor", "staleness"], data=rows)
        payload[HEATMAP] = wandb.Image(_heatmap(history))
    return payload


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
