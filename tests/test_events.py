"""Event keys and timestamps: the identity of an update, which exactly-once rests on."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_supervisor import events
from stream_supervisor.errors import TimestampError
from stream_supervisor.events import (
    decimal_text,
    event_key,
    fill_key,
    format_timestamp,
    parse_timestamp,
)

ORDER = "bcfdc56a-5221-42b3-a754-614c64ffc604"


# --- parse_timestamp ------------------------------------------------------------------


def test_nanoseconds_are_kept_in_ts_ns() -> None:
    ts, ns = parse_timestamp("2026-11-23T20:47:37.758317057Z")
    assert ts == datetime(2026, 11, 23, 20, 47, 37, 758317, tzinfo=UTC)
    assert ns == int(datetime(2026, 11, 23, 20, 47, 37, tzinfo=UTC).timestamp()) * 10**9 + 758317057


def test_instants_one_nanosecond_apart_stay_distinct() -> None:
    _, a = parse_timestamp("2026-11-23T20:47:37.123456789Z")
    _, b = parse_timestamp("2026-11-23T20:47:37.123456788Z")
    assert a - b == 1


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-01T05:00:00Z",
        "2026-01-01T05:00:00z",
        "2026-01-01T00:00:00-05:00",
        "2026-01-01T10:30:00+0530",
        "2026-01-01T10:30:00+05:30",
        "2026-01-01T05:00:00+00:00",
        "2026-01-01T05:00:00.000000000Z",
        "2026-01-01 05:00:00Z",
        "2025-12-31T23:00:00-06:00",
    ],
)
def test_offsets_normalise_to_the_same_utc_instant(text: str) -> None:
    ts, ns = parse_timestamp(text)
    assert ts == datetime(2026, 1, 1, 5, 0, tzinfo=UTC)
    assert ts.utcoffset() == timedelta(0)
    assert ns == 1767243600 * 10**9


def test_short_fractions_are_padded_not_misread() -> None:
    _, ns = parse_timestamp("2026-01-01T05:00:00.5Z")
    assert ns == 1767243600 * 10**9 + 500_000_000


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "2026-01-01T00:00:00",  # no offset: ambiguous
        "2026-01-01",
        "2026-01-01T00:00:00.1234567891Z",  # more than nanoseconds
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:60:00Z",
        "2026-01-01T00:00:60Z",
        "0000-01-01T00:00:00Z",
        "2026-01-01T00:00:00+24:00",
        "2026-01-01T00:00:00+23:60",
        "2026-01-01T00:00:00Z trailing",
    ],
)
def test_garbage_and_out_of_range_raise_timestamp_error(text: str) -> None:
    with pytest.raises(TimestampError):
        parse_timestamp(text)


@pytest.mark.parametrize(
    "text",
    [
        # Valid fields whose offset pushes the UTC instant outside what datetime holds.
        "9999-12-31T23:59:59-05:00",
        "0001-01-01T00:00:00+05:00",
    ],
)
def test_offset_pushing_the_instant_out_of_range_raises_timestamp_error(text: str) -> None:
    with pytest.raises(TimestampError):
        parse_timestamp(text)


_instants = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
_offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59)


@settings(max_examples=200, deadline=None)
@given(instant=_instants, nanos=st.integers(0, 999), offset=_offsets, colon=st.booleans())
def test_any_offset_spelling_gives_the_same_instant(
    instant: datetime, nanos: int, offset: int, colon: bool
) -> None:
    local = instant.astimezone(timezone(timedelta(minutes=offset)))
    sign = "+" if offset >= 0 else "-"
    hh, mm = divmod(abs(offset), 60)
    off = f"{sign}{hh:02d}:{mm:02d}" if colon else f"{sign}{hh:02d}{mm:02d}"
    frac = f"{local.microsecond:06d}{nanos:03d}"
    text = local.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac}{off}"
    zulu = instant.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac}Z"

    ts, ns = parse_timestamp(text)
    assert (ts, ns) == parse_timestamp(zulu)
    assert ts == instant
    assert ns // 1000 == int(
        (instant - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1)
    )
    assert ns % 1000 == nanos


def _two(low: int = 0) -> st.SearchStrategy[str]:
    return st.integers(low, 99).map(lambda n: f"{n:02d}")


#: Strings of the pattern's shape, fields in and out of range: every spelling the
#: pattern lets through, so both paths of `parse_timestamp` meet each kind.
_shaped = st.builds(
    lambda y, mo, d, sep, h, mi, s, frac, off: f"{y:04d}-{mo}-{d}{sep}{h}:{mi}:{s}{frac}{off}",
    st.one_of(st.integers(0, 9999), st.sampled_from([1, 1969, 1970, 2024, 9999])),
    _two(), _two(), st.sampled_from("Tt "), _two(), _two(), _two(),
    st.one_of(st.just(""), st.integers(1, 9).flatmap(
        lambda n: st.integers(0, 10**n - 1).map(lambda v: f".{v:0{n}d}"))),
    st.one_of(st.sampled_from(["Z", "z", "+00:00", "-00:00", "+0000"]),
              st.builds(lambda sign, hh, colon, mm: f"{sign}{hh}{colon}{mm}",
                        st.sampled_from("+-"), _two(), st.sampled_from(["", ":"]), _two())),
)


def _outcome(parse: Callable[[str], tuple[datetime, int]], text: str) -> tuple[object, ...]:
    try:
        ts, ns = parse(text)
    except TimestampError as exc:
        return ("refused", str(exc))
    return ("parsed", ts, ts.tzinfo is UTC, ns)


def _reference(text: str) -> tuple[datetime, int]:
    m = events._RFC3339.match(text)
    assert m is not None, text
    return events._parse_fields(m, text)


@settings(max_examples=2000, deadline=None)
@given(text=_shaped)
def test_the_c_parser_path_answers_as_the_field_by_field_parse(text: str) -> None:
    """Timestamps the broker sends go to `datetime.fromisoformat`, which alone takes more
    than RFC 3339 (offset minutes past 59, for one): whatever it is given, the answer,
    value or refusal with its message, is the field-by-field parse's."""
    assert _outcome(parse_timestamp, text) == _outcome(_reference, text)


