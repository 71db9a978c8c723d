"""The wire protocol: every recorded frame decodes, and bad frames become dead letters."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_supervisor.bounds import DEAD_LETTER_KEEP_BYTES
from stream_supervisor.errors import DecodeError
from stream_supervisor.events import DeadLetter, Event, fill_key
from stream_supervisor.protocol import (
    Authorization,
    ErrorReply,
    Listening,
    OtherStream,
    activity_json,
    activity_to_event,
    authenticate_message,
    decode_activities,
    decode_frame,
    listen_message,
)

from .fixtures import RECORDING

LINES: list[bytes] = (RECORDING / "trade_updates.jsonl").read_bytes().splitlines()
UPDATE_LINES = LINES[2:]
FRAME_TYPES = (Event, DeadLetter, Authorization, Listening, ErrorReply, OtherStream)
DECIMAL_FIELDS = ("cum_qty", "order_qty", "cum_avg_price", "fill_qty", "fill_price", "position_qty")


def _first(event: str) -> dict[str, Any]:
    for line in UPDATE_LINES:
        msg = json.loads(line)
        if msg["data"]["event"] == event:
            return msg  # type: ignore[no-any-return]
    raise AssertionError(f"no {event} in the recording")


def _frame(msg: Any) -> bytes:
    return json.dumps(msg).encode()


def _with(msg: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `msg` with `data.<path>` set (or deleted, for value=...)."""
    out = json.loads(json.dumps(msg))
    node = out["data"]
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out  # type: ignore[no-any-return]


def _dead(frame: bytes | str, **kw: Any) -> DeadLetter:
    result = decode_frame(frame, **kw)
    assert isinstance(result, DeadLetter), result
    assert result.reason
    return result


# --- the recording --------------------------------------------------------------------


@pytest.mark.parametrize("as_text", [False, True], ids=["binary", "text"])
def test_every_recorded_frame_decodes(as_text: bool) -> None:
    frames = [decode_frame(line.decode() if as_text else line) for line in LINES]

    assert frames[0] == Authorization(authorized=True, message=None)
    assert frames[1] == Listening(streams=("trade_updates",))
    events = frames[2:]
    assert len(events) == 194
    for ev, line in zip(events, UPDATE_LINES, strict=True):
        assert isinstance(ev, Event), ev
        raw = json.loads(line)["data"]
        assert ev.source == "stream"
        assert ev.event == raw["event"]
        assert ev.order_id == raw["order"]["id"]
        assert ev.symbol == raw["order"]["symbol"]
        assert ev.side == raw["order"]["side"]
        assert ev.status == raw["order"]["status"]
        assert ev.cum_qty == Decimal(raw["order"]["filled_qty"])
        assert ev.timestamp.tzinfo is not None
        assert ev.timestamp.utcoffset() == timedelta(0)
        for name in DECIMAL_FIELDS:
            value = getattr(ev, name)
            assert value is None or isinstance(value, Decimal), (name, value)
        if ev.is_fill:
            assert ev.key == fill_key(ev.order_id, ev.cum_qty)
            assert ev.fill_qty == Decimal(raw["qty"])
            assert ev.fill_price == Decimal(raw["price"])
            assert ev.position_qty == Decimal(raw["position_qty"])
            assert ev.cum_avg_price == Decimal(raw["order"]["filled_avg_price"])
    # Every update of the session is distinct: keys never collide.
    assert len({ev.key for ev in events if isinstance(ev, Event)}) == 194


def test_binary_and_text_frames_decode_identically() -> None:
    for line in LINES:
        assert decode_frame(line) == decode_frame(line.decode())


def test_offsets_in_the_recording_normalise_to_utc() -> None:
    # Some recorded updates carry a -05:00 offset: each must land at its UTC instant.
    shifted = [x for x in UPDATE_LINES if b'-05:00"}' in x]
    assert shifted
    for line in shifted:
        local, frac = json.loads(line)["data"]["timestamp"].removesuffix("-05:00").split(".")
        ev = decode_frame(line)
        assert isinstance(ev, Event)
        instant = datetime.fromisoformat(local).replace(tzinfo=UTC) + timedelta(hours=5)
        assert ev.timestamp == instant.replace(microsecond=int(frac[:6]))
        assert ev.ts_ns == int(instant.timestamp()) * 10**9 + int(frac)


def test_received_at_is_carried() -> None:
    ev = decode_frame(UPDATE_LINES[0], received_at=12.5)
    assert isinstance(ev, Event) and ev.received_at == 12.5
    assert _dead(b"{", received_at=3.0).received_at == 3.0


