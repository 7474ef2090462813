"""Per-step optimizer time and optimizer-state memory on GPT-style parameter shapes.

Times only ``optimizer.step()`` (gradients are fixed random tensors, cycled), so the numbers are the
optimizer's own cost: the median step (no refresh) and the amortized mean over ``--steps`` steps
(refreshes included). The candidates take their steps in turn (round robin), so a change of load on
the machine affects every row alike and the ratios in one table are comparable. The first step
(exact eigendecomposition of every factor) is a one-time cost and is reported separately;
``--warmup N`` leaves N steps untimed. Rivals (pytorch-optimizer's SOAP, a port of the reference
code; HeavyBall's SOAP, compiled on its first step and first refresh) join the table when
installed, with the same max_precond_dim and frequency.

    python -m scripts.bench_step --models gpt-mini gpt2-small --steps 20
    python -m scripts.bench_step --models gpt-mini --warmup 11 --only "fixed every=10" pytorch heavyball
    python -m scripts.bench_step --device cuda

``--refresh-orthonormalizers`` instead times one warm refresh of every factor (the stored B of
SOAP at step every+1, just before its first warm refresh) with each orthonormalizer, and counts
the failures of shifted Cholesky-QR3 and Cholesky-QR2 (members refreshed again with Householder)
with and without their QR-step shift:

    python -m scripts.bench_step --models gpt-mini --refresh-orthonormalizers
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
from tqdm import tqdm

import lightning_kron as lk
from lightning_kron.engine.solvers import ORTHONORMALIZERS, descending_diagonal_order, qr_step_in_basis
from lightning_kron.engine.staleness import staleness
from lightning_kron.methods.registry import METHODS

MODELS = {  # (layers, width, vocabulary, context): GPT-2 parameter layout, tied embeddings
    "gpt-mini": (6, 256, 256, 256),
    "gpt-deep": (24, 128, 256, 256),  # as many parameters, 4x the tensors: per-tensor overhead shows
    "gpt2-small": (12, 768, 50304, 1024),
}


def gpt_parameter_shapes(layers: int, width: int, vocab: int, context: int) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2's parameters (transformers' Conv1D layout), the output head tied to the embedding."""
    shapes = [("wte.weight", (vocab, width)), ("wpe.weight", (context, width))]
    for layer in range(layers):
        prefix = f"h.{layer}."
        shapes += [
            (prefix + "ln_1.weight", (width,)), (prefix + "ln_1.bias", (width,)),
            (prefix + "attn.c_attn.weight", (width, 3 * width)), (prefix + "attn.c_attn.bias", (3 * width,)),
            (prefix + "attn.c_proj.weight", (width, width)), (prefix + "attn.c_proj.bias", (width,)),
            (prefix + "ln_2.weight", (width,)), (prefix + "ln_2.bias", (width,)),
            (prefix + "mlp.c_fc.weight", (width, 4 * width)), (prefix + "mlp.c_fc.bias", (4 * width,)),
            (prefix + "mlp.c_proj.weight", (4 * width, width)), (prefix + "mlp.c_proj.bias", (width,)),
        ]
    return shapes + [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]


def candidates(max_precond_dim: int, every: int) -> dict[str, Callable]:
    """Optimizer factories by table row; rivals only when their package is importable."""
    common = dict(max_precond_dim=max_precond_dim)
    rows = {
        "torch AdamW (foreach)": lambda p: torch.optim.AdamW([t for _, t in p], lr=1e-3, foreach=True),
        f"SOAP fixed every={every}": lambda p: lk.SOAP(p, refresh=lk.FixedRefresh(every=every), **common),
        f"SOAP fixed every={every}, bf16 rotations": lambda p: lk.SOAP(
            p, refresh=lk.FixedRefresh(every=every), rotation_dtype=torch.bfloat16, **common),
        f"SOAP fixed every={every}, bf16 rotations+statistics": lambda p: lk.SOAP(
            p, refresh=lk.FixedRefresh(every=every), rotation_dtype=torch.bfloat16,
            statistics_product_dtype=torch.bfloat16, **common),
        "SOAP adaptive tol=0.05": lambda p: lk.SOAP(p, refresh=lk.AdaptiveRefresh(tolerance=0.05), **common),
    }
    for spec in METHODS.values():  # every other registered method at its own defaults (SOAP has its rows above)
        if spec.name != "soap":
            rows[f"{spec.label} (defaults)"] = lambda p, spec=spec: spec.optimizer(p, **common)
    return {**rows, **rival_rows(max_precond_dim, every)}


