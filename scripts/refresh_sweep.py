"""When do eigenbasis refreshes pay off? SOAP on one recipe under step-dependent refresh schedules.

Each ``--run NAME MODE PIECES`` trains SOAP (the compare script's tuned settings, same seed, data
order and step budget) with a piecewise-constant schedule: ``PIECES`` is ``until:value,...`` with
``inf`` for the last piece; ``MODE`` is ``fixed`` (value = refresh period in steps) or ``adaptive``
(value = staleness tolerance, checked every step). The first run is the reference of the
"vs first" column. Prints a markdown table: refreshes in all and by step 100, final validation
loss, and its difference to the first run. This is how the adaptive contender of
``scripts/compare.py`` was chosen (docs/refresh-study.md, "How the schedule was chosen")::

    python -m scripts.refresh_sweep --run every10 fixed inf:10 --run every20 fixed inf:20 \\
        --run early10 fixed 150:10,inf:30 --run late10 fixed 150:30,inf:10 \\
        --run tol0.4 adaptive inf:0.4 --run early0.15 adaptive 60:0.15,inf:0.5
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

import lightning_kron as lk
from recipes.errors import RecipeInputError
from scripts import compare
from scripts.arguments import positive_int, seed


@dataclass(frozen=True)
class Piecewise:
    """A value that depends on the step: ``pieces`` is ``[(until, value), ...]``, the last ``until``
    infinite. Called as a tolerance schedule, it is ``AdaptiveRefresh(schedule=...)``'s tolerance."""

    pieces: tuple[tuple[float, float], ...]

    def at(self, step: int) -> float:
        return next(value for until, value in self.pieces if step < until)

    def __call__(self, step: int, total_steps: Optional[float], tolerance: float) -> float:
        return self.at(step)


@dataclass(frozen=True)
class PiecewiseFixedRefresh:
    """Every factor refreshed on a clock whose period depends on the step (a ``RefreshPolicy``:
    the library's ``FixedRefresh`` has one period)."""

    periods: Piecewise

    def checks_at(self, step: int) -> bool:
        return step % int(self.periods.at(step)) == 0

    def select(self, staleness: torch.Tensor, step: int, total_steps: Optional[float] = None) -> torch.Tensor:
        return torch.ones_like(staleness, dtype=torch.bool)


def make_policy(mode: str, pieces: tuple[tuple[float, float], ...], max_iters: int = 1):
    """``fixed``: :class:`PiecewiseFixedRefresh`; ``adaptive``: the library's ``AdaptiveRefresh``
    checked every step, with the pieces as its tolerance schedule."""
    if mode == "fixed":
        return PiecewiseFixedRefresh(Piecewise(pieces))
    return lk.AdaptiveRefresh(tolerance=pieces[-1][1], max_iters=max_iters, schedule=Piecewise(pieces))


def parse_pieces(text: str) -> tuple[tuple[float, float], ...]:
    """``"150:10,inf:30"`` -> ``((150, 10.0), (inf, 30.0))``; the last piece must be open-ended."""
    pieces = []
    for item in text.split(","):
        until, _, value = item.partition(":")
        try:
            pieces.append((math.inf if until == "inf" else float(until), float(value)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"each piece of {text!r} must be UNTIL:VALUE (numbers, UNTIL may be "
                                             f"'inf'), got {item!r}") from None
    if not pieces or pieces[-1][0] != math.inf:
        raise argparse.ArgumentTypeError(f"the last piece of {text!r} must start with 'inf:'")
    return tuple(pieces)


def _policies(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """Every run's policy, built before any training, so a bad schedule fails in one line at once."""
    policies = []
    for _, mode, pieces in args.run:
        if mode not in ("fixed", "adaptive"):
            parser.error(f"MODE must be fixed or adaptive, got {mode!r}")
        try:
            parsed = parse_pieces(pieces)
            if mode == "fixed" and any(value < 1 or value != int(value) for _, value in parsed):
                raise argparse.ArgumentTypeError(f"a fixed schedule's periods must be whole numbers >= 1, got {pieces!r}")
            policies.append(make_policy(mode, parsed, args.max_iters))
        except (argparse.ArgumentTypeError, ValueError) as error:
            parser.error(str(error))
    return policies


def train(args: argparse.Namespace, name: str, policy, solver: str,
          precision: Optional[dict] = None) -> tuple[float, int, int]:
    """Final validation loss, total refreshes and refreshes by step 100 of one run (``precision``:
    SOAP's ``rotation_dtype`` / ``statistics_product_dtype`` options, if any)."""
    soap = next(c for c in compare.CONTENDERS if c.key == "soap").optimizer
    precision = precision or {}
    config = soap.replace(options={**soap.options, "refresh": policy, "solver": solver, **precision})
    record = compare.train_one(args, compare.Contender(name, name, config))
    early = record.refreshes[min(99, len(record.refreshes) - 1)]
    return record.val_loss[-1], record.total_refreshes, early


def _precision(args: argparse.Namespace) -> dict:
    """The low-precision options asked for (float32 means the default: leave the option out)."""
    chosen = {"rotation_dtype": args.rotation_dtype, "statistics_product_dtype": args.statistics_product_dtype}
    return {key: getattr(torch, value) for key, value in chosen.items() if value != "float32"}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs=3, action="append", required=True, metavar=("NAME", "MODE", "PIECES"))
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--eval-every", type=positive_int, default=25)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--solver", choices=("qr", "eigh"), default="qr", help="refresh solver of every run")
    parser.add_argument("--max-iters", type=int, default=1, help="warm-QR iterations per adaptive refresh")
    parser.add_argument("--rotation-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="SOAP's rotation_dtype in every run (bfloat16: the fast CPU/GPU path)")
    parser.add_argument("--statistics-product-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="SOAP's statistics_product_dtype in every run")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--data", default=None, help="text file/folder (default: Python's standard library)")
    parser.add_argument("--context-length", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: 32")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    policies = _policies(parser, args)
    torch.set_num_threads(args.threads)
    recipe_args = compare.parse_args(["--steps", str(args.steps), "--eval-every", str(args.eval_every),
                                      "--seed", str(args.seed), "--accelerator", "cpu",
                                      "--context-length", str(args.context_length)]
                                     + (["--no-progress"] if args.no_progress else []))
    recipe_args.data, recipe_args.batch_size, recipe_args.cache_dir = args.data, args.batch_size, args.cache_dir
    rows, reference = [], None
    try:  # as in compare: bad data and data too small are one line before the first run
        compare.check_inputs(recipe_args)
        for (name, mode, pieces), policy in tqdm(list(zip(args.run, policies)), desc="schedules", disable=args.no_progress):
            loss, refreshes, early = train(recipe_args, name, policy, args.solver, _precision(args))
            reference = loss if reference is None else reference
            rows.append(f"| {name} | {mode} {pieces} | {refreshes} | {early} | {loss:.4f} | {100 * (loss / reference - 1):+.2f}% |")
    except RecipeInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("| run | schedule | refreshes | by step 100 | final val loss | vs first |\n|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
