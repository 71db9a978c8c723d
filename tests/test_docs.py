"""The design document the code cites exists in the repository, with the sections cited."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
_CITED = re.compile(r"docs/design\.md,?\s+(?:#\s*)?section\s+(\d+)")
_SECTION = re.compile(r"^## (\d+)\. ", re.MULTILINE)


def _sources() -> list[Path]:
    return [p for p in (ROOT / "stream_supervisor").rglob("*.py")] + sorted(
        (ROOT / "migrations").glob("*.sql"))


def test_every_section_the_code_cites_exists() -> None:
    sections = set(_SECTION.findall(DESIGN.read_text()))
    assert sections >= {str(n) for n in range(1, 9)}
    cited: dict[str, list[str]] = {}
    for path in _sources():
        for number in _CITED.findall(" ".join(path.read_text().split())):
            cited.setdefault(number, []).append(path.name)
    assert cited, "no module cites docs/design.md"
    missing = {n: files for n, files in cited.items() if n not in sections}
    assert not missing, f"cited sections missing from docs/design.md: {missing}"


def test_no_module_cites_a_design_document_outside_the_repository() -> None:
    stale = [p.name for p in _sources() if re.search(r"\bDESIGN section\b", p.read_text())
             and p.suffix == ".py"]
    assert not stale, f"cite docs/design.md instead: {stale}"