def rival_rows(max_precond_dim: int, every: int, heavyball: bool = True) -> dict[str, Callable]:
    """Other projects' SOAP with the same max_precond_dim and frequency, when installed."""
    rows = {}
    try:
        import pytorch_optimizer

        rows[f"pytorch-optimizer SOAP every={every}"] = lambda p: pytorch_optimizer.SOAP(
            [t for _, t in p], precondition_frequency=every, max_precondition_dim=max_precond_dim)
    except ImportError:
        pass
    if heavyball:
        try:
            import heavyball as hb

            rows[f"HeavyBall SOAP every={every}"] = lambda p: _quiet_compiler() or hb.SOAP(
                [t for _, t in p], precondition_frequency=every, max_precond_dim=max_precond_dim)
        except ImportError:
            pass
    return rows


def _quiet_compiler() -> None:
    """HeavyBall compiles its step with max-autotune, whose Inductor prints a table per matmul
    shape to stderr (and torch's own TypedStorage deprecation warning) between the benchmark's
    lines; none of it is a figure of the benchmark."""
    import torch._inductor.config as inductor

    inductor.autotune_num_choices_displayed = 0
    inductor.max_autotune_report_choices_stats = False
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)


def state_megabytes(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of distinct tensor storages reachable from ``optimizer.state`` (views counted once)."""
    seen, total = set(), 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(dict(optimizer.state))
    return total / 2**20


@dataclass
class Timing:
    first_step_s: float
    median_ms: float
    amortized_ms: float
    state_mb: float


def _power_law(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A random matrix whose k-th singular value is 1/k (a vector stays Gaussian)."""
    if len(shape) < 2:
        return torch.randn(shape, generator=generator)
    rows, cols = shape
    rank = min(rows, cols)
    left, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator))
    values = 1.0 / torch.arange(1, rank + 1, dtype=torch.float32)
    return (left * values) @ right.T * (rows * cols) ** 0.5 / values.norm()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gradient_sets(shapes, device: torch.device, count: int = 3) -> list[list[torch.Tensor]]:
    """Fixed gradients, shared by every candidate (no optimizer here writes into ``.grad``)."""
    generator = torch.Generator().manual_seed(0)
    # Training gradients are correlated from step to step and their spectra are heavy-tailed: a fixed
    # component with power-law singular values plus 30% noise. (I.i.d. Gaussian gradients make every
    # factor drift past any tolerance every step: the adaptive rows' worst case.)
    base = [_power_law(shape, generator) for _, shape in shapes]
    return [[(b + 0.3 * torch.randn(b.shape, generator=generator)).to(device) for b in base] for _ in range(count)]


class Candidate:
    """One optimizer over its own copy of the parameters, timed one step at a time."""

    def __init__(self, factory: Callable, shapes, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(1)
        self.params = [(name, torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02).to(device)))
                       for name, shape in shapes]
        self.optimizer = factory(self.params)
        self.device = device
        self.durations: list[float] = []

    def step(self, gradients: list[torch.Tensor]) -> None:
        for (_, param), grad in zip(self.params, gradients):
            param.grad = grad
        _sync(self.device)
        started = time.perf_counter()
        self.optimizer.step()
        _sync(self.device)
        self.durations.append(time.perf_counter() - started)

    def timing(self, warmup: int = 1) -> Timing:
        """The first step, and the statistics of the steps after the first ``warmup``."""
        first, rest = self.durations[0], self.durations[warmup:]
        return Timing(first, 1e3 * statistics.median(rest), 1e3 * statistics.fmean(rest), state_megabytes(self.optimizer))


def time_round_robin(rows: dict[str, Callable], shapes, device: torch.device, steps: int,
                     warmup: int = 1) -> dict[str, Timing]:
    """All candidates take their steps in turn, so a load change on the machine hits every row alike."""
    grads = gradient_sets(shapes, device)
    candidates = {name: Candidate(factory, shapes, device) for name, factory in rows.items()}
    with tqdm(total=len(candidates) * (steps + warmup), desc="optimizer steps", file=sys.stderr) as progress:
        for index in range(steps + warmup):
            for candidate in candidates.values():
                candidate.step(grads[index % len(grads)])
                progress.update()
    return {name: candidate.timing(warmup) for name, candidate in candidates.items()}


