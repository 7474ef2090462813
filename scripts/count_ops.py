"""Counts, not times: kernels, host syncs, matmul FLOPs and bytes of one ``optimizer.step()``.

A ``TorchDispatchMode`` sees every ATen op a step dispatches. Counted per step:

- kernels: ops that compute (views and metadata-only ops are left out): what a GPU would launch;
- host syncs: ops whose result the host must wait for (``.item()``/``bool()``/``float()`` on a
  tensor, ``nonzero`` and boolean-mask indexing, whose output size depends on the data) and the
  Python-level reads ``Tensor.tolist``/``.cpu()``/``.numpy()``. On a CPU run they cost little;
  on a GPU each one drains the launch queue;
- matmul FLOPs: ``2 m n k`` for every mm/bmm/baddbmm/addmm/addbmm;
- bytes: the sizes of every computing op's tensor inputs and outputs (an upper bound on the memory
  traffic, since a fused kernel would not write its temporaries).

Profiler markers (``torch.optim`` wraps ``step`` in a ``record_function``) launch nothing and are
not counted. The counts depend on the shapes and the code path only, not on the machine or its
load, so a test can hold them (``tests/test_count_ops.py``). Two steps are counted per candidate:
the refresh step of ``FixedRefresh(every)`` (step ``every + 1``) and the ordinary step after it
(``every + 2``: what every later step between refreshes runs, the scheduler's state included).

``compile=True`` rows: under a dispatch mode Dynamo runs a compiled function eagerly, so the
compiled functions run outside the counter and add what Inductor generated for them
(:class:`CompiledCall`). On a CPU Inductor emits one C++ loop nest per tensor of a foreach list
(calls, not launches); on CUDA it fuses a foreach list horizontally, so there the compiled count
is lower than the CPU one.

    python -m scripts.count_ops --models gpt-mini
    python -m scripts.count_ops --models gpt2-small --only "soap fixed" fused   # ~10 minutes a SOAP row on a CPU
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch._inductor.metrics as inductor_metrics
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from tqdm import tqdm

import lightning_kron as lk
from scripts.bench_step import (
    MODELS,
    Candidate,
    gpt_parameter_shapes,
    gradient_sets,
    rival_rows,
    rows_named,
)

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2",
             "unique_consecutive", "repeat_interleave", "item"}
_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm"}
_HOST_READS = ("tolist", "cpu", "numpy")
_MARKERS = {"_record_function_enter", "_record_function_enter_new", "_record_function_exit"}
_ACTIVE: list["OpCounter"] = []  # the counter a CompiledCall reports to


@dataclass
class Counts:
    kernels: int = 0
    host_syncs: int = 0
    matmul_gflops: float = 0.0
    gigabytes: float = 0.0


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _matmul_flops(name: str, args) -> float:
    if name == "mm":
        a, b = args[0], args[1]
    elif name == "bmm":
        a, b = args[0], args[1]
    else:  # addmm/baddbmm/addbmm(input, a, b)
        a, b = args[1], args[2]
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class OpCounter(TorchDispatchMode):
    """Counts what the ops dispatched inside ``with OpCounter() as counter:`` cost; see the module
    docstring. ``counter.counts`` holds the totals, ``counter.by_op`` the kernels per op name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS or (name == "index" and any(t.dtype == torch.bool for t in _tensors(args[1:]))):
            self.counts.host_syncs += 1
        if func.is_view or name in ("detach", "alias", "lift_fresh") or name in _MARKERS:
            return out
        self.counts.kernels += 1
        self.by_op[name] = self.by_op.get(name, 0) + 1
        if name in _MATMULS:
            self.counts.matmul_gflops += _matmul_flops(name, args) / 1e9
        moved = sum(t.numel() * t.element_size() for t in _tensors(args) + _tensors(kwargs) + _tensors(out))
        self.counts.gigabytes += moved / 1e9
        return out

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    @contextmanager
    def host_reads(self):
        """Also count the Python-level host reads, which dispatch no op of their own."""
        originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

        def counted(original):
            def read(tensor, *args, **kwargs):
                self.counts.host_syncs += 1
                return original(tensor, *args, **kwargs)
            return read

        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


