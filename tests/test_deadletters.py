"""`stream-supervisor dead-letters`: the listing, and replays that go through the
exactly-once path under the writer lock, or through the leader that holds it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import pytest
import trio

from stream_supervisor.activities import WireNonTrade
from stream_supervisor.cli import run_cli
from stream_supervisor.deadletters import replay
from stream_supervisor.events import DeadLetter, Event
from stream_supervisor.nontrade import AssetBook
from stream_supervisor.pgstore import PgStore
from stream_supervisor.protocol import activity_json, decode_activities, decode_frame
from stream_supervisor.replay import decode_letter, replay_with, spelled_letter
from stream_supervisor.settings import Settings
from stream_supervisor.store import StoredDeadLetter

from .fixtures import RECORDING
from .test_store_conformance import ACCOUNT

FRAMES = (RECORDING / "trade_updates.jsonl").read_bytes().splitlines()[2:]
FILL_FRAME = next(f for f in FRAMES if b'"event":"fill"' in f)
ACTIVITY = decode_activities((RECORDING / "fill_activities.json").read_bytes())[0]
WAIT = 30


def insert(url: str, payload: bytes, *, source: str = "stream", reason: str = "x",
           account: str = ACCOUNT) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO dead_letters (account_id, reason, payload, source) "
            "VALUES (%s, %s, %s, %s) RETURNING id", [account, reason, payload, source]
        ).fetchone()
    assert row is not None
    return int(row[0])


def row(url: str, letter_id: int) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute("SELECT replay_requested_at, replayed_at, replay_result "
                           "FROM dead_letters WHERE id = %s", [letter_id])
        found = cur.fetchone()
    assert found is not None
    return dict(zip(("requested", "replayed", "result"), found, strict=True))


def keys(url: str) -> set[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT event_key FROM alpaca_event_dedupe")}


def cli(url: str, *args: str) -> int:
    return run_cli(["dead-letters", "--database-url", url, "--log-level", "error", *args])


def test_the_listing_is_newest_first_with_the_first_bytes(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = insert(database_url, b'{"stream":', reason="invalid JSON: truncated")
    second = insert(database_url, b"\x00\x01binary" * 30, reason="oversized frame: 9 bytes")
    other = insert(database_url, b"{}", reason="elsewhere", account="acct-other")

    assert cli(database_url) == 0
    text = capsys.readouterr().out
    ids = [int(line.split()[0]) for line in text.splitlines() if line[:8].strip()]
    assert ids == [other, second, first]
    assert "invalid JSON: truncated" in text and '{"stream":' in text
    assert "binary" in text and "\x00" not in text  # unprintable bytes replaced

    assert cli(database_url, "--json", "--account-id", ACCOUNT, "--limit", "1") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in listed] == [second]
    assert listed[0]["payload_bytes"] == 240 and listed[0]["source"] == "stream"
    assert listed[0]["reason"] == "oversized frame: 9 bytes"
    assert listed[0]["replayed_at"] is None and listed[0]["received_at"].endswith("+00:00")


def test_a_replay_under_a_free_lock_commits_once_and_twice_is_harmless(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Dead-lettered by an older build (say, a bound since widened): valid today.
    letter = insert(database_url, FILL_FRAME, reason="out of bounds: since fixed")
    event = decode_frame(FILL_FRAME)
    assert isinstance(event, Event)

    assert cli(database_url, "--replay", str(letter)) == 0
    assert "replayed (replayed): stored" in capsys.readouterr().out
    assert event.key in keys(database_url)
    first = row(database_url, letter)
    assert first["result"] == "stored" and first["replayed"] is not None

    assert cli(database_url, "--replay", str(letter), "--json") == 0
    assert json.loads(capsys.readouterr().out) == {
        "id": letter, "how": "replayed", "outcome": "already stored", "stored": True}
    assert row(database_url, letter)["result"] == "already stored"
    assert keys(database_url) == {event.key}


def test_a_rest_activity_replays_from_its_json(database_url: str) -> None:
    letter = insert(database_url, activity_json(ACTIVITY), source="rest")
    assert cli(database_url, "--replay", str(letter)) == 0
    assert row(database_url, letter)["result"] == "stored"


def test_a_non_trade_activity_replays_from_the_json_the_activities_pass_kept(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The activities pass keeps a refused non-trade activity as its JSON (source
    `rest`); a replay decoded it as a FILL activity or an order, and it stayed refused
    for ever. A transfer in of 10 MSFT replays once: the position holds 10, and again
    is `already stored`."""
    transfer = WireNonTrade(id="20261130093000000::acat-1", activity_type="ACATC",
                            transaction_time="2026-11-30T14:30:00Z", symbol="MSFT",
                            qty=Decimal(10), price=Decimal(400))
    letter = insert(database_url, msgspec.json.encode(transfer), source="rest",
                    reason="invalid activity: since fixed")
    assert cli(database_url, "--replay", str(letter)) == 0
    assert row(database_url, letter)["result"] == "stored"
    assert keys(database_url) == {"activity:20261130093000000::acat-1"}
    assert cli(database_url, "--replay", str(letter)) == 0
    assert row(database_url, letter)["result"] == "already stored"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT symbol, qty FROM active_positions WHERE status = 'open'"
                            ).fetchall() == [("MSFT", Decimal(10))]
    bad = msgspec.structs.replace(transfer, id="20261130093000000::acat-2", qty=Decimal("1E+20"))
    refused = insert(database_url, msgspec.json.encode(bad), source="rest")
    assert cli(database_url, "--replay", str(refused)) == 1
    assert row(database_url, refused)["result"].startswith("still refused: invalid activity")
    capsys.readouterr()