#: ``--refresh-orthonormalizers`` rows: (orthonormalizer, whether its QR-step shift is applied).
#: Unshifted shifted-Cholesky-QR3 keeps the shift ``s`` of its Gram matrix (what KrADagrad runs).
REFRESH_ROWS = {"householder": ("householder", True), "cholesky_qr3 (shifted)": ("cholesky_qr3", True),
                "cholesky_qr2 (shifted)": ("cholesky_qr2", True), "cholesky_qr3 unshifted": ("cholesky_qr3", False),
                "cholesky_qr2 unshifted": ("cholesky_qr2", False)}


@dataclass
class RefreshFigures:
    failures: int
    staleness: torch.Tensor  # of every member after the step, fallbacks included
    seconds: float  # the fastest repeat


def stored_factors(shapes, every: int, max_precond_dim: int) -> list[torch.Tensor]:
    """Every stack's B for every factored dim, as SOAP fixed ``every`` refreshes them at step
    ``every + 1`` (the statistics of that step included; no refresh since the exact first one)."""
    candidate = Candidate(lambda p: lk.SOAP(p, refresh=lk.FixedRefresh(every=2**62), max_precond_dim=max_precond_dim),
                          shapes, torch.device("cpu"))
    grads = gradient_sets(shapes, torch.device("cpu"))
    for index in range(every + 1):
        candidate.step(grads[index % len(grads)])
    return [group.stats(dim).clone() for group in candidate.optimizer.factor_groups() for dim in group.factored_dims]


def _refresh_once(stacks: list[torch.Tensor], orthonormalizer: str, shift: bool) -> tuple[int, list[torch.Tensor]]:
    """One sorted warm QR step of every stack, the failed members again with Householder."""
    orth = ORTHONORMALIZERS[orthonormalizer]
    orth = orth if shift else replace(orth, shift=None)
    failures, results = 0, []
    for stats in stacks:
        order = descending_diagonal_order(stats)
        _, new_stats, ok = qr_step_in_basis(stats, orth, order=order)
        failed = (~ok).nonzero().flatten()
        if len(failed):
            new_stats[failed] = qr_step_in_basis(stats[failed], ORTHONORMALIZERS["householder"], order=order[failed])[1]
        failures += len(failed)
        results.append(new_stats)
    return failures, results


def time_refreshes(stacks: list[torch.Tensor], repeats: int = 3) -> dict[str, RefreshFigures]:
    """Each :data:`REFRESH_ROWS` row's failures, staleness after the step and fastest time, the
    rows interleaved repeat by repeat (a load change on the machine hits every row alike)."""
    seconds = {name: [] for name in REFRESH_ROWS}
    outcome = {}
    for _ in range(repeats):
        for name, (orthonormalizer, shift) in REFRESH_ROWS.items():
            started = time.perf_counter()
            outcome[name] = _refresh_once(stacks, orthonormalizer, shift)
            seconds[name].append(time.perf_counter() - started)
    return {name: RefreshFigures(failures, torch.cat([staleness(s) for s in results]), min(seconds[name]))
            for name, (failures, results) in outcome.items()}


def shift_figures(stacks: list[torch.Tensor], orthonormalizer: str, shift: bool) -> str:
    """A row's QR-step shift delta: the share of all members' eigenvalues below it (the slowed
    ones) and its median ratio to lambda_max; "-" without one."""
    step_shift = ORTHONORMALIZERS[orthonormalizer].shift
    if not shift or step_shift is None:
        return "- | -"
    eigenvalues = [torch.linalg.eigvalsh(s.double()) for s in stacks]
    deltas = [step_shift(s).double() for s in stacks]
    below = torch.cat([(e < d[:, None]).flatten() for e, d in zip(eigenvalues, deltas)]).double().mean()
    ratio = torch.cat([d / e[:, -1] for e, d in zip(eigenvalues, deltas)]).median()
    return f"{100 * float(below):.1f} | {float(ratio):.2g}"


