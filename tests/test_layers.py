"""The package's folders are layers, and imports only point down them (docs/design.md, "Layers").

engine (pure torch) <- scheduling <- methods <- lightning. Only ``lightning/`` may import Lightning,
and importing the optimizers must not import it. The imports are read from the source with ``ast``,
so a lazy import inside a function counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_kron"
LAYERS = ("engine", "scheduling", "methods", "lightning")  # lowest first


def _modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py"))


def _layer(path: Path) -> str | None:
    relative = path.relative_to(PACKAGE).parts
    return relative[0] if len(relative) > 1 else None  # None: the package's __init__


def _imported(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_every_module_lives_in_a_layer():
    loose = [path.name for path in _modules() if _layer(path) is None and path.name != "__init__.py"]
    assert not loose, f"modules outside the layer folders: {loose}"
    assert {path.parts[-2] for path in _modules() if _layer(path)} == set(LAYERS)


def _violations(layer: str, names: list[str]) -> list[str]:
    """What a module of ``layer`` importing ``names`` breaks: upward or root imports, Lightning
    outside ``lightning/``."""
    found = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "lightning_kron" and (len(parts) < 2 or parts[1] not in LAYERS):
            found.append(f"{name}: import from a layer, not the package root")
        elif parts[0] == "lightning_kron" and LAYERS.index(parts[1]) > LAYERS.index(layer):
            found.append(f"{name} is above {layer}/")
        if parts[0] in ("lightning", "pytorch_lightning") and layer != "lightning":
            found.append(f"{name} imported outside lightning_kron/lightning/")
    return found


@pytest.mark.parametrize("path", [p for p in _modules() if _layer(p)], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    assert _violations(_layer(path), _imported(path)) == []


def test_the_layer_rule_catches_bad_imports(tmp_path):
    """The rule is not vacuous: an engine module importing a method, the package root or Lightning
    is flagged, and the lightning layer may import everything below it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import lightning.pytorch as pl\nfrom lightning_kron.methods.soap import SOAP\n"
                   "def f():\n    from lightning_kron import SOAP\n")
    assert len(_violations("engine", _imported(bad))) == 3
    assert _violations("lightning", ["lightning.pytorch", "lightning_kron.engine.blocking", "lightning_kron.methods.soap"]) == []


def test_importing_the_optimizers_does_not_import_lightning():
    code = ("import sys, lightning_kron as lk; lk.SOAP, lk.KrADagrad, lk.Shampoo; "
            "assert 'lightning' not in sys.modules and 'lightning.pytorch' not in sys.modules, 'lightning imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
