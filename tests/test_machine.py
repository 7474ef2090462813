"""The CPU recorded with the refresh study's runs."""

from scripts import machine


def test_the_model_name_comes_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: fpu\n")
    assert machine.cpu_name(info) == "AMD EPYC 9B14"


def test_without_cpuinfo_the_name_is_still_something(tmp_path):
    assert machine.cpu_name(tmp_path / "missing") != ""


def test_the_description_names_the_vector_instructions_torch_uses():
    import torch

    assert machine.describe_cpu().endswith(f"({torch.backends.cpu.get_cpu_capability()})")


def test_a_description_without_the_capability_matches_on_the_name():
    assert machine.same_cpu("AMD EPYC (AVX512)", "AMD EPYC (AVX512)")
    assert machine.same_cpu("Intel(R) Xeon(R) Processor", "Intel(R) Xeon(R) Processor (AVX512)")
    assert not machine.same_cpu("Intel(R) Xeon(R) Processor (AVX2)", "Intel(R) Xeon(R) Processor (AVX512)")
    assert not machine.same_cpu("AMD EPYC (AVX512)", "Intel(R) Xeon(R) Processor")


def test_runs_pair_by_the_model_name_whether_or_not_the_capability_was_recorded():
    assert machine.cpu_kind("AMD EPYC (AVX512)") == machine.cpu_kind("AMD EPYC") == "AMD EPYC"
    assert machine.cpu_kind("") == ""
