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
cosine schedule), so a run costs only its steps.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

import lightning_kron as lk
from lightning_kron.scheduling.budget_policies import BudgetRefresh
from recipes.optimizers import OptimizerConfig, configure_optimization, weight_decay_groups
from recipes.schedule import warmup_cosine
from scripts.machine import cpu_kind, describe_cpu, machine_of, same_cpu, same_cpu_run
from scripts.refresh_candidates import RelativeRefresh, SmallFactorsOnClock
from scripts.study_models import PROBE_MODELS, STUDY_MODELS, StudyModel, Task, register, study_model  # noqa: F401 (the registry's API)


# ----------------------------------------------------------------- the schedules
def _plain(**budget) -> BudgetRefresh:
    """The budget ranked by staleness alone (``age_power=0``) at a flat late rate, as it was before
    the aged ranking and the taper."""
    return BudgetRefresh(age_power=0.0, late_taper=1.0, **budget)


def _flat(**budget) -> BudgetRefresh:
    """The budget at a flat late rate (``late_taper=1``), as it was before the taper."""
    return BudgetRefresh(late_taper=1.0, **budget)


def schedules(steps: int) -> dict[str, object]:
    """Baselines, then every candidate default (a loser stays listed: the table reports it)."""
    def default(**changes) -> BudgetRefresh:
        """SOAP's default budget for a run of ``steps``, with ``changes``."""
        return BudgetRefresh(**{"every": 20, "front_load": 3.0, "early_fraction": 0.2, "total_steps": steps, **changes})

    return {
        "every10": lk.FixedRefresh(every=10),
        "every1": lk.FixedRefresh(every=1),
        "every20": lk.FixedRefresh(every=20),
        # ranked by staleness alone (age_power=0), as the budget was before the aged ranking won
        "budget20-front": _plain(every=20, front_load=2.0, early_fraction=0.25, total_steps=steps),
        "budget20-flat": _plain(every=20, front_load=1.0, total_steps=steps),
        # SOAP(params) alone does not know the length: an even spread, or the early rate for 30 steps
        "bare-flat": _plain(every=20, front_load=1.0),
        "bare-early30": _plain(every=20, front_load=3.0, early_steps=30),
        "budget20-front-check5-qr3": _plain(every=20, front_load=2.0, early_fraction=0.25, total_steps=steps,
                                            check_every=5, max_iters=3, tolerance=0.02),
        "budget20-front3": _plain(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps),
        "budget20-front1.5": _plain(every=20, front_load=1.5, early_fraction=0.3, total_steps=steps),
        # the aged ranking (age_power=1), flat; before it, budget20-front3
        "budget20-front3-aged": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps),
        "budget10-front3-aged": _flat(every=10, front_load=3.0, early_fraction=0.2, total_steps=steps),
        "bare-early30-aged": _flat(every=20, front_load=3.0, early_steps=30),
        "budget20-front5-aged": _flat(every=20, front_load=5.0, early_fraction=0.1, total_steps=steps),
        "budget20-front4-aged": _flat(every=20, front_load=4.0, early_fraction=0.15, total_steps=steps),
        "budget20-front3-aged2": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps,
                                       age_power=2.0),
        "budget20-front3-aged0.5": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps,
                                         age_power=0.5),
        # its stored runs predate the carry-over of what a check's cap holds back (0.39x every=10's count)
        "budget20-front3-aged-check10": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps,
                                              check_every=10),
        # the default: aged, the late rate tapered to a quarter (late_taper=0.25); then changes to it
        "budget20-front3-aged-taper": default(),
        # deciding every 10 steps (one host sync per 10 steps), the held-back budget carried over
        "budget20-front3-aged-taper-check10": default(check_every=10),
        "budget20-front3-aged-taper0": default(late_taper=0.0),
        "budget20-front2-aged-taper": default(front_load=2.0),
        "budget20-front4-aged-taper": default(front_load=4.0),
        # a second (third) warm-QR iteration in every refresh: better bases per refresh
        "budget20-front3-aged-taper-qr2": default(max_iters=2),
        "budget20-front3-aged-taper-qr3": default(max_iters=3),
        "budget20-front2-aged-taper0": default(front_load=2.0, late_taper=0.0),
        "budget20-front2-aged-taper-qr2": default(front_load=2.0, max_iters=2),
        "budget20-front2-aged-taper0-qr2": default(front_load=2.0, late_taper=0.0, max_iters=2),
        "budget20-front2-aged-taper0-check5": default(front_load=2.0, late_taper=0.0, check_every=5),
        "budget20-front2-aged-taper0-check10": default(front_load=2.0, late_taper=0.0, check_every=10),
        "budget20-front1.5-aged-taper": default(front_load=1.5),
        "budget20-front2-early0.1-aged-taper": default(front_load=2.0, early_fraction=0.1),
        "budget20-front3-age8": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps,
                                      age_power=8.0),
        "every10-rotate": lk.FixedRefresh(every=10),
        "budget20-front3-aged-rotate": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps),
        # the remaining deviations from the reference undone, one at a time and all together
        "every10-no-first-update": lk.FixedRefresh(every=10),
        "every10-plain-eps": lk.FixedRefresh(every=10),
        "every10-decay-after": lk.FixedRefresh(every=10),
        "every10-reference-options": lk.FixedRefresh(every=10),
        "budget20-front3-aged-taper-no-first-update": default(),
        "every10-first-step-adam": lk.FixedRefresh(every=10),
        # where the first step's effect sits: its update alone, or the first gradient in the moments
        "every10-first-step-undone": lk.FixedRefresh(every=10),
        "every10-first-step-fresh-moments": lk.FixedRefresh(every=10),
        # ... and which of the two moments carries it: M (or V) alone restarted after the first step
        "every10-first-step-fresh-m": lk.FixedRefresh(every=10),
        "every10-first-step-fresh-v": lk.FixedRefresh(every=10),
        "budget20-front3-aged-taper-first-step-fresh-m": default(),
        "budget20-front3-aged-taper-reference-options": default(),
        # the default with the factors of size <= 8 (a convolution's 3x3 kernel dims) on the every=10 clock
        "budget20-front3-aged-taper-small8-clock": SmallFactorsOnClock(default(), max_size=8, every=10),
        # EShampoo (exact eigh refreshes; after the step, V by rank, per-dim conv blocks, as SOAP) on its
        # clock and at its default (the same budget as SOAP's); at AdamW's betas, its own defaults
        "eshampoo-every10": lk.FixedRefresh(every=10),
        "eshampoo-default": default(),
        "eshampoo-every10-adamw-betas": lk.FixedRefresh(every=10),
        # EShampoo's choices around a refresh before the study (inside the step, V rotated, merged dims)
        "eshampoo-every10-own-carry": lk.FixedRefresh(every=10),
        "eshampoo-default-own-carry": default(),
        "eshampoo-aged-flat-own-carry": _flat(every=20, front_load=3.0, early_fraction=0.2, total_steps=steps),
        "eshampoo-every10-adamw-betas-own-carry": lk.FixedRefresh(every=10),
        "relative4": RelativeRefresh(ratio=4.0, floor=0.02),
        "tol0.1-check10-qr3": lk.AdaptiveRefresh(tolerance=0.1, check_every=10, max_iters=3),
        "gpt-tuned-0.15early-0.5": lk.AdaptiveRefresh(
            tolerance=0.5, schedule=lk.TighterEarly(early_tolerance=0.15, early_steps=int(0.2 * steps))),
    }


