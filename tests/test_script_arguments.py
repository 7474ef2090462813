"""scripts/arguments.py: the command-line checks the scripts share, and that each script refuses a
bad count or output in one argparse line (exit status 2) before any model is built."""

import argparse
import importlib
from pathlib import Path

import pytest

from scripts.arguments import output_problem, positive_int, seed

UNWRITABLE = Path("/proc/lightning_kron_test")  # os.access says yes here to root; nothing can be made
needs_proc = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc")


def test_positive_int_and_seed_refuse_what_the_runs_cannot_take():
    assert positive_int("3") == 3 and seed("0") == 0 and seed(str(2**32 - 1)) == 2**32 - 1
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a positive integer"):
            positive_int(bad)
    for bad in ("-1", str(2**32), "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="from 0 to 4294967295"):
            seed(bad)


def test_an_output_file_must_be_a_file_in_a_folder_that_can_be_written(tmp_path):
    (tmp_path / "a_file").write_text("kept")
    assert output_problem("--json", tmp_path / "a_file") is None and (tmp_path / "a_file").read_text() == "kept"
    assert output_problem("--json", tmp_path / "new" / "deeper" / "x.json") is None
    assert output_problem("--out", tmp_path / "new" / "deeper", folder=True) is None
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]  # checked without making anything
    assert output_problem("--json", tmp_path) == f"--json {tmp_path}: is a folder; it names a file to write"
    assert output_problem("--out", tmp_path / "a_file", folder=True).startswith(f"--out {tmp_path / 'a_file'}: is a file")
    below = tmp_path / "a_file" / "x.json"
    assert output_problem("--json", below) == f"--json {below}: {tmp_path / 'a_file'} is a file, so the file cannot be made there"


@needs_proc
def test_an_existing_file_or_device_that_opens_for_writing_is_accepted(tmp_path, monkeypatch):
    """It was refused where its folder refused new files, and so was /dev/stdout."""
    existing = tmp_path / "runs.json"
    existing.write_text("{}")
    monkeypatch.setattr("scripts.arguments._writable", lambda folder: False)  # a folder that takes no new file
    assert output_problem("--json", existing) is None and existing.read_text() == "{}"
    assert output_problem("--json", tmp_path / "new.json") is not None
    assert output_problem("--json", "/dev/null") is None


def test_a_folder_that_refuses_new_files_is_found_by_trying_not_by_os_access():
    assert output_problem("--out", UNWRITABLE, folder=True) == (
        f"--out {UNWRITABLE}: /proc is not a writable folder, so the folder cannot be made there")
    assert "/proc is not a writable folder" in output_problem("--plot", UNWRITABLE / "x.png")


@pytest.mark.parametrize("module", ["compare", "illconditioned", "reference_deviations", "refresh_study", "refresh_sweep"])
def test_zero_threads_is_one_argparse_line_in_every_script(module, monkeypatch, capsys):
    """It was torch's RuntimeError traceback (set_num_threads) in three of them."""
    script = importlib.import_module(f"scripts.{module}")
    monkeypatch.setattr(script.torch, "set_num_threads", lambda n: pytest.fail("the threads were set"))
    argv = ["--threads", "0"] + (["--run", "a", "fixed", "inf:10"] if module == "refresh_sweep" else [])
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 2 and "argument --threads: must be a positive integer, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["--scale", "inf"], "finite --scale > 0"),
    (["--noise", "nan"], "--noise >= 0"),
    (["--condition", "inf"], "--condition >= 1"),
    (["--out", str(UNWRITABLE)], "/proc is not a writable folder"),
    (["--out", "{tmp}/a_file"], "is a file; it names a folder"),
], ids=["scale-inf", "noise-nan", "condition-inf", "out-unmakeable", "out-file"])
def test_illconditioned_refuses_a_non_finite_problem_or_an_unmakeable_out_before_building_it(
        argv, said, tmp_path, monkeypatch, capsys):
    """Infinite or NaN settings ran and tabulated NaN losses; an --out that could not be made exited 1."""
    if "/proc" in " ".join(argv) and not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc")
    from scripts import illconditioned

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(illconditioned, "make_problem", None)  # building the problem would fail
    with pytest.raises(SystemExit) as stop:
        illconditioned.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and said in err.strip().splitlines()[-1] and "Traceback" not in err

