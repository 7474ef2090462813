"""The four PNG figures of ``scripts/compare.py``, drawn from :class:`~scripts.run_recorder.RunRecord`s.

Kept small (about 100 dpi, a few tens of KB) so they can be committed under ``docs/figures``.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scripts.run_recorder import RunRecord  # noqa: E402

DPI = 100
HEATMAP_DPI = 80  # the heatmap is the busiest image; keeps it under 200 KB


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def _loss_curves(records: list[RunRecord], path: Path, x_key: str, x_label: str) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    for record in records:
        axes.plot(getattr(record, x_key), record.val_loss, marker="o", markersize=3, label=record.label)
    axes.set_xlabel(x_label)
    axes.set_ylabel("validation loss (cross-entropy, nats)")
    axes.grid(alpha=0.3)
    axes.legend()
    _save(figure, path)


def _refreshes_per_step(records: list[RunRecord], path: Path) -> None:
    """Top: refreshes per step (the cost profile). Bottom: running total (the budget)."""
    figure, (per_step, total) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for record in records:
        if record.refreshes:
            counts = np.asarray(record.refreshes)
            per_step.plot(record.steps, np.diff(counts, prepend=0), alpha=0.7, linewidth=1)
            total.plot(record.steps, counts, label=f"{record.label} ({record.total_refreshes})")
    per_step.set_ylabel("factors refreshed\nin the step")
    total.set_ylabel("refreshes so far")
    total.set_xlabel("optimizer step")
    for axes in (per_step, total):
        axes.grid(alpha=0.3)
    if total.lines:
        total.legend(fontsize=8)
    _save(figure, path)


def _short_names(names: list[str]) -> list[str]:
    """Factor names without their shared dotted prefix (``transformer.`` in the GPT recipe)."""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    return [name[len(prefix):] for name in names]


def _staleness_heatmap(records: list[RunRecord], path: Path) -> None:
    kron = [record for record in records if record.staleness]
    figure, axes = plt.subplots(1, max(1, len(kron)), figsize=(3.6 * max(1, len(kron)), 4.5), squeeze=False,
                                layout="constrained")
    top = max((max(map(max, record.staleness)) for record in kron), default=1.0) or 1.0
    image = None
    for panel, record in zip(axes[0], kron):
        matrix = np.asarray(record.staleness).T  # factors x steps
        image = panel.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=top,
                             extent=(record.steps[0] - 0.5, record.steps[-1] + 0.5, len(matrix) - 0.5, -0.5))
        panel.set_title(record.label, fontsize=9)
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


def draw_all(records: list[RunRecord], out: Path) -> list[Path]:
    """Write the four figures into ``out`` and return their paths."""
    paths = [out / name for name in ("val_loss_vs_step.png", "val_loss_vs_time.png", "refreshes_per_step.png",
                                     "staleness_heatmap.png")]
    _loss_curves(records, paths[0], "val_steps", "optimizer step")
    _loss_curves(records, paths[1], "val_seconds", "training wall time (s)")
    _refreshes_per_step(records, paths[2])
    _staleness_heatmap(records, paths[3])
    return paths
