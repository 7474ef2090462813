"""What each deliberate deviation of our SOAP from the reference SOAP code costs or buys.

``pytorch_optimizer.SOAP`` (a port of the SOAP authors' code) and ``lk.SOAP`` in the *matched*
configuration (:data:`MATCHED`: ``lightning_kron.methods.soap.REFERENCE_OPTIONS``) compute the
same trajectory to float round-off where every factor has full rank (tests/test_reference_parity.py).
Where a first factor is rank-deficient (the CNN's), its null-space eigenvectors are arbitrary and
the two part by about 1e-4 within a few steps, in fp64 too. Starting from there, this script switches on our deviations one at
a time ("matched + X"), switches them all on (our defaults before issue 11, :data:`OLD_DEFAULTS`)
and off again one at a time ("old defaults - X"), and runs ``lk.SOAP`` at its current defaults, all
at the reference's hyperparameters (lr 3e-3, betas (0.95, 0.95), eps 1e-8, no weight decay) and the
same refresh clock, on the small models of ``scripts/small_models.py``. It prints one markdown table
per refresh period and metric: the final validation (or training) loss per model, mean over seeds,
and its difference to the reference. docs/algorithms.md ("Deviations from the reference SOAP") was
made with::

    python -m scripts.reference_deviations --seeds 0 1 2 --every 10 1

(about an hour on one loaded core). ``--tasks``, ``--configs`` and ``--steps`` narrow it down;
``--json PATH`` also writes every run's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

import lightning_kron as lk
from lightning_kron.methods.soap import REFERENCE_OPTIONS
from scripts.arguments import positive_int, refuse_unwritable
from scripts.small_models import TASKS, make_task

HYPERPARAMETERS = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.0)
#: lk.SOAP options that reproduce the reference, less its clock (each row sets ``refresh``).
MATCHED = {key: value for key, value in REFERENCE_OPTIONS.items() if key != "refresh"}


@dataclass(frozen=True)
class Deviation:
    """One deliberate difference: the option values of ours (the matched value is the reference's)."""

    key: str
    label: str
    options: dict


DEVIATIONS = (
    Deviation("merged_dims", "conv weight as one matrix [out, in*kh*kw]", {"merge_dims": True}),
    Deviation("in_step", "refresh inside the step, before the moments", {"refresh_timing": "in_step"}),
    Deviation("rotate", "V carried over by the squared rotation", {"second_moment_on_refresh": "rotate"}),
    Deviation("first_update", "first step updates the parameters too", {"update_at_start": True}),
    Deviation("corrected_eps", "eps added to the bias-corrected sqrt(V)", {"bias_corrected_eps": True}),
)
OLD_DEFAULTS = {key: value for deviation in DEVIATIONS for key, value in deviation.options.items()}


@dataclass(frozen=True)
class Config:
    """One row of the table: how to build the optimizer for a refresh period."""

    key: str
    label: str
    make: Callable[[list, int], torch.optim.Optimizer]


def _ours(options: dict) -> Callable[[list, int], torch.optim.Optimizer]:
    def make(params, every: int):
        return lk.SOAP(params, **HYPERPARAMETERS, refresh=lk.FixedRefresh(every=every), **options)
    return make


def _reference(params, every: int) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP as ReferenceSOAP  # the dev extra; only this row needs it

    return ReferenceSOAP(params, **HYPERPARAMETERS, precondition_frequency=every)


def configs() -> list[Config]:
    """Every row, in table order (``key`` selects rows with ``--configs``)."""
    rows = [Config("reference", "reference (pytorch_optimizer.SOAP)", _reference),
            Config("matched", "ours, matched to the reference", _ours(MATCHED))]
    rows += [Config(f"matched+{d.key}", f"matched + {d.label}", _ours({**MATCHED, **d.options})) for d in DEVIATIONS]
    rows.append(Config("old_defaults", "ours, old defaults (all five)", _ours({**MATCHED, **OLD_DEFAULTS})))
    for d in DEVIATIONS:
        reverted = {key: MATCHED[key] for key in d.options}
        rows.append(Config(f"old_defaults-{d.key}", f"old defaults - {d.label}",
                           _ours({**MATCHED, **OLD_DEFAULTS, **reverted})))
    rows.append(Config("defaults", "ours, current defaults", _ours({})))
    return rows


@dataclass(frozen=True)
class RunResult:
    task: str
    config: str
    every: int
    seed: int
    val_loss: float
    train_loss: float  # on the task's fixed training sample


def train(task_name: str, config: Config, every: int, seed: int, steps: int) -> RunResult:
    """One run: the task's model from ``seed``, ``steps`` optimizer steps on its batches."""
    task = make_task(task_name, seed)
    optimizer = config.make(list(task.model.parameters()), every)
    for step in range(steps):
        optimizer.zero_grad()
        task.loss(task.model, task.batch(step)).backward()
        optimizer.step()
    return RunResult(task_name, config.key, every, seed, task.val_loss(), task.train_loss())


def _cell(losses: list[float], reference: Optional[float]) -> str:
    if not all(math.isfinite(loss) for loss in losses):
        return "diverged"
    mean = statistics.fmean(losses)
    versus = "" if reference is None or reference == 0 else f" ({100 * (mean / reference - 1):+.0f}%)"
    return f"{mean:.4f}{versus}"


def table(results: list[RunResult], rows: list[Config], tasks: list[str], every: int, metric: str = "val_loss") -> str:
    """Markdown: one row per config, per task the mean of ``metric`` over seeds (the final loss on
    the validation set or on the fixed training sample) and its difference to the reference row
    (when it was run)."""
    def losses(config: str, task: str) -> list[float]:
        return [getattr(r, metric) for r in results if r.config == config and r.task == task and r.every == every]

    reference = {task: statistics.fmean(losses("reference", task)) if losses("reference", task) else None
                 for task in tasks}
    title = "validation loss" if metric == "val_loss" else "training loss"
    lines = [f"| {title}, refresh every {every} | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for row in rows:
        cells = [_cell(losses(row.key, task), reference[task]) for task in tasks]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--configs", nargs="+", default=None, help="row keys (default: all): "
                        + ", ".join(config.key for config in configs()))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--every", nargs="+", type=int, default=[10], help="refresh periods, one table each")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--json", default=None, help="also write every run's figures here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    known = {config.key for config in configs()}
    if args.configs is not None and (unknown := set(args.configs) - known):
        parser.error(f"unknown --configs {sorted(unknown)}; choose from {sorted(known)}")
    if args.steps < 1 or any(every < 1 for every in args.every):
        parser.error("--steps and --every must be positive")
    refuse_unwritable(parser, ("--json", args.json))  # written after the runs: found now, not after the hour they take
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [config for config in configs() if args.configs is None or config.key in args.configs]
    runs = [(every, task, row, seed)
            for every in args.every for task in args.tasks for row in rows for seed in args.seeds]
    results = [train(task, row, every, seed, args.steps)
               for every, task, row, seed in tqdm(runs, desc="runs", disable=args.no_progress)]
    print("\n\n".join(table(results, rows, args.tasks, every, metric)
                       for every in args.every for metric in ("val_loss", "train_loss")))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # found makeable by parse_args
        with open(args.json, "w") as handle:
            json.dump([result.__dict__ for result in results], handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
