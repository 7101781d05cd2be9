"""The README and docs/ point at things that exist.

- every relative link and image (``[text](path)``, ``[text](path#anchor)``,
  ``[text](#anchor)``) names a file or folder of this repository, and its anchor a heading
  of the target (GitHub's anchors: lower case, punctuation dropped, spaces to ``-``);
- every ``python -m simulations.X`` / ``python -m flwr_fedtan.X`` names a module that exists;
- every repository path quoted in backticks (``tests/...``, ``simulations/...``,
  ``flwr_fedtan/...``, ``docs/...``) exists;
- the README stays short.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "simulations" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_MODULE = re.compile(r"python -m ((?:simulations|flwr_fedtan)(?:\.\w+)*)")
_QUOTED_PATH = re.compile(r"`((?:tests|simulations|flwr_fedtan|docs)/[\w./-]*)`")
_HEADING = re.compile(r"#{1,6} (.+)")


def prose(text: str) -> str:
    """The text outside fenced code blocks (links are not links inside them)."""
    return "\n".join(part for i, part in enumerate(re.split(r"^```.*$", text, flags=re.M)) if i % 2 == 0)


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_anchor(m.group(1)) for line in prose(path.read_text()).splitlines()
            if (m := _HEADING.fullmatch(line))}


def broken_links(path: Path) -> list[str]:
    """What is wrong with the relative links of one document (empty: nothing)."""
    problems = []
    for target in _LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{target}: {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(document):
    assert broken_links(document) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_m_module_exists(document):
    missing = [name for name in sorted(set(_MODULE.findall(document.read_text())))
               if importlib.util.find_spec(name) is None]
    assert missing == [], f"{document.name} runs modules that do not exist: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_quoted_repository_path_exists(document):
    missing = [path for path in sorted(set(_QUOTED_PATH.findall(document.read_text())))
               if not (REPO / path.rstrip("/")).exists()]
    assert missing == [], f"{document.name} names paths that do not exist: {missing}"


def test_the_checks_catch_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad anchor](#nowhere)\n"
                    "```\n[in code](not-checked.md)\n```\n")
    assert broken_links(page) == [f"missing.md: {tmp_path / 'missing.md'} does not exist",
                                  "#nowhere: no heading with anchor #nowhere in page.md"]
    assert github_anchor("`SyncStep`: the resumable synchronised step") == "syncstep-the-resumable-synchronised-step"


def test_the_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_the_readme_drop_in_diff_is_the_tested_apps_diff():
    """The README's two diff blocks change exactly the lines that tests/test_drop_in.py's
    app changes (the app is committed before and after the switch)."""
    import difflib

    blocks = re.findall(r"^```diff\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)
    shown = [line for block in blocks for line in block.splitlines() if line.startswith(("+", "-"))]
    app = REPO / "tests" / "dropin_app" / "dropin"
    actual = []
    for part in ("server_app", "client_app"):
        before, after = (app / f"fedavg_{part}.py").read_text(), (app / f"fedtan_{part}.py").read_text()
        actual += [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
                   if line.startswith(("+", "-")) and not line.startswith(("---", "+++"))]
    assert shown == actual
    assert len(shown) == 14  # the README says so
