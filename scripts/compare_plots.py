"""The four PNG figures of ``scripts/compare.py``, drawn from :class:`~scripts.run_recorder.RunRecord`s.

Kept small (about 100 dpi, a few tens of KB) so they can be committed under ``docs/figures``.
Every figure draws an optimizer with the same colour, line style and marker (:func:`optimizer_styles`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scripts.run_recorder import RunRecord  # noqa: E402

DPI = 100
HEATMAP_DPI = 80  # the heatmap is the busiest image; keeps it under 200 KB


LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LOAD_NOTE = "wall time depends on machine load"


@dataclass(frozen=True)
class Style:
    """How one optimizer is drawn in every figure: the same colour, line style and marker throughout."""

    color: str
    linestyle: Any
    marker: str

    def kwargs(self) -> dict:
        return {"color": self.color, "linestyle": self.linestyle, "marker": self.marker}


def optimizer_styles(labels: list[str]) -> dict[str, Style]:
    """The one optimizer -> style map: ``labels`` in a fixed order (``scripts.compare.CONTENDERS``),
    so an optimizer keeps its colour whichever subset is compared.

    >>> styles = optimizer_styles(["AdamW", "SOAP (every 10)"])
    >>> styles["AdamW"].color, styles["SOAP (every 10)"].color, styles["SOAP (every 10)"].linestyle
    ('C0', 'C1', '--')
    """
    return {label: Style(f"C{index % 10}", LINESTYLES[index % len(LINESTYLES)], MARKERS[index % len(MARKERS)])
            for index, label in enumerate(labels)}


def _styles_for(records: list[RunRecord], styles: Optional[dict[str, Style]]) -> dict[str, Style]:
    """``styles`` extended with a style for every record it lacks (each distinct from those taken)."""
    styles = dict(styles or {})
    for label in [record.label for record in records if record.label not in styles]:
        styles[label] = optimizer_styles([*styles, label])[label]
    return styles


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def _threads(records: list[RunRecord]) -> str:
    counts = sorted({record.threads for record in records if record.threads is not None})
    return "torch threads " + "/".join(map(str, counts)) if counts else "torch threads unknown"


def loss_vs_step_figure(records: list[RunRecord], styles: dict[str, Style]):
    figure, axes = plt.subplots(figsize=(6, 4))
    for record in records:
        axes.plot(record.val_steps, record.val_loss, markersize=4, alpha=0.85, label=record.label,
                  **styles[record.label].kwargs())
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("validation loss (cross-entropy, nats)")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def loss_vs_time_figure(records: list[RunRecord], styles: dict[str, Style]):
    """Validation loss against steps x median step time: a slow stretch (another process on the
    cores) moves the curve far less than the raw cumulative wall time would."""
    figure, axes = plt.subplots(figsize=(6, 4.3))
    for record in records:
        label = f"{record.label} ({1000 * record.median_step_seconds:.0f} ms/step)"
        axes.plot(record.val_estimated_seconds, record.val_loss, markersize=4, alpha=0.85, label=label,
                  **styles[record.label].kwargs())
    axes.set_xlabel("training time (s) = step x median step time")
    axes.set_ylabel("validation loss (cross-entropy, nats)")
    axes.set_title(f"{_threads(records)}; {LOAD_NOTE}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def refreshes_figure(records: list[RunRecord], styles: dict[str, Style]):
    """Top: refreshes per step (the cost profile). Bottom: running total (the budget).

    Optimizers that refresh on the same steps would hide each other, so each has its own marker and
    line style, and the one drawn first (largest total) is drawn largest and widest: nested hollow
    markers in the top panel, a wide pale line under narrower ones in the bottom panel, whose markers
    are staggered along the line."""
    kron = sorted((record for record in records if record.refreshes), key=lambda record: -record.total_refreshes)
    figure, (per_step, total) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True)
    for index, record in enumerate(kron):
        style, under = styles[record.label], len(kron) - 1 - index  # records drawn after (on top of) this one
        counts = np.asarray(record.refreshes)
        per_step_counts = np.diff(counts, prepend=0)
        refreshed = per_step_counts > 0
        per_step.plot(np.asarray(record.steps)[refreshed], per_step_counts[refreshed], linestyle="none",
                      marker=style.marker, markersize=4 + 3 * under, markerfacecolor="none", markeredgewidth=1.3,
                      color=style.color, zorder=2 + index, label=f"{record.label} (max {per_step_counts.max()} in a step)")
        every = max(1, len(counts) // 10)
        total.plot(record.steps, counts, color=style.color, linestyle=style.linestyle, linewidth=1.4 + 1.1 * under,
                   alpha=0.9 if under == 0 else 0.55, marker=style.marker, markersize=5,
                   markevery=(index * every // max(1, len(kron)), every), zorder=2 + index,
                   label=f"{record.label} ({record.total_refreshes})")
    per_step.set_ylabel("factors refreshed\nin the step")
    total.set_ylabel("refreshes so far")
    total.set_xlabel("optimizer step")
    for axes in (per_step, total):
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no Kronecker optimizer in this comparison", ha="center", va="center",
                      transform=axes.transAxes)
    if kron:  # from 0, with room for the legend above the markers
        per_step.set_ylim(0, 1.5 * max(int(np.diff(record.refreshes, prepend=0).max()) for record in kron) + 0.5)
    return figure


def _short_names(names: list[str]) -> list[str]:
    """Factor names without their shared dotted prefix (``transformer.`` in the GPT recipe)."""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    return [name[len(prefix):] for name in names]


def _staleness_heatmap(records: list[RunRecord], path: Path, styles: dict[str, Style]) -> None:
    kron = [record for record in records if record.staleness]
    figure, axes = plt.subplots(1, max(1, len(kron)), figsize=(3.6 * max(1, len(kron)), 4.5), squeeze=False,
                                layout="constrained")
    top = max((max(map(max, record.staleness)) for record in kron), default=1.0) or 1.0
    image = None
    for panel, record in zip(axes[0], kron):
        matrix = np.asarray(record.staleness).T  # factors x steps
        image = panel.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=top,
                             extent=(record.steps[0] - 0.5, record.steps[-1] + 0.5, len(matrix) - 0.5, -0.5))
        panel.set_title(record.label, fontsize=9, color=styles[record.label].color)
        panel.set_xlabel("optimizer step")
        panel.set_yticks(range(len(record.factor_names)))
        panel.set_yticklabels(_short_names(record.factor_names), fontsize=max(3, 8 - len(record.factor_names) // 12))
    if image is not None:
        figure.colorbar(image, ax=axes[0].tolist(), label="staleness ||B - diag B|| / ||B||")
    else:
        axes[0][0].text(0.5, 0.5, "no Kronecker optimizer in this comparison", ha="center", va="center")
        axes[0][0].set_axis_off()
    figure.savefig(path, dpi=HEATMAP_DPI)
    plt.close(figure)


def draw_all(records: list[RunRecord], out: Path, styles: Optional[dict[str, Style]] = None) -> list[Path]:
    """Write the four figures into ``out`` and return their paths; ``styles`` (see
    :func:`optimizer_styles`) gives each optimizer one colour in all of them."""
    styles = _styles_for(records, styles)
    paths = [out / name for name in ("val_loss_vs_step.png", "val_loss_vs_time.png", "refreshes_per_step.png",
                                     "staleness_heatmap.png")]
    for figure, path in zip((loss_vs_step_figure(records, styles), loss_vs_time_figure(records, styles),
                             refreshes_figure(records, styles)), paths):
        _save(figure, path)
    _staleness_heatmap(records, paths[3], styles)
    return paths