BASELINES = ("every10", "every1", "every20")
#: EShampoo's choices around a refresh before the study took SOAP's for it.
_ESHAMPOO_OWN_CARRY = {"refresh_timing": "in_step", "second_moment_on_refresh": "rotate", "merge_dims": True}
#: The reference's choices where SOAP's defaults still differ from it (docs/algorithms.md).
_REMAINING_DEVIATIONS_UNDONE = {"update_at_start": False, "bias_corrected_eps": False,
                                "weight_decay_mode": "decoupled_after_update"}
#: Schedules that also change one of SOAP's defaults around a refresh (their name says which).
SOAP_OVERRIDES = {"every10-rotate": {"second_moment_on_refresh": "rotate"},
                  "budget20-front3-aged-rotate": {"second_moment_on_refresh": "rotate"},
                  "every10-no-first-update": {"update_at_start": False},
                  "every10-plain-eps": {"bias_corrected_eps": False},
                  "every10-decay-after": {"weight_decay_mode": "decoupled_after_update"},
                  "every10-reference-options": _REMAINING_DEVIATIONS_UNDONE,
                  "budget20-front3-aged-taper-no-first-update": {"update_at_start": False},
                  "every10-first-step-adam": {"update_at_start": False},
                  **{name: _ESHAMPOO_OWN_CARRY for name in ("eshampoo-every10-own-carry", "eshampoo-default-own-carry",
                                                            "eshampoo-aged-flat-own-carry",
                                                            "eshampoo-every10-adamw-betas-own-carry")},
                  "budget20-front3-aged-taper-reference-options": _REMAINING_DEVIATIONS_UNDONE}
