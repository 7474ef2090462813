"""Checks that run inside each of 2 gloo processes for tests/test_fsdp2.py.

One spawn runs them all (starting processes and importing torch and Lightning is most of the cost).
Each check returns normally or raises; :func:`run` records the outcome per check and rank in
``out_dir/rank{r}.json``, so each test reports its own check. The optimizer checks build DTensor
parameters with ``distribute_tensor`` (FSDP2's ``Shard(0)``: uneven and empty shards) and feed
them full gradients, so a one-process reference over the same row chunks sees the same numbers.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_kron as lk
from gloo_workers import finish_worker

WORLD = 2
#: (name, shape): 5 and 7 rows shard unevenly (3+2, 4+3), 1 row leaves rank 1 an empty shard,
#: the 1-D bias is left unpreconditioned
SHAPES = [("uneven", (5, 4)), ("odd", (7, 3)), ("single_row", (1, 6)), ("conv", (4, 3, 2, 2)), ("bias", (6,))]
STEPS = 12
NAN_STEP = 5  # rank 1 alone sees a NaN at this step: both ranks must skip it


def _optimizers():
    refresh = lk.FixedRefresh(every=3)
    return {
        "soap": lambda params: lk.SOAP(params, lr=3e-2, refresh=lk.AdaptiveRefresh(tolerance=0.01)),
        "shampoo": lambda params: lk.Shampoo(params, lr=3e-2, refresh=refresh),
        "kradagrad": lambda params: lk.KrADagrad(params, lr=3e-2, refresh=refresh),
    }


def _full_values(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in SHAPES}


def _rows_of(value: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows as FSDP2 cuts them (torch.chunk sizes; empty past the last chunk)."""
    size = -(-value.shape[0] // WORLD)
    return value[min(rank * size, value.shape[0]): (rank + 1) * size]


def _sharded(value: torch.Tensor, mesh, rank: int) -> torch.Tensor:
    """A Shard(0) DTensor made of this rank's own rows (distribute_tensor would scatter rank 0's)."""
    return DTensor.from_local(_rows_of(value, rank).clone(), mesh, [Shard(0)], shape=value.shape, stride=value.stride())


class Collectives(TorchDispatchMode):
    """Records every collective dispatched (process-group ops and DTensor's functional ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _sharded_run(make, mesh, rank: int) -> dict[str, nn.Parameter]:
    params = {name: nn.Parameter(_sharded(value, mesh, rank)) for name, value in _full_values(-1).items()}
    optimizer = make(list(params.items()))
    for step in range(STEPS):
        for name, grad in _full_values(step).items():
            if step == NAN_STEP and name == "uneven":
                grad[-1, 0] = float("nan")  # lands in rank 1's rows only
            params[name].grad = _sharded(grad, mesh, rank)
        with Collectives() as collectives:
            optimizer.step()
        # the finite flags' all-reduce is the step's only communication, refresh steps included
        assert collectives.seen == ["allreduce_.default"], (step, collectives.seen)
    assert optimizer.skipped_steps == 1, optimizer.skipped_steps
    return params


def _reference_run(make) -> dict[str, torch.Tensor]:
    """One process, each parameter cut into the same row chunks as the shards (empty ones dropped)."""
    def chunks(value):
        return [piece for piece in torch.chunk(value, WORLD) if piece.numel()]
    params = {(name, i): nn.Parameter(piece.clone()) for name, value in _full_values(-1).items()
              for i, piece in enumerate(chunks(value))}
    optimizer = make([(f"{name}.{i}", p) for (name, i), p in params.items()])
    for step in range(STEPS):
        for name, grad in _full_values(step).items():
            if step == NAN_STEP and name == "uneven":
                grad[-1, 0] = float("nan")
            for i, piece in enumerate(chunks(grad)):
                params[(name, i)].grad = piece.clone()
        optimizer.step()
    return {name: torch.cat([p.detach() for (n, _), p in params.items() if n == name]) for name, _ in SHAPES}


def check_methods_match_the_row_chunked_reference(rank: int, mesh, out_dir: str) -> None:
    for method, make in _optimizers().items():
        sharded = _sharded_run(make, mesh, rank)
        reference = _reference_run(make)
        for name, param in sharded.items():
            full = param.full_tensor()
            torch.testing.assert_close(full, reference[name], rtol=1e-9, atol=1e-12, msg=f"{method} {name}")
            gathered = [torch.empty_like(full) for _ in range(WORLD)]
            dist.all_gather(gathered, full)
            assert torch.equal(gathered[0], gathered[1]), f"{method} {name}: ranks disagree on full_tensor()"


def check_unsupported_placements_are_refused(rank: int, mesh, out_dir: str) -> None:
    value = torch.zeros(4, 3)
    cases = [
        (Replicate(), mesh, "placements \\(Replicate\\(\\),\\)"),
        (Shard(1), mesh, "placements \\(Shard\\(dim=1\\),\\)"),
    ]
    for placement, on, message in cases:
        param = nn.Parameter(distribute_tensor(value, on, [placement]))
        _expect_refusal(lambda: lk.SOAP([("w", param)]), message)
    two_d = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    hsdp = nn.Parameter(distribute_tensor(value, two_d, [Replicate(), Shard(0)]))
    _expect_refusal(lambda: lk.SOAP([("w", hsdp)]), "2-D mesh")
    sharded = nn.Parameter(distribute_tensor(value, mesh, [Shard(0)]))
    _expect_refusal(lambda: lk.SOAP([("w", sharded), ("plain", nn.Parameter(value.clone()))]), "plain tensors")


def check_a_sharded_optimizer_refuses_to_be_copied(rank: int, mesh, out_dir: str) -> None:
    import copy
    import pickle

    optimizer = _make_soap(_sharded_model(mesh))
    for attempt in (lambda: copy.deepcopy(optimizer), lambda: pickle.dumps(optimizer)):
        try:
            attempt()
        except TypeError as error:
            assert "torch.distributed.checkpoint" in str(error) and "\n" not in str(error), str(error)
        else:
            raise AssertionError("a sharded optimizer was copied")


def _expect_refusal(build, message: str) -> None:
    import re
    try:
        build()
    except ValueError as error:
        assert re.search(message, str(error)), str(error)
        assert "Shard(0)" in str(error) or "fully_shard" in str(error), str(error)
        return
    raise AssertionError(f"not refused: expected {message!r}")


def _sharded_model(mesh) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))  # 1 row: empty shard
    fully_shard(model, mesh=mesh)
    return model


def _train(model, optimizer, rank: int, start: int, count: int) -> None:
    for step in range(start, start + count):
        inputs = torch.randn(8, 6, generator=torch.Generator().manual_seed(100 * step + rank))  # each rank its own half
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


def _make_soap(model):
    policy = lk.AdaptiveRefresh(tolerance=0.0, max_per_step=1)  # a per-rank queue of deferred factors
    return lk.SOAP(model.named_parameters(), lr=1e-2, refresh=policy)


def check_dcp_save_load_continue_is_bit_identical(rank: int, mesh, out_dir: str) -> None:
    straight = _sharded_model(mesh)
    straight_optimizer = _make_soap(straight)
    _train(straight, straight_optimizer, rank, 0, 10)

    first = _sharded_model(mesh)
    first_optimizer = _make_soap(first)
    _train(first, first_optimizer, rank, 0, 6)
    assert first_optimizer.scheduler.deferred_count > 0  # the queue must travel
    path = os.path.join(out_dir, "dcp")
    dcp.save({"model": first.state_dict(), "optim": get_optimizer_state_dict(first, first_optimizer)}, checkpoint_id=path)

    resumed = _sharded_model(mesh)
    resumed_optimizer = _make_soap(resumed)
    state = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, resumed_optimizer)}
    assert resumed_optimizer.global_step == 0  # getting the state took no fake step
    dcp.load(state, checkpoint_id=path)
    resumed.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])
    assert resumed_optimizer.global_step == 6
    assert resumed_optimizer.scheduler.deferred_count == first_optimizer.scheduler.deferred_count
    _train(resumed, resumed_optimizer, rank, 6, 4)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())


def check_other_world_sizes_are_refused(rank: int, mesh, out_dir: str) -> None:
    model = _sharded_model(mesh)
    optimizer = _make_soap(model)
    state = optimizer.state_dict()
    state["param_groups"][0]["lightning_kron"]["world_size"] = 4
    try:
        optimizer.load_state_dict(state)
    except ValueError as error:
        assert "saved sharded over 4 ranks and cannot be loaded sharded over 2 ranks" in str(error), str(error)
    else:
        raise AssertionError("a state saved at another world size was loaded")


def check_a_full_state_dict_is_refused_on_every_rank(rank: int, mesh, out_dir: str) -> None:
    """A full (single-file) state dict keeps rank 0's rows only; loading it used to hand rank 1 its
    current state as if it were the saved one. Refused on every rank, before anything is written,
    both into a fresh optimizer and as a rollback of the run two steps on (rank 1's counts 0 and 5
    against the saved 3)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model = _sharded_model(mesh)
    optimizer = _make_soap(model)
    _train(model, optimizer, rank, 0, 3)
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = os.path.join(out_dir, "full_optimizer.pt")
    if rank == 0:  # saved as a file: on CPU the full state dict's plain tensors are views of the live state
        torch.save(full, path)
    dist.barrier()
    full = torch.load(path, weights_only=True) if rank == 0 else {}
    fresh = _sharded_model(mesh)
    fresh_optimizer = _make_soap(fresh)
    _train(model, optimizer, rank, 3, 2)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for target, target_optimizer in [(fresh, fresh_optimizer), (model, optimizer)]:
        step_before = target_optimizer.global_step
        try:
            set_optimizer_state_dict(target, target_optimizer, full, options=options)
        except ValueError as error:
            assert "no saved state for the shards of rank(s) [1]" in str(error), str(error)
            assert "full_state_dict=False" in str(error), str(error)
        else:
            raise AssertionError("a full state dict of a sharded optimizer was loaded")
        assert target_optimizer.global_step == step_before  # refused before anything was written


def _fit(out_dir: str, rank: int, max_epochs: int, ckpt_path=None, logger=False, distributed_checkpoint=True):
    """A KronCallback run under ModelParallelStrategy(tensor_parallel_size=1), FSDP2 in configure_model."""
    import lightning as L
    from callback_helpers import TinyRegression, loader
    from lightning.pytorch.strategies import ModelParallelStrategy

    class ShardedRegression(TinyRegression):
        def configure_model(self):
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    # the processes exist already: Lightning's environment reads who is who from these variables
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    callback = lk.KronCallback(refresh=lk.FixedRefresh(every=5), max_refreshes_per_step=1)
    trainer = L.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1,
                                       save_distributed_checkpoint=distributed_checkpoint), accelerator="cpu",
        devices=WORLD, max_epochs=max_epochs, callbacks=[callback], logger=logger, enable_checkpointing=False,
        log_every_n_steps=4,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    module = ShardedRegression(step_lr=5)
    trainer.fit(module, loader(batch_size=8), ckpt_path=ckpt_path)
    return trainer, module, callback


