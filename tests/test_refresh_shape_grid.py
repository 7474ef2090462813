"""scripts/refresh_shape_grid.py: the grid of budget shapes and its table against stored baselines."""

from __future__ import annotations

import json

import pytest

from lightning_kron.scheduling.budget_policies import BudgetRefresh
from scripts import refresh_shape_grid as grid
from scripts import refresh_study as study
from scripts import study_records as stored_runs
from scripts import study_schedules as named
from scripts import study_models
from scripts.machine import describe_cpu


def test_the_grid_holds_every_admissible_shape_once():
    shapes = grid.shapes()
    assert len(shapes) == 90  # 4 x 4 x 3 x 2, less the 6 whose early phase would overspend (3 x 0.5)
    for options in shapes.values():
        BudgetRefresh(every=20, total_steps=100, **options)  # each one constructs


def test_the_grid_runs_resumably_and_ranks_the_shapes_against_the_baselines(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(study.STUDY_MODELS, "toy", study.StudyModel("toy", study_models._mlp, 12, 3e-3, 2, "toy MLP"))
    two = dict(list(grid.shapes().items())[:2])
    monkeypatch.setattr(grid, "shapes", lambda: two)
    baselines = tmp_path / "study.json"
    stored = [{"model": "toy", "schedule": name, "seed": seed, "val_loss": 1.0, "soap": stored_runs.soap_variant(),
               "machine": describe_cpu()} for name in (named.REFERENCE, "every10") for seed in (0, 1)]
    baselines.write_text(json.dumps({"runs": stored}))
    arguments = ["--model", "toy", "--json", str(tmp_path / "grid.json"), "--study-json", str(baselines),
                 "--seeds", "0,1", "--no-progress"]
    assert grid.main(arguments) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in two) and "2 shapes" in table
    runs = json.loads((tmp_path / "grid.json").read_text())["runs"]
    assert sorted((r["schedule"], r["seed"]) for r in runs) == sorted((name, seed) for name in two for seed in (0, 1))
    monkeypatch.setattr(study, "run_one", lambda *args, **kwargs: (_ for _ in ()).throw(AssertionError("rerun")))
    assert grid.main(arguments) == 0  # everything stored: nothing is trained again


def test_a_grid_run_pairs_only_with_a_baseline_of_its_own_cpu():
    runs = [{"model": "mlp", "seed": 0, "val_loss": 1.1, "machine": "AMD EPYC (AVX512)"},
            {"model": "mlp", "seed": 1, "val_loss": 2.2}]
    intel = "Intel(R) Xeon(R) Processor"
    baseline = [{"model": "mlp", "seed": 0, "val_loss": 2.0, "machine": intel},
                {"model": "mlp", "seed": 0, "val_loss": 1.0, "machine": "AMD EPYC"},
                {"model": "other", "seed": 0, "val_loss": 1.5, "machine": "AMD EPYC"},
                {"model": "mlp", "seed": 1, "val_loss": 2.0, "machine": intel}]
    assert grid.changes(runs, baseline) == [1.1 / 1.0 - 1]


def test_a_grid_with_no_baseline_of_its_cpu_says_so_instead_of_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(study.STUDY_MODELS, "toy", study.StudyModel("toy", study_models._mlp, 12, 3e-3, 2, "toy MLP"))
    one = dict(list(grid.shapes().items())[:1])
    monkeypatch.setattr(grid, "shapes", lambda: one)
    baselines = tmp_path / "study.json"
    baselines.write_text(json.dumps({"runs": [{"model": "toy", "schedule": named.REFERENCE, "seed": 0, "val_loss": 1.0,
                                               "machine": "Some Other CPU"}]}))
    assert grid.main(["--model", "toy", "--json", str(tmp_path / "grid.json"), "--study-json", str(baselines),
                      "--seeds", "0", "--no-progress"]) == 1
    assert "no shape pairs" in capsys.readouterr().out


def test_an_unknown_model_fails_in_one_line_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "run_one", lambda *args, **kwargs: (_ for _ in ()).throw(AssertionError("ran")))
    for name in ("nope", "mlp@lrfast"):
        try:
            grid.main(["--model", name, "--json", str(tmp_path / "grid.json"), "--no-progress"])
        except SystemExit as stop:
            assert stop.code == 2
        else:
            raise AssertionError(f"{name} was accepted")
        assert name.split("@")[0] in capsys.readouterr().err
    assert not (tmp_path / "grid.json").exists()


def test_a_model_at_another_lr_trains_at_it_and_pairs_with_its_own_baselines(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(study.STUDY_MODELS, "toy", study.StudyModel("toy", study_models._mlp, 12, 3e-3, 2, "toy MLP"))
    one = dict(list(grid.shapes().items())[:1])
    monkeypatch.setattr(grid, "shapes", lambda: one)
    rates = []
    real_run_one = study.run_one
    monkeypatch.setattr(study, "run_one", lambda model, *args, **kwargs: rates.append(model.lr) or real_run_one(model, *args, **kwargs))
    baselines = tmp_path / "study.json"
    losses = {"toy": 1000.0, "toy@lr0.001": 2.0}  # pairing with the base model's runs would show about -100%
    stored = [{"model": model, "schedule": name, "seed": seed, "val_loss": loss, "soap": stored_runs.soap_variant(),
               "machine": describe_cpu()} for model, loss in losses.items() for name in (named.REFERENCE, "every10")
              for seed in (0, 1)]
    baselines.write_text(json.dumps({"runs": stored}))
    assert grid.main(["--model", "toy@lr1e-3", "--json", str(tmp_path / "grid.json"), "--study-json", str(baselines),
                      "--seeds", "0,1", "--no-progress"]) == 0
    assert rates == [1e-3, 1e-3]
    runs = json.loads((tmp_path / "grid.json").read_text())["runs"]
    assert {r["model"] for r in runs} == {"toy@lr0.001"}
    expected = sum(r["val_loss"] / 2.0 - 1 for r in runs) / len(runs)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {next(iter(one))} "))
    assert row.split("|")[2].strip() == f"{100 * expected:+.2f}%"


@pytest.mark.parametrize("argv, said", [
    (["--seeds", "3-1"], "argument --seeds: "),
    (["--json", "{tmp}"], "--json {tmp}: is a folder"),
    (["--study-json", "{tmp}"], "{tmp} is not a file of study runs: it cannot be read"),
], ids=["empty-seeds", "json-folder", "study-json-folder"])
def test_a_request_that_cannot_run_or_be_stored_fails_in_one_line_before_any_run(argv, said, tmp_path, monkeypatch, capsys):
    """Seeds 3-1 exited 1 after an empty grid; a folder as --json or --study-json was a traceback."""
    monkeypatch.setattr(study, "run_one", lambda *args, **kwargs: pytest.fail("a run trained"))
    with pytest.raises(SystemExit) as stop:
        grid.main(["--json", str(tmp_path / "grid.json"), "--no-progress", *(a.format(tmp=tmp_path) for a in argv)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and said.format(tmp=tmp_path) in err.strip().splitlines()[-1] and "Traceback" not in err
