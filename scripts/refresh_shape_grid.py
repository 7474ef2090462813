"""Is a study model's gap to a baseline a matter of the budget's shape? A grid over the shape.

Trains one model of the refresh study (``scripts/refresh_study.py``) under ``BudgetRefresh`` at
every=20's count over a grid of front-loads, early fractions, late tapers and age powers, and
prints each shape's mean change against the reference SOAP and our every=10 on the same seeds,
best first. A diagnostic, not a way to choose a default: the best of many shapes on one model and
three seeds is an optimistic figure. The baselines come from the study's stored runs of the same
kind of CPU (``--study-json``; a run reproduces only on its own kind, ``scripts/machine.py``)::

    python -m scripts.refresh_shape_grid --model mlp --json runs/shape_grid_mlp.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from lightning_kron.scheduling.budget_policies import BudgetRefresh
from scripts import refresh_study as study
from scripts.arguments import refuse_unwritable
from scripts.study_records import load_records, paired, save_records, soap_variant
from scripts.study_schedules import REFERENCE

FRONT_LOADS, EARLY_FRACTIONS, LATE_TAPERS, AGE_POWERS = (1.0, 1.5, 2.0, 3.0), (0.1, 0.2, 0.3, 0.5), (0.0, 0.25, 1.0), (0.0, 1.0)


def shapes() -> dict[str, dict]:
    """Every admissible shape (the early phase cannot spend more than the whole budget)."""
    grid = itertools.product(FRONT_LOADS, EARLY_FRACTIONS, LATE_TAPERS, AGE_POWERS)
    return {f"grid-f{f}-e{e}-t{t}-a{a}": dict(front_load=f, early_fraction=e, late_taper=t, age_power=a)
            for f, e, t, a in grid if f * e <= 1.0}


def changes(runs: list[dict], baseline: list[dict]) -> list[float]:
    """Each run's final loss over the baseline's run of its seed on the same kind of CPU."""
    return [run["val_loss"] / base["val_loss"] - 1 for run, base in paired(runs, baseline)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", help="a study or probe model; name@lrX trains one at lr X (mlp@lr6e-3)")
    parser.add_argument("--json", type=Path, default=Path("runs/shape_grid.json"), help="where runs are stored (resumable)")
    parser.add_argument("--study-json", type=Path, default=Path("docs/figures/refresh_study_runs.json"))
    parser.add_argument("--seeds", type=study.parse_seeds, default="0,1,2", help="e.g. 0,1,2 or 0-39")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    refuse_unwritable(parser, ("--json", args.json))  # saved after every run
    torch.set_num_threads(1)
    try:  # everything that can be wrong with the request, before any run
        model = study.study_model(args.model)
        seeds = args.seeds
        records = load_records(args.json)
        stored = [r for r in load_records(args.study_json) if r["model"] == model.name]
    except ValueError as error:
        parser.error(str(error))
    done = {(r["schedule"], r["seed"]) for r in records}
    todo = [(name, seed) for name in shapes() for seed in seeds if (name, seed) not in done]
    for name, seed in tqdm(todo, desc=f"shape grid ({model.name})", disable=args.no_progress):
        policy = BudgetRefresh(every=20, total_steps=model.steps, **shapes()[name])
        records.append(study.run_one(model, name, seed, refresh=policy))
        save_records(args.json, records)
    reference = [r for r in stored if r["schedule"] == REFERENCE]
    every10 = [r for r in stored if r["schedule"] == "every10" and r.get("soap") == soap_variant()]
    rows = []
    for name in shapes():
        mine = [r for r in records if r["schedule"] == name]
        against_reference, against_every10 = changes(mine, reference), changes(mine, every10)
        if len(against_reference) > 1:
            error = statistics.stdev(against_reference) / len(against_reference) ** 0.5
            rows.append((statistics.mean(against_reference), error, statistics.mean(against_every10 or [float("nan")]), name))
    if not rows:
        print(f"no shape pairs with two reference runs of its seeds on this kind of CPU in {args.study_json}: "
              f"run the baselines here (refresh_study --models {model.name} --schedules every10,reference)")
        return 1
    print("| shape | vs reference | its standard error | vs every=10 |\n|---|---:|---:|---:|")
    for mean, error, versus_clock, name in sorted(rows)[:args.top]:
        print(f"| {name} | {100 * mean:+.2f}% | {100 * error:.2f}% | {100 * versus_clock:+.2f}% |")
    print(f"{len(rows)} shapes; none below the reference: {all(mean > 0 for mean, *_ in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