#: Schedules run with another optimizer than SOAP (same hyperparameters); their baseline is that
#: optimizer's every=10 (:func:`baseline_of`).
OPTIMIZER_OF = {name: "eshampoo" for name in ("eshampoo-every10", "eshampoo-default", "eshampoo-every10-adamw-betas",
                                                "eshampoo-every10-own-carry", "eshampoo-default-own-carry",
                                                "eshampoo-aged-flat-own-carry", "eshampoo-every10-adamw-betas-own-carry")}
#: Schedules run at other betas than the study's (0.95, 0.95).
BETAS_OF = {"eshampoo-every10-adamw-betas": (0.9, 0.999), "eshampoo-every10-adamw-betas-own-carry": (0.9, 0.999)}
#: The schedule that is SOAP's default (``BudgetRefresh(total_steps=...)``, as KronCallback and the
#: recipes run it).
DEFAULT = "budget20-front3-aged-taper"
#: Not a schedule of ours: the SOAP reference code (``pytorch_optimizer.SOAP``, its every=10) at the
#: study's hyperparameters, learning-rate schedule and weight-decay groups.
REFERENCE = "reference"
#: The variant of records made before SOAP refreshed after the step, kept V by rank and blocked
#: conv weights per dim (issue 11).
OLD_VARIANT = "in_step+rotate+merged"


def soap_variant() -> str:
    """``lk.SOAP``'s default refresh timing, second-moment carry-over and conv blocking, as
    ``"timing+carry+blocking"``: recorded with every run, so runs of other defaults are never
    compared with these."""
    parameters = inspect.signature(lk.SOAP).parameters
    blocking = "merged" if parameters["merge_dims"].default else "per-dim"
    return f"{parameters['refresh_timing'].default}+{parameters['second_moment_on_refresh'].default}+{blocking}"


def _variant_of(record: dict) -> str:
    return record.get("soap", OLD_VARIANT)


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


@torch.no_grad()
def _adam_first_step(optimizer: torch.optim.Optimizer, before: list) -> None:
    """Adam's first step, ``-lr * sign(g)`` (its bias-corrected ``m / sqrt(v)``), on every
    parameter with a gradient: the first step in the identity basis, for a SOAP whose own first
    step only set the statistics and bases (``update_at_start=False``)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.add_(param.grad.sign(), alpha=-float(group["lr"]))


@torch.no_grad()
def _undo_first_update(optimizer: torch.optim.Optimizer, before: list) -> None:
    """The weights put back as they were before the first step: its gradient stays in the
    statistics, the bases and Adam's moments; only the update is gone."""
    for param, weight in zip(_weights(optimizer), before):
        param.copy_(weight)


@torch.no_grad()
def _restart_moments(optimizer: torch.optim.Optimizer, before: list) -> None:
    """Adam's moments emptied after the first step, with its count taken back: the update stays,
    the first gradient stays in the statistics and bases, and the moments start at the second."""
    for group in optimizer.factor_groups():
        group.tensors["exp_avg"].zero_()
        group.tensors["exp_avg_sq"].zero_()
        group.steps.sub_(1)


