"""Compare optimizers on one recipe: same model init, same data, same batch order, same step budget.

Runs AdamW, SOAP (refresh every 10 steps), SOAP (adaptive refresh), Shampoo with Adam grafting and
KrADagrad (skipped with a note when this lightning_kron build lacks it), then writes to ``--out``:

- ``results.md`` / ``results.csv`` / ``results.json``: final validation loss, steps to reach AdamW's
  final validation loss (linearly interpolated between evaluations) and the ratio to AdamW's steps,
  training wall time, the median step time and the torch thread count, eigenbasis refreshes,
  optimizer-state memory and (on a GPU) peak allocated memory;
- ``val_loss_vs_step.png``, ``val_loss_vs_time.png``, ``refreshes_per_step.png`` and
  ``staleness_heatmap.png`` (factor x step, one panel per Kronecker optimizer).

The defaults (GPT tiny on Python's standard library, 300 steps) take about 10 minutes on two CPU
cores; ``--steps``/``--eval-every`` scale it. Example::

    python -m scripts.compare --out runs/compare
    python -m scripts.compare --steps 20 --eval-every 10 --optimizers adamw,soap --out /tmp/quick
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from tqdm.auto import tqdm

from recipes.errors import RecipeInputError
from recipes.optimizers import OPTIMIZER_NAMES, OptimizerConfig, method_and_refresh
from recipes.quiet import quiet_dependencies
from scripts.arguments import output_problem, positive_int, seed
from scripts.run_recorder import RunRecord, RunRecorder


@dataclass(frozen=True)
class Contender:
    """One optimizer of the comparison: ``key`` selects it on the command line."""

    key: str
    label: str
    optimizer: OptimizerConfig


# Tuned on the default GPT recipe with 300-step runs (docs/benchmarks.md, "Training comparison: GPT recipe"):
# AdamW's best lr of {1.5, 2, 2.5, 3, 6}e-3; one lr for the three Kronecker methods (SOAP improved up
# to the largest tried, 2e-2, by under 2% beyond 1e-2; 1e-2 keeps a margin from instability).
SHARED = dict(weight_decay=0.1, warmup_steps=30, min_lr_ratio=0.1)
KRON_LR = 1e-2
# KrADagrad: its library defaults (AdaGrad sum, eps 0.1, no graft) reach only 2.56 here; with the
# statistics as an EMA, eps 1e-5 (X starts at I / eps, so eps must sit below the gradient
# statistics' scale) and Adam grafting: 2.00 (eps 1e-4: 2.03; 1e-6: 2.15); with the tighter
# "frobenius" domination scale, which shrinks X faster for high-rank minibatch statistics: 1.84.
KRADAGRAD = dict(SHARED, lr=KRON_LR, betas=(0.95, 0.95),
                 options={"eps": 1e-5, "graft": "adam", "shampoo_beta": 0.95, "domination_scale": "frobenius"})
# Adaptive: tolerance 0.15 for the first 20% of the steps, then 0.5. Measured with
# scripts/refresh_sweep.py (docs/refresh-study.md, "How the schedule was chosen"): refreshes pay off early
# (every 10 steps for the first half and every 30 after ends 0.65% above every=10; the other way
# round, 12% above), while a constant tolerance refreshes *more* late in training.
ADAPTIVE_TOLERANCE, ADAPTIVE_EARLY_TOLERANCE, ADAPTIVE_EARLY_FRACTION = 0.5, 0.15, 0.2
CONTENDERS = (
    Contender("adamw", "AdamW", OptimizerConfig(name="adamw", lr=2.5e-3, betas=(0.9, 0.95), **SHARED)),
    Contender("soap", "SOAP (every 10)", OptimizerConfig(name="soap", lr=KRON_LR, betas=(0.95, 0.95), refresh_schedule="fixed", refresh_every=10, **SHARED)),
    Contender("soap_default", "SOAP (default budget)", OptimizerConfig(name="soap", lr=KRON_LR, betas=(0.95, 0.95), **SHARED)),
    Contender("soap_adaptive", "SOAP (adaptive)", OptimizerConfig(
        name="soap_adaptive", lr=KRON_LR, betas=(0.95, 0.95), tolerance=ADAPTIVE_TOLERANCE,
        early_tolerance=ADAPTIVE_EARLY_TOLERANCE, early_fraction=ADAPTIVE_EARLY_FRACTION, **SHARED)),
    Contender("shampoo", "Shampoo + Adam graft", OptimizerConfig(name="shampoo", lr=KRON_LR, betas=(0.9, 0.95), refresh_every=10, **SHARED)),
    Contender("kradagrad", "KrADagrad + Adam graft", OptimizerConfig(name="kradagrad", **KRADAGRAD)),
)
RECIPES = ("gpt", "vision")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default in ``--help``."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    parser.add_argument("--recipe", choices=RECIPES, default="gpt")
    parser.add_argument("--optimizers", default=",".join(c.key for c in CONTENDERS),
                        help="comma-separated subset of: " + ", ".join(c.key for c in CONTENDERS))
    parser.add_argument("--steps", type=positive_int, default=300, help="optimizer steps per run")
    parser.add_argument("--eval-every", type=positive_int, default=25, help="validate every this many steps")
    parser.add_argument("--data", default=None, help="data path (default: the recipe's built-in data)")
    parser.add_argument("--family", default=None, help="model family (gpt: gpt2|llama, vision: vit|resnet)")
    parser.add_argument("--size", default="tiny", help="model size")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: 32 (gpt), 64 (vision)")
    parser.add_argument("--context-length", type=positive_int, default=None, help="GPT only; default: 128")
    parser.add_argument("--lr", action="append", default=[], metavar="NAME=LR", help="override one optimizer's lr")
    parser.add_argument("--options", action="append", default=[], metavar="NAME=JSON",
                        help="extra keyword arguments of one optimizer, a JSON object, e.g. "
                             "soap='{\"second_moment_on_refresh\": \"rotate\"}'")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="Lightning accelerator")
    parser.add_argument("--out", default="runs/compare", help="folder for the table and plots")
    parser.add_argument("--cache-dir", default=None, help="token cache folder (GPT)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if problem := _argument_problem(args):
        parser.error(problem)
    if args.recipe == "gpt" and args.context_length is None:
        args.context_length = 128  # resolved here, so results.json records what ran
    return args


def _argument_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the command line, found before any run starts (None when nothing is)."""
    if args.recipe != "gpt" and args.context_length is not None:
        return f"--context-length is a GPT option; the {args.recipe} recipe has no context"
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return f"--accelerator {args.accelerator}: no CUDA GPU is visible to torch here"
    # the table is written after every run: a folder that cannot be made then would throw the runs away
    return output_problem("--out", args.out, folder=True)


