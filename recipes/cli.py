"""The LightningCLI shared by the recipes: one-line errors, ``--wandb``, and Ctrl-C checkpoints.

What it adds to ``LightningCLI``:

- bad input (:class:`~recipes.errors.RecipeInputError`, a ``ValueError`` while the model, data
  and callbacks are built, a parser error such as an unknown key, a ``trainer.max_steps`` other
  than -1 or a positive count, a ``--ckpt_path`` that is not a file, data too small for one batch,
  Trainer limits that leave an epoch no batch or that validate less often than once per epoch)
  is printed as ``error: ...`` on one line with exit status 2, before the Trainer is built;
- no ``--config``: the recipe's tiny config (``recipes/configs/<recipe>_tiny.yaml``) is used, so
  ``kron-gpt fit`` alone is a bounded CPU-sized run into ``runs/``, not Lightning's 1000 epochs;
- deprecation warnings and vendor tips of dependencies are not printed (:mod:`recipes.quiet`);
- ``--wandb`` adds a ``WandbLogger`` next to the YAML's loggers (CSV by default), offline unless
  W&B is configured on this machine (``WANDB_API_KEY``, ``WANDB_MODE=online`` or a netrc login);
- the shipped YAMLs keep ``ModelCheckpoint(save_last=True, save_on_exception=True)``: an
  interrupted run (Ctrl-C, a crash) updates ``last.ckpt``; resume with ``--ckpt_path``.

``lightning_kron.KronCallback`` goes in the YAML's ``trainer.callbacks`` list like any callback.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

from jsonargparse import ActionYesNo, ArgumentError
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from recipes.errors import OptionError, RecipeInputError, one_line
from recipes.quiet import quiet_dependencies

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
    logger = WandbLogger(project=WANDB_PROJECT, name=name, save_dir=save_dir, offline=not wandb_configured())
    # Lightning always passes anonymous=None to wandb.init, which wandb >= 0.22 answers with a
    # "The anonymous setting has no effect" warning on every run; None is wandb's default anyway
    init_arguments = getattr(logger, "_wandb_init", {})
    if init_arguments.get("anonymous", "absent") is None:
        del init_arguments["anonymous"]
    return logger


class RecipeCLI(LightningCLI):
    """``LightningCLI`` with the recipe conventions above; ``links`` are (source, target[, "instantiate"])."""

    def __init__(self, *args: Any, links: Sequence[tuple] = (), note: Optional[str] = None, **kwargs: Any) -> None:
        self.links = list(links)
        self.note = note  # printed once the classes are built (an error before it stays the only line)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module's config picks the optimizer
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--wandb", action=ActionYesNo, default=False,
                            help="Also log to Weights & Biases (offline unless W&B is configured).")
        for source, target, *when in self.links:
            parser.link_arguments(source, target, apply_on=when[0] if when else "parse")

    def init_parser(self, **kwargs: Any):
        kwargs.setdefault("exit_on_error", False)  # parser errors come back as ArgumentError: one line in run_cli
        return super().init_parser(**kwargs)

    def _subcommand_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def parse_arguments(self, parser, args) -> None:
        self._model_flags = model_flags_given(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)
        check_trainer_options(self.config[self.config["subcommand"]] if self.config.get("subcommand") else self.config)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's settings with the checkpoint's when it resumes; a model
        option given on the command line that the checkpoint overrules is refused, not dropped."""
        if not self.config.get("subcommand"):
            return super()._parse_ckpt_path()
        config = self.config[self.config["subcommand"]]
        asked = {key: config.get(key) for key in self._model_flags}
        configured = _leaves(config.get("model"))
        saved = self._checkpoint_model_settings(super()._parse_ckpt_path)
        config = self.config[self.config["subcommand"]]
        _say_what_the_checkpoint_replaced(configured, _leaves(config.get("model")), skip=self._model_flags)
        for key, value in asked.items():
            if config.get(key) != value:
                trained = "the default" if config.get(key) is None else repr(config.get(key))
                raise OptionError(key, f"got {value!r}, but {config.get('ckpt_path')} was trained with "
                                       f"{trained}: a resumed run keeps the checkpoint's model and "
                                       "optimizer settings (drop the option, or start a new run without --ckpt_path)")
        for source, target, *when in self.links:  # a linked option would rebuild the model another size
            trained = saved.get(target.removeprefix("model."), config.get(source))
            if not when and config.get(source) != trained:
                raise OptionError(source, f"got {config.get(source)!r}, but the model in {config.get('ckpt_path')} "
                                          f"was built for {trained!r}: a resumed run needs the checkpoint's value")

    def _checkpoint_model_settings(self, parse) -> dict:
        """Run Lightning's ``parse`` of the checkpoint's hyperparameters, keeping what it read (the
        model's own settings, before links are applied again)."""
        seen: dict = {}
        parse_object = self.parser.parse_object

        def keep(settings, *args, **kwargs):
            seen.update(settings.get(self.config["subcommand"], {}).get("model", {}))
            return parse_object(settings, *args, **kwargs)

        self.parser.parse_object = keep
        try:
            parse()
        finally:
            del self.parser.parse_object
        return seen.get("dict_kwargs", seen)

    def _set_seed(self) -> None:
        # Lightning logs "Seed set to N" here, before the classes are built; said after them instead,
        # so that a refused value is the only line printed.
        seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
        disabled, seed_logger.disabled = seed_logger.disabled, True
        try:
            super()._set_seed()
        finally:
            seed_logger.disabled = disabled

    def after_instantiate_classes(self) -> None:
        seed = self._subcommand_config().get("seed_everything")
        if seed is not False and seed is not None:
            logging.getLogger("lightning.fabric.utilities.seed").info(f"Seed set to {seed}")
        if self.note:
            print(self.note, file=sys.stderr)
        self._warn_if_too_large_for_the_cpu()

    def _warn_if_too_large_for_the_cpu(self) -> None:
        """One line before a long silent first step: a GPU-sized model (gpt2_124m) on a CPU."""
        trainer, model = getattr(self, "trainer", None), getattr(self, "model", None)
        if trainer is None or model is None or type(trainer.accelerator).__name__ != "CPUAccelerator":
            return
        count = sum(param.numel() for param in model.parameters())
        if count >= CPU_PARAMETER_NOTE:
            print(f"note: {count / 1e6:.0f}M parameters on a CPU: this config is sized for GPUs, and a step can "
                  "take minutes (the *_tiny configs in recipes/configs/ train in seconds)", file=sys.stderr)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except OptionError as error:  # OptimizerConfig names its field; it sits at model.optimizer
            raise (error.within("model.") if error.option.startswith("optimizer") else error) from error
        except RecipeInputError:
            raise
        except (ValueError, MisconfigurationException) as error:  # a transformers config, a callback or
            raise RecipeInputError(one_line(error)) from error       # the Trainer refusing a setting

    def instantiate_trainer(self, **kwargs: Any):
        self._check_data()
        if self._subcommand_config().get("wandb"):
            existing = _logger_list(self._get(self.config_init, "trainer", default={}).get("logger"))
            kwargs["logger"] = [*existing, wandb_logger(existing)]
        return super().instantiate_trainer(**kwargs)

    def _check_data(self) -> None:
        """The data modules refuse data too small for one batch in ``setup``; run it before the
        Trainer is built, so the refusal is the only output and no empty run folder is left. Lightning's
        own ``setup`` call later finds the data loaded."""
        if self.subcommand and self.datamodule is not None:
            self.datamodule.setup(self.subcommand)
            if self.subcommand == "fit":
                trainer = self._subcommand_config().get("trainer") or {}
                check_the_epoch_fits(trainer, len(self.datamodule.train_dataloader()))


