"""The vendored recording is data: it stays byte for byte what the broker sent."""

from __future__ import annotations

import hashlib
import re

import pytest

from .fixtures import RECORDING

_LISTED = re.compile(r"^([0-9a-f]{64})  (\S+)$", re.MULTILINE)


def _listed() -> list[tuple[str, str]]:
    return _LISTED.findall((RECORDING / "README.md").read_text())


def test_the_readme_lists_every_data_file() -> None:
    data = sorted(p.name for p in RECORDING.iterdir() if p.name != "README.md")
    assert sorted(name for _, name in _listed()) == data == [
        "fill_activities.json", "ground_truth.json", "trade_updates.jsonl"]


@pytest.mark.parametrize(("digest", "name"), _listed())
def test_each_file_is_byte_for_byte_as_recorded(digest: str, name: str) -> None:
    assert hashlib.sha256((RECORDING / name).read_bytes()).hexdigest() == digest