def known_contenders() -> dict[str, Contender]:
    """The tuned contenders above, then every other optimizer name of the recipes (each method of
    the registry) at the recipe defaults: a newly registered method can be compared at once."""
    known = {c.key: c for c in CONTENDERS}
    for name in OPTIMIZER_NAMES:
        if name not in known:
            spec, _ = method_and_refresh(name)
            known[name] = Contender(name, spec.label, OptimizerConfig(name=name, **SHARED))
    return known


def select_contenders(args: argparse.Namespace) -> list[Contender]:
    """The requested contenders with ``--lr`` overrides; unknown names -> RecipeInputError."""
    known = known_contenders()
    wanted = [key.strip() for key in args.optimizers.split(",") if key.strip()]
    if not wanted:
        raise RecipeInputError(f"--optimizers names none; choose from {', '.join(known)}")
    if unknown := [key for key in wanted if key not in known]:
        raise RecipeInputError(f"unknown optimizer(s) {unknown}; choose from {', '.join(known)}")
    if repeated := sorted({key for key in wanted if wanted.count(key) > 1}):
        raise RecipeInputError(f"--optimizers names {', '.join(repeated)} more than once")
    overrides = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = None
        if name not in known or lr is None or not lr > 0 or lr == float("inf"):
            raise RecipeInputError(f"--lr expects NAME=LR with NAME one of {', '.join(known)} and LR a positive "
                                   f"number, got {item!r}")
        overrides[name] = lr
    options = _option_overrides(args.options, known)
    if unused := sorted((set(overrides) | set(options)) - set(wanted)):
        raise RecipeInputError(f"--lr/--options given for {', '.join(unused)}, which --optimizers does not select")
    chosen = []
    for key in wanted:
        contender = known[key]
        if key in overrides:
            contender = replace(contender, optimizer=contender.optimizer.replace(lr=overrides[key]))
        if key in options:  # validated by OptimizerConfig: an unknown key fails here, in one line
            merged = {**contender.optimizer.options, **options[key]}
            contender = replace(contender, optimizer=contender.optimizer.replace(options=merged))
        chosen.append(contender)
    return chosen


