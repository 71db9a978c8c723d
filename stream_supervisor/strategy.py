"""Which strategy a closed position belongs to: pure functions, no I/O.

The operator writes one Python regular expression with a named group `strategy`
(`STREAM_SUPERVISOR_STRATEGY_PATTERN`). `stats` applies it on the database server, so it
is translated once into PostgreSQL's dialect here; `strategy_of` is the same mapping in
Python, the contract the SQL is checked against (by tests, and by `stats` on a sample of
real client order ids before it writes anything).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

#: The text before the first `-` or `:` of the opening order's client_order_id.
DEFAULT_STRATEGY_PATTERN: Final = r"^(?P<strategy>[^-:]+)[-:]"
STRATEGY_GROUP: Final = "strategy"
#: No client_order_id, no match, or an empty `strategy` group.
UNATTRIBUTED: Final = "unattributed"
#: Positions taken from the broker at the service's first start (origin = 'baseline').
BASELINE: Final = "baseline"
BASELINE_ORIGIN: Final = "baseline"
PATTERN_VARIABLE: Final = "STREAM_SUPERVISOR_STRATEGY_PATTERN"


class PatternError(ValueError):
    """The pattern cannot be used; the message says why (the caller names the variable)."""


@dataclass(frozen=True, slots=True)
class StrategyPattern:
    """A checked pattern: the Python original, and the same expression for PostgreSQL
    with the number of the group that captures the strategy."""

    source: str
    postgres: str
    group: int

    @classmethod
    def parse(cls, source: str) -> StrategyPattern:
        try:
            compiled = re.compile(source)
        except re.error as exc:
            raise PatternError(f"not a valid regular expression: {exc}") from None
        group = compiled.groupindex.get(STRATEGY_GROUP)
        if group is None:
            raise PatternError(f"has no named group (?P<{STRATEGY_GROUP}>...)")
        return cls(source=source, postgres=to_postgres(source), group=group)

    def strategy_of(self, client_order_id: str | None, origin: str = "fill") -> str:
        return strategy_of(self.source, client_order_id, origin)


def strategy_of(pattern: str, client_order_id: str | None, origin: str = "fill") -> str:
    """The strategy of a position: `baseline` for baseline positions, else the pattern's
    `strategy` group searched in the client order id, else `unattributed`."""
    if origin == BASELINE_ORIGIN:
        return BASELINE
    if client_order_id is None:
        return UNATTRIBUTED
    match = re.search(pattern, client_order_id)
    found = match.group(STRATEGY_GROUP) if match else None
    return found or UNATTRIBUTED


def to_postgres(source: str) -> str:
    """The pattern in PostgreSQL's regex dialect (ARE), group numbers unchanged.

    ARE has no named groups: `(?P<name>` becomes a plain `(`, so every capturing group
    keeps its Python number and `regexp_match(...)[n]` picks the strategy. Escapes that
    mean something else in ARE are rewritten (`\\b`, `\\B`, `\\xhh`). Python-only
    constructs with no ARE equivalent are refused here; anything else ARE cannot compile
    is refused by the server, and a construct both accept with different meanings is
    caught by comparing the two mappings on real client order ids (`stats` does it).
    """
    out: list[str] = []
    i, n = 0, len(source)
    in_class = False
    while i < n:
        ch = source[i]
        if ch == "\\":
            escape = source[i:i + 2]
            if escape == "\\N":
                raise PatternError("uses a named character (\\N{...}), which PostgreSQL lacks")
            if escape == "\\x":
                # Python reads exactly two hex digits; ARE would read every one that follows.
                out.append("\\u00" + source[i + 2:i + 4])
                i += 4
                continue
            if not in_class and escape in _WORD_BOUNDARIES:
                out.append(_WORD_BOUNDARIES[escape])
            else:
                out.append(escape)
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
            out.append(ch)
            i += 1
            continue
        if ch == "[":
            in_class = True
            out.append(ch)
            i += 1
            # A `]` right after `[` or `[^` is a literal member, not the end.
            if source.startswith("^", i):
                out.append("^")
                i += 1
            if source.startswith("]", i):
                out.append("]")
                i += 1
            continue
        if source.startswith("(?P<", i):
            end = source.index(">", i)  # re.compile accepted it: the name is closed
            out.append("(")
            i = end + 1
            continue
        for construct, name in _PYTHON_ONLY:
            if source.startswith(construct, i):
                raise PatternError(f"uses {name} ({construct}...), which PostgreSQL lacks")
        out.append(ch)
        i += 1
    return "".join(out)


#: Python's word boundaries; in ARE `\b` is a backspace and `\B` a backslash.
_WORD_BOUNDARIES: Final = {"\\b": "\\y", "\\B": "\\Y"}
_PYTHON_ONLY: Final = (
    ("(?P=", "a named backreference"),
    ("(?(", "a conditional group"),
    ("(?>", "an atomic group"),
)