def test_a_letter_of_the_events_stream_says_why_it_is_not_replayed(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An events-stream letter keeps the bare `data:` payload; decoded as a trade_updates
    frame it was refused for a missing `stream`, which said nothing useful. Its accounts
    are written by the stream's writer, so it is not replayed, and says what settles it."""
    data = json.loads(FILL_FRAME)["data"]
    payload = json.dumps({"account_id": ACCOUNT, "event_id": "01KAT" + "0" * 21,
                          **data}).encode()
    letter = insert(database_url, payload)
    assert cli(database_url, "--replay", str(letter)) == 1
    assert row(database_url, letter)["result"].startswith(
        "still refused: an event of a Broker API events stream")
    assert "reconcile --apply" in capsys.readouterr().out
    assert keys(database_url) == set()


def test_a_payload_still_refused_is_recorded_and_fails(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = json.loads(FILL_FRAME)
    msg["data"]["qty"] = "1E-20000"
    bad = json.dumps(msg).encode()
    letter = insert(database_url, bad)
    assert cli(database_url, "--replay", str(letter)) == 1
    assert "still refused: out of bounds" in capsys.readouterr().out
    assert row(database_url, letter)["result"].startswith("still refused: out of bounds")
    assert keys(database_url) == set()
    assert cli(database_url, "--replay", "999999") == 78  # no such dead letter


async def test_while_a_leader_holds_the_lock_the_command_asks_it(database_url: str) -> None:
    settings = Settings(database_url=database_url)
    letter = insert(database_url, FILL_FRAME)
    leader = PgStore(database_url)
    await leader.open()
    assert await leader.try_leadership(ACCOUNT)
    try:
        # Nobody answers: the row is marked, nothing is written beside the leader.
        with trio.fail_after(WAIT):
            report = await replay(settings, letter, wait=0.3)
        assert (report.how, report.outcome, report.stored) == ("queued", None, False)
        assert row(database_url, letter)["requested"] is not None
        assert keys(database_url) == set()

        # The leader replays what was asked, through its own store (supervisor.py does
        # this every few seconds), while the command waits for the answer.
        async def lead() -> None:
            await trio.sleep(0.3)
            pending = await leader.pending_replays(ACCOUNT, 10)
            assert [p.id for p in pending] == [letter]
            outcome = await replay_with(leader, pending[0], settings, datetime.now(UTC))
            assert outcome == "stored"

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lead)
                report = await replay(settings, letter, wait=10)
        assert (report.how, report.outcome, report.stored) == ("by the service", "stored", True)
        assert await leader.pending_replays(ACCOUNT, 10) == []
    finally:
        await leader.aclose()


class _Assets:
    """The broker's asset records: BTCUSD is a crypto pair."""

    async def asset(self, symbol: str) -> dict[str, Any] | None:
        return {"class": "crypto"} if symbol == "BTCUSD" else {"class": "us_equity"}


def _rest_letter(symbol: str) -> StoredDeadLetter:
    activity = {"id": "20261130100000000::btc", "activity_type": "FILL", "type": "fill",
                "order_id": "o-btc", "symbol": symbol, "side": "buy", "price": "50000",
                "qty": "0.5", "cum_qty": "0.5", "transaction_time": "2026-11-30T15:00:00Z",
                "order_status": "filled"}
    return StoredDeadLetter(1, "acct", datetime(2026, 11, 30, tzinfo=UTC), "refused",
                            json.dumps(activity).encode(), "rest")


async def test_a_replayed_rest_fill_of_a_crypto_pair_is_spelled_as_positions_are() -> None:
    """A FILL activity names the pair BTCUSD, positions BTC/USD: the replay spells it as
    backfill does, or, with no asset records to ask, leaves it a dead letter that says
    what would let it through. An equity needs no asking."""
    settings = Settings()
    now = datetime(2026, 11, 30, 16, tzinfo=UTC)
    letter = _rest_letter("BTCUSD")
    decoded = decode_letter(letter, settings, now)
    assert isinstance(decoded, Event) and decoded.symbol == "BTCUSD"
    spelled = await spelled_letter(letter, decoded, AssetBook(_Assets()))
    assert isinstance(spelled, Event) and spelled.symbol == "BTC/USD"
    unasked = await spelled_letter(letter, decoded, None)
    assert isinstance(unasked, DeadLetter) and "APCA_API_KEY_ID" in unasked.reason
    equity = _rest_letter("AAPL")
    plain = decode_letter(equity, settings, now)
    assert await spelled_letter(equity, plain, None) is plain
