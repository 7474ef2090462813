"""scripts/refresh_study.py: the model registry, resumable runs, the relative table and the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import pytest

from scripts import refresh_study as study
from scripts import first_step_probes as probes
from scripts import refresh_report as report
from scripts import study_records as stored_runs
from scripts import study_schedules as named
from scripts import study_models


@pytest.fixture
def toy(monkeypatch):
    """A study model registered in one line, as the other engineers' small models will be."""
    monkeypatch.setitem(study.STUDY_MODELS, "toy", study.StudyModel("toy", study_models._mlp, 12, 3e-3, 2, "toy MLP"))
    return "toy"


def test_runs_are_recorded_and_not_repeated(toy, tmp_path, monkeypatch):
    path = tmp_path / "runs.json"
    records = study.run_all(path, [toy], ["every10", "budget20-front"], [0], progress=False)
    assert [(r["schedule"], r["seed"]) for r in records] == [("every10", 0), ("budget20-front", 0)]
    assert all(r["val_loss"] > 0 and r["factors"] > 0 for r in records)
    fixed, budget = records
    assert fixed["refreshes"] == fixed["factors"] * 1  # steps 1..11 after the exact first: one check, at 10
    monkeypatch.setattr(study, "run_one", lambda *args: pytest.fail("a stored run was repeated"))
    assert study.run_all(path, [toy], ["every10", "budget20-front"], [0], progress=False) == records


def _record(schedule, seed, loss, refreshes, variant=None):
    return {"model": "m", "schedule": schedule, "seed": seed, "val_loss": loss, "refreshes": refreshes,
            "soap": variant or stored_runs.soap_variant()}


def test_the_summary_is_relative_to_every10_on_the_same_seeds():
    records = [_record("every10", 0, 2.0, 100), _record("every10", 1, 4.0, 100),
               _record("every20", 0, 2.2, 50), _record("every20", 1, 4.0, 50), _record("every20", 2, 9.0, 50)]
    rows = {row.schedule: row for row in report.summarize(records)}
    assert rows["every20"].seeds == 2  # seed 2 has no every=10 run to compare with
    assert rows["every20"].refresh_ratio == pytest.approx(0.5)
    assert rows["every20"].loss_change == pytest.approx(0.05) and rows["every20"].spread == pytest.approx(0.1)
    table = report.markdown_tables(list(rows.values()))
    # per-seed changes 0% and +10%: standard error stdev / sqrt(2) = 0.0707 / 1.414 = 5%
    assert "| m | every20 | 2 | 50 | 0.50x | 3.1000 | +5.00% | 5.00% | 10.00% | +10.00% |" in table


def test_another_optimizers_rows_are_relative_to_its_own_every10():
    records = [_record("every10", 0, 2.0, 100), _record("eshampoo-every10", 0, 4.0, 100),
               _record("eshampoo-default", 0, 3.0, 50)]
    rows = {row.schedule: row for row in report.summarize(records)}
    assert rows["eshampoo-default"].loss_change == pytest.approx(-0.25)  # 3.0 / 4.0, not 3.0 / 2.0
    assert rows["eshampoo-every10"].loss_change == 0.0
    assert named.baseline_of("eshampoo-default", named.REFERENCE) == named.REFERENCE
    # at other betas, the same optimizer's clock at those betas
    assert named.baseline_of("eshampoo-every10-adamw-betas-own-carry") == "eshampoo-every10-adamw-betas"


def test_the_report_replaces_only_its_own_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- refresh-study:begin -->\nold\n<!-- refresh-study:end -->\noutro\n")
    rows = report.summarize([_record("every10", 0, 2.0, 10), _record("every1", 0, 1.9, 100)])
    timing = tmp_path / "timing.json"
    timing.write_text(json.dumps({"timings": [{"size": 768, "step_seconds": 0.1, "refresh_seconds": 0.5}]}))
    report.write_report(page, rows, timing, default="every1")
    text = page.read_text()
    assert text.startswith("intro\n<!-- refresh-study:begin -->\n| schedule |") and "old" not in text
    assert "outro" in text and "<!-- refresh-timing:begin -->" in text
    # at every=10: 2 factors x 0.5 s / 10 = 0.1 s per step beside a 0.1 s step: half of it
    assert "| 768 | 0.100 | 0.500 | 50% | 91% |" in text  # every1 made 10x every=10's refreshes