@pytest.mark.parametrize("text", [
    "2026-01-01T00:00:00+05:60",  # fromisoformat reads it as +06:00
    "2026-01-01T00:00:00+0599",
    "2026-01-01T24:00:00Z",
    "2026-01-01t05:00:00.5z",
    "9999-12-31T23:59:59.999999999-00:01",
    "0001-01-01T00:00:00.000000001+00:01",
    "1969-12-31T23:59:59.999999999Z",
])
def test_edges_answer_as_the_field_by_field_parse(text: str) -> None:
    assert _outcome(parse_timestamp, text) == _outcome(_reference, text)


def test_the_broker_spelling_takes_the_c_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("the field-by-field parse ran")

    monkeypatch.setattr(events, "_parse_fields", refuse)
    ts, ns = parse_timestamp("2026-11-23T20:47:37.758317057Z")
    assert (ts, ns) == (datetime(2026, 11, 23, 20, 47, 37, 758317, tzinfo=UTC),
                        1795466857 * 10**9 + 758317057)
    assert parse_timestamp("2026-11-23T15:47:37.758317057-05:00") == (ts, ns)


def test_format_timestamp_round_trips_in_utc() -> None:
    ts, _ = parse_timestamp("2026-01-01T00:00:00.123456-05:00")
    assert format_timestamp(ts) == "2026-01-01T05:00:00.123456Z"
    assert parse_timestamp(format_timestamp(ts))[0] == ts


# --- decimal_text and keys ------------------------------------------------------------


@pytest.mark.parametrize("text", ["10", "10.0", "1E+1", "10.000000", "0.1E+2", "1e1"])
def test_decimal_text_one_canonical_form_for_ten(text: str) -> None:
    assert decimal_text(Decimal(text)) == "10"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("0.50", "0.5"),
        ("0.5", "0.5"),
        ("5E-1", "0.5"),
        ("0", "0"),
        ("0.000", "0"),
        ("-0", "0"),
        ("0E+3", "0"),
        ("1E-7", "0.0000001"),
        ("100", "100"),
        ("0.974", "0.974"),
    ],
)
def test_decimal_text_canonical_forms(text: str, canonical: str) -> None:
    assert decimal_text(Decimal(text)) == canonical


@settings(max_examples=200, deadline=None)
@given(
    digits=st.integers(min_value=0, max_value=10**15),
    exponent=st.integers(min_value=-9, max_value=6),
    padding=st.integers(min_value=0, max_value=6),
)
def test_equal_decimals_have_equal_text(digits: int, exponent: int, padding: int) -> None:
    value = Decimal(digits).scaleb(exponent)
    padded = Decimal(digits * 10**padding).scaleb(exponent - padding)  # same value, more zeros
    assert value == padded
    assert decimal_text(value) == decimal_text(padded)
    assert Decimal(decimal_text(value)) == value
    assert "E" not in decimal_text(value)


def test_fill_key_is_order_and_cumulative_qty() -> None:
    assert fill_key(ORDER, Decimal("0.063")) == f"fill:{ORDER}:0.063"
    assert fill_key(ORDER, Decimal("10.0")) == fill_key(ORDER, Decimal("1E+1"))
    assert fill_key(ORDER, Decimal(1)) != fill_key(ORDER, Decimal(2))
    assert fill_key(ORDER, Decimal(1)) != fill_key("other-order", Decimal(1))


def test_fill_events_key_without_type_or_time_so_stream_and_rest_agree() -> None:
    # The stream says `partial_fill` at one instant; REST may say `fill`, stamped later.
    stream = event_key("partial_fill", ORDER, Decimal("0.50"), 1_000)
    rest = event_key("fill", ORDER, Decimal("0.5"), 2_000)
    assert stream == rest == fill_key(ORDER, Decimal("0.5"))


def test_other_events_key_on_order_type_and_instant() -> None:
    new = event_key("new", ORDER, Decimal(0), 1_000)
    assert new == f"new:{ORDER}:1000"
    assert event_key("new", ORDER, Decimal(0), 1_001) != new  # a different instant
    assert event_key("canceled", ORDER, Decimal(0), 1_000) != new  # a different type
    assert event_key("new", "other", Decimal(0), 1_000) != new  # a different order
    # A non-fill's key does not depend on the quantity it reports.
    assert event_key("canceled", ORDER, Decimal(3), 5) == event_key(
        "canceled", ORDER, Decimal(0), 5
    )


def test_unknown_event_types_still_get_a_key() -> None:
    assert event_key("order_exploded", ORDER, Decimal(0), 7) == f"order_exploded:{ORDER}:7"
