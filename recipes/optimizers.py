"""Optimizer selection by name, shared by every recipe and by ``scripts/compare.py``.

One place builds the optimizer so that a comparison differs in nothing but the optimizer: the same
weight-decay groups (AdamW practice: no decay on biases, norm scales and embeddings unless asked),
the same warm-up + cosine schedule, and ``(name, parameter)`` pairs in every group so the Kronecker
optimizers report readable factor names such as ``transformer.h.0.mlp.c_fc.weight[L]``.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
>>> optimizer = build_optimizer(OptimizerConfig(name="soap"), model)
>>> type(optimizer).__name__, optimizer.param_groups[0]["lr"], optimizer.factor_names()
('SOAP', 0.003, ['1.weight[L]', '1.weight[R]', '0.weight[L]', '0.weight[R]'])
>>> [group["weight_decay"] for group in optimizer.param_groups]
[0.1, 0.0]
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch

import lightning_kron as lk
from lightning_kron.methods.registry import METHODS, MethodSpec
from recipes.errors import OptionError
from recipes.schedule import warmup_cosine

# The recipes' optimizer names: AdamW, every method of the registry (lightning_kron/methods/
# registry.py), and "soap_adaptive", SOAP with the adaptive-refresh fields below (a name of its own
# because the comparison runs both SOAP schedules side by side).
RECIPE_VARIANTS = {"soap_adaptive": ("soap", "adaptive")}  # name -> (method, refresh)
OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", *METHODS, *RECIPE_VARIANTS)
OptimizerName = Literal[OPTIMIZER_NAMES]

# Defaults when the config leaves lr/betas unset: AdamW's usual LM settings, the registry's for the
# methods (the SOAP paper's lr 3e-3, betas (0.95, 0.95) for SOAP; None: the optimizer class decides).
# Recipe-tuned values live in the YAML configs and scripts/compare.py.
DEFAULT_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.95)},
    **{name: {"lr": spec.lr, "betas": spec.betas} for name, spec in METHODS.items()},
    **{name: {"lr": METHODS[method].lr, "betas": METHODS[method].betas} for name, (method, _) in RECIPE_VARIANTS.items()},
}


REFRESH_SCHEDULES = ("fixed", "budget", "adaptive")
# The OptimizerConfig fields each refresh schedule reads; a field set away from its default under
# a schedule (or an optimizer) that does not read it is refused instead of silently doing nothing.
FIELDS_OF_SCHEDULE = {
    "fixed": ("refresh_every",),
    "budget": ("refresh_budget_every", "check_every", "max_iters"),
    "adaptive": ("tolerance", "check_every", "early_tolerance", "early_fraction", "max_iters", "max_refreshes_per_step"),
}
REFRESH_FIELDS = tuple(dict.fromkeys(name for fields in FIELDS_OF_SCHEDULE.values() for name in fields))


def method_and_refresh(name: str) -> tuple[Optional[MethodSpec], Optional[str]]:
    """The registry entry behind a recipe optimizer name (None for AdamW) and the refresh the recipe
    gives it: ``"fixed"``, ``"budget"``, ``"adaptive"`` or None (the class's own default)."""
    if name == "adamw":
        return None, None
    method, refresh = RECIPE_VARIANTS.get(name, (name, None))
    spec = METHODS[method]
    return spec, refresh or spec.recipe_refresh


@dataclass(frozen=True)
class OptimizerConfig:
    """What to optimize with; validated on construction so a typo fails before training starts.

    Args:
        name: one of ``adamw``, ``soap`` (the refresh budget of every=``refresh_budget_every``,
            front-loaded, spent on the factors most stale for their age), ``soap_adaptive`` (refresh a factor when
            its staleness exceeds ``tolerance``), ``eshampoo``, ``shampoo`` (Adam-grafted root-inverse
            Shampoo, refresh every ``refresh_every`` steps) or ``kradagrad``.
        lr, betas: ``None`` takes the per-optimizer default in ``DEFAULT_HYPERPARAMETERS``.
        weight_decay: decoupled (AdamW-style) decay of weight matrices.
        decay_embeddings, decay_norms_and_biases: also decay those (off by default).
        warmup_steps, min_lr_ratio: the warm-up + cosine schedule (see :mod:`recipes.schedule`).
        refresh_schedule: ``"fixed"`` (every ``refresh_every`` steps), ``"budget"``
            (:class:`~lightning_kron.BudgetRefresh`: as many refreshes as every=``refresh_budget_every``,
            front-loaded, most stale factors first; chosen by scripts/refresh_study.py across ten
            models, docs/refresh-study.md) or ``"adaptive"``; ``None``: the method's own
            (``recipe_refresh`` in the method registry: ``budget`` for soap and eshampoo, ``fixed`` for
            shampoo and kradagrad).
        refresh_every: eigenbasis refresh period of the fixed schedule (``shampoo``'s default).
        refresh_budget_every: the fixed clock whose refresh count the budget schedule spends.
        tolerance: staleness threshold of the adaptive schedule (``soap_adaptive``, or
            ``refresh_schedule: adaptive``).
        check_every: how often (steps) the adaptive or the budget schedule looks at staleness.
        early_tolerance, early_fraction: when set, ``tolerance`` is replaced by ``early_tolerance``
            for the first ``early_fraction`` of training (basis accuracy matters most early; see
            ``scripts/refresh_sweep.py``). Needs the training length: set ``max_steps``.
        max_iters: warm-QR iterations a refresh may take (adaptive: to get below ``tolerance``;
            budget: repeated ``max_iters`` times).
        max_refreshes_per_step: cap on factors refreshed in one step (the adaptive schedule only).
        A refresh field set away from its default where the chosen schedule does not read it is
        refused (``FIELDS_OF_SCHEDULE`` lists what each reads).
        options: any further keyword arguments of the optimizer class (e.g. ``max_precond_dim``; a
            ``refresh`` policy object here replaces the one the fields above describe).
    """

    name: OptimizerName = "adamw"
    lr: Optional[float] = None
    betas: Optional[tuple[float, float]] = None
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    decay_norms_and_biases: bool = False
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    refresh_schedule: Optional[Literal[REFRESH_SCHEDULES]] = None
    refresh_every: int = 10
    refresh_budget_every: int = 20
    tolerance: float = 0.05
    check_every: int = 1
    early_tolerance: Optional[float] = None
    early_fraction: float = 0.2
    max_iters: int = 1
    max_refreshes_per_step: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        refuse = OptionError.refused
        if self.name not in OPTIMIZER_NAMES:
            raise refuse("optimizer.name", self.name, f"one of {', '.join(OPTIMIZER_NAMES)}")
        if self.lr is not None and not self.lr > 0:
            raise refuse("optimizer.lr", self.lr, "a positive number, or null for the optimizer's default")
        if not self.eps > 0:
            raise refuse("optimizer.eps", self.eps, "a positive number")
        if self.betas is not None and (len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas)):
            raise refuse("optimizer.betas", list(self.betas), "two decay rates in [0, 1), e.g. [0.9, 0.95]")
        for option in ("weight_decay", "warmup_steps"):
            if getattr(self, option) < 0:
                raise refuse(f"optimizer.{option}", getattr(self, option), "a number >= 0")
        if self.refresh_schedule is not None and self.refresh_schedule not in REFRESH_SCHEDULES:
            raise refuse("optimizer.refresh_schedule", self.refresh_schedule, f"one of {', '.join(REFRESH_SCHEDULES)} or null")
        for option in ("refresh_every", "refresh_budget_every", "check_every", "max_iters"):
            if getattr(self, option) < 1:
                raise refuse(f"optimizer.{option}", getattr(self, option), "an integer >= 1")
        if self.max_refreshes_per_step is not None and self.max_refreshes_per_step < 1:
            raise refuse("optimizer.max_refreshes_per_step", self.max_refreshes_per_step, "an integer >= 1 or null")
        for option in ("tolerance", "early_tolerance", "early_fraction", "min_lr_ratio"):
            value = getattr(self, option)
            if value is not None and not 0.0 <= value <= 1.0:
                raise refuse(f"optimizer.{option}", value, "a number in [0, 1]" + (" or null" if option == "early_tolerance" else ""))
        self._check_refresh_fields()
        self._check_options()
        if self.early_tolerance is not None and self.early_tolerance > self.tolerance:
            # a warning, not a refusal: checkpoints of runs made so must still resume
            warnings.warn(f"optimizer.early_tolerance {self.early_tolerance} is above optimizer.tolerance "
                          f"{self.tolerance}: the early phase refreshes less, not more", stacklevel=3)

    def _check_refresh_fields(self) -> None:
        """Refuse a refresh field set for a schedule that does not read it (``tolerance`` with the
        budget, ``refresh_every`` with AdamW, anything beside a ``refresh`` in ``options``)."""
        spec, refresh = method_and_refresh(self.name)
        if spec is None and self.refresh_schedule is not None:
            raise OptionError.refused("optimizer.refresh_schedule", self.refresh_schedule, "null: adamw has no "
                                      "eigenbasis to refresh")
        schedule = None if spec is None or "refresh" in self.options else self.refresh_schedule or refresh
        read = FIELDS_OF_SCHEDULE.get(schedule, ())
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        for option in REFRESH_FIELDS:
            if option not in read and getattr(self, option) != defaults[option]:
                what = ("adamw, which refreshes nothing" if spec is None else
                        "the refresh policy given in optimizer.options" if "refresh" in self.options else
                        f"{self.name} with refresh_schedule {schedule}")
                uses = f" (it reads {', '.join(read)})" if read else ""
                raise OptionError.refused(f"optimizer.{option}", getattr(self, option),
                                          f"its default, {defaults[option]!r}: it is not read by {what}{uses}")

    def _check_options(self) -> None:
        """Unknown ``options`` keys, and values the optimizer class refuses (``rotation_dtype: bf17``),
        fail here by building the optimizer once on a 2x2 probe parameter, not at the first step."""
        try:
            accepted = accepted_options(self.name)
        except ValueError:  # KrADagrad not shipped: building it says so
            return
        if given_elsewhere := sorted(set(self.options) & set(_set_by_config(self.name))):
            field_of = {"graft_eps": "eps"}  # Shampoo's and KrADagrad's graft eps is AdamW's eps
            raise OptionError("optimizer.options", "got " + ", ".join(
                f"{key!r}, which the recipe sets from optimizer.{field_of.get(key, key)} (give it there)"
                for key in given_elsewhere))
        if unknown := sorted(set(self.options) - set(accepted)):
            raise OptionError("optimizer.options", f"got unknown key{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}, expected keys of {_class_of(self.name).__name__}: "
                              f"{', '.join(accepted)}")
        probe = [{"params": [("probe", torch.nn.Parameter(torch.zeros(2, 2)))], "weight_decay": self.weight_decay}]
        try:
            _construct(self, probe, total_steps=100.0)
        except (ValueError, TypeError) as error:
            raise OptionError("optimizer.options" if self.options else "optimizer", str(error)) from error

    @property
    def resolved_lr(self) -> Optional[float]:
        return self.lr if self.lr is not None else DEFAULT_HYPERPARAMETERS[self.name]["lr"]

    @property
    def resolved_betas(self) -> Optional[tuple[float, float]]:
        return tuple(self.betas) if self.betas is not None else DEFAULT_HYPERPARAMETERS[self.name]["betas"]

    def replace(self, **changes: Any) -> "OptimizerConfig":
        """A copy with some fields changed (used by ``scripts/compare.py`` to swap optimizers)."""
        return dataclasses.replace(self, **changes)


