"""Every relative link in README.md and docs/*.md points at a file that exists, and every
``#anchor`` at a heading of its page: pages get split and sections renamed, and a link that
silently lands at the top of the wrong page is how documentation rots."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")


def _outside_code(text: str) -> list[str]:
    """The page's lines outside fenced code blocks (a ``# comment`` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to
    hyphens (``_`` stays: it is part of the code names headings quote)."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings, with GitHub's ``-1``, ``-2`` for repeated ones."""
    seen: dict[str, int] = {}
    found = set()
    for line in _outside_code(page.read_text()):
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_slug_follows_github():
    assert slug("Closing the gap to the reference: what was tried") == "closing-the-gap-to-the-reference-what-was-tried"
    assert slug("3. Eigenbasis refresh and the staleness criterion") == "3-eigenbasis-refresh-and-the-staleness-criterion"
    assert slug("Results: the GPT recipe comparison") == "results-the-gpt-recipe-comparison"
    assert slug("`merge_dims` and **conv** blocks") == "merge_dims-and-conv-blocks"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_resolve(page: Path):
    broken = []
    for line in _outside_code(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)
