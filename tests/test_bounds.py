"""bounds.py at the edge: the last accepted and the first refused value on each side of
every bound, through the real decoder (stream frames and REST FILL activities); and the
bounds fit what the schema holds (the round trip through both stores is in
`test_store_conformance.py`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from stream_supervisor import bounds
from stream_supervisor.errors import OutOfBounds
from stream_supervisor.events import DeadLetter, Event, decimal_text, parse_timestamp
from stream_supervisor.protocol import (
    activity_from_json,
    activity_json,
    activity_to_event,
    decode_activities,
    decode_frame,
    decode_stored,
)

from .fixtures import RECORDING

LINES = (RECORDING / "trade_updates.jsonl").read_bytes().splitlines()[2:]
#: A character of four UTF-8 bytes: the longest a text bound can be in bytes.
WIDE = "\U0001d518"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
TOLERANCE = 120.0
LIMIT_NS = bounds.not_after_ns(NOW, TOLERANCE)


def _fill() -> dict[str, Any]:
    for line in LINES:
        msg: dict[str, Any] = json.loads(line)
        if msg["data"]["event"] == "fill":
            return msg
    raise AssertionError("no fill in the recording")


def _frame(path: str, value: Any) -> bytes:
    msg = _fill()
    node = msg["data"]
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return json.dumps(msg).encode()


def decoded(path: str, value: Any) -> Event | DeadLetter:
    result = decode_frame(_frame(path, value), not_after_ns=LIMIT_NS)
    assert isinstance(result, Event | DeadLetter)
    return result


def ns_text(ns: int) -> str:
    """RFC 3339 with nanoseconds for an epoch-ns instant."""
    whole, frac = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


QTY_MAX = bounds.QTY_LIMIT - Decimal(1).scaleb(-bounds.QTY_MAX_SCALE)
# 40 significant digits: more than the default context holds, so spelled out.
PRICE_MAX = Decimal("9" * bounds.PRICE_LIMIT.adjusted() + "." + "9" * bounds.PRICE_MAX_SCALE)
QTY_MIN_STEP = Decimal(1).scaleb(-bounds.QTY_MAX_SCALE)
PRICE_MIN_STEP = Decimal(1).scaleb(-bounds.PRICE_MAX_SCALE)

# (path in the frame, last accepted, first refused) for each side of each bound.
EDGES: list[tuple[str, Any, Any]] = [
    ("order.id", "i" * bounds.MAX_ID_CHARS, "i" * (bounds.MAX_ID_CHARS + 1)),
    ("order.id", WIDE * bounds.MAX_ID_CHARS, WIDE * (bounds.MAX_ID_CHARS + 1)),
    ("order.symbol", "S" * bounds.MAX_SYMBOL_CHARS, "S" * (bounds.MAX_SYMBOL_CHARS + 1)),
    ("order.client_order_id", "c" * bounds.MAX_CLIENT_ORDER_ID_CHARS,
     "c" * (bounds.MAX_CLIENT_ORDER_ID_CHARS + 1)),
    ("order.status", "s" * bounds.MAX_LABEL_CHARS, "s" * (bounds.MAX_LABEL_CHARS + 1)),
    ("order.order_type", "t" * bounds.MAX_LABEL_CHARS, "t" * (bounds.MAX_LABEL_CHARS + 1)),
    ("order.asset_class", "a" * bounds.MAX_LABEL_CHARS, "a" * (bounds.MAX_LABEL_CHARS + 1)),
    ("execution_id", "x" * bounds.MAX_ID_CHARS, "x" * (bounds.MAX_ID_CHARS + 1)),
    # quantities: range, both signs, and scale
    ("order.filled_qty", str(QTY_MAX), str(bounds.QTY_LIMIT)),
    ("qty", str(QTY_MAX), str(QTY_MAX + QTY_MIN_STEP)),
    ("position_qty", str(-QTY_MAX), str(-bounds.QTY_LIMIT)),
    ("order.qty", str(QTY_MIN_STEP), str(QTY_MIN_STEP / 10)),
    ("qty", "0.000000000001", "0.0000000000015"),
    ("position_qty", "0E-12", "0E-13"),
    ("order.filled_qty", "1.5000000000000000000", "1.5000000000001"),
    # prices
    ("price", str(PRICE_MAX), str(bounds.PRICE_LIMIT)),
    ("order.filled_avg_price", str(PRICE_MAX), str(PRICE_MAX) + "5"),
    ("price", str(PRICE_MIN_STEP), str(PRICE_MIN_STEP / 10)),
    ("order.filled_avg_price", "0", "0E-29"),
    # time: the floor and the wall clock plus the tolerance
    ("timestamp", ns_text(bounds.TIMESTAMP_FLOOR_NS), ns_text(bounds.TIMESTAMP_FLOOR_NS - 1)),
    ("timestamp", ns_text(LIMIT_NS), ns_text(LIMIT_NS + 1)),
    ("order.created_at", ns_text(bounds.TIMESTAMP_FLOOR_NS),
     ns_text(bounds.TIMESTAMP_FLOOR_NS - 1)),
    ("order.created_at", ns_text(LIMIT_NS), ns_text(LIMIT_NS + 1)),
]


@pytest.mark.parametrize(("path", "accepted", "refused"), EDGES,
                         ids=[f"{e[0]}-{i}" for i, e in enumerate(EDGES)])
def test_the_first_refused_value_on_each_side_is_dead_lettered(
    path: str, accepted: Any, refused: Any
) -> None:
    if path in ("qty", "order.filled_qty"):
        # A fill's quantities go together: fill qty = cumulative = ordered.
        ok = _with_fill_qty(accepted)
        bad = _with_fill_qty(refused) if path == "qty" else decoded(path, refused)
    else:
        ok, bad = decoded(path, accepted), decoded(path, refused)
    assert isinstance(ok, Event), ok
    assert isinstance(bad, DeadLetter), bad
    assert bad.reason.startswith("out of bounds: "), bad.reason
    assert bad.payload == _frame(path, refused) or path in ("qty", "order.filled_qty")


def _with_fill_qty(value: str) -> Event | DeadLetter:
    msg = _fill()
    data = msg["data"]
    data["qty"] = data["order"]["filled_qty"] = data["order"]["qty"] = value
    data["position_qty"] = value
    result = decode_frame(json.dumps(msg).encode(), not_after_ns=LIMIT_NS)
    assert isinstance(result, Event | DeadLetter)
    return result


def test_the_reasons_name_the_field_and_the_bound() -> None:
    cases = {
        ("order.id", "i" * 129): "order.id is 129 characters, over the limit of 128",
        ("price", "1E+12"): "price is out of range",
        ("order.filled_avg_price", "1E-20000"): "more than 28 decimal places",
        ("timestamp", ns_text(LIMIT_NS + 10**9)): "timestamp is in the future: 1.000 s",
        ("timestamp", "1970-01-01T00:00:00Z"): "timestamp is before 2000-01-01",
    }
    for (path, value), words in cases.items():
        dead = decoded(path, value)
        assert isinstance(dead, DeadLetter)
        assert words in dead.reason, dead.reason


def test_without_a_clock_limit_only_the_future_check_is_skipped() -> None:
    future = _frame("timestamp", "2099-01-01T00:00:00Z")
    assert isinstance(decode_frame(future), Event)
    assert isinstance(decode_frame(future, not_after_ns=LIMIT_NS), DeadLetter)
    assert isinstance(decode_frame(_frame("timestamp", "1999-01-01T00:00:00Z")), DeadLetter)


# --- REST FILL activities -------------------------------------------------------------


ACTIVITY = decode_activities((RECORDING / "fill_activities.json").read_bytes())[0]


@pytest.mark.parametrize(
    ("field", "accepted", "refused"),
    [
        ("qty", QTY_MAX, bounds.QTY_LIMIT),
        ("cum_qty", QTY_MIN_STEP, Decimal("1E-20000")),
        ("price", PRICE_MAX, bounds.PRICE_LIMIT),
        ("leaves_qty", Decimal(0), Decimal("-1E+15")),
        ("order_id", "o" * bounds.MAX_ID_CHARS, "o" * (bounds.MAX_ID_CHARS + 1)),
        ("id", "a" * bounds.MAX_ID_CHARS, "a" * (bounds.MAX_ID_CHARS + 1)),
        ("symbol", WIDE * bounds.MAX_SYMBOL_CHARS, WIDE * (bounds.MAX_SYMBOL_CHARS + 1)),
        ("transaction_time", ns_text(LIMIT_NS), ns_text(LIMIT_NS + 1)),
        ("transaction_time", "2000-01-01T00:00:00Z", "1999-12-31T23:59:59.999999999Z"),
    ],
)
def test_fill_activities_are_held_to_the_same_bounds(
    field: str, accepted: Any, refused: Any
) -> None:
    import msgspec

    ok = msgspec.structs.replace(ACTIVITY, **{field: accepted})
    if field in ("qty", "cum_qty"):
        ok = msgspec.structs.replace(ok, qty=accepted, cum_qty=accepted)
    assert isinstance(activity_to_event(ok, not_after_ns=LIMIT_NS), Event)
    bad = msgspec.structs.replace(ACTIVITY, **{field: refused})
    with pytest.raises(OutOfBounds):
        activity_to_event(bad, not_after_ns=LIMIT_NS)
    # What a dead letter keeps of it is its JSON, which decodes back to the same activity.
    assert activity_from_json(activity_json(bad)) == bad
    replayed = decode_stored(activity_json(bad), "rest", not_after_ns=LIMIT_NS)
    assert isinstance(replayed, DeadLetter) and "out of bounds" in replayed.reason


# --- what the schema holds ------------------------------------------------------------


def test_the_longest_event_key_fits_a_postgres_index_entry() -> None:
    longest_qty = decimal_text(-QTY_MAX)
    fill_key = f"fill:{WIDE * bounds.MAX_ID_CHARS}:{longest_qty}"
    other_key = f"{WIDE * bounds.MAX_LABEL_CHARS}:{WIDE * bounds.MAX_ID_CHARS}:{2**63}"
    refresh_key = f"refresh:{WIDE * bounds.MAX_ID_CHARS}:{WIDE * bounds.MAX_LABEL_CHARS}:{2**63}"
    # The account id shares the (account_id, symbol) index; ours are uuids.
    symbol_entry = "a" * 64 + WIDE * bounds.MAX_SYMBOL_CHARS
    for text in (fill_key, other_key, refresh_key, symbol_entry):
        # A margin for the index tuple's own header and alignment.
        assert len(text.encode()) + 64 < bounds.POSTGRES_INDEX_ROW_MAX


def test_amounts_fit_numeric_and_stay_exact_in_the_default_context() -> None:
    assert bounds.QTY_LIMIT.adjusted() + bounds.QTY_MAX_SCALE <= 27  # 28-digit sums exact
    assert QTY_MAX + QTY_MAX == Decimal("1999999999999999.999999999998")
    assert bounds.PRICE_MAX_SCALE < bounds.POSTGRES_NUMERIC_MAX_SCALE
    assert bounds.PRICE_LIMIT.adjusted() < bounds.POSTGRES_NUMERIC_MAX_INTEGER_DIGITS


def test_the_tolerance_helper_is_exact_to_the_nanosecond() -> None:
    assert LIMIT_NS == parse_timestamp("2026-11-30T12:02:00Z")[1]
    assert bounds.not_after_ns(NOW + timedelta(microseconds=1), 0) == \
        parse_timestamp("2026-11-30T12:00:00.000001Z")[1]
