"""Which refresh schedule transfers? Candidate policies against fixed clocks on several models.

Each run trains SOAP (same init, data and batch order per seed) on one study model under one
schedule and records the total refreshes and the final validation loss in ``--json`` (resumable:
runs already there are skipped). ``--report`` writes the table of every schedule relative to
``FixedRefresh(every=10)`` and a loss-vs-refreshes plot; ``--timing`` measures the share of a step
that refreshes take as the factor size grows. The models are a registry, :data:`STUDY_MODELS`
(``scripts/study_models.py``): adding one is one ``register(StudyModel(...))`` line::

    python -m scripts.refresh_study --json runs/refresh_study.json              # all runs
    python -m scripts.refresh_study --timing runs/refresh_timing.json
    python -m scripts.refresh_study --json runs/refresh_study.json --report docs/refresh-study.md

A plain training loop (no Trainer) over the recipes' own modules and optimizer construction
(``recipes.optimizers.configure_optimization``: the recipes' weight-decay groups and warm-up +
cosine schedule), so a run costs only its steps. The parts: the schedules by name
(``study_schedules.py``), the probes of the first step (``first_step_probes.py``), the stored runs
(``study_records.py``) and the tables, plot and page (``refresh_report.py``); this file trains and
is the command line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

import lightning_kron as lk
from recipes.optimizers import OptimizerConfig, configure_optimization, weight_decay_groups
from recipes.schedule import warmup_cosine
from scripts.arguments import positive_int, refuse_unwritable
from scripts.first_step_probes import AFTER_FIRST_STEP, weights_of
from scripts.machine import describe_cpu, machine_of, same_cpu
from scripts.refresh_report import (
    REFERENCE_ROWS,
    USER_PLOT,
    machine_table,
    markdown_tables,
    plot,
    reference_table,
    summarize,
    timing_table,
    write_report,
)
from scripts.study_models import STUDY_MODELS, StudyModel, Task, study_model
from scripts.study_records import OLD_VARIANT, load_records, record_key, save_records, soap_variant
from scripts.study_schedules import BETAS_OF, DEFAULT, OPTIMIZER_OF, REFERENCE, SOAP_OVERRIDES, schedules


# ----------------------------------------------------------------- training
def _reference_optimizer(model: StudyModel, network: torch.nn.Module) -> tuple[torch.optim.Optimizer, list]:
    """The reference SOAP over the recipes' weight-decay groups, and a list that collects how many
    factors each of its refreshes recomputed."""
    from pytorch_optimizer import SOAP as ReferenceSOAP  # the dev extra; only this row needs it

    config = OptimizerConfig(name="soap", lr=model.lr, weight_decay=model.weight_decay)
    groups = [{**group, "params": [param for _, param in group["params"]]} for group in weight_decay_groups(network, config)]
    optimizer = ReferenceSOAP(groups, lr=model.lr, betas=(0.95, 0.95), weight_decay=model.weight_decay)
    refreshed: list[int] = []
    recompute = optimizer.get_orthogonal_matrix_qr

    def counted(state, *args, **kwargs):
        refreshed.append(sum(1 for factor in state["GG"] if len(factor)))
        return recompute(state, *args, **kwargs)

    optimizer.get_orthogonal_matrix_qr = counted
    return optimizer, refreshed


def run_one(model: StudyModel, schedule: str, seed: int, refresh: Optional[object] = None) -> dict:
    """Train one run; returns its record (final val loss, refreshes, seconds). ``refresh``: a
    policy to run under the name ``schedule`` instead of the study's own (a sweep's)."""
    torch.manual_seed(seed)
    task = model.build(seed)
    if schedule == REFERENCE:
        optimizer, refreshed = _reference_optimizer(model, task.network)
        lr_schedule = warmup_cosine(optimizer, model.warmup_steps, model.steps, OptimizerConfig().min_lr_ratio)
    else:
        policy = refresh if refresh is not None else schedules(model.steps)[schedule]
        options = {"refresh": policy, **SOAP_OVERRIDES.get(schedule, {})}
        config = OptimizerConfig(name=OPTIMIZER_OF.get(schedule, "soap"), lr=model.lr, betas=BETAS_OF.get(schedule, (0.95, 0.95)),
                                 weight_decay=model.weight_decay,
                                 warmup_steps=model.warmup_steps, options=options)
        setup = configure_optimization(config, task.network, model.steps)
        optimizer, lr_schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
        if hasattr(policy, "bind"):  # a policy that must see the optimizer's factors (SmallFactorsOnClock)
            policy.bind(optimizer)
    after_first_step = AFTER_FIRST_STEP.get(schedule)
    started = time.perf_counter()
    for step, batch in enumerate(itertools.islice(task.batches, model.steps)):
        optimizer.zero_grad(set_to_none=True)
        task.loss(task.network, batch).backward()
        first_hooked = step == 0 and after_first_step is not None
        before = [weight.detach().clone() for weight in weights_of(optimizer)] if first_hooked else None
        optimizer.step()
        if before is not None:
            after_first_step(optimizer, before)
        lr_schedule.step()
    seconds = time.perf_counter() - started
    record = {"model": model.name, "schedule": schedule, "seed": seed, "steps": model.steps, "soap": soap_variant(),
              "val_loss": evaluate(task), "train_seconds": seconds, "machine": describe_cpu()}
    if schedule == REFERENCE:
        factors = sum(1 for state in optimizer.state.values() for factor in state.get("GG", []) if len(factor))
        return {**record, "refreshes": sum(refreshed), "factors": factors, "refresh_seconds": None}
    counters = optimizer.scheduler.counters
    return {**record, "refreshes": counters.refreshes, "factors": len(optimizer.factors()),
            "refresh_seconds": counters.seconds}


@torch.no_grad()
def evaluate(task: Task) -> float:
    task.network.eval()
    losses = [float(task.loss(task.network, batch)) for batch in task.val_batches]
    task.network.train()
    return sum(losses) / len(losses)


def check_request(path: Path, models: list[str], names: list[str]) -> list[StudyModel]:
    """The models of a request to run, once it is known to be runnable: every model and schedule
    registered, and ``path`` holding no runs of another kind of CPU (``scripts/machine.py``: runs
    reproduce only on the CPU that made them). Raises ``ValueError`` before any run."""
    here = describe_cpu()
    records = load_records(path)
    elsewhere = sorted({machine_of(r) or "a CPU it does not record" for r in records if not same_cpu(machine_of(r), here)})
    if elsewhere:
        raise ValueError(f"{path} holds runs made on {', '.join(elsewhere)}, and this is {here}: runs are compared "
                         f"seed by seed and reproduce only on the CPU that made them; store these in another --json")
    chosen = [study_model(name) for name in models]
    unknown = [name for name in names if name != REFERENCE and name not in schedules(100)]
    if unknown:
        raise ValueError(f"unknown schedules {', '.join(unknown)}; the study's: {', '.join([*schedules(100), REFERENCE])}")
    return chosen


def run_all(path: Path, models: list[str], names: list[str], seeds: list[int], progress: bool = True) -> list[dict]:
    """Every (model, schedule, seed) not yet in ``path``; saved after each run (resumable). A file
    holds the runs of one kind of CPU: one made elsewhere is refused (:func:`check_request`)."""
    chosen = check_request(path, models, names)
    records = load_records(path)
    done = {record_key(r) for r in records}
    current = soap_variant()
    todo = [(m, s, seed) for seed in seeds for m in chosen for s in names
            if (m.name, s, seed, None if s == REFERENCE else current) not in done]
    for model, schedule, seed in tqdm(todo, desc="refresh study", disable=not progress):
        records.append(run_one(model, schedule, seed))
        save_records(path, records)
    return records


# ----------------------------------------------------------------- the wall-clock view
def time_factor(size: int, repeats: int = 3) -> dict:
    """Median seconds of one ordinary SOAP step on a ``size x size`` weight (two factors, no
    refresh) and of one warm-QR refresh of one of its factors."""
    weight = torch.nn.Parameter(torch.randn(size, size) / math.sqrt(size))
    optimizer = lk.SOAP([("w", weight)], lr=1e-3, refresh=lk.FixedRefresh(every=10**9))

    def step():
        weight.grad = torch.randn_like(weight)
        optimizer.step()

    step()  # the exact first refresh
    step_times, refresh_times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        optimizer.refresh_factors(["w[L]"])
        refresh_times.append(time.perf_counter() - started)
    return {"size": size, "step_seconds": statistics.median(step_times), "refresh_seconds": statistics.median(refresh_times)}


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"``, ``"0-39"`` or a mix (``"0-2,7"``): the seeds, in order, each once (an argparse
    type: a part that is no seed or an empty range such as ``"3-1"`` raises ArgumentTypeError)."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            first, last = -1, -1
        if first < 0 or last < first:
            where = "" if part == text else f" in {text!r}"
            raise argparse.ArgumentTypeError(f"seeds are whole numbers >= 0 and ranges LOW-HIGH with LOW <= HIGH, "
                                             f"e.g. 0,1,2 or 0-39; got {part.strip()!r}{where}")
        seeds += [seed for seed in range(first, last + 1) if seed not in seeds]
    return seeds


def parse_sizes(text: str) -> list[int]:
    """``"768,1024"``: factor sizes, each a whole number >= 1."""
    sizes = [int(part) for part in text.split(",")]
    if any(size < 1 for size in sizes):
        raise ValueError(f"sizes must be >= 1, got {text}")
    return sizes


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("runs/refresh_study.json"), help="where runs are stored")
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="more run files to report (parallel workers)")
    parser.add_argument("--models", default=",".join(STUDY_MODELS),
                        help="comma-separated registered models; name@lrX trains one at lr X (resnet@lr1.5e-3)")
    parser.add_argument("--schedules", default=",".join([*schedules(100), REFERENCE]))
    parser.add_argument("--seeds", type=parse_seeds, default="0,1,2", help="e.g. 0,1,2 or 0-39")
    parser.add_argument("--report", type=Path, default=None, help="write the tables here (markdown) and the plot next to it")
    parser.add_argument("--plot", type=Path, default=Path("docs/figures/refresh_study.png"))
    parser.add_argument("--user-plot", type=Path, default=Path("docs/figures/refresh_default.png"),
                        help="with --report: the user page's plot (the clocks, the reference and the default)")
    parser.add_argument("--timing", type=Path, default=None, help="measure the wall-clock view into this JSON")
    parser.add_argument("--timing-json", type=Path, default=Path("runs/refresh_timing.json"),
                        help="with --report: the timing measured by --timing, put into the report")
    parser.add_argument("--sizes", type=parse_sizes, default="768,1024,2048,4096",
                        help="with --timing: the factor sizes, comma-separated")
    parser.add_argument("--default", default=DEFAULT, help="the schedule whose refresh rate the timing uses")
    parser.add_argument("--variant", default=None,
                        help=f"report the runs of these SOAP defaults (timing+carry; default: the current ones, "
                             f"{soap_variant()}; runs without a variant are {OLD_VARIANT})")
    parser.add_argument("--marker", default="refresh-study", help="with --report: the section of the page to replace")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--show", action="store_true", help="print the tables of the runs stored in --json; run none")
    parser.add_argument("--against", default=None,
                        help="with --show: the schedules to compare with the reference (default: "
                             f"{','.join(REFERENCE_ROWS)})")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    running = args.report is None and not args.show
    if args.timing is not None:  # what will be written, found writable before any step is timed or run
        refuse_unwritable(parser, ("--timing", args.timing))
    elif args.report is not None:
        refuse_unwritable(parser, ("--report", args.report), ("--plot", args.plot), ("--user-plot", args.user_plot))
    elif running:
        refuse_unwritable(parser, ("--json", args.json))
    torch.set_num_threads(args.threads)
    if args.timing is not None:
        timings = [time_factor(size) for size in tqdm(args.sizes, desc="timing", disable=args.no_progress)]
        args.timing.parent.mkdir(parents=True, exist_ok=True)
        args.timing.write_text(json.dumps({"timings": timings}, indent=1) + "\n")
        print(timing_table(timings, None))
        return 0
    models, names = args.models.split(","), args.schedules.split(",")
    if not running:  # --show and --report read runs: a mistyped path must not look like "no runs stored"
        missing = [str(path) for path in (args.json, *args.also) if not path.exists()]
        if missing:
            parser.error(f"no stored runs at {', '.join(missing)} (--json/--also name the run files to read)")
    try:  # a request that cannot run, or a run file that cannot be read, is refused before any run
        if running:
            check_request(args.json, models, names)
        records = load_records(args.json, *args.also)
    except ValueError as error:
        parser.error(str(error))
    if running:
        records = [*run_all(args.json, models, names, args.seeds, not args.no_progress), *load_records(*args.also)]
    rows = summarize(records, variant=args.variant)
    text = markdown_tables(rows)
    ours = tuple(args.against.split(",")) if args.against and args.show else REFERENCE_ROWS
    reference = reference_table(records, ours, args.variant) if any(r["schedule"] == REFERENCE for r in records) else None
    if reference is not None:
        text += "\n\n" + reference
    machines = machine_table(records)
    if machines is not None:
        text += "\n\n" + machines
    if args.report is not None:
        write_report(args.report, rows, args.timing_json, args.default, reference, args.marker, machines)
        plot(rows, args.plot)
        plot(rows, args.user_plot, USER_PLOT)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