CKPT_PATH_NAMES = ("last", "best", "hpc", "registry")  # what Lightning resolves itself
CPU_PARAMETER_NOTE = 20_000_000  # models this large get a note on a CPU (gpt_small is 11M, gpt2_124m 85M)


def _leaves(model_config: Any) -> dict[str, Any]:
    """``{"optimizer.lr": 0.01, ...}`` of a parsed model config (nothing for another type)."""
    return dict(model_config.items()) if hasattr(model_config, "items") else {}


def _say_what_the_checkpoint_replaced(configured: dict, resumed: dict, skip: Sequence[str]) -> None:
    """Config-file values the checkpoint's settings replaced, in one warning (flags are refused
    instead, see ``_parse_ckpt_path``); tuples and lists of the same numbers count as equal."""
    def shown(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    replaced = [f"{key} {shown(value)} -> {shown(resumed[key])}" for key, value in configured.items()
                if key in resumed and f"model.{key}" not in skip and shown(value) != shown(resumed[key])]
    if replaced:
        warnings.warn("resuming: the checkpoint's model settings replace the config's: " + ", ".join(replaced),
                      stacklevel=2)


def model_flags_given(args: Any) -> list[str]:
    """The ``model.*`` options named on the command line (``--model.optimizer.lr 0.01`` or
    ``--model.optimizer.lr=0.01``); a config file's values are not "given" in this sense."""
    if not isinstance(args, (list, tuple)):
        return []
    keys = [str(arg)[2:].split("=", 1)[0] for arg in args if str(arg).startswith("--model.")]
    return list(dict.fromkeys(keys))


def check_trainer_options(config) -> None:
    """``trainer.max_steps`` and ``ckpt_path`` refused before anything is built (Lightning would
    refuse -5 only after building the model, take 0 as "train nothing", and look for the checkpoint
    after the data and model are set up)."""
    trainer = config.get("trainer") or {}
    max_steps = trainer.get("max_steps", -1)
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise OptionError.refused("trainer.max_steps", max_steps,
                                  "a positive number of optimizer steps, or -1 for no step limit (trainer.max_epochs decides)")
    check_trainer_counts(trainer)
    ckpt_path = config.get("ckpt_path")
    if str(ckpt_path) == "last":
        config["ckpt_path"] = ckpt_path = latest_last_checkpoint(trainer)
    if ckpt_path and str(ckpt_path) not in CKPT_PATH_NAMES and not str(ckpt_path).startswith("registry:") \
            and "://" not in str(ckpt_path) and not os.path.isfile(ckpt_path):
        raise OptionError.refused("ckpt_path", str(ckpt_path), "an existing checkpoint file such as "
                                  "runs/<name>/version_N/checkpoints/last.ckpt, or one of " + ", ".join(CKPT_PATH_NAMES))
    if ckpt_path and os.path.isfile(ckpt_path) and not looks_like_a_torch_file(ckpt_path):
        raise OptionError.refused("ckpt_path", str(ckpt_path), "a checkpoint that Lightning saved (this file is "
                                  "neither the zip archive torch.save writes nor a pickle)")


def _is_number(value: Any) -> bool:
    """An int or float count; ``val_check_interval`` may also be a duration (a str, dict or timedelta)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_trainer_counts(trainer: dict) -> None:
    """Trainer settings that Lightning accepts and then fails on (a division by zero after the
    first step) or that train nothing without saying so."""
    interval = trainer.get("val_check_interval")
    if _is_number(interval) and not interval > 0:  # a duration ("00:00:10:00", a dict) is Lightning's to check
        raise OptionError.refused("trainer.val_check_interval", interval, "a positive number of steps, or a "
                                  "fraction of an epoch in (0, 1]")
    if _is_number(trainer.get("limit_train_batches")) and trainer["limit_train_batches"] == 0:
        raise OptionError.refused("trainer.limit_train_batches", trainer["limit_train_batches"], "a positive number "
                                  "of batches, or a fraction of an epoch in (0, 1] (0 trains nothing)")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and accumulate < 1:
        raise OptionError.refused("trainer.accumulate_grad_batches", accumulate, "an integer >= 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip < 0:
        raise OptionError.refused("trainer.gradient_clip_val", clip, "a norm >= 0, or null for no clipping")
    if trainer.get("max_epochs") == 0:
        raise OptionError.refused("trainer.max_epochs", 0, "a positive number of epochs, or -1 for no epoch "
                                  "limit (0 trains nothing)")


def check_the_epoch_fits(trainer: dict, batches: int) -> None:
    """Limits that Lightning refuses only inside ``fit``, with a traceback, once it knows the
    ``batches`` of an epoch: a ``limit_train_batches`` fraction that keeps none of them, and a
    ``val_check_interval`` in steps longer than the epoch while validation runs per epoch. Counted
    on one process; under DDP an epoch has fewer batches, so nothing refused here would pass there."""
    limit = trainer.get("limit_train_batches")
    if trainer.get("overfit_batches") or (_is_number(limit) and limit < 0):  # not this check's to judge
        return
    kept = _batches_kept(batches, limit)
    if kept == 0:
        raise OptionError.refused("trainer.limit_train_batches", limit, f"a fraction that keeps at least one of an "
                                  f"epoch's {batches} training batches (>= {1 / batches:.3g}), or a number of batches")
    interval, validation = trainer.get("val_check_interval"), trainer.get("limit_val_batches")
    if isinstance(interval, int) and not isinstance(interval, bool) and interval > kept \
            and trainer.get("check_val_every_n_epoch") is not None and (validation is None or validation > 0):
        raise OptionError.refused("trainer.val_check_interval", interval, f"at most the {kept} training batches of an "
                                  "epoch while trainer.check_val_every_n_epoch is set (set it to null to validate "
                                  f"every {interval} steps across epochs)")


def _batches_kept(batches: int, limit: Any) -> int:
    """The batches of an epoch that ``limit_train_batches`` keeps, counted as Lightning counts them."""
    if isinstance(limit, float):
        return int(batches * limit)
    return min(batches, limit) if isinstance(limit, int) else batches


def looks_like_a_torch_file(path: str) -> bool:
    """What ``torch.save`` writes: a zip archive holding ``<name>/data.pkl`` (read from the archive's
    directory alone), or before torch 1.6 a pickle (by its first byte). Reading a whole multi-GB
    checkpoint twice to check it is what this avoids."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"  # the pickle protocol opcode


def latest_last_checkpoint(trainer_config) -> str:
    """``--ckpt_path last`` as a user means it: the newest ``last.ckpt`` of this recipe's earlier
    runs (``<save_dir>/<name>/version_*/checkpoints``). Lightning's own ``last`` looks only in the
    new run's version folder, which is empty, and then trains from scratch with a warning."""
    logger = trainer_config.get("logger")
    first = logger[0] if isinstance(logger, list) and logger else logger
    init_args = (first.get("init_args") if hasattr(first, "get") else None) or {}
    save_dir, name = init_args.get("save_dir") or ".", init_args.get("name") or "lightning_logs"
    found = sorted(Path(save_dir, name).glob("version_*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise OptionError.refused("ckpt_path", "last", f"a run to resume, but {Path(save_dir, name)}/version_*/"
                                  "checkpoints/ holds no last.ckpt (give the checkpoint's path)")
    print(f"resuming from {_shown(str(found[-1]))}", file=sys.stderr)
    return str(found[-1])


def _shown(path: Optional[str]) -> str:
    relative = os.path.relpath(path) if path else ""
    return path if relative.startswith("..") else relative


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def with_default_config(args: Optional[list], default_config: Optional[str]) -> Optional[list]:
    """``args`` with ``--config default_config`` after the subcommand when no config is given.

    >>> with_default_config(["fit", "--trainer.max_steps", "5"], "tiny.yaml")
    ['fit', '--config', 'tiny.yaml', '--trainer.max_steps', '5']
    >>> with_default_config(["fit", "-c", "mine.yaml"], "tiny.yaml")
    ['fit', '-c', 'mine.yaml']
    """
    if default_config is None:
        return args
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] not in SUBCOMMANDS or any(arg in ("-c", "--config") or arg.startswith("--config=")
                                                       for arg in argv):
        return args
    argv = [argv[0], "--config", default_config, *argv[1:]]
    if args is None:  # a console script: keep the arguments in sys.argv (LightningCLI warns about both)
        sys.argv[1:] = argv
        return None
    return argv


def run_cli(model_class, datamodule_class, links: Sequence[tuple] = (), args: Optional[list] = None,
            default_config: Optional[str] = None, **kwargs: Any):
    """Run a recipe's CLI; bad input ends the process with a one-line ``error:`` and status 2.

    ``default_config`` (a YAML path) is used when the command names no ``--config``."""
    with quiet_dependencies():
        try:
            given = list(sys.argv[1:] if args is None else args)
            args = with_default_config(args, default_config)
            changed = given != list(sys.argv[1:] if args is None else args)
            note = f"no --config given: using {_shown(default_config)}" if changed else None
            return RecipeCLI(model_class, datamodule_class, links=links, args=args, note=note, **kwargs)
        except (RecipeInputError, ArgumentError) as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            raise SystemExit(2) from None
