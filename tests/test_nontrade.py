"""nontrade.py: the activities backfill from its own cursor, and the crypto spelling of
REST fills from the broker's cached asset record (docs/design.md, section 10)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec

from stream_supervisor.activities import WireNonTrade
from stream_supervisor.events import DeadLetter, Event, format_timestamp
from stream_supervisor.messages import Item
from stream_supervisor.nontrade import (
    REREAD,
    ActivityRecovery,
    AssetBook,
    activity_time,
    looks_compact_crypto,
)
from stream_supervisor.protocol import WireActivity, activity_to_event
from stream_supervisor.settings import load_settings

NOW = datetime(2026, 1, 5, 21, 0, tzinfo=UTC)


class Rest:
    """Just the two calls nontrade.py makes, recording what it asked."""

    def __init__(self, activities: Sequence[dict[str, Any]], assets: dict[str, str]) -> None:
        self.activities = [msgspec.convert(a, WireNonTrade) for a in activities]
        self.assets = assets
        self.asked: list[tuple[str | None, str | None, tuple[str, ...]]] = []
        self.asset_requests: list[str] = []

    async def non_trade_activities(
        self, *, activity_types: Sequence[str], after: str | None, page_token: str | None,
        page_size: int = 100,
    ) -> list[WireNonTrade]:
        self.asked.append((after, page_token, tuple(activity_types)))
        found = [a for a in self.activities if page_token is None or a.id > page_token]
        return found[:page_size]

    async def asset(self, symbol: str) -> dict[str, Any] | None:
        self.asset_requests.append(symbol)
        cls = self.assets.get(symbol)
        return None if cls is None else {"symbol": symbol, "class": cls}


def _activity(n: int, kind: str = "CFEE", **extra: Any) -> dict[str, Any]:
    return {"id": f"20260105160000{n:03d}::{n:04d}", "activity_type": kind,
            "transaction_time": "2026-01-05T21:00:00Z", "symbol": "BTCUSD", "qty": "-0.0001",
            **extra}


async def _pass(rest: Rest, cursor: str | None) -> list[Item]:
    got: list[Item] = []

    async def forward(item: Item) -> None:
        got.append(item)

    async def load() -> str | None:
        return cursor

    recovery = ActivityRecovery(rest, forward, load, interval=0, wallclock=lambda: NOW)
    await recovery.backfill(NOW - timedelta(hours=1))
    return got


async def test_a_pass_resumes_a_day_before_the_newest_activity_stored() -> None:
    rest = Rest([_activity(1), _activity(2)], {})
    got = await _pass(rest, "20260105160000001::0001")
    [(after, token, types)] = rest.asked
    since = activity_time("20260105160000001::0001")
    assert since is not None and after == format_timestamp(since - REREAD)
    assert after == "2026-01-04T21:00:00.001000Z"  # 16:00 in New York is 21:00 UTC
    assert token is None and {"CFEE", "OPEXP", "OPASN", "SPLIT", "REORG"} <= set(types)
    assert [e.key for e in got if isinstance(e, Event)] == [
        "activity:20260105160000001::0001", "activity:20260105160000002::0002"]


async def test_a_pass_without_a_cursor_starts_where_the_fills_backfill_did() -> None:
    rest = Rest([], {})
    await _pass(rest, None)
    assert rest.asked[0][0] == "2026-01-05T20:00:00.000000Z"


async def test_a_full_page_is_followed_by_the_next_by_its_last_id() -> None:
    rest = Rest([_activity(n) for n in range(1, 151)], {})
    got = await _pass(rest, None)
    assert len(got) == 150 and rest.asked[1][1] == "20260105160000100::0100"


async def test_an_activity_out_of_bounds_is_dead_lettered_as_its_json() -> None:
    rest = Rest([_activity(1, transaction_time="2099-01-01T00:00:00Z"), _activity(2)], {})
    got = await _pass(rest, None)
    assert isinstance(got[0], DeadLetter) and got[0].source == "rest"
    assert b"2099-01-01" in got[0].payload and isinstance(got[1], Event)


def test_activity_ids_tell_their_time() -> None:
    assert activity_time("20260105160000123::x") == datetime(2026, 1, 5, 21, 0, 0, 123000,
                                                              tzinfo=UTC)
    assert activity_time("nonsense") is None


def test_only_pair_shaped_symbols_need_the_asset_record() -> None:
    assert [looks_compact_crypto(s) for s in ("BTCUSD", "ETHUSDT", "AAPL", "BTC/USD",
                                              "AAPL240119C00190000", "USD")] == [
        True, True, False, False, False, False]


async def test_rest_fills_of_a_pair_get_its_slash_and_the_asset_is_asked_once() -> None:
    rest = Rest([], {"BTCUSD": "crypto", "ABCUSD": "us_equity"})
    book = AssetBook(rest)

    def fill(n: int, symbol: str) -> Event:
        return activity_to_event(WireActivity(
            id=f"2026010516000000{n}::a", order_id=f"o{n}", symbol=symbol, side="buy",
            price=Decimal(1), qty=Decimal(1), cum_qty=Decimal(1),
            transaction_time="2026-01-05T16:00:00Z"))

    spelled = await book.spelled([fill(1, "BTCUSD"), fill(2, "BTCUSD"), fill(3, "ABCUSD"),
                                  fill(4, "AAPL")])
    assert [e.symbol for e in spelled] == ["BTC/USD", "BTC/USD", "ABCUSD", "AAPL"]
    assert rest.asset_requests == ["BTCUSD", "ABCUSD"]


def test_the_activity_interval_is_a_setting() -> None:
    assert load_settings({}).activity_interval == 600.0
    assert load_settings({"STREAM_SUPERVISOR_ACTIVITY_INTERVAL": "30"}).activity_interval == 30.0