# --- REST FILL activities: the same keys as the stream --------------------------------


def test_fill_activities_key_like_the_matching_stream_fill() -> None:
    activities = decode_activities((RECORDING / "fill_activities.json").read_bytes())
    stream = {
        (ev.order_id, ev.cum_qty): ev
        for ev in map(decode_frame, UPDATE_LINES)
        if isinstance(ev, Event) and ev.is_fill
    }
    assert len(activities) == len(stream) == 101
    seen = set()
    for act in activities:
        ev = activity_to_event(act)
        twin = stream[(ev.order_id, ev.cum_qty)]
        assert ev.key == twin.key  # a fill seen on both sources counts once
        assert ev.source == "rest"
        assert ev.activity_id == act.id
        assert ev.event == twin.event
        assert (ev.fill_qty, ev.fill_price) == (twin.fill_qty, twin.fill_price)
        assert (ev.symbol, ev.side) == (twin.symbol, twin.side)
        assert ev.cum_avg_price is None  # REST does not tell the cumulative average
        assert ev.timestamp.utcoffset() == timedelta(0)
        seen.add(ev.key)
    assert seen == {ev.key for ev in stream.values()}


def test_activity_keys_ignore_decimal_spelling() -> None:
    body = json.loads((RECORDING / "fill_activities.json").read_text())[:1]
    body[0]["cum_qty"] = "0.0630"
    respelled = activity_to_event(decode_activities(json.dumps(body).encode())[0])
    stream = decode_frame(UPDATE_LINES[2])  # the first partial fill, cum 0.063
    assert isinstance(stream, Event) and stream.cum_qty == Decimal("0.063")
    assert respelled.key == stream.key


def test_bad_activities_page_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="activities"):
        decode_activities(b'{"id": 1}')
    with pytest.raises(DecodeError):
        decode_activities(b"not json")


def test_one_undecodable_activity_does_not_fail_its_page() -> None:
    # Issue 13: one activity of the wrong shape used to fail the whole page, hence every
    # backfill, for ever. It now reaches backfill, which dead-letters it as it came.
    good = (RECORDING / "fill_activities.json").read_bytes()
    items = json.loads(good)
    bad = {**items[0], "id": "bad-activity", "qty": "abc"}
    odd = {"id": 7}
    page = json.dumps([bad, *items[1:3], odd]).encode()
    activities = decode_activities(page)
    assert [a.id for a in activities[1:3]] == [i["id"] for i in items[1:3]]
    assert activities[0].id == "bad-activity" and activities[3].id == ""
    for activity in (activities[0], activities[3]):
        with pytest.raises(DecodeError, match="invalid update"):
            activity_to_event(activity)
    assert json.loads(activity_json(activities[0])) == bad
    assert json.loads(activity_json(activities[3])) == odd
    assert activities[0].transaction_time == bad["transaction_time"]


# --- control messages -----------------------------------------------------------------


def test_control_replies() -> None:
    assert decode_frame(
        b'{"stream":"authorization","data":{"status":"unauthorized","action":"authenticate",'
        b'"message":"access key verification failed"}}'
    ) == Authorization(authorized=False, message="access key verification failed")
    assert decode_frame(b'{"stream":"error","data":{"code":400,"message":"bad request"}}') == (
        ErrorReply("bad request")
    )


def test_client_messages_are_the_documented_json() -> None:
    assert json.loads(authenticate_message("K", "S")) == {
        "action": "authenticate",
        "data": {"key_id": "K", "secret_key": "S"},
    }
    assert json.loads(listen_message()) == {
        "action": "listen",
        "data": {"streams": ["trade_updates"]},
    }


# --- bad frames: dead letters with a reason, never an exception -----------------------


def test_invalid_json() -> None:
    dead = _dead(b"{not json")
    assert "invalid JSON" in dead.reason
    assert dead.payload == b"{not json"


