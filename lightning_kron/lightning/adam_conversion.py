"""Turning a ``torch.optim.Adam``/``AdamW`` into a lightning_kron optimizer, schedulers included.

This is the "drop-in" of ``KronCallback``, kept free of Lightning. The new optimizer gets the same
parameter groups with the same lr, betas, eps and weight decay (AdamW's decay stays decoupled,
Adam's stays L2, unless ``weight_decay_mode`` is among the options), parameter names for readable
telemetry, and ``initial_lr`` so LR schedulers keep their base rates; the schedulers are then
re-pointed at it.

How the Adam hyperparameters map (why): SOAP and EShampoo run Adam in the eigenbasis, so every
number means what it meant for AdamW. Shampoo's ``eps`` is a damping of the factor eigenvalues
with a different scale, so AdamW's ``eps`` becomes the Adam graft's ``graft_eps`` and the damping
keeps Shampoo's default (or ``optimizer_options["eps"]``). KrADagrad's ``eps`` sets its initial
inverse, so it keeps its own default as well; ungrafted, KrADagrad takes AdaGrad-scale steps, so it
is given ``graft="adam"`` (unless ``optimizer_options`` says otherwise) and AdamW's lr carries over.

>>> import torch
>>> model = torch.nn.Linear(4, 2)
>>> adamw = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1)
>>> soap = convert_adam(adamw, "soap", dict(model.named_parameters()))
>>> type(soap).__name__, soap.param_groups[0]["lr"], soap.param_groups[0]["weight_decay_mode"]
('SOAP', 0.002, 'decoupled')
>>> soap.factor_names()
['weight[L]', 'weight[R]']
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

import torch

from lightning_kron.methods.registry import method as method_spec

GROUP_KEYS_FROM_ADAM = ("lr", "betas", "weight_decay")
_ADAM_ONLY = ("params", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def optimizer_class(method: str) -> type:
    """The optimizer class of ``method``; a one-line ValueError naming the choices when unknown."""
    return method_spec(method).optimizer


def check_options(method: str, options: Mapping[str, Any]) -> None:
    """Refuse options the converted optimizer takes from the Adam it replaces, and options the
    optimizer class does not accept (by building it once on a dummy parameter)."""
    eps_taken = {"eps"} if method_spec(method).adam_eps_option == "eps" else set()
    taken = set(GROUP_KEYS_FROM_ADAM) | {"params"} | eps_taken
    if clashes := sorted(taken & set(options)):
        raise ValueError(f"optimizer_options {clashes} come from the module's own Adam/AdamW (configure_optimizers); "
                         "set them there")
    try:
        optimizer_class(method)([torch.nn.Parameter(torch.zeros(2, 2))], **options)
    except TypeError as error:
        raise ValueError(f"optimizer_options not accepted by method={method!r}: {error}") from error


def convert_adam(optimizer: torch.optim.Adam, method: str, names: Mapping[str, torch.Tensor],
                 **options: Any) -> torch.optim.Optimizer:
    """A ``method`` optimizer over ``optimizer``'s parameter groups (see the module docstring).

    ``names`` maps parameter names to parameters (``dict(module.named_parameters())``).
    """
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(f"expected torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    name_of = {id(param): name for name, param in names.items()}
    spec = method_spec(method)
    mode = options.get("weight_decay_mode")  # asked for explicitly: it wins over the mode Adam's class implies
    groups = [_convert_group(group, optimizer, spec.adam_eps_option == "eps", name_of, mode)
              for group in optimizer.param_groups]
    if spec.adam_eps_option != "eps" and spec.adam_eps_option not in options:
        # AdamW's eps belongs to the graft, an option of the whole optimizer; the method keeps its own eps
        options = {spec.adam_eps_option: _shared_eps(optimizer, spec.adam_eps_option), **options}
    return spec.optimizer(groups, **{**spec.from_adam, **options})


def _shared_eps(optimizer: torch.optim.Adam, option: str) -> float:
    """The one eps of all Adam groups, for an option that is not per group."""
    values = sorted({float(group["eps"]) for group in optimizer.param_groups})
    if len(values) > 1:
        raise ValueError(f"the Adam parameter groups have different eps ({', '.join(map(str, values))}), but {option} "
                         f"is one value for the whole optimizer; give it explicitly, e.g. optimizer_options="
                         f"{{'{option}': {values[0]}}}")
    return values[0]


def _convert_group(group: dict, optimizer: torch.optim.Adam, keeps_eps: bool, name_of: Mapping[int, str],
                   weight_decay_mode: Optional[str] = None) -> dict:
    """One Adam group as a lightning_kron group. The decay mode is a group key, which the step reads
    before the optimizer's default, so an explicit ``weight_decay_mode`` option is written here."""
    for flag in ("amsgrad", "maximize"):
        if group.get(flag):
            raise ValueError(f"torch.optim.{type(optimizer).__name__}({flag}=True) has no lightning_kron "
                             f"equivalent; drop {flag} or build a lightning_kron optimizer yourself")
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    # every other key travels: scheduler bookkeeping (initial_lr, OneCycleLR's max_lr/min_lr) and
    # user keys such as a group "name"
    converted = {key: _as_float(value) for key, value in group.items() if key not in _ADAM_ONLY}
    converted["betas"] = tuple(_as_float(beta) for beta in group["betas"])
    converted["weight_decay_mode"] = weight_decay_mode or ("decoupled" if decoupled else "l2")
    converted["params"] = [(name_of.get(id(param)), param) for param in group["params"]]
    if not keeps_eps:
        del converted["eps"]
    return converted


