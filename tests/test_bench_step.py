"""scripts/bench_step.py at a tiny scale: every row is timed and the table is printed."""

import importlib
import math

import pytest

from scripts import bench_step


def test_bench_step_prints_one_timed_row_per_candidate(monkeypatch, capsys):
    monkeypatch.setitem(bench_step.MODELS, "tiny", (1, 64, 128, 32))
    bench_step.main(["--models", "tiny", "--steps", "3", "--every", "2", "--only", "adamw", "soap fixed", "pytorch"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    table = {row[1].strip(): [cell.strip() for cell in row[2:-1]] for row in rows[1:]}
    assert "torch AdamW (foreach)" in table and "SOAP fixed every=2" in table
    for first_s, median_ms, amortized_ms, _, state_mb in table.values():
        assert float(first_s) >= 0 and float(median_ms) > 0 and float(amortized_ms) > 0 and float(state_mb) > 0
    assert float(table["SOAP fixed every=2"][4]) > float(table["torch AdamW (foreach)"][4])  # factors and bases


def test_gpt_parameter_shapes_match_gpt2_small_parameter_count():
    shapes = bench_step.gpt_parameter_shapes(*bench_step.MODELS["gpt2-small"])
    count = sum(math.prod(shape) for _, shape in shapes)
    assert count == 124_475_904  # GPT-2 small with a 50304-token tied vocabulary and 1024 positions


def test_warmup_steps_are_left_out_of_the_statistics():
    import torch

    candidate = object.__new__(bench_step.Candidate)
    candidate.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    candidate.durations = [5.0, 1.0, 0.1, 0.2, 0.6]
    warm = candidate.timing(warmup=2)
    assert warm.first_step_s == 5.0 and math.isclose(warm.median_ms, 200.0) and math.isclose(warm.amortized_ms, 300.0)
    assert math.isclose(candidate.timing().median_ms, 400.0)  # default: only the first step is left out


def test_refresh_orthonormalizers_counts_failures_and_times_every_row(monkeypatch, capsys):
    """A tiny GPT whose 128-wide factors are rank-deficient after 3 steps (3 x 32 gradient rows):
    unshifted Cholesky-QR2 and Cholesky-QR3 (whose Gram shift alone cannot lift an exact null
    space) fail on them, the shifted ones and Householder on none; the shifted rows report their
    delta, Cholesky-QR3's below Cholesky-QR2's."""
    monkeypatch.setitem(bench_step.MODELS, "tiny", (1, 32, 64, 32))
    bench_step.main(["--models", "tiny", "--every", "2", "--repeats", "1", "--refresh-orthonormalizers"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    table = {row[1].strip(): [cell.strip() for cell in row[2:-1]] for row in rows[1:]}
    assert set(table) == set(bench_step.REFRESH_ROWS)
    assert table["householder"][0] == table["cholesky_qr3 (shifted)"][0] == table["cholesky_qr2 (shifted)"][0] == "0"
    assert int(table["cholesky_qr3 unshifted"][0]) > 0 and int(table["cholesky_qr2 unshifted"][0]) > 0
    assert all(float(seconds) > 0 for _, _, seconds, _, _ in table.values())
    assert float(table["cholesky_qr3 (shifted)"][4]) < float(table["cholesky_qr2 (shifted)"][4])
    assert table["householder"][3:] == ["-", "-"]


@pytest.mark.parametrize("module, argv, message", [
    ("bench_step", ["--every", "0"], "--every must be an integer >= 1, got 0"),
    ("bench_step", ["--max-precond-dim", "0"], "--max-precond-dim must be an integer >= 1, got 0"),
    ("bench_step", ["--device", "foo"], "--device 'foo' is not a torch device"),
    ("bench_step", ["--only", "nomatch"], "--only nomatch matches no row; the rows are: torch AdamW"),
    ("count_ops", ["--only", "nomatch"], "--only nomatch matches no row; the rows are: torch AdamW"),
    ("bench_step", ["--only", "eshampoo", "shampoo+adam"], "--only shampoo+adam matches no row"),  # a renamed row dropped out
    ("illconditioned", ["--lrs", "-1"], "every --lrs must be a positive learning rate"),
    ("illconditioned", ["--methods", "lion"], "unknown --methods ['lion']; choose from ["),
])
def test_a_benchmarks_bad_flag_is_refused_before_any_model_is_built(module, argv, message, capsys, monkeypatch):
    script = importlib.import_module(f"scripts.{module}")
    builder = "make_problem" if module == "illconditioned" else "gpt_parameter_shapes"
    monkeypatch.setattr(script, builder, None)  # building a model or problem would fail
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