def test_the_reference_runs_in_the_study_and_counts_its_refreshes_like_every10(toy, tmp_path):
    records = study.run_all(tmp_path / "runs.json", [toy], ["every10", named.REFERENCE], [0], progress=False)
    ours, reference = records
    # the toy MLP has only matrices: the reference preconditions the same factors, once, at step 10
    assert reference["factors"] == ours["factors"] > 0 and reference["refreshes"] == ours["refreshes"]
    assert reference["val_loss"] > 0 and reference["val_loss"] != ours["val_loss"]


def test_runs_of_other_defaults_are_neither_compared_nor_taken_for_current_ones(toy, tmp_path):
    path = tmp_path / "runs.json"
    old = {**_record("every10", 0, 1.0, 5, variant=stored_runs.OLD_VARIANT), "model": toy, "machine": study.describe_cpu()}
    del old["soap"]  # records made before the variant was recorded are the old defaults
    stored_runs.save_records(path, [old])
    records = study.run_all(path, [toy], ["every10"], [0], progress=False)
    assert len(records) == 2 and records[1]["soap"] == stored_runs.soap_variant()
    (row,) = report.summarize(records)
    assert row.losses == [records[1]["val_loss"]]
    (old_row,) = report.summarize(records, variant=stored_runs.OLD_VARIANT)
    assert old_row.losses == [1.0]


def test_the_reference_table_compares_each_seed_with_the_reference():
    records = [_record(named.REFERENCE, 0, 2.0, 10), _record(named.REFERENCE, 1, 4.0, 10),
               _record("every10", 0, 1.8, 10), _record("every10", 1, 4.4, 10),
               _record(named.DEFAULT, 0, 2.0, 5), _record(named.DEFAULT, 1, 3.0, 5)]
    table = report.reference_table(records)
    assert table.splitlines()[0] == f"| model | reference (mean) | ours, every10 | ours, {named.DEFAULT} |"
    # every10: -10% and +10% -> mean 0, s.e. 14.14% / sqrt(2) = 10%, worst +10%, lower on one;
    # budget: 0% (a tie is not lower) and -25%
    assert table.splitlines()[2] == ("| m | 3.0000 | 3.1000 (+0.0% ± 10.00%, worst seed +10.0%, lower on 1/2) | "
                                     "2.5000 (-12.5% ± 12.50%, worst seed +0.0%, lower on 1/2) |")


def test_the_aged_ranking_lets_a_passed_over_factor_catch_up():
    """The library's budget with the ages the scheduler would pass (steps since each factor was
    chosen): the plain ranking keeps choosing the most stale factor, the aged one reaches them all."""
    from lightning_kron.scheduling.budget_policies import BudgetRefresh

    plain, aged = BudgetRefresh(every=4, front_load=1.0, age_power=0.0), BudgetRefresh(every=4, front_load=1.0)
    staleness = torch.tensor([0.30, 0.29, 0.10, 0.05])  # 4 factors / every=4: one refresh per step
    last = torch.zeros(4)
    picks = {"plain": [], "aged": []}
    for step in range(1, 17):
        for name, policy in (("plain", plain), ("aged", aged)):
            chosen = policy.select(staleness, step, steps_since_refresh=step - last)
            picks[name].append(int(chosen.nonzero()))
            if name == "aged":
                last = torch.where(chosen, torch.full_like(last, step), last)
    assert picks["plain"] == [0] * 16
    assert picks["aged"][:2] == [0, 1] and set(picks["aged"]) == {0, 1, 2, 3}


def test_every_override_names_a_schedule_of_the_study():
    names = set(named.schedules(100))
    assert set(named.SOAP_OVERRIDES) <= names and set(named.OPTIMIZER_OF) <= names
    assert set(probes.AFTER_FIRST_STEP) <= names
    assert named.SOAP_OVERRIDES["every10-first-step-adam"]["update_at_start"] is False