def _restart_one_moment(name: str):
    """A hook that empties one of Adam's moments (``"exp_avg"``: M, ``"exp_avg_sq"``: V) after the
    first step and keeps the other. Its bias correction then counts one gradient fewer than the
    step count: ``1 - beta^(t-1)`` instead of ``1 - beta^t``, put in by rescaling SOAP's ``s`` (and
    ``e``, which carries ``sqrt(c2)``, for V) on every later step."""
    def hook(optimizer: torch.optim.Optimizer, before: list) -> None:
        assert optimizer.update_at_start, "the first step must have updated the moments to restart one of them"
        for group in optimizer.factor_groups():
            group.tensors[name].zero_()
        corrections = optimizer._bias_corrections

        def one_gradient_fewer(items, hyper):
            eps, scale = corrections(items, hyper)
            assert hyper.step is not None, "the study's parameter groups share one step count"
            t = float(hyper.step)
            if name == "exp_avg":
                return eps, scale * ((1 - hyper.beta1 ** t) / (1 - hyper.beta1 ** (t - 1)))
            ratio = math.sqrt((1 - hyper.beta2 ** (t - 1)) / (1 - hyper.beta2 ** t))
            return (eps * ratio if optimizer.bias_corrected_eps else eps), scale * ratio
        optimizer._bias_corrections = one_gradient_fewer
    return hook


