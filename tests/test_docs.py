"""The README and docs/ hold together: every relative link (and its #anchor)
points at a file and heading that exist, every page under docs/ is linked
from the README, the README stays short, and commit hashes (history) appear
only where a measured figure needs its provenance: docs/performance.md and
the README's two commands.  Reads the Markdown only; well under a second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
# A commit as the docs would quote one: 7 to 40 lowercase hex digits, with a letter and a digit.
_COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def _prose(text: str) -> str:
    """The text without code blocks and inline code (their brackets are not links)."""
    return _CODE.sub("", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    # explicit <a id="..."> / <a name="..."> anchors count too
    anchors.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", path.read_text()))
    return anchors


def _links(path: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(path.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif REPO.resolve() not in dest.parents and dest != REPO.resolve():
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in _links(REPO / "README.md")}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{', docs/'.join(missing)}"


def test_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines; topics belong under docs/"


def test_commits_only_as_the_provenance_of_figures():
    """History goes in CHANGELOG.md.  A commit may name where a measured figure
    comes from: in docs/performance.md, and in the README's two commands."""
    found = []
    for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        if page.name == "performance.md":
            continue
        text = page.read_text()
        if page.name == "README.md":  # the two commands' figures carry their commit
            text = re.sub(r"^## The two commands$.*?(?=^## )", "", text, flags=re.M | re.S)
        found += [f"{page.relative_to(REPO)}: {c}" for c in _COMMIT.findall(_FENCE.sub("", text))]
    assert not found, "commit hashes outside a figure's provenance (history goes in CHANGELOG.md): " + ", ".join(found)