def test_a_first_step_in_the_identity_basis_is_adams_sign_step():
    """SOAP without its first update leaves the weights; the study's stand-in moves each by lr."""
    layer = torch.nn.Linear(4, 3)
    optimizer = study.lk.SOAP(layer.named_parameters(), lr=0.1, update_at_start=False)
    layer(torch.randn(5, 4)).sum().backward()
    before = layer.weight.detach().clone()
    optimizer.step()
    assert torch.equal(layer.weight, before)
    probes.adam_first_step(optimizer, [before])
    assert torch.equal(layer.weight.detach(), before - 0.1 * layer.weight.grad.sign())


def _first_step(hook):
    """A SOAP's first step on a small layer with ``hook`` after it: the weights before, the layer
    and the optimizer."""
    layer = torch.nn.Linear(4, 3)
    optimizer = study.lk.SOAP(layer.named_parameters(), lr=0.1)
    layer(torch.randn(5, 4)).sum().backward()
    before = [weight.detach().clone() for weight in probes.weights_of(optimizer)]
    optimizer.step()
    hook(optimizer, before)
    return before, layer, optimizer


def test_the_first_update_undone_leaves_the_weights_and_keeps_the_moments():
    before, _, optimizer = _first_step(probes.undo_first_update)
    assert all(torch.equal(weight, old) for weight, old in zip(probes.weights_of(optimizer), before))
    groups = optimizer.factor_groups()
    assert all(bool(group.tensors["exp_avg_sq"].abs().sum() > 0) and int(group.steps.min()) == 1 for group in groups)


def test_restarted_moments_keep_the_update_and_count_from_the_second_step():
    before, layer, optimizer = _first_step(probes.restart_moments)
    assert not torch.equal(layer.weight.detach(), before[0])
    groups = optimizer.factor_groups()
    assert all(not group.tensors["exp_avg"].any() and not group.tensors["exp_avg_sq"].any() for group in groups)
    assert all(int(group.steps.max()) == 0 for group in groups)