def _refresh_logs(log_dir: str) -> dict[int, tuple[str, str]]:
    """``step -> (kron/refresh/count, kron/refresh/fraction)`` of a CSVLogger run's rows that have them."""
    import csv

    with open(os.path.join(log_dir, "metrics.csv")) as handle:
        return {int(row["step"]): (row["kron/refresh/count"], row["kron/refresh/fraction"])
                for row in csv.DictReader(handle) if row.get("kron/refresh/count")}


def check_model_parallel_strategy_resumes_exactly(rank: int, mesh, out_dir: str) -> None:
    from lightning.pytorch.loggers import CSVLogger
    straight, straight_module, straight_callback = _fit(out_dir, rank, max_epochs=3, logger=CSVLogger(out_dir))
    interrupted, _, first_callback = _fit(out_dir, rank, max_epochs=2)
    assert type(interrupted.optimizers[0]) is lk.SOAP and interrupted.optimizers[0].shard_layout.world_size == WORLD
    assert first_callback.scheduler.deferred_count > 0  # the cut leaves a per-rank queue behind
    path = os.path.join(out_dir, "lightning.ckpt")
    interrupted.save_checkpoint(path)
    resumed, resumed_module, resumed_callback = _fit(out_dir, rank, max_epochs=3, ckpt_path=path,
                                                     logger=CSVLogger(out_dir, name="resumed"))
    assert resumed.optimizers[0].global_step == straight.optimizers[0].global_step == 12
    for a, b in zip(straight_module.parameters(), resumed_module.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())
    # the callback's state arrives after on_fit_start under this strategy, and is applied (each
    # rank's own refresh count: they differ, each rank refreshing its own rows)
    for key in ("checks", "refreshes"):
        assert getattr(resumed_callback.scheduler.counters, key) == getattr(straight_callback.scheduler.counters, key)
    assert resumed.optimizers[0].param_groups[0]["lr"] == straight.optimizers[0].param_groups[0]["lr"]
    if rank == 0:  # rank 0 logs the factors of both ranks' shards
        with open(os.path.join(straight.logger.log_dir, "metrics.csv")) as handle:
            columns = handle.readline().split(",")
        assert any(".shard0[" in column for column in columns) and any(".shard1[" in column for column in columns)
        # the first log after the resume counts the refreshes since the cut, summed over ranks, as
        # the uninterrupted run's log at that step does (it counted the other ranks' earlier ones too)
        straight_rows, resumed_rows = (_refresh_logs(logger.log_dir) for logger in (straight.logger, resumed.logger))
        assert list(resumed_rows) == [12] and resumed_rows[12] == straight_rows[12], (resumed_rows, straight_rows)


