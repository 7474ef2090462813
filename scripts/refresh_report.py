"""The refresh study's report: rows relative to a baseline, the markdown tables (against every=10,
against the reference, one CPU against another, the wall-clock view), the plot, and writing them into
a page between markers.

Reads the records of ``scripts/study_records.py``; runs nothing.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from scripts.machine import cpu_kind, machine_of
from scripts.study_models import PROBE_MODELS, STUDY_MODELS
from scripts.study_records import paired, record_key, soap_variant, variant_of
from scripts.study_schedules import BASELINES, DEFAULT, REFERENCE, baseline_of, schedules


@dataclass
class Row:
    model: str
    schedule: str
    refreshes: float
    refresh_ratio: float
    loss: float
    loss_change: float  # mean over seeds of (loss / every10 loss of the same seed - 1)
    spread: float  # max - min over seeds of that change
    seeds: int
    per_seed: list = field(default_factory=list)  # loss changes vs every=10, one per seed
    losses: list = field(default_factory=list)  # final val losses, one per seed


def summarize(records: list[dict], baseline: str = "every10", variant: Optional[str] = None) -> list[Row]:
    """One row per (model, schedule): refreshes and loss relative to ``baseline`` on the same seeds,
    over the runs of SOAP's ``variant`` of defaults (the current ones unless told) and the reference.
    A run is paired with the baseline's run of its seed on the same kind of CPU (its ``machine``),
    so the runs of several CPUs pool without pairing across them."""
    variant = variant or soap_variant()
    by_row: dict[tuple, list[dict]] = {}
    for r in records:
        if r["schedule"] == REFERENCE or variant_of(r) == variant:
            by_row.setdefault((r["model"], r["schedule"]), []).append(r)
    rows = []
    for model, schedule in sorted(by_row, key=_order):
        pairs = paired(by_row[(model, schedule)], by_row.get((model, baseline_of(schedule, baseline)), []))
        if not pairs:
            continue
        runs, base = [r for r, _ in pairs], [b for _, b in pairs]
        changes = [r["val_loss"] / b["val_loss"] - 1 for r, b in zip(runs, base)]
        rows.append(Row(model, schedule, statistics.mean(r["refreshes"] for r in runs),
                        sum(r["refreshes"] for r in runs) / max(1, sum(b["refreshes"] for b in base)),
                        statistics.mean(r["val_loss"] for r in runs), statistics.mean(changes),
                        max(changes) - min(changes), len(runs), changes, [r["val_loss"] for r in runs]))
    return rows


#: Our schedules the report's table compares with the reference (``--against`` names others).
REFERENCE_ROWS = ("every10", DEFAULT, "budget20-front3-aged", "budget10-front3-aged", "bare-early30-aged")


def reference_table(records: list[dict], ours: tuple[str, ...] = REFERENCE_ROWS, variant: Optional[str] = None) -> str:
    """Per model: the reference's mean final loss and each of ``ours`` against it (mean over seeds
    of the per-seed change, its standard error, the worst seed and on how many seeds ours ended
    lower, in brackets: the count does not lean on the mean of a noisy loss's ratios)."""
    rows = {(r.model, r.schedule): r for r in summarize(records, baseline=REFERENCE, variant=variant)}
    models = list(dict.fromkeys(model for model, schedule in rows if schedule == REFERENCE))
    shown = [name for name in ours if any((model, name) in rows for model in models)]
    lines = ["| model | reference (mean) | " + " | ".join(f"ours, {name}" for name in shown) + " |",
             "|---|---:|" + "---:|" * len(shown)]
    for model in models:
        cells = [f"{rows[(model, REFERENCE)].loss:.4f}"]
        for name in shown:
            row = rows.get((model, name))
            error = _standard_error(row.per_seed) if row is not None else ""
            lower = "" if row is None else sum(change < 0 for change in row.per_seed)
            cells.append("" if row is None else f"{row.loss:.4f} ({100 * row.loss_change:+.1f}%"
                         f"{' ± ' + error if error else ''}, worst seed {100 * max(row.per_seed):+.1f}%, "
                         f"lower on {lower}/{row.seeds})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_table(records: list[dict]) -> Optional[str]:
    """The same run (model, schedule, seed, SOAP's defaults) on two kinds of CPU (by model name):
    how far round-off alone moves the final loss (the second CPU's over the first's, by name), per
    model and schedule; None when the runs come from one kind."""
    machines = sorted({cpu_kind(machine_of(r)) for r in records} - {""})
    if len(machines) < 2:
        return None
    if len(machines) > 2:
        raise ValueError(f"the runs come from {len(machines)} kinds of CPU ({', '.join(machines)}); compare two at a time")
    first, second = machines
    runs = {(r["model"], r["schedule"], r["seed"], record_key(r)[3], cpu_kind(machine_of(r))): r["val_loss"] for r in records}
    lines = [f"| model | schedule | seeds | {second} over {first} (mean) | its standard error | mean size |",
             "|---|---|---:|---:|---:|---:|"]
    pairs = sorted({(model, schedule) for model, schedule, _, _, machine in runs if machine == second}, key=_order)
    for model, schedule in pairs:
        changes = [loss / runs[(m, s, seed, variant, first)] - 1 for (m, s, seed, variant, machine), loss in runs.items()
                   if (m, s, machine) == (model, schedule, second) and (m, s, seed, variant, first) in runs]
        if len(changes) > 1:
            lines.append(f"| {model} | {schedule} | {len(changes)} | {100 * statistics.mean(changes):+.2f}% | "
                         f"{_standard_error(changes)} | {100 * statistics.mean(map(abs, changes)):.2f}% |")
    return "\n".join(lines)


def _order(pair: tuple[str, str]) -> tuple:
    """Registry order of the models (one at another lr, ``name@lrX``, next to its own, by lr), then
    the schedules' order."""
    registered = {**STUDY_MODELS, **PROBE_MODELS}
    models, names = list(registered), [*BASELINES, REFERENCE, *schedules(100)]
    model, schedule = pair
    base, _, lr = model.partition("@lr")
    known = base in registered
    return (models.index(base) if known else len(models), base, float(lr) if lr else registered[base].lr if known else 0.0,
            names.index(schedule) if schedule in names else 99, schedule)


def _standard_error(changes: list[float]) -> str:
    """The standard error of the mean of the per-seed changes (the seeds are paired with
    every=10's, so this is the noise of the comparison itself); blank for one seed."""
    if len(changes) < 2:
        return ""
    return f"{100 * statistics.stdev(changes) / math.sqrt(len(changes)):.2f}%"


def markdown_tables(rows: list[Row]) -> str:
    """Per model: every schedule's refreshes and loss relative to every=10; then a summary per
    schedule over models (mean and worst loss change, mean refresh ratio)."""
    lines = ["| model | schedule | seeds | refreshes (mean) | x every=10 | final val loss (mean) | vs every=10 (mean) | "
             "its standard error | spread over seeds | worst seed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.model} | {r.schedule} | {r.seeds} | {r.refreshes:.0f} | {r.refresh_ratio:.2f}x | {r.loss:.4f} | "
              f"{100 * r.loss_change:+.2f}% | {_standard_error(r.per_seed)} | {100 * r.spread:.2f}% | "
              f"{100 * max(r.per_seed):+.2f}% |" for r in rows]
    summary = ["| schedule | models | seeds per model | refreshes x every=10 (mean) | worst refresh ratio | "
               "loss vs every=10 (mean over models) | worst model (its mean) | worst seed |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for schedule in dict.fromkeys(r.schedule for r in rows):
        mine = [r for r in rows if r.schedule == schedule]
        worst = max(mine, key=lambda r: r.loss_change)
        seed = max(mine, key=lambda r: max(r.per_seed))
        seeds = "-".join(sorted({str(r.seeds) for r in mine}))
        summary.append(f"| {schedule} | {len(mine)} | {seeds} | {statistics.mean(r.refresh_ratio for r in mine):.2f}x | "
                       f"{max(r.refresh_ratio for r in mine):.2f}x | {100 * statistics.mean(r.loss_change for r in mine):+.2f}% | "
                       f"{100 * worst.loss_change:+.2f}% ({worst.model}) | {100 * max(seed.per_seed):+.2f}% ({seed.model}) |")
    return "\n".join(summary) + "\n\n" + "\n".join(lines)


#: The schedules of the user page's plot (docs/adaptive-refresh.md), with the names it shows.
USER_PLOT = {"every1": "every=1", "every10": "every=10", "every20": "every=20", REFERENCE: "the SOAP reference (every=10)",
             DEFAULT: "the default (BudgetRefresh)"}


def plot(rows: list[Row], path: Path, labels: Optional[dict[str, str]] = None) -> list[str]:
    """Final validation loss (mean over seeds, bars: min to max) against total refreshes, one panel
    per model, one marker per schedule; the dashed line is every=10's loss. ``labels``: only these
    schedules, under these names (else every schedule, by its name). Returns the legend's entries."""
    if labels is not None:
        rows = [row for row in rows if row.schedule in labels]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(dict.fromkeys(r.model for r in rows))
    names = list(dict.fromkeys(r.schedule for r in rows))
    columns, legend_columns = 3, 4
    legend_height = 0.2 * math.ceil(len(names) / legend_columns) + 0.3  # inches below the panels
    height = 3.6 * math.ceil(len(models) / columns) + legend_height
    figure, axes = plt.subplots(math.ceil(len(models) / columns), columns, figsize=(13, height), squeeze=False)
    markers = "os^vD<>pX*h"
    for axis, model in zip(axes.flat, models):
        for index, name in enumerate(names):
            row = next((r for r in rows if r.model == model and r.schedule == name), None)
            if row is not None:
                bars = [[row.loss - min(row.losses)], [max(row.losses) - row.loss]]
                # the colour and marker follow the schedule, not the order of the panel's calls (a panel
                # without some schedule would shift the colour cycle)
                axis.errorbar(max(row.refreshes, 1), row.loss, yerr=bars, fmt=markers[index % len(markers)],
                              color=f"C{index % 10}", label=(labels or {}).get(name, name), capsize=2, ms=6)
            if name == "every10" and row is not None:
                axis.axhline(row.loss, color="grey", lw=0.6, ls="--")
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 2x10^2, 3x10^2... overlap
        axis.set_title(model)
        axis.set_xlabel("total refreshes (log)")
        axis.set_ylabel("final val loss")
    for axis in list(axes.flat)[len(models):]:
        axis.axis("off")
    legend: dict[str, Any] = {}  # every schedule once, in order, whichever panel drew it
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    shown = [label for label in ((labels or {}).get(name, name) for name in names) if label in legend]
    figure.legend([legend[label] for label in shown], shown, loc="lower center", ncol=legend_columns, fontsize=8)
    figure.tight_layout(rect=(0, legend_height / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return shown


def timing_table(timings: list[dict], adaptive_ratio: Optional[float]) -> str:
    """Share of the step spent refreshing, amortised: 2 factors x refresh / period."""
    header = "| factor size | step (s) | one refresh (s) | refresh share at every=10 |"
    header += (f" at the default's {adaptive_ratio:.2f}x |" if adaptive_ratio else "")
    lines = [header, "|" + "---:|" * (5 if adaptive_ratio else 4)]
    for t in timings:
        cells = [str(t["size"]), f"{t['step_seconds']:.3f}", f"{t['refresh_seconds']:.3f}"]
        for ratio in ([1.0, adaptive_ratio] if adaptive_ratio else [1.0]):
            amortised = 2 * t["refresh_seconds"] * ratio / 10
            cells.append(f"{100 * amortised / (t['step_seconds'] + amortised):.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_between(text: str, marker: str, content: str) -> str:
    """``text`` with what lies between ``<!-- marker:begin -->`` and ``<!-- marker:end -->``
    replaced by ``content`` (the markers stay); appended at the end when the markers are absent."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin not in text or end not in text:
        return text.rstrip("\n") + f"\n\n{begin}\n{content}\n{end}\n"
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{content}\n{end}{rest.split(end, 1)[1]}"


def write_report(path: Path, rows: list[Row], timing: Optional[Path], default: str,
                 reference: Optional[str] = None, marker: str = "refresh-study", machines: Optional[str] = None) -> None:
    """The study's tables (and the timing table, when measured; the runs of two CPUs compared, when
    there are two) into ``path`` between markers."""
    text = path.read_text() if path.exists() else ""
    text = replace_between(text, marker, markdown_tables(rows))
    if reference is not None:
        text = replace_between(text, "refresh-reference", reference)
    if machines is not None:
        text = replace_between(text, "refresh-machines", machines)
    if timing is not None and timing.exists():
        mine = [r.refresh_ratio for r in rows if r.schedule == default]
        ratio = statistics.mean(mine) if mine else None
        text = replace_between(text, "refresh-timing", timing_table(json.loads(timing.read_text())["timings"], ratio))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