def as_optimizer_config(value: Union[OptimizerConfig, dict, None]) -> OptimizerConfig:
    """Accept the dataclass, ``None`` (AdamW defaults) or the plain dict a checkpoint stores."""
    if value is None:
        return OptimizerConfig()
    if isinstance(value, dict):
        return OptimizerConfig(**value)
    return value


def _is_embedding_owner(module: torch.nn.Module) -> bool:
    """``nn.Embedding`` and transformers' ``*Embeddings`` blocks (ViT's position table, CLS token)."""
    return type(module).__name__.endswith(("Embedding", "Embeddings"))


def weight_decay_groups(model: torch.nn.Module, config: OptimizerConfig) -> list[dict]:
    """Two parameter groups of ``(name, parameter)`` pairs: decayed and not decayed.

    Biases and norm scales (every tensor with fewer than 2 dims) and embedding tables are not
    decayed by default: shrinking them towards zero regularises nothing useful and hurts the
    language model. Tied weights appear once, under their first name.
    """
    owners: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), module)
    decayed, kept = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = _is_embedding_owner(owners[id(param)])
        exempt = (param.dim() < 2 and not config.decay_norms_and_biases) or (is_embedding and not config.decay_embeddings)
        (kept if exempt else decayed).append((name, param))
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def _torch_takes_parameter_names() -> bool:
    """torch >= 2.6 accepts ``(name, tensor)`` pairs in its own optimizers and keeps the names."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6)


def _set_by_config(name: str) -> tuple[str, ...]:
    """Keyword arguments the recipe passes itself (from the config's fields), so ``options`` may not
    repeat them."""
    spec, _ = method_and_refresh(name)
    eps = "eps" if spec is None else spec.adam_eps_option
    return ("lr", "betas", eps, "weight_decay")


def _class_of(name: str) -> type:
    spec, _ = method_and_refresh(name)
    return torch.optim.AdamW if spec is None else spec.optimizer


def accepted_options(name: str) -> tuple[str, ...]:
    """The keyword arguments ``OptimizerConfig.options`` may hold for optimizer ``name``: those of
    the class and of the base classes it forwards ``**options`` to, less what the config sets itself.

    >>> "rotation_dtype" in accepted_options("soap"), "lr" in accepted_options("soap")
    (True, False)
    """
    names: list[str] = []
    for klass in _class_of(name).__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in ("self", "params", "defaults") and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    taken = _set_by_config(name)
    return tuple(option for option in names if option not in taken)


def _tolerance_schedule(config: OptimizerConfig, total_steps: Optional[float]):
    """``TighterEarly`` in steps (the optimizer does not know the training length), or None."""
    if config.early_tolerance is None:
        return None
    if total_steps is None or not math.isfinite(total_steps):
        raise ValueError("optimizer early_tolerance needs a known training length: set trainer.max_steps")
    return lk.TighterEarly(early_tolerance=config.early_tolerance, early_steps=int(config.early_fraction * total_steps))


def _known_length(total_steps: Optional[float]) -> Optional[int]:
    """The planned steps as BudgetRefresh takes them: a positive int, or None when unknown (inf)."""
    return int(total_steps) if total_steps is not None and math.isfinite(total_steps) and total_steps >= 1 else None


def _construct(config: OptimizerConfig, groups: list[dict], total_steps: Optional[float] = None) -> torch.optim.Optimizer:
    lr, betas, options = config.resolved_lr, config.resolved_betas, config.options
    spec, refresh = method_and_refresh(config.name)
    refresh = config.refresh_schedule or refresh
    if spec is None:
        if not _torch_takes_parameter_names():
            groups = [{**group, "params": [param for _, param in group["params"]]} for group in groups]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=config.eps, **options)
    # the method's own eps where AdamW's means something else goes to its graft (Shampoo, KrADagrad)
    settings = {"lr": lr, "betas": betas, spec.adam_eps_option: config.eps}
    if refresh == "fixed":
        settings["refresh"] = lk.FixedRefresh(every=config.refresh_every)
    elif refresh == "budget":
        settings["refresh"] = lk.BudgetRefresh(every=config.refresh_budget_every, total_steps=_known_length(total_steps),
                                               check_every=config.check_every, max_iters=config.max_iters)
    elif refresh == "adaptive":
        settings["refresh"] = lk.AdaptiveRefresh(tolerance=config.tolerance, check_every=config.check_every,
                                                 max_iters=config.max_iters, max_per_step=config.max_refreshes_per_step,
                                                 schedule=_tolerance_schedule(config, total_steps))
    settings = {key: value for key, value in settings.items() if value is not None}
    return spec.optimizer(groups, **{**settings, **options})


def build_optimizer(config: OptimizerConfig, model: torch.nn.Module,
                    total_steps: Optional[float] = None) -> torch.optim.Optimizer:
    """The optimizer ``config.name`` over ``model``'s weight-decay groups; bad options -> ValueError.
    ``total_steps`` (the planned optimizer steps) is needed only with ``early_tolerance``."""
    groups = weight_decay_groups(model, config)
    try:
        return _construct(config, groups, total_steps)
    except TypeError as error:  # an option the optimizer class does not take
        raise ValueError(f"optimizer {config.name!r} rejected its options {config.options}: {error}") from error


def configure_optimization(config: OptimizerConfig, model: torch.nn.Module, total_steps: float) -> dict:
    """What ``LightningModule.configure_optimizers`` returns: the optimizer and its per-step schedule."""
    optimizer = build_optimizer(config, model, total_steps)
    if config.warmup_steps >= total_steps:
        warnings.warn(f"optimizer.warmup_steps {config.warmup_steps} is not shorter than the run's {total_steps:g} "
                      "optimizer steps: the learning rate never reaches its peak", stacklevel=2)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