def _option_overrides(items: list[str], known: dict[str, Contender]) -> dict[str, dict]:
    """``--options NAME=JSON`` items as ``{name: options}``; malformed ones -> RecipeInputError."""
    overrides = {}
    for item in items:
        name, _, text = item.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if name not in known or not isinstance(value, dict):
            raise RecipeInputError(f"--options expects NAME=JSON with NAME one of {', '.join(known)} and JSON an "
                                   f"object of optimizer keyword arguments, got {item!r}")
        overrides[name] = {**overrides.get(name, {}), **value}
    return overrides


def build_data(args: argparse.Namespace) -> L.LightningDataModule:
    """The recipe's data module (bad paths and options raise RecipeInputError here)."""
    if args.recipe == "gpt":
        from recipes.text_data import TextDataModule

        batch_size = 32 if args.batch_size is None else args.batch_size  # None: not given (0 is refused)
        return TextDataModule(source=args.data, context_length=args.context_length, batch_size=batch_size,
                              cache_dir=args.cache_dir, seed=args.seed)
    from recipes.image_data import ImageDataModule

    batch_size = 64 if args.batch_size is None else args.batch_size
    return ImageDataModule(source=args.data, batch_size=batch_size, seed=args.seed)


def build_recipe(args: argparse.Namespace, optimizer: OptimizerConfig) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Fresh model and data module for one run (the caller seeds first, so inits are identical)."""
    data = build_data(args)
    if args.recipe == "gpt":
        from recipes.gpt import CausalLM

        model = CausalLM(family=args.family or "gpt2", size=args.size, context_length=args.context_length, optimizer=optimizer)
        return model, data
    from recipes.vision import ImageClassifier

    model = ImageClassifier(family=args.family or "vit", size=args.size, num_classes=data.num_classes,
                            channels=data.channels, image_size=data.image_size, optimizer=optimizer)
    return model, data


def check_model_names(args: argparse.Namespace) -> None:
    """An unknown family or size, found without building a model (a 124m one takes a while)."""
    if args.recipe == "gpt":
        from recipes.gpt import transformer_config

        transformer_config(args.family or "gpt2", args.size, args.context_length, 0.0)
    else:
        from recipes.vision import vision_config

        vision_config(args.family or "vit", args.size, 10, 1, 32)


def check_inputs(args: argparse.Namespace) -> None:
    """Bad model or data names and data too small, found before the first run (RecipeInputError)."""
    check_model_names(args)
    build_data(args).setup("fit")


def train_one(args: argparse.Namespace, contender: Contender) -> RunRecord:
    """Train one contender for ``args.steps`` steps and return what the recorder saw."""
    L.seed_everything(args.seed, verbose=False)
    model, data = build_recipe(args, contender.optimizer)
    recorder = RunRecorder(contender.label, args.steps, progress=not args.no_progress)
    trainer = L.Trainer(max_steps=args.steps, val_check_interval=args.eval_every, check_val_every_n_epoch=None,
                        accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[recorder])
    trainer.fit(model, datamodule=data)
    if not recorder.record.val_steps or recorder.record.val_steps[-1] != trainer.global_step:
        trainer.validate(model, datamodule=data, verbose=False)  # the table needs the final loss
    return recorder.record


def steps_to_reach(record: RunRecord, target: float) -> Optional[float]:
    """First step at which validation loss reaches ``target``, interpolated between evaluations."""
    previous_step, previous_loss = 0, None
    for step, loss in zip(record.val_steps, record.val_loss):
        if loss <= target:
            if previous_loss is None or previous_loss == loss:
                return float(step)
            return previous_step + (previous_loss - target) / (previous_loss - loss) * (step - previous_step)
        previous_step, previous_loss = step, loss
    return None


def summary_rows(records: list[RunRecord], contenders: list[Contender]) -> list[dict]:
    """One row per run; "steps to AdamW's loss" only when AdamW ran."""
    reference = next((r for r, c in zip(records, contenders) if c.key == "adamw"), None)
    target = reference.val_loss[-1] if reference else None
    reference_steps = steps_to_reach(reference, target) if reference else None
    rows = []
    for record, contender in zip(records, contenders):
        steps = steps_to_reach(record, target) if target is not None else None
        rows.append({
            "optimizer": record.label, "lr": contender.optimizer.resolved_lr,
            "final_val_loss": record.val_loss[-1],
            "steps_to_adamw_loss": steps,
            "step_ratio_vs_adamw": steps / reference_steps if steps is not None and reference_steps else None,
            "train_seconds": record.train_seconds, "ms_per_step": 1000 * record.median_step_seconds,
            "threads": record.threads,
            "refreshes": record.total_refreshes, "refresh_seconds": record.refresh_seconds,
            "optimizer_state_mb": record.optimizer_state_mb,
            "peak_gpu_mb": record.peak_gpu_mb,
        })
    return rows


def _cell(value, digits: int = 3) -> str:
    """Table text: ``-`` for missing, ``digits`` decimals (significant digits for tiny numbers)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if 0 < abs(value) < 1e-2 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    header = ["optimizer", "lr", "final val loss", "steps to AdamW's final loss", "x AdamW steps", "train time (s)",
              "ms/step (median)", "threads", "refreshes", "refresh time (s)", "optimizer state (MB)", "peak GPU memory (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["optimizer"], _cell(row["lr"]), _cell(row["final_val_loss"], 4), _cell(row["steps_to_adamw_loss"], 0),
                 _cell(row["step_ratio_vs_adamw"], 2), _cell(row["train_seconds"], 1), _cell(row["ms_per_step"], 0),
                 _cell(row["threads"]), _cell(row["refreshes"]), _cell(row["refresh_seconds"], 1), _cell(row["optimizer_state_mb"], 2), _cell(row["peak_gpu_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TIMING_NOTE = ("ms/step is the median of the per-step wall times (not total time / steps), which the slow steps "
               "of a loaded machine disturb least; wall time still depends on machine load and on the thread count, "
               "so compare times only between runs made together on the same machine.")


def write_results(rows: list[dict], records: list[RunRecord], args: argparse.Namespace, notes: list[str]) -> Path:
    from scripts.compare_plots import draw_all, optimizer_styles

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    device = torch.cuda.get_device_name() if args.accelerator != "cpu" and torch.cuda.is_available() else "CPU"
    header = (f"{args.recipe} recipe ({args.family or 'default family'}, {args.size}), {args.steps} steps, "
              f"validation every {args.eval_every}, seed {args.seed}, {device}, torch threads {torch.get_num_threads()}")
    text = "\n\n".join([f"# Optimizer comparison\n\n{header}", markdown_table(rows), TIMING_NOTE, *notes]) + "\n"
    (out / "results.md").write_text(text)
    settings = {key: value for key, value in vars(args).items() if key != "no_progress"}
    settings.update(device=device, threads=torch.get_num_threads())
    (out / "results.json").write_text(json.dumps({"settings": settings, "timing": TIMING_NOTE, "rows": rows}, indent=2) + "\n")
    draw_all(records, out, styles=optimizer_styles([c.label for c in CONTENDERS]))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with quiet_dependencies():
        return _compare(args)


def _compare(args: argparse.Namespace) -> int:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    try:
        contenders = select_contenders(args)
        check_inputs(args)
        notes: list[str] = []
        records = [train_one(args, c) for c in tqdm(contenders, desc="optimizers", disable=args.no_progress)]
    except RecipeInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = summary_rows(records, contenders)
    out = write_results(rows, records, args, notes)
    print(markdown_table(rows))
    print(f"\nwrote {out / 'results.md'}, results.csv, results.json and 4 plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
