"""Every ```python block in README.md runs, in order, in one namespace: the documentation cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 2


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(_python_blocks()):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
