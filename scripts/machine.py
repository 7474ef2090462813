"""Which CPU a run was made on, recorded with the study's runs.

Two x86-64 CPUs (an Intel Xeon with AVX-512 and an AMD EPYC, say) round floating point
differently in the same torch build, because torch picks its kernels by the vector instructions
it finds. Over a hundred steps that round-off grows into a different trajectory on a chaotic model,
so a run reproduces bit for bit only on the kind of CPU that made it, and runs compared seed by
seed should come from one kind.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

import torch


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name (Linux's ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_cpu() -> str:
    """``"<model name> (<torch's CPU capability>)"``, e.g. ``"AMD EPYC (AVX512)"``."""
    return f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})"


def same_cpu(one: str, other: str) -> bool:
    """Whether two :func:`describe_cpu` strings name one kind of CPU; a description without the
    capability (runs recorded before it was) matches on the model name alone."""
    if one == other:
        return True
    name, _, capability = one.partition(" (")
    other_name, _, other_capability = other.partition(" (")
    return name == other_name and not (capability and other_capability)


def cpu_kind(description: str) -> str:
    """The model name of a :func:`describe_cpu` string, the capability left off (``""`` for none):
    what the table of the same runs on two CPUs groups by. Pairing a run with its baseline is
    stricter (:func:`same_cpu_run`)."""
    return description.partition(" (")[0]


def machine_of(record: dict) -> str:
    """The CPU a stored run says it was made on; ``""`` for a run from before runs said it."""
    return record.get("machine", "")


def same_cpu_run(run: dict, candidates: list[dict]) -> Optional[dict]:
    """The first of ``candidates`` made on the same kind of CPU as ``run`` (:func:`same_cpu`; a
    run that does not say its CPU pairs only with others that do not), else None."""
    return next((other for other in candidates if same_cpu(machine_of(other), machine_of(run))), None)
