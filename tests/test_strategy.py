"""Strategy attribution, the pure part: the Python mapping and its translation into
PostgreSQL's dialect (the server side is checked against it in tests/test_stats.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_supervisor.strategy import (
    DEFAULT_STRATEGY_PATTERN,
    PatternError,
    StrategyPattern,
    strategy_of,
    to_postgres,
)


@pytest.mark.parametrize(("client_order_id", "origin", "strategy"), [
    ("alpha-1", "fill", "alpha"),
    ("alpha:1", "fill", "alpha"),
    ("alpha:1-2", "fill", "alpha"),  # the first separator
    ("mean_rev-2026-03-02-7", "fill", "mean_rev"),
    ("alpha", "fill", "unattributed"),  # no separator
    ("-alpha", "fill", "unattributed"),  # nothing before it
    ("", "fill", "unattributed"),
    (None, "fill", "unattributed"),
    ("alpha-1", "baseline", "baseline"),  # origin wins over the id
    (None, "baseline", "baseline"),
    ("alpha-1", "transfer", "alpha"),  # other origins go by the id
])
def test_the_default_mapping(client_order_id: str | None, origin: str, strategy: str) -> None:
    assert strategy_of(DEFAULT_STRATEGY_PATTERN, client_order_id, origin) == strategy


def test_an_empty_group_is_unattributed() -> None:
    assert strategy_of(r"^(?P<strategy>[a-z]*)-", "-7") == "unattributed"
    assert strategy_of(r"^(?P<strategy>[a-z]+)?-", "-7") == "unattributed"  # did not take part


@pytest.mark.parametrize(("python", "postgres"), [
    (DEFAULT_STRATEGY_PATTERN, r"^([^-:]+)[-:]"),
    (r"(?P<a>x)(?P<strategy>y)", r"(x)(y)"),
    (r"\b(?P<strategy>\w+)\B", r"\y(\w+)\Y"),
    (r"[\b](?P<strategy>.)", r"[\b](.)"),  # inside a class \b is a backspace in both
    (r"(?P<strategy>\x41B)", r"(\u0041B)"),  # two hex digits, not three
    (r"[]](?P<strategy>a)", r"[]](a)"),  # a ] first in a class is a member
    (r"[^]a](?P<strategy>b)", r"[^]a](b)"),
    (r"\(?P<x>(?P<strategy>z)", r"\(?P<x>(z)"),  # an escaped paren is no group
    (r"(?:a|b)(?=c)(?P<strategy>d)", r"(?:a|b)(?=c)(d)"),
])
def test_translation(python: str, postgres: str) -> None:
    assert to_postgres(python) == postgres


@pytest.mark.parametrize("pattern", [
    r"(?P<strategy>a)(?P=strategy)", r"(?P<strategy>a)?(?(strategy)b|c)",
    r"(?>(?P<strategy>a))", r"(?P<strategy>\N{DIGIT ONE})",
])
def test_python_only_constructs_are_refused(pattern: str) -> None:
    with pytest.raises(PatternError):
        StrategyPattern.parse(pattern)


def test_the_strategy_group_keeps_its_number() -> None:
    parsed = StrategyPattern.parse(r"(a)(?:b)(?P<x>c)(?P<strategy>d)")
    assert parsed.group == 3
    assert parsed.postgres == "(a)(?:b)(c)(d)"


NAMES = st.sampled_from(["x", "y", "strategy"])
PIECES = st.sampled_from(["a", r"\d", "[a-c]", r"[\]]", r"\(", "(?:z)", "(q)", r"\b", ".", "-"])


@given(pieces=st.lists(PIECES, max_size=6), names=st.lists(NAMES, max_size=3, unique=True),
       split=st.integers(0, 6))
def test_capturing_groups_keep_their_numbers(pieces: list[str], names: list[str],
                                             split: int) -> None:
    """Whatever surrounds them, the groups of the translation are Python's, in order."""
    named = [f"(?P<{n}>{p})" for n, p in zip(names, pieces[:len(names)], strict=False)]
    pattern = "".join(pieces[:split] + named + pieces[split:])
    compiled = re.compile(pattern)
    translated = to_postgres(pattern)
    # Opening parens of capturing groups: not escaped, not in a class, not (?...
    opens = re.findall(r"(?<!\\)\((?!\?)", re.sub(r"\[(?:\\.|[^\]\\])*\]", "", translated))
    assert len(opens) == compiled.groups
    assert "?P<" not in translated
