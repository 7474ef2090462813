"""The refresh study's stored runs: one JSON file of records per kind of CPU, each record tagged with
the SOAP defaults it ran under (its variant), and the pairing of a run with its baseline's run.

A run is compared seed by seed with its baseline's run of the same seed, and only on the same kind of
CPU (``scripts/machine.py``): round-off makes runs on two kinds of CPU different trajectories.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import lightning_kron as lk
from scripts.machine import same_cpu_run
from scripts.study_schedules import REFERENCE


#: The variant of records made before SOAP refreshed after the step, kept V by rank and blocked
#: conv weights per dim (issue 11).
OLD_VARIANT = "in_step+rotate+merged"


def soap_variant() -> str:
    """``lk.SOAP``'s default refresh timing, second-moment carry-over and conv blocking, as
    ``"timing+carry+blocking"``: recorded with every run, so runs of other defaults are never
    compared with these."""
    parameters = inspect.signature(lk.SOAP).parameters
    blocking = "merged" if parameters["merge_dims"].default else "per-dim"
    return f"{parameters['refresh_timing'].default}+{parameters['second_moment_on_refresh'].default}+{blocking}"


def variant_of(record: dict) -> str:
    return record.get("soap", OLD_VARIANT)


def record_key(record: dict) -> tuple:
    """A run's identity; the reference does not depend on our defaults, so it has no variant."""
    variant = None if record["schedule"] == REFERENCE else variant_of(record)
    return record["model"], record["schedule"], record["seed"], variant


def load_records(*paths: Path) -> list[dict]:
    """The runs stored in ``paths`` (parallel workers write one file each; missing files: none)."""
    return [run for path in paths if path.exists() for run in _runs_in(path)]


def _runs_in(path: Path) -> list[dict]:
    """The runs of one file; ``ValueError`` naming the file when it is not a file of runs."""
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a file of study runs: not JSON ({error})") from None
    except OSError as error:  # a folder, say
        raise ValueError(f"{path} is not a file of study runs: it cannot be read ({error.strerror})") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("runs"), list):
        raise ValueError(f"{path} is not a file of study runs: it has no list under \"runs\"")
    return stored["runs"]


def save_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": records}, indent=1) + "\n")
    tmp.replace(path)


def paired(runs: list[dict], baseline: list[dict]) -> list[tuple[dict, dict]]:
    """Each of ``runs`` with ``baseline``'s run of its model and seed on the same kind of CPU
    (:func:`~scripts.machine.same_cpu_run`): round-off makes runs on two kinds of CPU different
    trajectories, so a run with no such partner is left out and CPUs pool without pairing across."""
    by_seed: dict[tuple, list[dict]] = {}
    for run in baseline:
        by_seed.setdefault((run["model"], run["seed"]), []).append(run)
    pairs = [(run, same_cpu_run(run, by_seed.get((run["model"], run["seed"]), []))) for run in runs]
    return [(run, base) for run, base in pairs if base is not None]
