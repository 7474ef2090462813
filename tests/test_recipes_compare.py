"""scripts/compare.py end to end at a tiny budget, and the numbers its table is built from."""

import csv
import json
from pathlib import Path

import pytest

from recipes.optimizers import kradagrad_available
from scripts import compare
from scripts.run_recorder import RunRecord

TEXT_FOLDER = str(Path(json.__file__).parent)


def test_compare_runs_end_to_end_and_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    status = compare.main(["--steps", "4", "--eval-every", "2", "--data", TEXT_FOLDER, "--context-length", "16",
                           "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                           "--no-progress"])
    assert status == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = ["AdamW", "SOAP (every 10)", "SOAP (adaptive)", "Shampoo + Adam graft"]
    expected += ["KrADagrad + Adam graft"] if kradagrad_available() else []
    assert [row["optimizer"] for row in rows] == expected
    adamw, soap = rows[0], rows[1]
    assert float(adamw["step_ratio_vs_adamw"]) == pytest.approx(1.0)
    assert int(adamw["refreshes"]) == 0 and int(soap["refreshes"]) > 0
    assert all(float(row["final_val_loss"]) > 0 and float(row["train_seconds"]) > 0 for row in rows)
    assert float(soap["optimizer_state_mb"]) > float(adamw["optimizer_state_mb"])  # factors + bases cost memory
    table = (out / "results.md").read_text()
    assert "| AdamW |" in table and "steps to AdamW's final loss" in table
    if not kradagrad_available():
        assert "KrADagrad skipped" in table
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


def test_lr_override_reaches_the_contender():
    args = compare.parse_args(["--optimizers", "soap,adamw", "--lr", "soap=0.01"])
    chosen = compare.select_contenders(args)
    assert [c.key for c in chosen] == ["soap", "adamw"]
    assert chosen[0].optimizer.resolved_lr == 0.01 and chosen[1].optimizer.resolved_lr == compare.CONTENDERS[0].optimizer.lr



def test_adaptive_contender_uses_a_tighter_tolerance_early():
    contender = next(c for c in compare.CONTENDERS if c.key == "soap_adaptive")
    config = contender.optimizer
    assert config.early_tolerance < config.tolerance and 0 < config.early_fraction < 1