def check_model_parallel_strategy_refuses_a_full_checkpoint(rank: int, mesh, out_dir: str) -> None:
    """Lightning's single-file checkpoint (save_distributed_checkpoint=False) of a sharded run is
    refused on resume, on every rank, instead of continuing from rank 1's fresh state."""
    interrupted, _, _ = _fit(out_dir, rank, max_epochs=1, distributed_checkpoint=False)
    path = os.path.join(out_dir, "full.ckpt")
    interrupted.save_checkpoint(path)
    try:
        _fit(out_dir, rank, max_epochs=2, ckpt_path=path, distributed_checkpoint=False)
    except ValueError as error:
        assert "no saved state for the shards of rank(s) [1]" in str(error), str(error)
    else:
        raise AssertionError("a full checkpoint of a sharded run was resumed")


CHECKS = [
    check_methods_match_the_row_chunked_reference,
    check_unsupported_placements_are_refused,
    check_a_sharded_optimizer_refuses_to_be_copied,
    check_dcp_save_load_continue_is_bit_identical,
    check_other_world_sizes_are_refused,
    check_a_full_state_dict_is_refused_on_every_rank,
    check_model_parallel_strategy_resumes_exactly,
    check_model_parallel_strategy_refuses_a_full_checkpoint,
]


def run(rank: int, port: int, out_dir: str, extra_checks=()) -> None:
    """Entry point of each spawned process: every check, outcomes to ``out_dir/rank{rank}.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    outcomes = {}
    for check in [*CHECKS, *extra_checks]:
        try:
            check(rank, mesh, out_dir)
            outcomes[check.__name__] = "ok"
        except Exception:  # noqa: BLE001 - recorded for the test that owns this check
            outcomes[check.__name__] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(outcomes, handle)
    finish_worker()
