"""scripts/compare.py end to end at a tiny budget, and the numbers its table is built from."""

import csv
import json
import warnings
from pathlib import Path

import matplotlib.colors
import matplotlib.pyplot
import pytest
import torch

from lightning_kron.methods.registry import METHODS
from scripts import compare, compare_plots
from scripts.arguments import output_problem
from scripts.run_recorder import RunRecord

TEXT_FOLDER = str(Path(json.__file__).parent)


def test_compare_runs_end_to_end_and_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        status = compare.main(["--steps", "4", "--eval-every", "2", "--data", TEXT_FOLDER, "--context-length", "16",
                               "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                               "--no-progress"])
    assert status == 0
    # e.g. torch's/Lightning's LeafSpec FutureWarning, which broke the progress bar
    assert [str(w.message) for w in seen if issubclass(w.category, (DeprecationWarning, FutureWarning))] == []
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = ["AdamW", "SOAP (every 10)", "SOAP (default budget)", "SOAP (adaptive)", "Shampoo + Adam graft",
                "KrADagrad + Adam graft"]
    assert [row["optimizer"] for row in rows] == expected
    adamw, soap = rows[0], rows[1]
    assert float(adamw["step_ratio_vs_adamw"]) == pytest.approx(1.0)
    assert int(adamw["refreshes"]) == 0 and int(soap["refreshes"]) > 0
    assert all(float(row["final_val_loss"]) > 0 and float(row["train_seconds"]) > 0 for row in rows)
    assert float(soap["optimizer_state_mb"]) > float(adamw["optimizer_state_mb"])  # factors + bases cost memory
    assert all(int(row["threads"]) == torch.get_num_threads() for row in rows)
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["threads"] == torch.get_num_threads() and "machine load" in saved["timing"]
    assert [row["optimizer"] for row in saved["rows"]] == expected
    table = (out / "results.md").read_text()
    assert "| AdamW |" in table and "steps to AdamW's final loss" in table
    assert "ms/step (median) | threads" in table and f"torch threads {torch.get_num_threads()}" in table
    for name in ("val_loss_vs_step", "val_loss_vs_time", "refreshes_per_step", "staleness_heatmap"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    assert "| SOAP (every 10) |" in capsys.readouterr().out


def test_steps_to_reach_interpolates_between_evaluations():
    record = RunRecord("x", val_steps=[10, 20, 30], val_loss=[3.0, 2.0, 1.0])
    assert compare.steps_to_reach(record, 2.5) == pytest.approx(15.0)
    assert compare.steps_to_reach(record, 3.5) == pytest.approx(10.0)
    assert compare.steps_to_reach(record, 0.5) is None


def test_unknown_optimizer_or_bad_lr_override_is_one_error_line(capsys):
    assert compare.main(["--optimizers", "adamw,lion", "--no-progress"]) == 2
    assert "unknown optimizer(s) ['lion']" in capsys.readouterr().err
    assert compare.main(["--lr", "soap:0.1", "--no-progress"]) == 2
    assert "--lr expects NAME=LR" in capsys.readouterr().err
    for bad in ("soap=-0.01", "soap=0", "soap=fast"):
        assert compare.main(["--lr", bad, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: --lr expects NAME=LR with NAME one of adamw, soap, soap_default, soap_adaptive, shampoo, kradagrad, "
                       f"eshampoo and LR a positive number, got '{bad}'\n")


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", ""], "error: --optimizers names none; choose from adamw,"),
    (["--optimizers", "adamw,adamw"], "error: --optimizers names adamw more than once"),
    (["--optimizers", "adamw", "--lr", "soap=0.1"], "error: --lr/--options given for soap, which --optimizers does not"),
    (["--optimizers", "adamw", "--size", "huge"], "error: unknown model size 'huge'"),
    (["--optimizers", "adamw", "--data", "/no/such/corpus"], "error: data path '/no/such/corpus' does not exist"),
    (["--optimizers", "adamw", "--batch-size", "100000", "--data", TEXT_FOLDER + "/tool.py"],
     "training bytes, fewer than one batch needs (12800001)"),
], ids=["none", "twice", "lr-unselected", "size", "data", "too-small"])
def test_bad_choices_are_one_error_line_before_any_run(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    assert compare.main([*argv, "--out", str(out)]) == 2  # progress bars on: nothing may have started
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "argument --threads: must be a positive integer, got '0'"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["--steps", "-3"], "argument --steps: must be a positive integer, got '-3'"),
    (["--recipe", "vision", "--context-length", "64"], "--context-length is a GPT option"),
    (["--accelerator", "tpuu"], "argument --accelerator: invalid choice: 'tpuu'"),
    (["--seed", "-1"], "argument --seed: must be a whole number from 0 to 4294967295, got '-1'"),
    (["--seed", str(2**32)], "argument --seed: must be a whole number from 0 to 4294967295"),
], ids=["threads", "batch-size", "steps", "context-on-vision", "accelerator", "negative-seed", "huge-seed"])
def test_bad_flags_are_refused_by_the_parser(argv, message, capsys, monkeypatch):
    """A seed out of numpy's range was a traceback of seed_everything once the data was built."""
    monkeypatch.setattr(compare, "build_data", lambda args: pytest.fail("the data was built"))
    with pytest.raises(SystemExit) as exit_info:
        compare.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_any_run(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        with pytest.raises(SystemExit):
            compare.main(["--optimizers", "adamw", "--out", str(out)])
        assert f"--out {out}" in capsys.readouterr().err
    assert output_problem("--out", tmp_path / "new" / "deeper", folder=True) is None  # made when the results are written


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc")
def test_an_out_where_nothing_can_be_made_is_refused_even_for_root(capsys, monkeypatch):
    """os.access says yes to root in /proc, and --out /proc/x trained every optimizer before failing."""
    monkeypatch.setattr(compare, "build_data", lambda args: pytest.fail("the data was built"))
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--optimizers", "adamw", "--out", "/proc/x"])
    assert exit_info.value.code == 2
    assert "--out /proc/x: /proc is not a writable folder" in capsys.readouterr().err


def test_every_registered_method_can_be_compared():
    """The tuned contenders first, then each registry method not among them at the recipe defaults."""
    known = compare.known_contenders()
    assert set(METHODS) <= set(known) and list(known)[:len(compare.CONTENDERS)] == [c.key for c in compare.CONTENDERS]
    assert known["eshampoo"].label == METHODS["eshampoo"].label and known["eshampoo"].optimizer.lr is None


def test_ms_per_step_is_the_median_step_not_total_over_steps():
    """One step slowed 20x by another process must not move ms/step (it moved the old mean 11x)."""
    quiet = RunRecord("AdamW", steps=[1, 2, 3, 4, 5], seconds=[0.1, 0.2, 0.3, 0.4, 0.5], val_steps=[5], val_loss=[2.0],
                      threads=2)
    loaded = RunRecord("AdamW", steps=[1, 2, 3, 4, 5], seconds=[0.1, 0.2, 2.2, 2.3, 2.4], val_steps=[5],
                       val_loss=[2.0], threads=2)
    contenders = [compare.CONTENDERS[0]]
    quiet_row, loaded_row = (compare.summary_rows([record], contenders)[0] for record in (quiet, loaded))
    assert quiet_row["ms_per_step"] == pytest.approx(100) and loaded_row["ms_per_step"] == pytest.approx(100)
    assert loaded_row["train_seconds"] == pytest.approx(2.4) and loaded_row["threads"] == 2
    assert loaded.val_estimated_seconds == [pytest.approx(0.5)]


def _record(label: str, every: int, steps: int = 30) -> RunRecord:
    counts = [4 * (1 + (step - 1) // every) for step in range(1, steps + 1)] if every else []
    return RunRecord(label, steps=list(range(1, steps + 1)), seconds=[0.1 * s for s in range(1, steps + 1)],
                     refreshes=counts, val_steps=[10, 20, 30], val_loss=[3.0, 2.5, 2.2], threads=3)


def test_plots_keep_one_colour_per_optimizer_a_legend_per_panel_and_no_hidden_line():
    labels = [c.label for c in compare.CONTENDERS]
    styles = compare_plots.optimizer_styles(labels)
    assert len({style.color for style in styles.values()}) == len(labels)
    # SOAP and Shampoo refreshing on the same steps: identical data, the worst case for hiding
    records = [_record("AdamW", 0), _record("SOAP (every 10)", 10), _record("Shampoo + Adam graft", 10)]
    figures = [compare_plots.loss_vs_step_figure(records, styles), compare_plots.loss_vs_time_figure(records, styles),
               compare_plots.refreshes_figure(records, styles)]
    try:
        for figure in figures:
            for axes in figure.axes:
                assert axes.get_legend() is not None
                for line in axes.get_lines():  # the legend label starts with the optimizer's name
                    label = next(name for name in labels if line.get_label().startswith(name))
                    assert matplotlib.colors.same_color(line.get_color(), styles[label].color)
        assert "machine load" in figures[1].axes[0].get_title() and "threads 3" in figures[1].axes[0].get_title()
        for axes in figures[2].axes:
            soap, shampoo = axes.get_lines()[:2]  # the one drawn first (underneath) is bigger or wider
            assert (soap.get_markersize(), soap.get_linewidth()) > (shampoo.get_markersize(), shampoo.get_linewidth())
            assert (soap.get_marker(), soap.get_linestyle()) != (shampoo.get_marker(), shampoo.get_linestyle())
    finally:
        for figure in figures:
            matplotlib.pyplot.close(figure)


def test_options_override_reaches_the_contender_and_bad_ones_are_one_error_line(capsys):
    args = compare.parse_args(["--optimizers", "soap", "--options", 'soap={"second_moment_on_refresh": "rotate"}',
                               "--options", 'soap={"refresh_timing": "in_step"}'])
    (soap,) = compare.select_contenders(args)
    assert soap.optimizer.options["second_moment_on_refresh"] == "rotate"
    assert soap.optimizer.options["refresh_timing"] == "in_step"
    assert soap.optimizer.replace(options={}) == compare.CONTENDERS[1].optimizer  # nothing else changed
    for bad, message in (("soap=[1]", "--options expects NAME=JSON"), ("lion={}", "--options expects NAME=JSON"),
                         ('soap={"second_moment_on_refresh": "mix"}', "second_moment_on_refresh must be one of")):
        assert compare.main(["--optimizers", "soap", "--options", bad, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_lr_override_reaches_the_contender():
    args = compare.parse_args(["--optimizers", "soap,adamw", "--lr", "soap=0.01"])
    chosen = compare.select_contenders(args)
    assert [c.key for c in chosen] == ["soap", "adamw"]
    assert chosen[0].optimizer.resolved_lr == 0.01 and chosen[1].optimizer.resolved_lr == compare.CONTENDERS[0].optimizer.lr



def test_adaptive_contender_uses_a_tighter_tolerance_early():
    contender = next(c for c in compare.CONTENDERS if c.key == "soap_adaptive")
    config = contender.optimizer
    assert config.early_tolerance < config.tolerance and 0 < config.early_fraction < 1
