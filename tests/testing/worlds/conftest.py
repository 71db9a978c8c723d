"""Print how many simulated worlds ran, so every CI log shows the number."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from .test_worlds import pytest_terminal_summary_lines

    lines = pytest_terminal_summary_lines()
    if lines:
        terminalreporter.section("deterministic simulation")
        for line in lines:
            terminalreporter.write_line(line)