def _as_float(value):
    return float(value) if isinstance(value, torch.Tensor) else value


def repoint_schedulers(schedulers, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Make every scheduler that drives ``old`` drive ``new``; returns how many were moved.

    A scheduler reads and writes ``optimizer.param_groups[i]["lr"]`` each step, and the groups
    correspond one to one, so moving the reference is enough. The step wrapper torch's LRScheduler
    installs (to warn when ``scheduler.step()`` runs before ``optimizer.step()``) is installed on the
    new optimizer too.
    """
    moved = 0
    pending = list(schedulers)
    while pending:  # SequentialLR / ChainedScheduler hold child schedulers that drive ``old`` too
        scheduler = pending.pop()
        pending.extend(getattr(scheduler, "_schedulers", []))
        if getattr(scheduler, "optimizer", None) is old:
            scheduler.optimizer = new
            moved += 1
    _track_step_calls(new, old)
    old.param_groups = new.param_groups  # any reference we could not see now writes into the new groups
    _forward_steps(old, new)
    return moved


def _track_step_calls(optimizer: torch.optim.Optimizer, replaced: torch.optim.Optimizer) -> None:
    """What torch's LRScheduler installs on the optimizer it drives (it warns when
    ``scheduler.step()`` comes before any ``optimizer.step()``), for ``optimizer`` and for the
    ``replaced`` one: a scheduler the module holds and steps itself still points at that one."""
    step = optimizer.step

    def tracked_step(*args, **kwargs):
        optimizer._opt_called = replaced._opt_called = True
        return step(*args, **kwargs)

    tracked_step._wrapped_by_lr_sched = True
    optimizer.step = tracked_step


def _forward_steps(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """A reference to the replaced optimizer that the module kept (``self.opt = AdamW(...)`` in
    ``configure_optimizers``, stepped in manual optimization) steps the new one, with one warning:
    AdamW's own step over the new optimizer's groups failed inside torch (``KeyError: 'fused'``)."""
    warned = []

    def forwarded_step(*args, **kwargs):
        if not warned:
            warned.append(True)
            warnings.warn(f"KronCallback replaced this {type(old).__name__} with {type(new).__name__}: its step() now "
                          f"steps the {type(new).__name__}. Get that one with self.optimizers()", UserWarning, stacklevel=2)
        return new.step(*args, **kwargs)

    old.step = forwarded_step