def _weights(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


#: Schedules that change what the first step leaves behind: ``hook(optimizer, weights_before)``
#: runs right after it. Adam's first step in the identity basis instead of SOAP's (whose own then
#: only sets the statistics and bases), the update undone, or the moments restarted (both, M or V).
AFTER_FIRST_STEP = {"every10-first-step-adam": _adam_first_step,
                    "every10-first-step-undone": _undo_first_update,
                    "every10-first-step-fresh-moments": _restart_moments,
                    "every10-first-step-fresh-m": _restart_one_moment("exp_avg"),
                    "every10-first-step-fresh-v": _restart_one_moment("exp_avg_sq"),
                    "budget20-front3-aged-taper-first-step-fresh-m": _restart_one_moment("exp_avg")}


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
        before = [weight.detach().clone() for weight in _weights(optimizer)] if first_hooked else None
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


def _key(record: dict) -> tuple:
    """A run's identity; the reference does not depend on our defaults, so it has no variant."""
    variant = None if record["schedule"] == REFERENCE else _variant_of(record)
    return record["model"], record["schedule"], record["seed"], variant


def load_records(*paths: Path) -> list[dict]:
    """The runs stored in ``paths`` (parallel workers write one file each; missing files: none)."""
    return [run for path in paths if path.exists() for run in json.loads(path.read_text())["runs"]]


def save_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": records}, indent=1) + "\n")
    tmp.replace(path)


def run_all(path: Path, models: list[str], names: list[str], seeds: list[int], progress: bool = True) -> list[dict]:
    """Every (model, schedule, seed) not yet in ``path``; saved after each run (resumable). A file
    holds the runs of one kind of CPU (``scripts/machine.py``): one made elsewhere is refused."""
    records = load_records(path)
    here = describe_cpu()
    elsewhere = sorted({machine_of(r) or "a CPU it does not record" for r in records if not same_cpu(machine_of(r), here)})
    if elsewhere:
        raise ValueError(f"{path} holds runs made on {', '.join(elsewhere)}, and this is {here}: runs are compared "
                         f"seed by seed and reproduce only on the CPU that made them; store these in another --json")
    done = {_key(r) for r in records}
    current = soap_variant()
    chosen = [study_model(name) for name in models]
    unknown = [name for name in names if name != REFERENCE and name not in schedules(100)]
    if unknown:
        raise ValueError(f"unknown schedules {', '.join(unknown)}; the study's: {', '.join([*schedules(100), REFERENCE])}")
    todo = [(m, s, seed) for seed in seeds for m in chosen for s in names
            if (m.name, s, seed, None if s == REFERENCE else current) not in done]
    for model, schedule, seed in tqdm(todo, desc="refresh study", disable=not progress):
        records.append(run_one(model, schedule, seed))
        save_records(path, records)
    return records


# ----------------------------------------------------------------- the report
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
        if r["schedule"] == REFERENCE or _variant_of(r) == variant:
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


def paired(runs: list[dict], baseline: list[dict]) -> list[tuple[dict, dict]]:
    """Each of ``runs`` with ``baseline``'s run of its model and seed on the same kind of CPU
    (:func:`~scripts.machine.same_cpu_run`): round-off makes runs on two kinds of CPU different
    trajectories, so a run with no such partner is left out and CPUs pool without pairing across."""
    by_seed: dict[tuple, list[dict]] = {}
    for run in baseline:
        by_seed.setdefault((run["model"], run["seed"]), []).append(run)
    pairs = [(run, same_cpu_run(run, by_seed.get((run["model"], run["seed"]), []))) for run in runs]
    return [(run, base) for run, base in pairs if base is not None]


def baseline_of(schedule: str, baseline: str = "every10") -> str:
    """What a schedule's row is compared with: SOAP's ``baseline``, or for a run of another
    optimizer (:data:`OPTIMIZER_OF`) against SOAP's every=10, that optimizer's own every=10 (at
    the run's betas, :data:`BETAS_OF`)."""
    optimizer = OPTIMIZER_OF.get(schedule)
    if optimizer is None or baseline != "every10":
        return baseline
    if schedule in BETAS_OF:  # the same optimizer on the clock at the same betas
        return next(name for name, betas in BETAS_OF.items() if betas == BETAS_OF[schedule]
                    and OPTIMIZER_OF.get(name) == optimizer and name not in SOAP_OVERRIDES)
    return f"{optimizer}-every10"


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
    runs = {(r["model"], r["schedule"], r["seed"], _key(r)[3], cpu_kind(machine_of(r))): r["val_loss"] for r in records}
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


def plot(rows: list[Row], path: Path) -> None:
    """Final validation loss (mean over seeds, bars: min to max) against total refreshes, one panel
    per model, one marker per schedule; the dashed line is every=10's loss."""
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
                axis.errorbar(max(row.refreshes, 1), row.loss, yerr=bars, fmt=markers[index % len(markers)],
                              label=name, capsize=2, ms=6)
            if name == "every10" and row is not None:
                axis.axhline(row.loss, color="grey", lw=0.6, ls="--")
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 2x10^2, 3x10^2... overlap
        axis.set_title(model)
        axis.set_xlabel("total refreshes (log)")
        axis.set_ylabel("final val loss")
    for axis in list(axes.flat)[len(models):]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=legend_columns, fontsize=8)
    figure.tight_layout(rect=(0, legend_height / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
    path.write_text(text)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"``, ``"0-39"`` or a mix (``"0-2,7"``): the seeds, in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        for seed in range(int(low), int(high or low) + 1):
            if seed not in seeds:
                seeds.append(seed)
    return seeds


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
    parser.add_argument("--timing", type=Path, default=None, help="measure the wall-clock view into this JSON")
    parser.add_argument("--timing-json", type=Path, default=Path("runs/refresh_timing.json"),
                        help="with --report: the timing measured by --timing, put into the report")
    parser.add_argument("--sizes", default="768,1024,2048,4096")
    parser.add_argument("--default", default=DEFAULT, help="the schedule whose refresh rate the timing uses")
    parser.add_argument("--variant", default=None,
                        help=f"report the runs of these SOAP defaults (timing+carry; default: the current ones, "
                             f"{soap_variant()}; runs without a variant are {OLD_VARIANT})")
    parser.add_argument("--marker", default="refresh-study", help="with --report: the section of the page to replace")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show", action="store_true", help="print the tables of the runs stored in --json; run none")
    parser.add_argument("--against", default=None,
                        help="with --show: the schedules to compare with the reference (default: "
                             f"{','.join(REFERENCE_ROWS)})")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timing is not None:
        timings = [time_factor(int(size)) for size in tqdm(args.sizes.split(","), desc="timing", disable=args.no_progress)]
        args.timing.parent.mkdir(parents=True, exist_ok=True)
        args.timing.write_text(json.dumps({"timings": timings}, indent=1) + "\n")
        print(timing_table(timings, None))
        return 0
    if args.report is None and not args.show:
        run_all(args.json, args.models.split(","), args.schedules.split(","),
                args.seeds, not args.no_progress)
    records = load_records(args.json, *args.also)
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
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