def print_refresh_table(model: str, stacks: list[torch.Tensor], repeats: int) -> None:
    before = torch.cat([staleness(s) for s in stacks])
    figures = time_refreshes(stacks, repeats)
    print(f"\n### {model}: {len(before)} factors, staleness before the step {before.mean():.4f} mean / "
          f"{before.max():.4f} max\n")
    print("| orthonormalizer | failures | staleness after (mean / max) | refresh, fastest of {} (s) "
          "| eigenvalues below delta (%) | delta / lambda_max (median) |".format(repeats))
    print("|---|---:|---:|---:|---:|---:|")
    for name, f in figures.items():
        print(f"| {name} | {f.failures} | {f.staleness.mean():.3g} / {f.staleness.max():.3g} | {f.seconds:.3g} "
              f"| {shift_figures(stacks, *REFRESH_ROWS[name])} |")


def rows_named(rows: dict[str, Callable], only: list[str] | None, parser: argparse.ArgumentParser) -> dict[str, Callable]:
    """The rows whose names hold one of ``--only``'s substrings (all without it). A substring that
    matches no row is an error, said before any model is built: a row renamed since a command was
    written down would otherwise drop out of the table unnoticed."""
    if not only:
        return rows
    unmatched = [part for part in only if not any(part.lower() in name.lower() for name in rows)]
    if unmatched:
        parser.error(f"--only {' '.join(unmatched)} matches no row; the rows are: {'; '.join(rows)}")
    return rows_matching(rows, only)


def rows_matching(rows: dict[str, Callable], only: list[str] | None) -> dict[str, Callable]:
    """The rows whose names hold one of ``only``'s substrings, case aside (all when ``only`` is empty)."""
    if not only:
        return rows
    return {name: make for name, make in rows.items() if any(part.lower() in name.lower() for part in only)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt-mini", "gpt2-small"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the first (default 20: two refreshes at every=10)")
    parser.add_argument("--every", type=int, default=10, help="fixed refresh frequency")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps first (default 1, the exact first refresh); every+1 also "
                             "takes torch.compile'd rivals (HeavyBall) through their first refresh")
    parser.add_argument("--max-precond-dim", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="substrings of row names to run")
    parser.add_argument("--refresh-orthonormalizers", action="store_true",
                        help="time one warm refresh of every factor per orthonormalizer instead (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="--refresh-orthonormalizers: repeats per row")
    args = parser.parse_args(argv)
    for flag, value, minimum in (("--every", args.every, 1), ("--max-precond-dim", args.max_precond_dim, 1),
                                 ("--repeats", args.repeats, 1)):
        if value < minimum:
            parser.error(f"{flag} must be an integer >= {minimum}, got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if args.refresh_orthonormalizers:
        print(f"torch={torch.__version__} threads={torch.get_num_threads()} every={args.every}")
        for model in args.models:
            shapes = gpt_parameter_shapes(*MODELS[model])
            print_refresh_table(model, stored_factors(shapes, args.every, args.max_precond_dim), args.repeats)
        return
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step is never timed)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA device is available")
    rows = candidates(args.max_precond_dim, args.every)
    rows = rows_named(rows, args.only, parser)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"max_precond_dim={args.max_precond_dim} timed steps={args.steps} after {args.warmup} untimed")
    for model in args.models:
        shapes = gpt_parameter_shapes(*MODELS[model])
        numel = sum(torch.Size(s).numel() for _, s in shapes)
        print(f"\n### {model}: {len(shapes)} tensors, {numel / 1e6:.1f}M parameters\n")
        timings = time_round_robin(rows, shapes, device, args.steps, args.warmup)
        reference = next((t for name, t in timings.items() if name.startswith("pytorch-optimizer")), None)
        print("| optimizer | first step (s) | median step (ms) | amortized step (ms) | vs pytorch-optimizer SOAP | state (MB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, t in timings.items():
            ratio = f"{t.amortized_ms / reference.amortized_ms:.2f}x" if reference else "-"
            print(f"| {name} | {t.first_step_s:.2f} | {t.median_ms:.1f} | {t.amortized_ms:.1f} | {ratio} | {t.state_mb:.1f} |")


if __name__ == "__main__":
    main()
