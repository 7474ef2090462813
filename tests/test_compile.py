"""``compile=True``: the ``torch.compile``d per-group functions (SOAP's Adam in the eigenbasis, the
parameter update) take the eager step's numbers, and ``scripts/count_ops.py`` counts what they launch.

Small on purpose: Inductor compiles C++ on a CPU (gcc), about 10 s per graph on CI's 2 cores.
"""

from __future__ import annotations

import pytest
import torch

import lightning_kron as lk
from scripts import count_ops
from scripts.bench_step import Candidate, gpt_parameter_shapes, gradient_sets

SHAPES = gpt_parameter_shapes(1, 16, 48, 8)  # 16 tensors in 9 stacks
STEPS = 6  # two refreshes at every=2: compiled functions also see re-expressed moments


def _run(compile: bool):
    torch._dynamo.reset()  # each graph compiles under count_compiled, so its kernels are counted
    candidate = Candidate(lambda p: lk.SOAP(p, lr=1e-2, refresh=lk.FixedRefresh(every=2), compile=compile),
                          SHAPES, torch.device("cpu"))
    count_ops.count_compiled(candidate.optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(candidate.optimizer, lambda step: 1.0 / (1 + step))
    grads = gradient_sets(SHAPES, torch.device("cpu"))
    for step in range(STEPS):
        if step == STEPS - 1:
            counts, by_op = count_ops.count_step(candidate, grads[step % len(grads)])
        else:
            candidate.step(grads[step % len(grads)])
        schedule.step()  # a new lr every step: a float argument, so no recompilation
    return candidate, counts, by_op


@pytest.fixture(scope="module")
def runs():
    return {compile: _run(compile) for compile in (False, True)}


def test_the_compiled_step_equals_the_eager_step(runs):
    (eager, *_), (compiled, *_) = runs[False], runs[True]
    for (name, a), (_, b) in zip(eager.params, compiled.params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    for param_a, param_b in zip(eager.optimizer.state.values(), compiled.optimizer.state.values()):
        scale = param_a["block0.exp_avg"].abs().max()  # near-zero entries are differences of large ones
        torch.testing.assert_close(param_b["block0.exp_avg"], param_a["block0.exp_avg"], rtol=1e-5, atol=1e-6 * scale)


def test_the_compiled_functions_run_and_are_counted(runs):
    _, eager_counts, eager_ops = runs[False]
    optimizer, counts, by_op = runs[True][0].optimizer, runs[True][1], runs[True][2]
    assert by_op.get("compiled", 0) > 0 and "_foreach_addcmul_" not in by_op  # not the eager direction
    assert "_foreach_addcmul_" in eager_ops and "compiled" not in eager_ops
    assert counts.host_syncs == 0
    # the LR changed every step, yet each function compiled at most twice (the refresh step hands
    # it moments with other strides)
    assert all(len(call.kernels) <= 2 for call in optimizer._compiled_functions.values())
    # the two functions take over 11 eager foreach ops; on a CPU Inductor emits at most one C++ loop
    # per tensor of a foreach list in their place (16 parameters to update, 9 stacks' directions)
    taken_over = sum(count - by_op.get(name, 0) for name, count in eager_ops.items())
    assert taken_over == 11 and 0 < by_op["compiled"] <= 16 + 9
    assert counts.kernels == eager_counts.kernels - taken_over + by_op["compiled"]

