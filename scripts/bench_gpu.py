"""One-command GPU benchmark: the whole training step (forward, backward, optimizer) on GPT-2-small.

Needs only this package, torch and transformers (a dependency): the model is transformers'
``GPT2LMHeadModel`` built from its config (no download), fed a fixed batch of random tokens
(8 x 1024 by default) under bf16 autocast. Each row trains its own copy of the same initial model
for ``--warmup`` untimed steps (compilation, the first exact refresh) and then ``--steps`` timed
ones, timed with CUDA events. Printed per row: the median and the amortized (mean, refreshes
included) total step, the optimizer's share, the total against fused AdamW's, the optimizer-state
memory and the peak memory; ``--json`` writes the same figures.

    python -m scripts.bench_gpu                         # on a CUDA machine, about 3-5 minutes
    python -m scripts.bench_gpu --json runs/bench_gpu.json --only "fused" "every=10"
    python -m scripts.bench_gpu --device cpu --tiny     # a seconds-long smoke run of the script itself

Rows: torch AdamW (fused), SOAP every=10 and adaptive with IEEE fp32, TF32 (the CUDA default:
the direction's rotation on tensor cores) and bf16 rotations, SOAP every=10 with ``compile=True``,
and the SOAP of pytorch-optimizer and HeavyBall when they are installed (same max_precond_dim,
every=10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

import lightning_kron as lk
from scripts.arguments import refuse_unwritable
from scripts.bench_step import rival_rows, rows_matching, rows_named, state_megabytes


@dataclass
class Row:
    """One row's figures (milliseconds, megabytes; ``peak_mb`` only on CUDA)."""

    name: str
    median_ms: float
    amortized_ms: float
    optimizer_median_ms: float
    vs_fused_adamw: Optional[float]
    state_mb: float
    peak_mb: Optional[float]


def gpt2(tiny: bool, device: torch.device) -> torch.nn.Module:
    """GPT-2-small (124M) from its config, or a 2-layer toy for ``--tiny``; no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=64) if tiny else {}
    config = GPT2Config(**sizes, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device)


def candidates(max_precond_dim: int, every: int) -> dict[str, Callable]:
    """The rows: ``name -> factory(named_parameters)``. SOAP's rotations: IEEE fp32, TF32 for the
    direction (``rotation_dtype="tf32"``, the CUDA default) and bf16; the process-wide TF32 switch
    stays off (the optimizer sets its own precision per op group either way)."""
    common = dict(max_precond_dim=max_precond_dim)
    fixed = lambda: lk.FixedRefresh(every=every)  # noqa: E731
    rows: dict[str, Callable] = {
        "torch AdamW (fused)": lambda p: torch.optim.AdamW([t for _, t in p], lr=3e-4, fused=True),
    }
    for label, dtype in (("fp32", torch.float32), ("TF32 (default)", "tf32"), ("bf16 rotations", torch.bfloat16)):
        rows[f"SOAP every={every}, {label}"] = lambda p, d=dtype: lk.SOAP(p, lr=3e-3, refresh=fixed(), rotation_dtype=d, **common)
        rows[f"SOAP adaptive, {label}"] = lambda p, d=dtype: lk.SOAP(p, lr=3e-3, rotation_dtype=d, **common)
    rows[f"SOAP every={every}, TF32, compile=True"] = lambda p: lk.SOAP(p, lr=3e-3, refresh=fixed(), compile=True, **common)
    return {**rows, **rival_rows(max_precond_dim, every)}


class Timer:
    """CUDA events around a region on a GPU; wall-clock on a CPU (the smoke run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, run: Callable[[], None]) -> float:
        if not self.cuda:
            import time

            started = time.perf_counter()
            run()
            return 1e3 * (time.perf_counter() - started)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def bench_row(name: str, factory: Callable, args, device: torch.device) -> tuple[list[float], list[float], float, Optional[float]]:
    """(total step ms, optimizer ms) for each timed step, the state MB and the peak MB."""
    model = gpt2(args.tiny, device)
    optimizer = factory(list(model.named_parameters()))
    generator = torch.Generator().manual_seed(1)
    context = model.config.n_positions
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, context), generator=generator).to(device)
    timer = Timer(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def forward_backward() -> None:
        with autocast:
            loss = model(tokens, labels=tokens).loss
        loss.backward()

    totals, steps = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for index in tqdm(range(args.warmup + args.steps), desc=name, file=sys.stderr, leave=False):
        optimizer.zero_grad(set_to_none=True)
        forward_ms = timer(forward_backward)
        step_ms = timer(optimizer.step)
        if index >= args.warmup:
            totals.append(forward_ms + step_ms)
            steps.append(step_ms)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return totals, steps, state_megabytes(optimizer), peak


def run(args) -> list[Row]:
    """Every selected row in turn on its own model copy; ratios against the fused AdamW row."""
    device = torch.device(args.device)
    rows = selected_rows(args)
    results, fused_median = [], None
    for name, factory in rows.items():
        totals, steps, state_mb, peak = bench_row(name, factory, args, device)
        median = statistics.median(totals)
        if name.startswith("torch AdamW (fused)"):
            fused_median = median
        results.append(Row(name, median, statistics.fmean(totals), statistics.median(steps), None, state_mb, peak))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in results:
        row.vs_fused_adamw = None if fused_median is None else row.median_ms / fused_median
    return results


def selected_rows(args) -> dict:
    """The candidate rows whose names contain one of the --only substrings (every row without it)."""
    return rows_matching(candidates(args.max_precond_dim, args.every), args.only)


def table(results: list[Row]) -> str:
    """The rows as a Markdown table (what docs/benchmarks.md records)."""
    lines = ["| row | total step, median (ms) | amortized (ms) | optimizer step, median (ms) | vs fused AdamW | state (MB) | peak (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        ratio = "-" if row.vs_fused_adamw is None else f"{row.vs_fused_adamw:.2f}x"
        peak = "-" if row.peak_mb is None else f"{row.peak_mb:.0f}"
        lines.append(f"| {row.name} | {row.median_ms:.1f} | {row.amortized_ms:.1f} | {row.optimizer_median_ms:.1f} | "
                     f"{ratio} | {row.state_mb:.0f} | {peak} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Parse the options, refuse bad ones in one line, run, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy GPT-2 (smoke runs, CPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30: three refreshes at every=10)")
    parser.add_argument("--warmup", type=int, default=11, help="untimed steps first (default 11: through the first refresh)")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--max-precond-dim", type=int, default=4096)
    parser.add_argument("--only", nargs="*", help="substrings of row names to run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "every", "max_precond_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    refuse_unwritable(parser, ("--json", args.json))  # written after the benchmark: found before it
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu --tiny for a smoke run)")
    rows_named(candidates(args.max_precond_dim, args.every), args.only, parser)  # an --only that matches no row
    results = run(args)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        args.json.write_text(json.dumps({"settings": settings, "device": device, "torch": torch.__version__,
                                         "rows": [asdict(row) for row in results]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
