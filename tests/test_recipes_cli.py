"""The recipe CLIs: every shipped config parses, bad input is one line, Ctrl-C leaves a resumable run."""

import contextlib
import io
import json
import logging
import signal
import warnings
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import lightning_kron as lk
from recipes import gpt, vision
from recipes.cli import run_cli, wandb_configured
import recipes.quiet
from recipes.quiet import quiet_dependencies

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))
TEXT_FOLDER = str(Path(json.__file__).parent)
GPT_TINY = str(next(path for path in CONFIGS if path.name == "gpt_tiny.yaml"))


def recipe_main(config: Path):
    return vision.main if config.name.startswith("vision") else gpt.main


def small_gpt_args(tmp_path: Path, steps: int, *extra: str) -> list[str]:
    return ["fit", "--config", GPT_TINY, "--data.source", TEXT_FOLDER, "--data.context_length", "16",
            "--data.batch_size", "4", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path), *extra]


def test_shipped_configs_cover_both_recipes_and_sizes():
    names = {path.stem for path in CONFIGS}
    assert {"gpt_tiny", "gpt_small", "gpt2_124m", "llama_tiny", "vision_vit_tiny", "vision_resnet_tiny"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe_main(config)(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "optimizer:" in printed and "logger:" in printed and "save_on_exception: true" in printed


KRON_CALLBACK = ["--trainer.callbacks+=lightning_kron.KronCallback"]


@pytest.mark.parametrize("extra, message", [
    (["--data.source", "/no/such/corpus"], "error: data path '/no/such/corpus' does not exist"),
    (["--model.family", "bert"], 'model.family'),
    (["--model.size", "huge"], 'model.size'),
    (["--model.optimizer.name", "sgd"], "model.optimizer.name"),
    (["--model.optimizer.lr", "-1"], "error: model.optimizer.lr: got -1.0, expected a positive number"),
    (["--model.optimizer.name", "adamw", "--model.optimizer.betas", "[1.5, 0.9]"],
     "error: model.optimizer.betas: got [1.5, 0.9], expected two decay rates in [0, 1)"),
    (["--model.colour", "red"], "--model.colour"),
    (["--model.optimizer.name", "soap_adaptive", "--model.optimizer.tolerance", "-1"],
     "error: model.optimizer.tolerance: got -1.0, expected a number in [0, 1]"),
    (["--model.optimizer.name", "soap", "--model.optimizer.options", '{"bogus": 1}'],
     "error: model.optimizer.options: got unknown key 'bogus', expected keys of SOAP: refresh, solver,"),
    (["--model.optimizer.name", "soap", "--model.optimizer.options", '{"rotation_dtype": "bf17"}'],
     "error: model.optimizer.options: rotation_dtype must be None or one of 'auto', 'tf32', torch.float32, "
     "torch.float64, torch.bfloat16, got 'bf17'"),
    (["--trainer.max_steps", "-5"], "error: trainer.max_steps: got -5, expected a positive number of optimizer steps, "
                                    "or -1 for no step limit"),
    (["--trainer.max_steps", "0"], "error: trainer.max_steps: got 0, expected a positive number"),
    (["--data.context_length", "-4"], "error: data.context_length: got -4, expected a positive integer"),
    (["--trainer.val_check_interval", "0"], "error: trainer.val_check_interval: got 0, expected a positive number"),
    (["--trainer.accumulate_grad_batches", "0"], "error: trainer.accumulate_grad_batches: got 0, expected an integer >= 1"),
    (["--trainer.gradient_clip_val", "-1"], "error: trainer.gradient_clip_val: got -1"),
    (["--trainer.max_epochs", "0"], "error: trainer.max_epochs: got 0, expected a positive number of epochs"),
    (["--trainer.limit_train_batches", "0"], "error: trainer.limit_train_batches: got 0, expected a positive number "
                                             "of batches, or a fraction of an epoch in (0, 1] (0 trains nothing)"),
    (["--data.val_windows", "0"], "error: data.val_windows: got 0, expected a positive integer"),
    (["--data.num_workers", "-1"], "error: data.num_workers: got -1, expected 0"),
    (["--model.dropout", "1.5"], "error: model.dropout: got 1.5, expected a probability in [0, 1)"),
    (["--ckpt_path", "missing/last.ckpt"], "error: ckpt_path: got 'missing/last.ckpt', expected an existing checkpoint file"),
    (["--ckpt_path", "last"], "error: ckpt_path: got 'last', expected a run to resume, but runs/gpt_tiny/version_*/"),
    ([*KRON_CALLBACK, "--trainer.callbacks.method", "soapp"],
     "error: method must be one of 'soap', 'eshampoo', 'shampoo', 'kradagrad' or None; got 'soapp'"),
    (["--trainer.enable_checkpointing", "false"], "error: Trainer was configured with `enable_checkpointing=False`"),
    # a mistake inside the callback's refresh policy names the policy's own option, not just the callback
    ([*KRON_CALLBACK, "--trainer.callbacks.refresh", '{"class_path": "lightning_kron.BudgetRefresh", '
                                                     '"init_args": {"evry": 10}}'],
     """Parser key "refresh": Problem with given class_path 'lightning_kron.BudgetRefresh': Option 'evry' is not accepted"""),
    ([*KRON_CALLBACK, "--trainer.callbacks.refresh", '{"class_path": "lightning_kron.BudgetRefresh", '
                                                     '"init_args": {"every": 0}}'],
     "error: every must be an integer >= 1, got 0"),
    ([*KRON_CALLBACK, "--trainer.callbacks.refresh", '{"class_path": "lightning_kron.LinearRamp"}'],
     "lightning_kron.LinearRamp does not implement protocol RefreshPolicy"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_input_is_one_error_line_before_training(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML logs to ./runs: nothing may appear there
    with pytest.raises(SystemExit) as exit_info:
        gpt.main(["fit", "--config", GPT_TINY, *extra])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error: "), captured.err
    assert message in captured.err
    assert captured.out == "" and list(tmp_path.iterdir()) == []  # no log dir, no checkpoint: nothing started


@pytest.mark.parametrize("policy, expected", [
    ('{"class_path": "lightning_kron.BudgetRefresh", "init_args": {"every": 10}}', "BudgetRefresh"),
    ('{"class_path": "lightning_kron.FixedRefresh", "init_args": {"every": 5}}', "FixedRefresh"),
    ('{"class_path": "lightning_kron.AdaptiveRefresh", "init_args": {"tolerance": 0.1}}', "AdaptiveRefresh"),
    ('{"class_path": "callback_helpers.EveryOtherStep"}', "EveryOtherStep"),
], ids=lambda value: value if value.isidentifier() else None)
def test_the_callbacks_refresh_policy_can_be_any_policy_in_a_config(policy, expected, tmp_path):
    """The default policy (BudgetRefresh), the other built-ins and a user-written one all pass the
    CLI's type check (the callback's ``refresh`` is typed by the policy protocol) and drive the run."""
    cli = run_gpt_cli(small_gpt_args(tmp_path, 4, "--model.optimizer.name", "adamw", *KRON_CALLBACK,
                                     "--trainer.callbacks.refresh", policy))
    callback = next(each for each in cli.trainer.callbacks if isinstance(each, lk.KronCallback))
    assert type(callback.scheduler.policy).__name__ == expected
    assert type(cli.trainer.optimizers[0]).__name__ == "SOAP" and cli.trainer.optimizers[0].global_step == 4
    if expected == "EveryOtherStep":  # it checks the even steps and refreshes every factor there
        counters = callback.scheduler.counters
        assert counters.checks >= 1 and counters.refreshes == counters.checks * callback.scheduler.factor_count


def test_no_config_runs_the_tiny_config(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpt.main(["fit", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "max_steps: 1000" in printed and "name: gpt_tiny" in printed and "save_dir: runs" in printed
    with pytest.raises(SystemExit):
        vision.main(["fit", "--print_config"])
    printed = capsys.readouterr().out
    assert "max_steps: 600" in printed and "name: vision_vit_tiny" in printed
    # a --config of the user's own is taken as it is, not merged with the tiny one
    own = tmp_path / "own.yaml"
    own.write_text("trainer:\n  max_steps: 7\n")
    with pytest.raises(SystemExit):
        gpt.main(["fit", "--config", str(own), "--print_config"])
    printed = capsys.readouterr().out
    assert "max_steps: 7" in printed and "gpt_tiny" not in printed


def test_unknown_key_in_a_yaml_file_is_refused(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(Path(GPT_TINY).read_text().replace("  size: tiny", "  size: tiny\n  sise: small"))
    with pytest.raises(SystemExit) as exit_info:
        gpt.main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2 and "sise" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["text", "zip"])
def test_a_file_that_is_no_checkpoint_is_one_error_line(kind, tmp_path, capsys, monkeypatch):
    if kind == "zip":  # a zip archive, but not one torch.save wrote
        with zipfile.ZipFile(tmp_path / "notes.ckpt", "w") as archive:
            archive.writestr("notes/readme.txt", "not a checkpoint")
    else:
        (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        gpt.main(["fit", "--config", GPT_TINY, "--ckpt_path", "notes.ckpt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ckpt_path: got 'notes.ckpt', expected a checkpoint that Lightning saved") and err.count("\n") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.ckpt"]


def _images_npz(path: Path, **change) -> str:
    generator = np.random.default_rng(0)
    arrays = {"x": generator.random((200, 1, 8, 8), dtype=np.float32), "y": np.arange(200) % 3}
    arrays.update(change)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return str(path)


@pytest.mark.parametrize("change, extra, message", [
    ({"x_val": np.zeros((20, 3, 8, 8), np.float32), "y_val": np.arange(20) % 3}, [],
     "x_val images have 3 channels, the training images 1"),
    ({"x_val": np.zeros((20, 1, 8, 8), np.float32)}, [], "x_val and y_val come together"),
    ({"x": np.full((200, 1, 8, 8), np.nan, np.float32)}, [], "images hold NaN or infinite pixel values"),
    ({"y": np.linspace(0, 2, 200)}, [], "labels must be class indices (whole numbers), got float64 values such as [0.0101, 0.0201"),
    ({}, ["--model.label_smoothing", "-0.5"], "error: model.label_smoothing: got -0.5, expected a number in [0, 1]"),
    ({}, ["--data.image_size", "2"], "error: data.image_size: got 2, expected an integer >= 4"),
], ids=["val-channels", "val-labels-missing", "nan-images", "fractional-labels", "label-smoothing", "image-size"])
def test_bad_image_data_is_one_error_line_before_training(change, extra, message, tmp_path, capsys, monkeypatch):
    source = _images_npz(tmp_path / "data.npz", **change)
    monkeypatch.chdir(tmp_path)
    config = next(path for path in CONFIGS if path.name == "vision_vit_tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        vision.main(["fit", "--config", str(config), "--data.source", source, "--data.batch_size", "16", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.npz"]  # no run folder


def test_bool_labels_and_a_validation_set_at_another_resolution_are_data(tmp_path):
    from recipes.image_data import ImageDataModule

    source = _images_npz(tmp_path / "data.npz", y=np.arange(200) % 2 == 0,
                         x_val=np.zeros((20, 1, 16, 16), np.float32), y_val=np.arange(20) % 2 == 1)
    data = ImageDataModule(source=source, image_size=8, batch_size=16)
    data.setup("fit")
    assert data.num_classes == 2 and data.val_set.tensors[0].shape == (20, 1, 8, 8)


def test_empty_image_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    config = next(path for path in CONFIGS if path.name == "vision_vit_tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        vision.main(["fit", "--config", str(config), "--data.source", str(tmp_path / "images")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: data folder")


@contextlib.contextmanager
def listening_to_lightning():
    """What Lightning's own logger says (it does not propagate to the root logger or to capsys)."""
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        yield output
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)


@pytest.mark.parametrize("recipe, too_large, message", [
    ("vision_vit_tiny.yaml", ["--data.batch_size", "5000"], "error: 1437 training images, fewer than one batch of 5000"),
    ("gpt_tiny.yaml", ["--data.batch_size", "1000"], "training bytes, fewer than one batch needs (128001)"),
])
def test_data_too_small_for_a_batch_is_refused_before_the_trainer_exists(recipe, too_large, message, tmp_path, capsys):
    config = next(path for path in CONFIGS if path.name == recipe)
    source = [] if recipe.startswith("vision") else ["--data.source", str(Path(TEXT_FOLDER) / "decoder.py"),
                                                   "--data.cache_dir", str(tmp_path / "cache")]
    with listening_to_lightning() as lightning_output, pytest.raises(SystemExit) as exit_info:
        recipe_main(config)(["fit", "--config", str(config), *source, *too_large,
                             "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    assert "GPU available" not in lightning_output.getvalue()  # the Trainer was never built
    assert not (tmp_path / "runs").exists()


VISION_VIT_TINY = str(next(path for path in CONFIGS if path.name == "vision_vit_tiny.yaml"))


@pytest.mark.parametrize("extra, message", [
    (["--trainer.limit_train_batches", "0.01"], "error: trainer.limit_train_batches: got 0.01, expected a fraction "
                                                "that keeps at least one of an epoch's 22 training batches (>= 0.0455)"),
    (["--trainer.check_val_every_n_epoch", "1"], "error: trainer.val_check_interval: got 50, expected at most the 22 "
                                                 "training batches of an epoch while trainer.check_val_every_n_epoch "
                                                 "is set (set it to null to validate every 50 steps across epochs)"),
    (["--trainer.check_val_every_n_epoch", "1", "--trainer.limit_train_batches", "10"],
     "error: trainer.val_check_interval: got 50, expected at most the 10 training batches"),
], ids=["fraction-keeps-no-batch", "interval-longer-than-the-epoch", "interval-longer-than-the-limit"])
def test_limits_that_lightning_refuses_inside_fit_are_one_line_before_the_trainer_exists(extra, message, tmp_path, capsys):
    """Both used to end in a traceback from inside ``fit`` (1437 digits in batches of 64: 22 an epoch)."""
    with listening_to_lightning() as lightning_output, pytest.raises(SystemExit) as exit_info:
        vision.main(["fit", "--config", VISION_VIT_TINY, *extra, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert "GPU available" not in lightning_output.getvalue() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("interval", ["00:00:00:30", '{"seconds": 30}'], ids=["DD:HH:MM:SS", "dict"])
def test_a_time_based_val_check_interval_is_lightnings_to_take(interval, tmp_path):
    """The CLI's own ``val_check_interval > 0`` check used to crash on Lightning's duration forms
    (TypeError: '>' not supported between instances of 'str' and 'int')."""
    cli = run_gpt_cli(small_gpt_args(tmp_path, 2, "--model.optimizer.name", "adamw",
                                     "--trainer.val_check_interval", interval))
    assert cli.trainer.global_step == 2 and cli.trainer._val_check_time_interval == 30


class InterruptAtStep(L.Callback):
    """Raises KeyboardInterrupt after the given optimizer step, as Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def run_gpt_cli(args: list[str], **kwargs):
    """``kron-gpt`` in-process, returning the CLI object (``gpt.main`` returns nothing, as a console script must)."""
    from recipes.gpt import CausalLM
    from recipes.text_data import TextDataModule

    return run_cli(CausalLM, TextDataModule, links=[("data.context_length", "model.context_length")], args=args, **kwargs)


def test_ctrl_c_leaves_a_checkpoint_that_resumes(tmp_path):
    args = small_gpt_args(tmp_path, 6, "--model.optimizer.name", "soap")
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            run_gpt_cli(args, trainer_defaults={"callbacks": [InterruptAtStep(4)]})
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a KeyboardInterrupt
    last = tmp_path / "gpt_tiny" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4
    assert saved["optimizer_states"][0]["param_groups"][0]["lightning_kron"]["global_step"] == 4
    cli = run_gpt_cli(args + ["--ckpt_path", "last"])  # the newest last.ckpt of the earlier runs: this one
    assert cli.trainer.global_step == 6
    assert cli.trainer.optimizers[0].global_step == 6  # the SOAP state continued, not restarted


def test_resuming_refuses_a_model_option_the_checkpoint_overrules(tmp_path, capsys):
    """Lightning takes a resumed run's model settings from the checkpoint; asking for others is an
    error line, not a run that silently trains with the checkpoint's optimizer."""
    run_gpt_cli(small_gpt_args(tmp_path, 2, "--model.optimizer.name", "soap"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_gpt_cli(small_gpt_args(tmp_path, 4, "--model.optimizer.name=adamw", "--ckpt_path", "last"))
    assert exit_info.value.code == 2
    resuming, error = capsys.readouterr().err.splitlines()  # "--ckpt_path last" says which file it took
    assert resuming.startswith("resuming from ") and resuming.endswith("version_0/checkpoints/last.ckpt")
    assert error.startswith("error: model.optimizer.name: got 'adamw', but ") and "was trained with 'soap'" in error
    assert sorted(path.name for path in (tmp_path / "gpt_tiny").iterdir()) == ["version_0"]  # no new run
    with pytest.warns(UserWarning, match=r"checkpoint's model settings replace the config's: optimizer.name "
                                         r'"adamw" -> "soap"'):  # the YAML's adamw, not a flag: said, not refused
        run_gpt_cli(small_gpt_args(tmp_path, 3, "--ckpt_path", "last"))
    with pytest.raises(SystemExit):  # linked into the model: it would be built another size
        run_gpt_cli(small_gpt_args(tmp_path, 4, "--data.context_length", "32", "--ckpt_path", "last"))
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: data.context_length: got 32, but the model in ") and "was built for 16" in error


def test_wandb_flag_adds_an_offline_wandb_logger(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = small_gpt_args(tmp_path, 1, "--wandb")[1:]  # no subcommand: build everything, run nothing
    cli = run_gpt_cli(args, run=False)
    kinds = [type(logger).__name__ for logger in cli.trainer.loggers]
    assert kinds == ["CSVLogger", "WandbLogger"]
    assert cli.trainer.loggers[1]._offline
    # Lightning's anonymous=None would make wandb.init warn that the setting has no effect
    assert "anonymous" not in cli.trainer.loggers[1]._wandb_init


def test_wandb_is_online_only_when_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_configured()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_configured()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not wandb_configured()


def test_no_config_short_run_logs_to_runs_without_dependency_warnings_or_tips(tmp_path, monkeypatch, capsys):
    """``kron-gpt fit`` with no --config: the tiny config's ./runs/gpt_tiny, not ./lightning_logs; and none
    of torch's/Lightning's deprecation warnings or Lightning's "💡 Tip" lines reach the output."""
    monkeypatch.chdir(tmp_path)
    with listening_to_lightning() as lightning_output, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gpt.main(["fit", "--data.source", TEXT_FOLDER, "--data.context_length", "16", "--data.batch_size", "4",
                  "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "2",
                  "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                  "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    assert (tmp_path / "runs" / "gpt_tiny" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "lightning_logs").exists()
    assert "no --config given: using" in capsys.readouterr().err
    logged = lightning_output.getvalue()
    assert "`max_steps=2` reached" in logged  # the handler did hear Lightning
    assert not [line for line in logged.splitlines() if "tip" in line.lower() or "warning" in line.lower()], logged
    dependency_warnings = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in seen
                           if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert dependency_warnings == []


def test_quiet_dependencies_hides_their_deprecations_but_not_ours():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_dependencies():
            warnings.warn_explicit("LeafSpec is deprecated", FutureWarning, "_pytree.py", 21, module="torch.utils._pytree")
            warnings.warn_explicit("old", DeprecationWarning, "x.py", 1, module="lightning.pytorch.x")
            warnings.warn_explicit("ours", FutureWarning, "soap.py", 1, module="lightning_kron.soap")
        warnings.warn_explicit("LeafSpec is deprecated", FutureWarning, "_pytree.py", 21, module="torch.utils._pytree")
    assert [str(w.message) for w in seen] == ["ours", "LeafSpec is deprecated"]  # only inside is it hidden


def test_quiet_dependencies_prints_our_warnings_in_one_line_and_theirs_with_the_location():
    own_file = str(Path(recipes.quiet.__file__))
    with quiet_dependencies():
        ours = warnings.formatwarning("warmup too long", UserWarning, own_file, 37, "return configure(...)")
        theirs = warnings.formatwarning("odd input", UserWarning, "/site-packages/torch/x.py", 5, "x = 1")
    assert ours == "UserWarning: warmup too long\n"
    assert theirs.startswith("/site-packages/torch/x.py:5: UserWarning: odd input") and "x = 1" in theirs
    after = warnings.formatwarning("warmup too long", UserWarning, own_file, 37, "return configure(...)")
    assert after.startswith(f"{own_file}:37: UserWarning")  # restored outside


def test_a_gpu_sized_model_on_a_cpu_gets_a_one_line_note(tmp_path, monkeypatch, capsys):
    """gpt2_124m on a CPU used to start a silent first step of minutes; the tiny model gets no note."""
    import recipes.cli

    run_gpt_cli(small_gpt_args(tmp_path, 1))
    assert "note:" not in capsys.readouterr().err
    monkeypatch.setattr(recipes.cli, "CPU_PARAMETER_NOTE", 1)  # the tiny model counts as large
    run_gpt_cli(small_gpt_args(tmp_path, 1))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "parameters on a CPU" in notes[0], notes
