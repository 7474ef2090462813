"""scripts/refresh_sweep.py: step-dependent refresh schedules and the sweep end to end."""

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scripts import refresh_sweep
from scripts.refresh_sweep import make_policy, parse_pieces

TEXT_FOLDER = str(Path(json.__file__).parent)


def test_pieces_parse_and_must_end_open():
    assert parse_pieces("150:10,inf:30") == ((150.0, 10.0), (math.inf, 30.0))
    with pytest.raises(argparse.ArgumentTypeError, match="inf:"):
        parse_pieces("150:10")


def test_fixed_pieces_change_the_period_and_adaptive_pieces_the_tolerance():
    fixed = make_policy("fixed", parse_pieces("10:2,inf:5"))
    assert [step for step in range(1, 21) if fixed.checks_at(step)] == [2, 4, 6, 8, 10, 15, 20]
    adaptive = make_policy("adaptive", parse_pieces("3:0.1,inf:0.5"))
    staleness = torch.tensor([0.05, 0.2, 0.6])
    assert adaptive.checks_at(1) and adaptive.select(staleness, step=1).tolist() == [False, True, True]
    assert adaptive.tolerance_at(1) == 0.1
    assert adaptive.select(staleness, step=3).tolist() == [False, False, True] and adaptive.tolerance_at(3) == 0.5


def test_sweep_runs_schedules_and_counts_their_refreshes(tmp_path, capsys):
    status = refresh_sweep.main(["--run", "often", "fixed", "inf:1", "--run", "once", "fixed", "inf:1000",
                                 "--steps", "4", "--eval-every", "2", "--data", TEXT_FOLDER, "--context-length", "16",
                                 "--batch-size", "4", "--cache-dir", str(tmp_path), "--no-progress"])
    assert status == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| often") or line.startswith("| once")]
    often, once = (int(row[3]) for row in rows)
    assert often > once > 0  # every step vs only the first exact refresh
    assert rows[0][6].strip() == "+0.00%"


def test_rotation_dtype_reaches_every_run(monkeypatch, capsys):
    seen = []

    def fake_train_one(args, contender):
        options = contender.optimizer.options
        seen.append((options.get("rotation_dtype"), options.get("statistics_product_dtype")))
        return SimpleNamespace(val_loss=[1.0], total_refreshes=1, refreshes=[1])

    monkeypatch.setattr(refresh_sweep.compare, "train_one", fake_train_one)
    monkeypatch.setattr(refresh_sweep.compare, "check_inputs", lambda args: None)  # the default data is large
    refresh_sweep.main(["--run", "a", "fixed", "inf:10", "--run", "b", "adaptive", "inf:0.5",
                        "--rotation-dtype", "bfloat16", "--no-progress"])
    assert seen == [(torch.bfloat16, None)] * 2
    refresh_sweep.main(["--run", "a", "fixed", "inf:10", "--statistics-product-dtype", "bfloat16", "--no-progress"])
    assert seen[-1] == (None, torch.bfloat16)


@pytest.mark.parametrize("runs, message", [
    (["a", "fixed", "inf:10", "b", "fixed", "10:5"], "the last piece of '10:5' must start with 'inf:'"),
    (["a", "adaptive", "garbage"], "each piece of 'garbage' must be UNTIL:VALUE"),
    (["a", "fixed", "inf:0"], "periods must be whole numbers >= 1"),
    (["a", "adaptive", "inf:2"], "tolerance must be in"),
])
def test_every_schedule_is_checked_before_any_run_trains(runs, message, monkeypatch, capsys):
    """A bad second schedule used to fail after the first had trained (a traceback, its result lost)."""
    monkeypatch.setattr(refresh_sweep, "train", lambda *args, **kwargs: pytest.fail("a run trained"))
    argv = ["--steps", "3"]
    for start in range(0, len(runs), 3):
        argv += ["--run", *runs[start:start + 3]]
    with pytest.raises(SystemExit) as stop:
        refresh_sweep.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),  # was run at 32
    (["--seed", "-1"], "argument --seed: must be a whole number from 0 to 4294967295"),
    (["--context-length", "0"], "argument --context-length: must be a positive integer"),
], ids=["batch-size", "seed", "context-length"])
def test_a_bad_recipe_flag_is_refused_by_the_parser(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(refresh_sweep, "train", lambda *args, **kwargs: pytest.fail("a run trained"))
    with pytest.raises(SystemExit) as stop:
        refresh_sweep.main(["--run", "a", "fixed", "inf:10", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/corpus"], "error: data path '/no/such/corpus' does not exist"),
    (["--data", TEXT_FOLDER + "/tool.py", "--batch-size", "100000"], "training bytes, fewer than one batch needs"),
], ids=["missing", "too-small"])
def test_bad_data_is_the_one_line_error_compare_gives_before_any_run(argv, message, tmp_path, monkeypatch, capsys):
    """A missing --data was a RecipeInputError traceback (exit 1) from inside the first run."""
    monkeypatch.setattr(refresh_sweep, "train", lambda *args, **kwargs: pytest.fail("a run trained"))
    assert refresh_sweep.main(["--run", "a", "fixed", "inf:10", "--cache-dir", str(tmp_path), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
