"""The KrADagrad paper's synthetic ill-conditioned problem: does fp32 KrADagrad beat fp32 Shampoo?

Minimise ``f(W) = 0.5 tr(W^T H1 W H2) = 0.5 vec(W)^T (H2 kron H1) vec(W)`` over a ``d x d`` matrix
``W``. ``H1`` and ``H2`` have random orthogonal eigenvectors and eigenvalues drawn log-uniformly
from ``[1/condition, 1]`` (both ends included), so each has condition number ``condition`` and the
Kronecker product its square. The gradient is ``H1 W H2`` (plus optional Gaussian noise scaled to
the initial gradient's RMS). Every method runs in fp32 (Shampoo also with fp64 statistics) from the
same ``W0``, with the same noise, over a small learning-rate sweep that the script performs; the
best rate per method (lowest final loss among runs that stayed finite) is plotted and tabulated.
The Kronecker methods run once per ``--eps`` value, because the damping is what decides whether
fp32 holds up.

    python scripts/illconditioned.py            # defaults: d=128, 400 steps, eps 1e-12 and 1e-6 (~2.5 min, 1 core)
    python scripts/illconditioned.py --size 256 --condition 1e5 --noise 0.01 --eps 1e-8 --out runs/ill_big
    # the alternating variant's defaults (W 32x24, H scaled by 100, lr grid 1e-3..3, ~1 min):
    python scripts/illconditioned.py --size 32 --cols 24 --scale 100 --steps 300 \
        --lrs 1e-3 3e-3 1e-2 3e-2 0.1 0.3 1 3 --methods "AdamW fp32" "KrADagrad defaults" \
        "KrADagrad* defaults" --out runs/ill_alternating

Writes to ``--out``: ``curves.csv`` (every run, every step), ``sweep.csv`` (one row per run),
``summary.md`` (the table) and ``loss.png`` (loss / initial loss vs step, log scale).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

if __package__ in (None, ""):  # `python scripts/illconditioned.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_kron as lk  # noqa: E402
from scripts.arguments import positive_int, refuse_unwritable  # noqa: E402

Factory = Callable[[list, float], torch.optim.Optimizer]
COLOURS = {"KrADagrad*": "C0", "KrADagrad* fp64": "C0", "KrADagrad": "C1", "Shampoo": "C3", "Shampoo fp64": "C3",
           "SOAP": "C2", "AdamW": "C4", "SGD": "C7"}


@dataclass(frozen=True)
class Method:
    """One row of the comparison: how to build the optimizer, and the learning rates to sweep."""

    name: str
    make: Factory
    learning_rates: tuple[float, ...]


def kronecker_methods(eps: float) -> list[Method]:
    """The Kronecker-factored AdaGrads at damping ``eps``: AdaGrad-style statistics (sum, no EMA),
    no grafting (the comparison is of preconditioners), momentum 0.9, no weight decay.

    ``eps`` means the same for KrADagrad* and Shampoo (``X ~ (eps I + L)^-1`` vs ``(L + eps I)^-1/4``).
    The alternating KrADagrad runs with ``damping="absolute"`` here (its default is relative, see
    the "defaults" rows) and gets ``sqrt(eps)``: its two ``X^(1/2)`` roots multiply the damping of
    both factors, so ``eps`` acts as ``eps^2`` on the Kronecker product.
    """
    grid = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    shampoo = dict(graft="none", shampoo_beta=1.0, eps=eps, betas=(0.9, 0.999))
    tag = f"eps {eps:g}"
    return [
        Method(f"KrADagrad* fp32, {tag}", lambda p, lr: lk.KrADagrad(p, lr=lr, eps=eps, variant="star"), grid),
        Method(f"KrADagrad fp32, {tag}", lambda p, lr: lk.KrADagrad(p, lr=lr, eps=math.sqrt(eps), variant="alternating",
                                                                           damping="absolute"), grid),
        Method(f"KrADagrad* fp64 statistics, {tag}",
               lambda p, lr: lk.KrADagrad(p, lr=lr, eps=eps, variant="star", statistics_dtype=torch.float64), grid),
        Method(f"Shampoo fp32, {tag}", lambda p, lr: lk.Shampoo(p, lr=lr, **shampoo), grid),
        Method(f"Shampoo fp64 statistics, {tag}",
               lambda p, lr: lk.Shampoo(p, lr=lr, statistics_dtype=torch.float64, **shampoo), grid),
    ]


def baseline_methods() -> list[Method]:
    adam_grid = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
    grid = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    return [
        Method("KrADagrad defaults", lambda p, lr: lk.KrADagrad(p, lr=lr, variant="alternating"), grid),
        Method("KrADagrad* defaults", lambda p, lr: lk.KrADagrad(p, lr=lr, variant="star"), grid),
        Method("SOAP fp32", lambda p, lr: lk.SOAP(p, lr=lr, weight_decay=0.0), adam_grid),
        Method("AdamW fp32", lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), adam_grid),
        Method("SGD fp32", lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), (0.03, 0.1, 0.3, 1.0, 3.0)),
    ]


@dataclass(frozen=True)
class Problem:
    h1: torch.Tensor  # fp64
    h2: torch.Tensor
    w0: torch.Tensor
    noise_scale: float

    def loss(self, weight: torch.Tensor) -> float:
        w = weight.detach().double()
        return 0.5 * torch.sum(w * (self.h1 @ w @ self.h2)).item()


def make_problem(size: int, condition: float, noise: float, seed: int, cols: Optional[int] = None,
                 scale: float = 1.0) -> Problem:
    generator = torch.Generator().manual_seed(seed)

    def spd(size: int) -> torch.Tensor:
        basis, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))
        exponents = torch.rand(size, dtype=torch.float64, generator=generator) * -math.log10(condition)
        exponents[0], exponents[-1] = 0.0, -math.log10(condition)
        return scale * (basis * torch.pow(10.0, exponents)) @ basis.T

    cols = size if cols is None else cols
    h1, h2 = spd(size), spd(cols)
    w0 = torch.randn(size, cols, dtype=torch.float64, generator=generator)
    gradient_rms = (h1 @ w0 @ h2).square().mean().sqrt().item()
    return Problem(h1, h2, w0, noise * gradient_rms)


@dataclass
class Run:
    method: str
    lr: float
    losses: list[float]
    seconds: float
    diverged_at: Optional[int]
    skipped_steps: int
    factor_failures: int

    @property
    def final(self) -> float:
        return self.losses[-1] if self.diverged_at is None else math.inf


def run_one(method: Method, lr: float, problem: Problem, steps: int, seed: int) -> Run:
    weight = torch.nn.Parameter(problem.w0.float().clone())
    optimizer = method.make([weight], lr)
    h1, h2 = problem.h1.float(), problem.h2.float()
    noise = torch.Generator().manual_seed(seed + 1)
    losses, diverged_at = [problem.loss(weight)], None
    started = time.perf_counter()
    for step in range(1, steps + 1):
        grad = h1 @ weight.detach() @ h2
        if problem.noise_scale:
            grad += problem.noise_scale * torch.randn(grad.shape, generator=noise)
        weight.grad = grad
        optimizer.step()
        losses.append(problem.loss(weight))
        if not math.isfinite(losses[-1]) or losses[-1] > 1e6 * losses[0]:
            diverged_at = step
            break
    seconds = time.perf_counter() - started
    failures = sum(info.failures for info in optimizer.factors()) if hasattr(optimizer, "factors") else 0
    return Run(method.name, lr, losses, seconds, diverged_at, getattr(optimizer, "skipped_steps", 0), failures)


def best_runs(runs: list[Run]) -> dict[str, Run]:
    best: dict[str, Run] = {}
    for run in runs:
        if run.method not in best or run.final < best[run.method].final:
            best[run.method] = run
    return best


def write_csvs(runs: list[Run], out: Path) -> None:
    with open(out / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "lr", "step", "loss"])
        for run in runs:
            writer.writerows([run.method, run.lr, step, loss] for step, loss in enumerate(run.losses))
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "lr", "final_loss", "relative_final_loss", "diverged_at_step",
                         "skipped_steps", "factor_failures", "seconds"])
        for run in runs:
            writer.writerow([run.method, run.lr, run.final, run.final / run.losses[0], run.diverged_at or "",
                             run.skipped_steps, run.factor_failures, f"{run.seconds:.3f}"])


def summary_table(runs: list[Run], args: argparse.Namespace) -> str:
    best = best_runs(runs)
    lines = [
        f"W {args.size} x {args.cols or args.size}, H scale {args.scale:g}, condition {args.condition:g} per factor ({args.condition ** 2:g} for H2 kron H1), "
        f"{args.steps} steps, gradient noise {args.noise:g}, seed {args.seed}; loss relative to f(W0); "
        f"best lr of the sweep (lowest final loss among runs that stayed finite).",
        "",
        "| method | best lr | final loss / f(W0) | NaN/Inf runs in sweep | factor failures | skipped steps | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in best.items():
        diverged = sum(1 for r in runs if r.method == name and r.diverged_at is not None)
        swept = sum(1 for r in runs if r.method == name)
        final = "diverged" if run.diverged_at is not None else f"{run.final / run.losses[0]:.2e}"
        lines.append(f"| {name} | {run.lr:g} | {final} | {diverged}/{swept} | {run.factor_failures} | "
                     f"{run.skipped_steps} | {run.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], out: Path, args: argparse.Namespace) -> None:
    """One panel per eps: the Kronecker methods at that eps, and the baselines for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_runs(runs)
    figure, axes = plt.subplots(1, len(args.eps), figsize=(5.2 * len(args.eps), 4.0), dpi=90, sharey=True, squeeze=False)
    for axis, eps in zip(axes[0], args.eps):
        for name, run in best.items():
            if "eps" in name and not name.endswith(f"eps {eps:g}"):
                continue
            relative = [loss / run.losses[0] for loss in run.losses]
            label = name.replace(f", eps {eps:g}", "")
            style = ":" if "eps" not in name else ("--" if "fp64" in name else "-")
            color = COLOURS.get(label.split(" fp")[0] + (" fp64" if "fp64" in label else ""))
            axis.plot(range(len(relative)), relative, style, color=color, label=f"{label} (lr {run.lr:g})", linewidth=1.3)
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_title(f"eps = {eps:g}", fontsize=10)
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel("f(W) / f(W0)")
    figure.suptitle(f"0.5 tr(W^T H1 W H2), W {args.size} x {args.cols or args.size}, condition {args.condition:g} per factor, "
                    f"noise {args.noise:g}", fontsize=10)
    figure.tight_layout()
    figure.savefig(out / "loss.png")
    plt.close(figure)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="W is size x cols (the paper: 1536)")
    parser.add_argument("--cols", type=int, default=None, help="columns of W (default: --size)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply H1 and H2 by this (the loss by its square): eigenvalues in [scale/condition, scale]")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="one learning-rate grid for every method (default: each method's own)")
    parser.add_argument("--condition", type=float, default=1e4, help="condition number of H1 and of H2")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--noise", type=float, default=0.0, help="gradient noise std, relative to the initial gradient RMS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-12, 1e-6],
                        help="damping of the Kronecker methods, one comparison per value "
                             "(1e-12 is Shampoo's library default)")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of method names (default: all)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("runs/illconditioned"),
                        help="folder for curves.csv, sweep.csv, summary.md and loss.png (made if missing)")
    args = parser.parse_args(argv)
    finite = all(math.isfinite(value) for value in (args.scale, args.condition, args.noise))  # inf or nan: NaN losses
    if args.size < 2 or (args.cols is not None and args.cols < 2) or not finite or not args.scale > 0 or args.steps < 1 or not args.condition >= 1 or args.noise < 0:
        parser.error("need --size >= 2, --cols >= 2, --steps >= 1 and finite --scale > 0, --condition >= 1, --noise >= 0")
    if not all(0 < eps < 1 for eps in args.eps):
        parser.error("every --eps must be in (0, 1)")
    if args.lrs and not all(0 < lr < float("inf") for lr in args.lrs):
        parser.error(f"every --lrs must be a positive learning rate, got {args.lrs}")
    refuse_unwritable(parser, ("--out", args.out), folder=True)
    unknown = set(args.methods or ()) - {method.name for method in available_methods(args.eps)}
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from "
                     f"{[method.name for method in available_methods(args.eps)]}")
    return args


def available_methods(eps_values: list[float]) -> list:
    """Every Kronecker method at each damping, then the baselines: what --methods chooses from."""
    return [method for eps in eps_values for method in kronecker_methods(eps)] + baseline_methods()


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    available = available_methods(args.eps)
    if args.methods:
        available = [m for m in available if m.name in args.methods]
    args.out.mkdir(parents=True, exist_ok=True)  # found makeable by parse_args
    problem = make_problem(args.size, args.condition, args.noise, args.seed, args.cols, args.scale)
    jobs = [(method, lr) for method in available for lr in (args.lrs or method.learning_rates)]
    runs = [run_one(method, lr, problem, args.steps, args.seed)
            for method, lr in tqdm(jobs, desc="runs", unit="run")]
    write_csvs(runs, args.out)
    table = summary_table(runs, args)
    (args.out / "summary.md").write_text(table)
    plot(runs, args.out, args)
    print(table)
    print(f"wrote {args.out}/curves.csv, sweep.csv, summary.md, loss.png")


if __name__ == "__main__":
    main()
