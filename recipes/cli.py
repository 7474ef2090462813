"""The LightningCLI shared by the recipes: one-line errors, ``--wandb``, and Ctrl-C checkpoints.

What it adds to ``LightningCLI``:

- bad input (:class:`~recipes.errors.RecipeInputError`, or a ``ValueError`` while the model and
  data are built) is printed as ``error: ...`` on one line with exit status 2, before training;
  unknown config keys are already refused that way by the parser;
- ``--wandb`` adds a ``WandbLogger`` next to the YAML's loggers (CSV by default), offline unless
  W&B is configured on this machine (``WANDB_API_KEY``, ``WANDB_MODE=online`` or a netrc login);
- the shipped YAMLs keep ``ModelCheckpoint(save_last=True, save_on_exception=True)``: an
  interrupted run (Ctrl-C, a crash) updates ``last.ckpt``; resume with ``--ckpt_path``.

``lightning_kron.KronCallback`` goes in the YAML's ``trainer.callbacks`` list like any callback.
"""

from __future__ import annotations

import netrc
import os
import sys
from typing import Any, Optional, Sequence

from jsonargparse import ActionYesNo
from lightning.pytorch.cli import LightningCLI

from recipes.errors import RecipeInputError

WANDB_PROJECT = "lightning_kron"


def wandb_configured() -> bool:
    """Whether this machine can log to W&B online (otherwise ``--wandb`` runs offline)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() == "online":
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _logger_list(configured: Any) -> list:
    """The YAML's ``trainer.logger`` (one logger, a list, or a bool/None for Lightning's default) as a list."""
    if isinstance(configured, list):
        return configured
    return [] if configured is None or isinstance(configured, bool) else [configured]


def wandb_logger(existing: list):
    """A ``WandbLogger`` named and placed like the first of ``existing`` loggers."""
    try:
        from lightning.pytorch.loggers import WandbLogger
        import wandb  # noqa: F401  (checked here so the error names the missing package)
    except ImportError as error:
        raise RecipeInputError("--wandb needs the wandb package (pip install wandb)") from error
    first = existing[0] if existing else None
    save_dir = getattr(first, "save_dir", None) or "runs"
    name = getattr(first, "name", None) or None
    return WandbLogger(project=WANDB_PROJECT, name=name, save_dir=save_dir, offline=not wandb_configured())


class RecipeCLI(LightningCLI):
    """``LightningCLI`` with the recipe conventions above; ``links`` are (source, target[, "instantiate"])."""

    def __init__(self, *args: Any, links: Sequence[tuple] = (), **kwargs: Any) -> None:
        self.links = list(links)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module's config picks the optimizer
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--wandb", action=ActionYesNo, default=False,
                            help="Also log to Weights & Biases (offline unless W&B is configured).")
        for source, target, *when in self.links:
            parser.link_arguments(source, target, apply_on=when[0] if when else "parse")

    def _subcommand_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except RecipeInputError:
            raise
        except ValueError as error:  # e.g. an OptimizerConfig or transformers config refusing a value
            raise RecipeInputError(str(error)) from error

    def instantiate_trainer(self, **kwargs: Any):
        if self._subcommand_config().get("wandb"):
            existing = _logger_list(self._get(self.config_init, "trainer", default={}).get("logger"))
            kwargs["logger"] = [*existing, wandb_logger(existing)]
        return super().instantiate_trainer(**kwargs)


def run_cli(model_class, datamodule_class, links: Sequence[tuple] = (), args: Optional[list] = None, **kwargs: Any):
    """Run a recipe's CLI; bad input ends the process with a one-line ``error:`` and status 2."""
    try:
        return RecipeCLI(model_class, datamodule_class, links=links, args=args, **kwargs)
    except RecipeInputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