def test_truncated_frame() -> None:
    line = UPDATE_LINES[2]
    dead = _dead(line[: len(line) // 2])
    assert "truncated" in dead.reason
    assert dead.payload == line[: len(line) // 2]


def test_empty_frame() -> None:
    _dead(b"")


def test_data_null() -> None:
    dead = _dead(b'{"stream":"trade_updates","data":null}')
    assert "no data" in dead.reason


def test_unknown_stream_is_ignored_not_dead() -> None:
    assert decode_frame(b'{"stream":"account_updates","data":{"x":1}}') == (
        OtherStream("account_updates")
    )


def test_oversized_frame_is_dead_lettered_unparsed() -> None:
    line = UPDATE_LINES[2]
    dead = _dead(line, max_bytes=len(line) - 1)
    assert "oversized" in dead.reason and str(len(line)) in dead.reason
    assert isinstance(decode_frame(line, max_bytes=len(line)), Event)  # the limit is inclusive
    huge = b'{"stream":"trade_updates","data":"' + b"x" * 200_000 + b'"}'
    dead = _dead(huge, max_bytes=100_000)
    assert len(dead.payload) == DEAD_LETTER_KEEP_BYTES  # what is kept is bounded
    assert _dead(huge.decode(), max_bytes=100_000).reason == dead.reason  # text frames too


def test_unknown_event_type_is_an_event_not_a_crash() -> None:
    msg = _with(_first("new"), "event", "order_exploded")
    ev = decode_frame(_frame(msg))
    assert isinstance(ev, Event)
    assert ev.event == "order_exploded"
    assert ev.key.startswith("order_exploded:")
    assert not ev.is_fill


@pytest.mark.parametrize("field", ["id", "symbol", "side", "status", "filled_qty"])
def test_missing_order_field(field: str) -> None:
    dead = _dead(_frame(_with(_first("partial_fill"), f"order.{field}", ...)))
    assert field in dead.reason


def test_missing_order_object() -> None:
    assert "order" in _dead(_frame(_with(_first("new"), "order", ...))).reason
    _dead(_frame(_with(_first("new"), "order", None)))


def test_empty_order_id() -> None:
    assert "order id" in _dead(_frame(_with(_first("new"), "order.id", ""))).reason


@pytest.mark.parametrize("field", ["qty", "price"])
def test_fill_without_qty_or_price(field: str) -> None:
    for event in ("fill", "partial_fill"):
        dead = _dead(_frame(_with(_first(event), field, ...)))
        assert "without qty or price" in dead.reason
        dead = _dead(_frame(_with(_first(event), field, None)))
        assert "without qty or price" in dead.reason


def test_unknown_side() -> None:
    assert "side" in _dead(_frame(_with(_first("fill"), "order.side", "short"))).reason


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("qty", "-1"),
        ("qty", "0"),
        ("price", "-0.01"),
        ("order.filled_qty", "0"),
        ("order.filled_qty", "-5"),
    ],
)
def test_non_positive_fill_quantities(path: str, value: str) -> None:
    _dead(_frame(_with(_first("fill"), path, value)))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("qty", True),
        ("qty", [1]),
        ("qty", "ten"),
        ("price", {"v": 1}),
        ("order.filled_qty", "1,5"),
        ("order.symbol", 5),
        ("event", 3),
        ("timestamp", 1700000000),
    ],
)
def test_wrong_types(path: str, value: Any) -> None:
    dead = _dead(_frame(_with(_first("partial_fill"), path, value)))
    assert "invalid update" in dead.reason


def test_quantities_sent_as_json_numbers_stay_exact() -> None:
    # msgspec reads a JSON number straight into a Decimal from its text: no float on the
    # way, so 0.1 stays 0.1 and many digits stay exact. Accepting numbers is lenient and
    # lossless; the key is the one the string spelling gives.
    line = next(x for x in UPDATE_LINES if b'"partial_fill"' in x)
    assert b'"qty":"0.063"' in line and b'"price":"351.14"' in line
    numeric = (
        line.replace(b'"qty":"0.063"', b'"qty":0.1')
        .replace(b'"price":"351.14"', b'"price":123456789.123456789012')
        .replace(b'"filled_qty":"0.063"', b'"filled_qty":0.300000000004')
    )
    ev = decode_frame(numeric)
    assert isinstance(ev, Event)
    assert isinstance(ev.fill_qty, Decimal) and ev.fill_qty == Decimal("0.1")
    assert ev.fill_price == Decimal("123456789.123456789012")
    assert ev.cum_qty == Decimal("0.300000000004")
    as_text = line.replace(b'"filled_qty":"0.063"', b'"filled_qty":"0.300000000004"')
    assert decode_frame(as_text).key == ev.key  # type: ignore[union-attr]
    # A float's artefact has more decimal places than a quantity may (bounds.py): the
    # update is refused rather than rounded.
    artefact = line.replace(b'"filled_qty":"0.063"', b'"filled_qty":0.30000000000000004')
    assert "decimal places" in _dead(artefact).reason


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("qty", "Infinity"),
        ("price", "Infinity"),
        ("price", "NaN"),
        ("order.filled_qty", "Infinity"),
        ("order.filled_avg_price", "NaN"),
        ("order.filled_avg_price", "-Infinity"),
        ("position_qty", "sNaN"),
        ("position_qty", "Infinity"),
        ("order.qty", "NaN"),
        ("qty", "1E+999999999"),
    ],
)
def test_non_finite_money_never_becomes_an_event(path: str, value: str) -> None:
    # Such a value passes straight into position math downstream, where it either
    # poisons the stored averages or raises inside the writer's transaction on every
    # retry (a poison pill). It belongs in the dead-letter table.
    result = decode_frame(_frame(_with(_first("partial_fill"), path, value)))
    assert isinstance(result, DeadLetter), result


