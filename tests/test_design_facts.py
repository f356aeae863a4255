"""The design facts the code cites are in the package, and the docs' links land.

Comments say "DESIGN fact N" (or "DESIGN facts N and M", or "DESIGN,
"<section>""): each must name a fact heading, or a section, of
``sharedpool/DESIGN.md``. That file and ``REFERENCE.md`` ship as package
data, found through ``importlib.resources`` as an installed wheel finds them.
The README's links into REFERENCE.md, and its own anchors, name headings
that exist.
"""

from __future__ import annotations

import importlib.resources
import re
import sys
from pathlib import Path

import pytest

import sharedpool

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PACKAGE = Path(sharedpool.__file__).parent
ROOT = PACKAGE.parent
TESTS = Path(__file__).parent
THIS = Path(__file__).resolve()

# "DESIGN fact 9", "DESIGN facts 5 and 12", "DESIGN facts 5, 12", "DESIGN.md fact 3", also
# split over comment lines ("(DESIGN\n    # fact 11)"): "#" and "*" may sit between the words.
_GAP = r"[\s#*]*"
_NUMBERS = r"\d+(?:(?:\s*,\s*|\s+and\s+)\d+)*"
DESIGN_REF = re.compile(rf"\bDESIGN(?:\.md)?{_GAP}facts?{_GAP}({_NUMBERS})")
# A bare "fact N" elsewhere: a reference too (it can only mean DESIGN.md's).
BARE_REF = re.compile(rf"\bfacts?{_GAP}({_NUMBERS})\b")
SECTION_REF = re.compile(r'\bDESIGN(?:\.md)?, "([^"]+)"')
FACT_HEADING = re.compile(r"^### Fact (\d+)\. \S", re.MULTILINE)
HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$", re.MULTILINE)
SOURCE_SUFFIXES = {".py", ".c", ".toml", ".md", ".ini", ".sh", ".yaml", ".txt"}


def _design_text() -> str:
    return importlib.resources.files("sharedpool").joinpath("DESIGN.md").read_text(encoding="utf-8")


def _numbers(group: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", group)]


def _sources() -> list[Path]:
    files = [p for top in (PACKAGE, TESTS) for p in top.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()]
    return sorted(p for p in files if p.resolve() != THIS and "__pycache__" not in p.parts)


def _references() -> list[tuple[str, int]]:
    """(where, fact number) of every reference in sharedpool/ and tests/, DESIGN.md's own included."""
    found: set[tuple[str, int]] = set()
    for path in _sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in (DESIGN_REF, BARE_REF):
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.update((f"{path.relative_to(ROOT)}:{line}", n) for n in _numbers(match.group(1)))
    return sorted(found)


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    without_code = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return {slug(m.group(2)) for m in HEADING.finditer(without_code)}


def test_the_design_facts_ship_in_the_package() -> None:
    files = importlib.resources.files("sharedpool")
    assert files.joinpath("DESIGN.md").is_file() and files.joinpath("REFERENCE.md").is_file()
    pyproject = ROOT / "pyproject.toml"
    if pyproject.is_file():  # a source tree: the wheel must take them along
        package_data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
        assert {"DESIGN.md", "REFERENCE.md"} <= set(package_data["sharedpool"])


def test_the_facts_are_numbered_once_each_from_one() -> None:
    numbers = [int(n) for n in FACT_HEADING.findall(_design_text())]
    assert numbers == list(range(1, len(numbers) + 1)), numbers


def test_the_code_cites_facts_at_all() -> None:
    # The pattern must still see the comments it is there to check.
    assert len(_references()) >= 20


def test_every_fact_the_code_cites_is_a_fact_heading_of_design_md() -> None:
    facts = {int(n) for n in FACT_HEADING.findall(_design_text())}
    unresolved = [f"{where}: fact {n}" for where, n in _references() if n not in facts]
    assert not unresolved, "references to no fact of sharedpool/DESIGN.md:\n" + "\n".join(unresolved)


def test_every_section_the_code_cites_is_a_heading_of_design_md() -> None:
    titles = {m.group(2) for m in HEADING.finditer(_design_text())}
    cited = [
        (path, match.group(1))
        for path in _sources()
        for match in SECTION_REF.finditer(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert cited, "the pattern no longer sees the section references"
    missing = [f"{path.relative_to(ROOT)}: {title!r}" for path, title in cited if title not in titles]
    assert not missing, missing


def test_no_reference_names_a_file_outside_the_repository() -> None:
    outside = [str(path.relative_to(ROOT)) for path in _sources() if "/work/shared" in path.read_text(errors="replace")]
    assert not outside, outside


def test_the_files_design_md_names_exist() -> None:
    """``client/connection.py`` is under sharedpool/, ``tests/x.py`` under the root, a bare name anywhere in the package."""
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source tree (an installed wheel)")
    names = set(re.findall(r"`([\w./]+\.(?:py|c|toml))`", _design_text()))
    assert names, "the pattern no longer sees the file names"
    package_files = {p.name for p in PACKAGE.rglob("*") if p.is_file()}
    missing = [
        name for name in sorted(names)
        if not name.startswith("redis/")  # redis-py's own files
        and not ((PACKAGE / name).is_file() or (ROOT / name).is_file() or ("/" not in name and name in package_files))
    ]
    assert not missing, f"sharedpool/DESIGN.md names files that are not there: {missing}"


@pytest.mark.parametrize("target", ["README.md", "sharedpool/REFERENCE.md", "sharedpool/DESIGN.md"])
def test_the_docs_links_name_headings_that_exist(target: str) -> None:
    source = ROOT / target
    if not source.is_file():
        pytest.skip(f"{target} is not beside the package (an installed wheel)")
    text = source.read_text(encoding="utf-8")
    broken = []
    for link, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        linked = (source.parent / link) if link else source
        if not linked.is_file():
            broken.append(f"{link}#{anchor}: no such file")
        elif anchor not in _anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{link or target}#{anchor}: no such heading")
    for link in re.findall(r"\]\(([^)#\s:]+\.md)\)", text):
        if not (source.parent / link).is_file():
            broken.append(f"{link}: no such file")
    assert not broken, broken
