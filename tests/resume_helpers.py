"""The cut-and-resume pattern of the optimizer tests: a run cut after some steps, its state_dict
loaded into a freshly built copy, then continued, to compare with the uninterrupted run."""

from __future__ import annotations

import copy


def continued_after_a_cut(build, run, cut: int, total: int) -> list:
    """The parameters of a run of ``total`` steps resumed after step ``cut``. ``build()`` returns
    ``(params, optimizer)`` from the same start every time; ``run(params, optimizer, steps)`` takes
    the steps numbered ``steps``."""
    cut_params, cut_optimizer = build()
    run(cut_params, cut_optimizer, range(cut))
    params, optimizer = build()
    for param, source in zip(params, cut_params):
        param.data.copy_(source.data)
    optimizer.load_state_dict(copy.deepcopy(cut_optimizer.state_dict()))
    run(params, optimizer, range(cut, total))
    return list(params)