@pytest.mark.parametrize(
    "stamp",
    [
        "",
        "yesterday",
        "2026-11-23T20:47:37",
        "2026-13-23T20:47:37Z",
        "2026-11-23T25:00:00Z",
        "9999-12-31T23:59:59-05:00",
    ],
)
def test_invalid_timestamp(stamp: str) -> None:
    dead = _dead(_frame(_with(_first("fill"), "timestamp", stamp)))
    assert "timestamp" in dead.reason


def test_invalid_created_at_is_dead_lettered() -> None:
    _dead(_frame(_with(_first("fill"), "order.created_at", "whenever")))


def test_invalid_utf8() -> None:
    line = UPDATE_LINES[2].replace(b"AAPL", b"AA\xffPL")
    dead = _dead(line)
    assert "utf-8" in dead.reason.lower() or "utf8" in dead.reason.lower()
    assert dead.payload == line


def test_lone_surrogate_in_a_text_frame() -> None:
    _dead(UPDATE_LINES[2].decode().replace("AAPL", "AA\udcffPL"))


@pytest.mark.parametrize("depth", [200, 5_000, 100_000])
def test_deeply_nested_json(depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    # In a field we do not read, in the data, and as the whole frame.
    _dead(b'{"stream":"trade_updates","data":{"event":"new","extra":' + nested + b"}}")
    _dead(b'{"stream":"trade_updates","data":' + nested + b"}")
    _dead(nested)


def test_dead_letters_keep_the_payload_verbatim() -> None:
    frame = b'{"stream":"trade_updates","data":{"event":"fill"}}'
    assert _dead(frame).payload == frame
    assert _dead(frame.decode()).payload == frame


# --- fuzzing: never an exception, always a Frame --------------------------------------


def _check(frame: bytes | str) -> None:
    result = decode_frame(frame)
    assert isinstance(result, FRAME_TYPES)
    if isinstance(result, Event):
        assert result.timestamp.utcoffset() == timedelta(0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise(frame: bytes) -> None:
    _check(frame)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=256))
def test_arbitrary_text_never_raises(frame: str) -> None:
    _check(frame)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    line=st.sampled_from(LINES),
    cut=st.integers(min_value=0, max_value=2_000),
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2_000), st.binary(min_size=0, max_size=4)),
        max_size=4,
    ),
)
def test_mutated_and_truncated_recorded_frames_never_raise(
    line: bytes, cut: int, edits: list[tuple[int, bytes]]
) -> None:
    frame = bytearray(line)
    for pos, replacement in edits:
        i = pos % (len(frame) + 1)
        frame[i : i + len(replacement)] = replacement
    _check(bytes(frame))
    _check(bytes(frame[: cut % (len(frame) + 1)]))


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=10),
    st.sampled_from(["NaN", "Infinity", "-0", "1E+400", "", "2026-01-01T00:00:00Z"]),
)


@settings(max_examples=200, deadline=None)
@given(
    event=st.sampled_from(["new", "fill", "partial_fill", "canceled", "weird"]),
    field=st.sampled_from(
        [
            "qty",
            "price",
            "position_qty",
            "timestamp",
            "event",
            "order.id",
            "order.symbol",
            "order.side",
            "order.status",
            "order.filled_qty",
            "order.filled_avg_price",
            "order.qty",
            "order.created_at",
            "order",
        ]
    ),
    value=_json_scalars,
)
def test_recorded_frames_with_a_field_replaced_never_raise(
    event: str, field: str, value: Any
) -> None:
    base = _first("fill" if event == "weird" else event)
    if event == "weird":
        base = _with(base, "event", "weird")
    _check(_frame(_with(base, field, value)))