def _signature(value):
    """What Dynamo guards on, roughly: tensor shapes, strides and dtypes, and the argument types."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(item) for item in value)
    return type(value)


class CompiledCall:
    """A ``torch.compile``d function of a ``compile=True`` optimizer, counted.

    Called under an :class:`OpCounter`, it runs outside the dispatch mode and adds to the counter
    the kernels Inductor generated for its input signature (a graph without control flow runs each
    of them once per call; our compiled functions are pointwise, so they call no extern kernel),
    and as bytes its tensor inputs and outputs, the inputs it wrote counted twice: what one fused
    pass moves.
    """

    def __init__(self, function: Callable) -> None:
        self.function = function
        self.kernels: dict = {}

    def __call__(self, *args):
        key, before = _signature(args), inductor_metrics.generated_kernel_count
        inputs = _tensors(args)
        versions = [t._version for t in inputs]
        with _disable_current_modes():
            out = self.function(*args)
        generated = inductor_metrics.generated_kernel_count - before
        if generated or key not in self.kernels:  # compiled (or recompiled) by this call
            self.kernels[key] = generated
        if _ACTIVE:
            written = [t for t, version in zip(inputs, versions) if t._version != version]
            counter = _ACTIVE[-1]
            counter.counts.kernels += self.kernels[key]
            counter.by_op["compiled"] = counter.by_op.get("compiled", 0) + self.kernels[key]
            counter.counts.gigabytes += sum(t.numel() * t.element_size() for t in inputs + written + _tensors(out)) / 1e9
        return out


def count_compiled(optimizer) -> None:
    """Wrap the compiled functions of a ``compile=True`` optimizer in :class:`CompiledCall`s.
    Call it before the optimizer's first step (with Dynamo reset), so that each graph is compiled
    under the wrapper and its kernels are seen."""
    functions = getattr(optimizer, "_compiled_functions", {})
    for name, function in functions.items():
        functions[name] = CompiledCall(function)


def count_step(candidate: Candidate, gradients: list[torch.Tensor]) -> tuple[Counts, dict[str, int]]:
    """The counts of one ``candidate.step``."""
    counter = OpCounter()
    with counter, counter.host_reads():
        candidate.step(gradients)
    return counter.counts, counter.by_op


def candidates(max_precond_dim: int, every: int) -> dict[str, Callable]:
    common = dict(max_precond_dim=max_precond_dim)
    rows = {
        "torch AdamW (foreach)": lambda p: torch.optim.AdamW([t for _, t in p], lr=1e-3, foreach=True),
        "torch AdamW (fused)": lambda p: torch.optim.AdamW([t for _, t in p], lr=1e-3, fused=True),
        f"SOAP fixed every={every}": lambda p: lk.SOAP(p, refresh=lk.FixedRefresh(every=every), **common),
        f"SOAP fixed every={every}, compile=True": lambda p: lk.SOAP(
            p, refresh=lk.FixedRefresh(every=every), compile=True, **common),
        "SOAP adaptive tol=0.05": lambda p: lk.SOAP(p, refresh=lk.AdaptiveRefresh(tolerance=0.05), **common),
    }
    return {**rows, **rival_rows(max_precond_dim, every, heavyball=False)}  # HeavyBall compiles its step


def count_model(rows: dict[str, Callable], shapes, every: int) -> dict[str, dict[str, Counts]]:
    """``{row: {"ordinary": counts, "refresh": counts}}``: steps ``every + 2`` and ``every + 1``."""
    grads = gradient_sets(shapes, torch.device("cpu"))
    results = {}
    for name, factory in tqdm(rows.items(), desc="candidates", file=sys.stderr):
        torch._dynamo.reset()  # a compile=True row compiles its graphs under count_compiled
        candidate = Candidate(factory, shapes, torch.device("cpu"))
        count_compiled(candidate.optimizer)
        results[name] = {}
        for step in range(1, every + 3):
            gradients = grads[step % len(grads)]
            if step in (every + 1, every + 2):
                results[name]["refresh" if step == every + 1 else "ordinary"] = count_step(candidate, gradients)[0]
            else:
                candidate.step(gradients)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt-mini"], choices=list(MODELS))
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--max-precond-dim", type=int, default=4096)
    parser.add_argument("--only", nargs="*", help="substrings of row names to run")
    args = parser.parse_args(argv)
    if args.every < 2:
        parser.error("--every must be >= 2 (step 2 is the ordinary step)")
    if args.max_precond_dim < 1:
        parser.error(f"--max-precond-dim must be an integer >= 1, got {args.max_precond_dim}")
    rows_named(candidates(args.max_precond_dim, args.every), args.only, parser)  # refuse a bad --only first
    torch.manual_seed(0)
    for model in args.models:
        shapes = gpt_parameter_shapes(*MODELS[model])
        rows = rows_named(candidates(args.max_precond_dim, args.every), args.only, parser)
        results = count_model(rows, shapes, args.every)
        print(f"\n### {model}: {len(shapes)} tensors, max_precond_dim {args.max_precond_dim}\n")
        print("| optimizer | step | kernels | host syncs | matmul GFLOP | GB touched |")
        print("|---|---|---:|---:|---:|---:|")
        for name, steps in results.items():
            for kind in ("ordinary", "refresh"):
                counts = steps[kind]
                print(f"| {name} | {kind} | {counts.kernels} | {counts.host_syncs} | "
                      f"{counts.matmul_gflops:.2f} | {counts.gigabytes:.2f} |")


if __name__ == "__main__":
    main()
