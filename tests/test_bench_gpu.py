"""scripts/bench_gpu.py runs end to end (on the CPU, a toy GPT-2): every chosen row is timed, the
table compares with fused AdamW, and the JSON holds the same rows. CI has no GPU; on a CUDA machine
the same command without ``--device cpu --tiny`` is the benchmark of docs/benchmarks.md."""

import json

import pytest

from scripts import bench_gpu


def test_bench_gpu_smoke_run_prints_and_writes_every_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--device", "cpu", "--tiny", "--batch", "2", "--steps", "2", "--warmup", "1",
                           "--every", "2", "--only", "fused", "every=2, fp32", "--json", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["torch AdamW (fused)", "SOAP every=2, fp32"]
    saved = json.loads(out.read_text())
    assert [row["name"] for row in saved["rows"]] == ["torch AdamW (fused)", "SOAP every=2, fp32"]
    fused, soap = saved["rows"]
    assert fused["vs_fused_adamw"] == pytest.approx(1.0) and soap["median_ms"] > 0 and soap["state_mb"] > fused["state_mb"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], "--device cuda, but torch sees no CUDA device"),
    (["--device", "foo"], "--device 'foo' is not a torch device"),
    (["--device", "cpu", "--tiny", "--only", "lion"], "--only lion matches no row; the rows are: torch AdamW"),
])
def test_bench_gpu_refuses_a_bad_flag_in_one_line_before_any_model_is_built(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(bench_gpu.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_gpu, "run", None)  # running a row would fail
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("where", ["{tmp}", "{tmp}/a_file/rows.json", "/proc/nope/rows.json"],
                         ids=["folder", "under-a-file", "unmakeable"])
def test_a_json_that_cannot_be_written_is_refused_before_the_benchmark(where, tmp_path, monkeypatch, capsys):
    """It ran every row, printed the table and then died writing the JSON (a traceback)."""
    if where.startswith("/proc") and not bench_gpu.Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(bench_gpu, "run", None)  # running a row would fail
    path = where.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.main(["--device", "cpu", "--tiny", "--only", "fused", "--json", path])
    assert exit_info.value.code == 2 and f"error: --json {path}: " in capsys.readouterr().err
