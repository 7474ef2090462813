"""Every ```python block of README.md and of docs/*.md runs: the documentation cannot rot.

Each file's blocks run in order in one namespace of their own (a later block may use what an earlier
one defined), in a temporary working directory. A block fenced as ```python-norun (or any other tag)
is shown but not run: keep that for snippets that need an optional extra, a GPU or several
processes, and say so next to the block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *DOCS]
README_MAX_LINES = 300


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_readme_has_examples():
    assert len(_python_blocks(README)) >= 2


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_readme_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    missing = [_name(page) for page in DOCS if f"({_name(page)})" not in text]
    assert not missing, f"README.md does not link {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    return {_anchor(heading) for heading in re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("path", DOCUMENTS, ids=_name)
def test_relative_links_resolve(path):
    """Links to other files (and to their headings) point at something that exists."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{_name(path)}: broken links {broken}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=_name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    namespace: dict = {"__name__": f"docs:{_name(path)}"}
    for number, block in enumerate(_python_blocks(path)):
        exec(compile(block, f"{_name(path)} python block {number}", "exec"), namespace)