def _trajectory(hooks, steps=4):
    """Weights after ``steps`` SOAP steps (fp64, the same gradients each run) on a small layer, with
    ``hooks`` run in turn after the first."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3).double()
    inputs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(steps)]
    optimizer = study.lk.SOAP(layer.named_parameters(), lr=0.1)
    for step, batch in enumerate(inputs):
        optimizer.zero_grad()
        layer(batch).square().sum().backward()
        before = [weight.detach().clone() for weight in probes.weights_of(optimizer)]
        optimizer.step()
        for hook in hooks if step == 0 else ():
            hook(optimizer, before)
    return optimizer, [weight.detach().clone() for weight in probes.weights_of(optimizer)]


def test_one_moment_restarted_empties_it_and_keeps_the_other():
    optimizer, _ = _trajectory([probes.restart_one_moment("exp_avg")], steps=1)
    groups = optimizer.factor_groups()
    assert all(not group.tensors["exp_avg"].any() and group.tensors["exp_avg_sq"].any() for group in groups)


def test_m_and_v_restarted_one_at_a_time_is_both_restarted_with_the_count_taken_back():
    """The one-moment hooks' rescaled bias corrections compose to the step count taken back: the
    same trajectory to fp64 round-off (a few operations per step in another order)."""
    _, both = _trajectory([probes.restart_moments])
    _, apart = _trajectory([probes.restart_one_moment("exp_avg"), probes.restart_one_moment("exp_avg_sq")])
    _, m_only = _trajectory([probes.restart_one_moment("exp_avg")])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(both, apart))
    assert not all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(both, m_only))


def test_a_study_model_at_another_learning_rate_keeps_the_rest_and_has_one_name():
    base = study.STUDY_MODELS["resnet"]
    varied = study.study_model("resnet@lr1.5e-3")
    assert varied.lr == 1.5e-3 and varied.name == "resnet@lr0.0015" == study.study_model("resnet@lr0.0015").name
    assert study.study_model("resnet@lr1.0000001e-3").name != study.study_model("resnet@lr1.0000002e-3").name
    assert (varied.steps, varied.build, varied.weight_decay) == (base.steps, base.build, base.weight_decay)
    assert study.study_model("resnet") is base


@pytest.mark.parametrize("name", ["resnet50", "resnet@lrfast", "resnet@lr-1e-3", "resnet@lrinf"])
def test_a_bad_model_name_fails_before_any_run(name, tmp_path):
    with pytest.raises(ValueError, match="study model|learning rate"):
        study.run_all(tmp_path / "runs.json", [name], ["every10"], [0], progress=False)
    assert not (tmp_path / "runs.json").exists()


@pytest.mark.parametrize("machine, said", [("Some Other CPU (AVX2)", "Some Other CPU"), (None, "does not record")])
def test_a_store_of_runs_made_on_another_or_an_unrecorded_cpu_is_refused_before_any_run(tmp_path, machine, said):
    path = tmp_path / "runs.json"
    record = _record("every10", 0, 1.0, 10) if machine is None else {**_record("every10", 0, 1.0, 10), "machine": machine}
    stored_runs.save_records(path, [record])
    with pytest.raises(ValueError, match=said):
        study.run_all(path, ["mlp"], ["every10"], [1], progress=False)
    assert len(stored_runs.load_records(path)) == 1


def test_an_unknown_schedule_fails_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="unknown schedules every7"):
        study.run_all(tmp_path / "runs.json", ["mlp"], ["every10", "every7"], [0], progress=False)
    assert not (tmp_path / "runs.json").exists()


@pytest.mark.parametrize("argv, stored, said", [
    (["--models", "resnet50"], None, "unknown study model 'resnet50'"),
    (["--models", "mlp", "--schedules", "every7"], None, "unknown schedules every7"),
    (["--models", "mlp"], '{"runs": [', "is not a file of study runs: not JSON"),
    (["--show"], '{"records": []}', 'has no list under "runs"'),
    (["--models", "mlp"], json.dumps({"runs": [{"machine": "Some Other CPU (AVX2)"}]}), "runs made on Some Other CPU"),
    (["--timing", "{tmp}/timing.json", "--sizes", "768,x"], None, "--sizes"),
])
def test_the_command_line_refuses_a_bad_request_in_one_line_before_any_run(tmp_path, capsys, argv, stored, said):
    path = tmp_path / "runs.json"
    if stored is not None:
        path.write_text(stored)
    with pytest.raises(SystemExit) as exit_info:
        study.main([*(a.format(tmp=tmp_path) for a in argv), "--json", str(path), "--seeds", "0", "--no-progress"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert ": error: " in stderr.strip().splitlines()[-1] and said in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and (path.read_text() == stored if stored is not None else not path.exists())
    assert not (tmp_path / "timing.json").exists()


def test_seeds_are_given_as_lists_ranges_or_both():
    assert study.parse_seeds("0,1,2") == [0, 1, 2]
    assert study.parse_seeds("0-3") == [0, 1, 2, 3]
    assert study.parse_seeds("5, 0-2,1") == [5, 0, 1, 2]
    for bad in ("zero", "3-1", "0,2-1", "-1", ""):  # "3-1" ran nothing and exited 0
        with pytest.raises(argparse.ArgumentTypeError, match="LOW <= HIGH"):
            study.parse_seeds(bad)


def test_seeds_that_name_no_run_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study, "run_one", lambda *args, **kwargs: pytest.fail("a run trained"))
    with pytest.raises(SystemExit) as stop:
        study.main(["--seeds", "3-1", "--models", "mlp", "--schedules", "every10", "--json", str(tmp_path / "r.json")])
    assert stop.value.code == 2 and "argument --seeds: " in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("argv, said", [
    (["--timing", "{tmp}", "--sizes", "8"], "--timing {tmp}: is a folder"),
    (["--json", "{tmp}", "--models", "mlp", "--schedules", "every10", "--seeds", "0"], "--json {tmp}: is a folder"),
    (["--json", "{tmp}/a_file/runs.json", "--models", "mlp", "--seeds", "0"], "{tmp}/a_file is a file"),
    (["--show", "--json", "{tmp}"], "{tmp} is not a file of study runs: it cannot be read"),
    (["--show", "--report", "{tmp}/r.md", "--plot", "/proc/x.png", "--json", "{tmp}/runs.json"], "--plot /proc/x.png: /proc"),
    (["--show", "--report", "{tmp}/r.md", "--user-plot", "{tmp}", "--json", "{tmp}/runs.json"], "--user-plot {tmp}: is a folder"),
], ids=["timing-folder", "json-folder", "json-under-a-file", "show-folder", "plot-unmakeable", "user-plot-folder"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(argv, said, tmp_path, capsys, monkeypatch):
    """Each was a traceback after the work: the timings measured, the report written, or a run trained."""
    if any(a.startswith("/proc") for a in argv) and not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "runs.json").write_text(json.dumps({"runs": []}))
    monkeypatch.setattr(study, "run_one", lambda *args, **kwargs: pytest.fail("a run trained"))
    monkeypatch.setattr(study, "time_factor", lambda *args, **kwargs: pytest.fail("a factor was timed"))
    with pytest.raises(SystemExit) as stop:
        study.main([a.format(tmp=tmp_path) for a in argv])
    stderr = capsys.readouterr().err
    assert stop.value.code == 2 and said.format(tmp=tmp_path) in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and not (tmp_path / "r.md").exists()


def test_show_prints_the_stored_runs_against_the_reference_and_runs_none(tmp_path, capsys):
    stored = stored_runs.load_records(Path(__file__).parents[1] / "docs/figures/refresh_study_runs.json")
    chosen = [r for r in stored if r["model"] == "mlp" and r["seed"] in (0, 1) and (r["schedule"] == named.REFERENCE or (
              r["schedule"] == "every10" and r.get("soap") == stored_runs.soap_variant()))]
    path = tmp_path / "runs.json"
    stored_runs.save_records(path, chosen)
    assert study.main(["--json", str(path), "--show"]) == 0
    assert stored_runs.load_records(path) == chosen
    out = capsys.readouterr().out
    reference = next(line for line in out.splitlines() if line.startswith("| mlp | 0."))
    assert "| mlp | every10 | 2 |" in out and "lower on" in reference and reference.count("/2)") == 1


def test_show_compares_the_schedules_it_is_given_with_the_reference(tmp_path, capsys):
    records = [_record(schedule, seed, loss, 10) for seed in (0, 1)
               for schedule, loss in ((named.REFERENCE, 1.0), ("every10", 1.1), ("every20", 1.2))]
    path = tmp_path / "runs.json"
    stored_runs.save_records(path, records)
    assert study.main(["--json", str(path), "--show", "--against", "every20"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| model | reference"))
    assert header.count("ours,") == 1 and "ours, every20" in header


def _on(machine, record):
    return {**record, "machine": machine}


def test_runs_pair_with_the_baseline_of_their_own_cpu():
    records = [_on("A", _record("every10", 0, 2.0, 10)), _on("B (AVX2)", _record("every10", 0, 4.0, 10)),
               _on("B (AVX512)", _record("every10", 0, 8.0, 10)), _record("every10", 0, 16.0, 10),
               _on("A", _record("every20", 0, 2.2, 5)), _on("B (AVX512)", _record("every20", 0, 8.0, 5)),
               _record("every20", 0, 16.0, 5), _on("B (AVX1)", _record("every20", 0, 1.0, 5))]
    (row,) = [row for row in report.summarize(records) if row.schedule == "every20"]
    # A with A, AVX512 with AVX512, unrecorded with unrecorded; AVX1 has no baseline of its CPU
    assert row.seeds == 3 and sorted(row.per_seed) == pytest.approx([0.0, 0.0, 0.1])


def test_the_machine_table_says_how_far_round_off_alone_moves_a_run():
    records = [_on("A", _record("every10", 0, 2.0, 10)), _on("B", _record("every10", 0, 2.2, 10)),
               _on("A", _record("every10", 1, 4.0, 10)), _on("B", _record("every10", 1, 3.6, 10))]
    table = report.machine_table(records)
    # +10% and -10%: mean 0, standard error 14.14% / sqrt(2) = 10%, mean size 10%
    assert table.splitlines()[2] == "| m | every10 | 2 | +0.00% | 10.00% | 10.00% |"
    assert report.machine_table([r for r in records if r["machine"] == "A"]) is None


def test_group_norm_takes_the_place_of_every_batch_norm():
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8),
                                  torch.nn.Sequential(torch.nn.Conv2d(8, 2, 1), torch.nn.BatchNorm2d(2)))
    study_models.group_norm_for_batch_norm(network)
    norms = [module for module in network.modules() if "Norm" in type(module).__name__]
    assert [type(norm) for norm in norms] == [torch.nn.GroupNorm] * 2
    assert [(norm.num_groups, norm.num_channels) for norm in norms] == [(4, 8), (2, 2)]
    assert network(torch.randn(2, 1, 6, 6)).shape == (2, 2, 4, 4)


def test_the_probe_models_train_by_name_but_stay_out_of_the_study():
    assert {"resnet-gn", "conv-bn", "conv-plain"} <= set(study_models.PROBE_MODELS)
    assert not set(study_models.PROBE_MODELS) & set(study.STUDY_MODELS)
    assert study.study_model("conv-bn@lr1e-3").lr == 1e-3
    with_norm, without = (study_models.conv_stack(1, 10, flag) for flag in (True, False))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_norm.modules()) == 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())
    assert with_norm(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_the_machine_table_compares_two_cpus_by_name_and_refuses_three():
    records = [_on("A", _record("every10", 0, 2.0, 10)), _on("A (AVX512)", _record("every10", 1, 2.0, 10)),
               _on("B (AVX512)", _record("every10", 0, 2.2, 10)), _on("B", _record("every10", 1, 2.2, 10))]
    assert report.machine_table(records).splitlines()[2] == "| m | every10 | 2 | +10.00% | 0.00% | 10.00% |"
    with pytest.raises(ValueError, match="3 kinds of CPU"):
        report.machine_table(records + [_on("C", _record("every10", 0, 1.0, 10))])


def test_one_moment_restarted_needs_a_first_step_that_updated_the_moments():
    layer = torch.nn.Linear(4, 3)
    optimizer = study.lk.SOAP(layer.named_parameters(), lr=0.1, update_at_start=False)
    with pytest.raises(AssertionError, match="first step"):
        probes.restart_one_moment("exp_avg")(optimizer, [])


def test_the_plot_keeps_one_legend_entry_per_schedule_in_order_whichever_panel_has_it(tmp_path):
    def row(model, schedule, loss):
        return report.Row(model, schedule, 100.0, 1.0, loss, 0.0, 0.0, 2, [0.0, 0.0], [loss, loss])

    rows = [row("first", "every10", 1.0), row("first", named.DEFAULT, 0.9),  # no every=20 in the first panel
            row("second", "every10", 2.0), row("second", "every20", 2.2), row("second", named.DEFAULT, 1.9)]
    shown = report.plot(rows, tmp_path / "all.png")
    assert shown == ["every10", named.DEFAULT, "every20"] and (tmp_path / "all.png").stat().st_size > 0
    chosen = report.plot(rows, tmp_path / "user.png", report.USER_PLOT)
    assert chosen == [report.USER_PLOT[name] for name in ("every10", named.DEFAULT, "every20")]  # the rows' order


def test_show_with_a_mistyped_run_file_is_refused_in_one_line(tmp_path, capsys):
    """It printed two empty tables and exited 0, as if no runs were stored."""
    from scripts import refresh_study

    with pytest.raises(SystemExit) as stop:
        refresh_study.main(["--show", "--json", str(tmp_path / "typo.json")])
    assert stop.value.code == 2 and "no stored runs at" in capsys.readouterr().err
