"""Issue 13 end to end: the real `python -m stream_supervisor run` process, a real socket
(the replay server), the REST stub over HTTP and the test's PostgreSQL. Each scenario
sends valid updates with bad ones among them; each ends with the valid ones stored once,
the bad ones in `dead_letters` with the decoder's or the database's reason, the cursor
no later than the wall clock, one connection (no restart loop) and exit 0 on SIGTERM.
The last one is the loop the database never ends: counted crashes, then exit 1."""

from __future__ import annotations

import json
import os
import random
import string
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import trio

from stream_supervisor.events import Event, format_timestamp
from stream_supervisor.protocol import activity_from_json, decode_frame

from ..chaos.harness import SupervisorProcess
from .replay import KEY_ID, SECRET_KEY, ReplayServer, Script
from .rest_stub import RestStub

pytestmark = pytest.mark.slow

ACCOUNT = "acct-bad-values"
WAIT = 60.0


def stamp(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def noise(n: int, seed: int) -> str:
    """Text PostgreSQL cannot compress into an index entry."""
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_letters + string.digits, k=n))


def update(event: str, order_id: str, *, symbol: str = "AAPL", cum: str = "0",
           qty: str | None = None, price: str | None = None, ts: datetime | None = None,
           side: str = "buy") -> dict[str, Any]:
    """A trade update as the broker sends it (the fields the decoder reads)."""
    when = ts or datetime.now(UTC) - timedelta(seconds=30)
    data: dict[str, Any] = {
        "event": event,
        "execution_id": str(uuid.uuid4()),
        "order": {
            "id": order_id, "client_order_id": f"c-{order_id[:40]}", "symbol": symbol,
            "side": side, "status": "filled" if event == "fill" else "new",
            "qty": cum if event == "fill" else "5", "filled_qty": cum,
            "filled_avg_price": price if event == "fill" else None,
            "order_type": "market", "type": "market", "asset_class": "us_equity",
            "created_at": stamp(when - timedelta(seconds=1)), "updated_at": stamp(when),
        },
        "timestamp": stamp(when),
    }
    if event == "fill":
        data.update(qty=qty or cum, price=price, position_qty=qty or cum)
    return {"stream": "trade_updates", "data": data}


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode()


def activity(order_id: str, cum: str, price: str, ts: datetime, *,
             symbol: str = "MSFT") -> dict[str, Any]:
    return {
        "id": f"{ts.strftime('%Y%m%d%H%M%S%f')[:17]}::{uuid.uuid4()}",
        "activity_type": "FILL", "transaction_time": format_timestamp(ts), "type": "fill",
        "price": price, "qty": cum, "side": "buy", "symbol": symbol, "leaves_qty": "0",
        "order_id": order_id, "cum_qty": cum, "order_status": "filled",
    }


def sql(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description is not None else []


def stored_keys(url: str) -> set[str]:
    return {r[0] for r in sql(url, "SELECT event_key FROM alpaca_event_dedupe")}


def dead_letters(url: str) -> list[tuple[str, bytes, str]]:
    return [(r[0], bytes(r[1]), r[2])
            for r in sql(url, "SELECT reason, payload, source FROM dead_letters ORDER BY id")]


def cursor(url: str) -> datetime | None:
    found = sql(url, "SELECT fill_time FROM stream_cursors WHERE account_id = %s", ACCOUNT)
    return found[0][0] if found else None


@dataclass
class Service:
    server: ReplayServer
    rest: RestStub
    process: SupervisorProcess
    url: str

    async def wait_until(self, keys: set[str], letters: int, *, timeout: float = WAIT) -> None:
        """Until every key in `keys` is stored and `letters` dead letters are kept."""
        with trio.fail_after(timeout):
            while True:
                if self.process.returncode is not None:
                    raise AssertionError(f"the service exited ({self.process.returncode}):\n"
                                         + self.process.tail())
                have = await trio.to_thread.run_sync(stored_keys, self.url)
                kept = await trio.to_thread.run_sync(dead_letters, self.url)
                if keys <= have and len(kept) >= letters:
                    return
                await trio.sleep(0.1)

    async def drain(self) -> int:
        self.process.terminate()
        return await self.process.wait(timeout=20)

    def events(self) -> list[str]:
        return [e["event"] for e in self.process.events()]

    def assert_no_restart_loop(self) -> None:
        events = self.events()
        for bad in ("pipeline_crashed", "pipeline_restarting", "leadership_lost",
                    "batch_keeps_failing", "pipeline_store_error"):
            assert bad not in events, (bad, self.process.tail())
        assert self.server.connections == 1, self.process.tail()
        assert "another replica" not in "\n".join(self.process.stdout)


@asynccontextmanager
async def service(database_url: str, frames: Sequence[bytes],
                  activities: Sequence[dict[str, Any]] = (), *,
                  positions: Sequence[dict[str, Any]] = (),
                  answers: Mapping[str, tuple[int, bytes]] | None = None,
                  **env: str) -> AsyncIterator[Service]:
    server = ReplayServer(Script(frames))
    rest = RestStub(ACCOUNT, activities)
    rest.positions = list(positions)
    rest.answers.update(answers or {})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await nursery.start(rest.serve)
        environment = {k: v for k, v in os.environ.items()
                       if not k.startswith(("APCA_", "STREAM_SUPERVISOR_"))
                       and k != "DATABASE_URL"}
        environment.update({
            "APCA_API_KEY_ID": KEY_ID, "APCA_API_SECRET_KEY": SECRET_KEY,
            "APCA_API_BASE_URL": rest.url, "APCA_API_STREAM_URL": server.url,
            "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1",
            "STREAM_SUPERVISOR_ACCOUNT_ID": ACCOUNT,
            "STREAM_SUPERVISOR_LOG_FORMAT": "json", "STREAM_SUPERVISOR_LOG_LEVEL": "info",
            "STREAM_SUPERVISOR_FIRST_START_LOOKBACK": "3600",
            "STREAM_SUPERVISOR_ORDER_REFRESH_INTERVAL": "0",
            "STREAM_SUPERVISOR_BACKOFF_INITIAL": "0.05", "STREAM_SUPERVISOR_BACKOFF_CAP": "0.5",
            "STREAM_SUPERVISOR_PING_INTERVAL": "2", "STREAM_SUPERVISOR_PING_TIMEOUT": "2",
            "STREAM_SUPERVISOR_DRAIN_TIMEOUT": "10",
            # The stub's activities are fills of an account it says is flat: a baseline
            # would rightly trust "flat" (tests/integration/test_real_accounts_service.py
            # runs this harness with one, and positions to match).
            "STREAM_SUPERVISOR_BASELINE": "off",
        })
        environment.update(env)
        async with SupervisorProcess(environment, nursery) as process:
            yield Service(server, rest, process, database_url)
        nursery.cancel_scope.cancel()


def fill_key(order_id: str, cum: str) -> str:
    return f"fill:{order_id}:{cum}"


def new_key(msg: dict[str, Any]) -> str:
    frame = decode_frame(encode(msg))
    assert isinstance(frame, Event), frame
    return frame.key


async def test_values_the_database_refuses_no_longer_poison_the_batch(database_url: str) -> None:
    """Observation 1: a 3,000-character order id, a 3,000-character symbol and a quantity
    of 1E-20000 made the whole batch fail for ever, the valid `new` beside them was never
    stored, and the log blamed another replica. Now the decoder refuses them at the edge;
    and a value within the bounds that the database still refuses (here a CHECK the test
    adds) is isolated by the writer, its neighbours committed."""
    sql(database_url, "ALTER TABLE broker_orders ADD CONSTRAINT test_refuses_poison "
                      "CHECK (symbol <> 'POISON')")
    good_new = update("new", "good-new")
    good_fill = update("fill", "good-fill", cum="3", price="101.5")
    bad = [
        update("new", noise(3000, 1)),
        update("new", "long-symbol", symbol=noise(3000, 2)),
        update("fill", "tiny-qty", cum="1E-20000", price="10"),
    ]
    refused_by_db = update("fill", "db-refused", symbol="POISON", cum="1", price="5")
    frames = [encode(m) for m in (good_new, *bad, refused_by_db, good_fill)]
    async with service(database_url, frames) as svc:
        await svc.wait_until({new_key(good_new), fill_key("good-fill", "3")}, 4)
        code = await svc.drain()
    assert code == 0, svc.process.tail()
    assert stored_keys(database_url) == {new_key(good_new), fill_key("good-fill", "3")}
    kept = dead_letters(database_url)
    reasons = [r for r, _, _ in kept]
    assert sum(r.startswith("out of bounds: ") for r in reasons) == 3, reasons
    assert any("order.id is 3000 characters" in r for r in reasons)
    assert any("order.symbol is 3000 characters" in r for r in reasons)
    assert any("decimal places" in r for r in reasons)
    refused = [(r, p) for r, p, _ in kept if r.startswith("refused by the database")]
    assert len(refused) == 1 and "[23514]" in refused[0][0] and "test_refuses_poison" in refused[0][0]
    assert refused[0][1] == encode(refused_by_db)  # verbatim
    assert {p for _, p, _ in kept} == {encode(m) for m in (*bad, refused_by_db)}
    svc.assert_no_restart_loop()
    assert "update_refused" in svc.events() and "batch_refused" in svc.events()
    found = cursor(database_url)
    assert found is not None and found <= datetime.now(UTC)


async def test_a_bad_fill_activity_from_rest_is_dead_lettered_and_ingestion_goes_on(
    database_url: str,
) -> None:
    """Observation 2: the same bad quantity in one FILL activity made every reconnect's
    backfill fail its batch: 7 connections in 15 s, nothing committed, no crash counted,
    for ever. Now the activity is dead-lettered as its JSON and everything else lands."""
    now = datetime.now(UTC)
    good = activity("rest-good", "2", "50", now - timedelta(minutes=10))
    bad = activity("rest-bad", "1E-20000", "50", now - timedelta(minutes=9))
    # And one no struct can hold: it used to fail its whole page, hence every backfill.
    shapeless = {**activity("rest-shapeless", "1", "50", now - timedelta(minutes=8)),
                 "qty": "abc"}
    live = update("fill", "live-fill", cum="4", price="20")
    async with service(database_url, [encode(live)], [good, bad, shapeless]) as svc:
        await svc.wait_until({fill_key("rest-good", "2"), fill_key("live-fill", "4")}, 2)
        await trio.sleep(1.0)  # nothing else may come: no reconnect, no third letter
        code = await svc.drain()
    assert code == 0, svc.process.tail()
    assert stored_keys(database_url) == {fill_key("rest-good", "2"), fill_key("live-fill", "4")}
    [(reason, payload, source), (other, verbatim, _)] = dead_letters(database_url)
    assert "Invalid decimal string" in other and json.loads(verbatim) == shapeless
    assert source == "rest" and "qty has more than 12 decimal places" in reason
    # Its JSON, which decodes back to the activity the broker sent.
    assert activity_from_json(payload).order_id == "rest-bad"
    assert str(activity_from_json(payload).qty) == "1E-20000"
    svc.assert_no_restart_loop()
    assert svc.events().count("backfill_started") == 1


async def test_one_malformed_order_or_non_trade_activity_does_not_stop_recovery(
    database_url: str,
) -> None:
    """One open order with `filled_qty: ""` failed the whole orders list, so every
    backfill failed: a reconnect loop, never streaming. One non-trade activity with
    `qty: "abc"` failed its whole page: no later fee, split or expiry was ever applied.
    Now the order is skipped (said in the log) and the activity is dead-lettered as its
    JSON; the rest of both lists lands, on one connection."""
    now = datetime.now(UTC)
    when = stamp(now - timedelta(minutes=5))
    order = {"id": "open-1", "client_order_id": "c1", "symbol": "AAPL", "side": "buy",
             "status": "new", "qty": "5", "filled_qty": "0", "filled_avg_price": None,
             "order_type": "limit", "type": "limit", "asset_class": "us_equity",
             "created_at": when, "updated_at": when}
    bad_order = {**order, "id": "open-bad", "filled_qty": ""}
    day = (now - timedelta(hours=2)).strftime("%Y%m%d%H%M%S%f")[:17]
    good = {"id": f"{day}::good", "activity_type": "REORG", "symbol": "AAPL", "qty": "1",
            "transaction_time": stamp(now - timedelta(hours=2))}
    bad = {"id": f"{day}::bad", "activity_type": "CFEE", "symbol": "BTCUSD", "qty": "abc",
           "date": (now - timedelta(hours=2)).date().isoformat()}
    async with service(database_url, []) as svc:
        svc.rest.orders = [order, bad_order]
        svc.rest.nontrade = [bad, good]
        with trio.fail_after(WAIT):
            while not sql(database_url, "SELECT 1 FROM account_activities"):
                assert svc.process.returncode is None, svc.process.tail()
                await trio.sleep(0.1)
        await svc.wait_until(set(), 1)
        await trio.sleep(1.0)  # nothing else may come: no reconnect, no second letter
        code = await svc.drain()
    assert code == 0, svc.process.tail()
    assert sql(database_url, "SELECT activity_id, outcome FROM account_activities") == [
        (good["id"], "not understood")]
    [(reason, payload, source)] = dead_letters(database_url)
    assert source == "rest" and json.loads(payload) == bad
    assert reason.startswith(f"invalid activity {bad['id']}: ") and "decimal" in reason
    assert [k for k in stored_keys(database_url) if k.startswith("refresh:")] == [
        k for k in stored_keys(database_url) if k.startswith("refresh:open-1:")] != []
    skipped = [e for e in svc.process.events() if e["event"] == "order_undecodable"]
    assert skipped and "'open-bad'" in skipped[0]["problem"]
    svc.assert_no_restart_loop()
    assert svc.events().count("backfill_started") == 1


@pytest.mark.parametrize("body", [b"<html>down for maintenance</html>", b'{"id": null}'],
                         ids=["html", "null-id"])
async def test_an_account_lookup_answered_with_no_account_is_waited_out(
    database_url: str, body: bytes,
) -> None:
    """A maintenance page on GET /v2/account at start was a traceback and exit 1; an id
    of null ran the service as account "None". Both are the broker not answering: the
    service waits (`broker_unavailable`) and starts once the account comes."""
    async with service(database_url, [], STREAM_SUPERVISOR_ACCOUNT_ID="",
                       answers={"/v2/account": (200, body)}) as svc:
        with trio.fail_after(WAIT):
            while svc.events().count("broker_unavailable") < 2:
                assert svc.process.returncode is None, svc.process.tail()
                await trio.sleep(0.1)
            assert svc.server.connections == 0
            del svc.rest.answers["/v2/account"]
            while svc.server.connections == 0:
                assert svc.process.returncode is None, svc.process.tail()
                await trio.sleep(0.1)
        code = await svc.drain()
    assert code == 0, svc.process.tail()
    unavailable = [e for e in svc.process.events() if e["event"] == "broker_unavailable"]
    assert "/v2/account" in unavailable[0]["error"]
    assert {a for (a,) in sql(database_url, "SELECT account_id FROM stream_cursors")} <= {
        ACCOUNT}
    svc.assert_no_restart_loop()


async def test_a_fill_stamped_in_the_future_never_moves_the_cursor(database_url: str) -> None:
    """Observation 3: a fill stamped 2099 moved the cursor to 2099, and every later
    reconnect backfilled only after 2099 minus the overlap. Now it is dead-lettered, and
    a reconnect backfills from the real cursor."""
    now = datetime.now(UTC)
    future = update("fill", "from-2099", cum="1", price="10", ts=datetime(2099, 1, 1, tzinfo=UTC))
    ahead = update("fill", "ten-minutes-ahead", cum="1", price="10", ts=now + timedelta(minutes=10))
    first = update("fill", "before", cum="1", price="10", ts=now - timedelta(seconds=40))
    after = update("fill", "after", cum="1", price="10", ts=now - timedelta(seconds=20))
    frames = [encode(m) for m in (first, future, ahead, after)]
    async with service(database_url, frames) as svc:
        await svc.wait_until({fill_key("before", "1"), fill_key("after", "1")}, 2)
        code = await svc.drain()
    assert code == 0, svc.process.tail()
    reasons = [r for r, _, _ in dead_letters(database_url)]
    assert len(reasons) == 2 and all("timestamp is in the future" in r for r in reasons)
    found = cursor(database_url)
    assert found is not None and found <= datetime.now(UTC)
    assert abs(found - (now - timedelta(seconds=20))) < timedelta(seconds=1)
    svc.assert_no_restart_loop()

    # The next start backfills from that cursor minus the overlap, not from 2099.
    async with service(database_url, []) as svc:
        with trio.fail_after(WAIT):
            while "backfill_done" not in svc.events():
                await trio.sleep(0.1)
        code = await svc.drain()
    started = next(e for e in svc.process.events() if e["event"] == "backfill_started")
    assert started["after"] == format_timestamp(found - timedelta(seconds=300))
    assert code == 0


async def test_frames_over_the_limit_are_dead_lettered_without_a_reconnect(
    database_url: str,
) -> None:
    """Observation 4: a frame over the transport's fixed 16 MiB dropped the connection
    instead of being dead-lettered. Now the transport cuts whatever is over the frame
    limit and the decoder dead-letters it; the connection stays."""
    before = update("new", "before-big")
    after = update("fill", "after-big", cum="1", price="3")
    big = b'{"stream":"trade_updates","data":' + b" " * 200_000 + b"null}"
    huge = b'{"stream":"trade_updates","data":"' + b"x" * (17 * 1024 * 1024) + b'"}'
    frames = [encode(before), big, huge, encode(after)]
    async with service(database_url, frames,
                       STREAM_SUPERVISOR_MAX_FRAME_BYTES="50000") as svc:
        await svc.wait_until({new_key(before), fill_key("after-big", "1")}, 2, timeout=90)
        code = await svc.drain()
    assert code == 0, svc.process.tail()
    kept = dead_letters(database_url)
    # The transport kept limit + 1 bytes of each (the rest never reached memory).
    assert [r for r, _, _ in kept] == ["oversized frame: at least 50001 bytes > limit 50000"] * 2
    assert [p for _, p, _ in kept] == [big[:50_001], huge[:50_001]]
    svc.assert_no_restart_loop()


async def test_a_frame_limit_the_transport_cannot_honour_is_a_configuration_error(
    database_url: str,
) -> None:
    async with service(database_url, [],
                       STREAM_SUPERVISOR_MAX_FRAME_BYTES=str(17 * 1024 * 1024)) as svc:
        code = await svc.process.wait(timeout=WAIT)
    assert code == 78
    assert "STREAM_SUPERVISOR_MAX_FRAME_BYTES" in "\n".join(svc.process.stderr)


_REFUSE_ORDER = """
CREATE FUNCTION test_refuse_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.alpaca_order_id = 'never-stored' THEN
        RAISE EXCEPTION 'this order is refused by a trigger';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_refuse_order BEFORE INSERT OR UPDATE ON broker_orders
    FOR EACH ROW EXECUTE FUNCTION test_refuse_order();
"""


async def test_a_refusal_that_never_ends_is_counted_and_the_process_exits_1(
    database_url: str,
) -> None:
    """The same refusal of the same batch, again on every start (the activity comes
    back with each backfill): each time a counted crash, then past the restart limit
    exit 1, so systemd or ECS see it, instead of a process that neither works nor
    exits."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_REFUSE_ORDER)
    now = datetime.now(UTC)
    refused = activity("never-stored", "1", "10", now - timedelta(minutes=5))
    async with service(database_url, [], [refused], STREAM_SUPERVISOR_RESTART_LIMIT="2",
                       STREAM_SUPERVISOR_RESTART_WINDOW="600") as svc:
        code = await svc.process.wait(timeout=90)
    events = svc.events()
    assert code == 1, svc.process.tail()
    assert events.count("batch_keeps_failing") == 3
    assert events.count("pipeline_crashed") == 3
    assert "restart_intensity_exceeded" in events
    crashed = [e for e in svc.process.events() if e["event"] == "pipeline_crashed"]
    assert all("this order is refused by a trigger" in e["error"] for e in crashed)
    assert "another replica" not in "\n".join(svc.process.stdout)
    assert stored_keys(database_url) == set()


async def test_a_replay_asked_while_the_service_runs_goes_through_its_leader(
    database_url: str,
) -> None:
    """`dead-letters --replay` never writes beside a running leader: the service holds the
    writer lock, so the command marks the row and the leader replays it."""
    fixed = update("fill", "replayed-later", cum="2", price="7")
    async with service(database_url, []) as svc:
        with trio.fail_after(WAIT):
            while "backfill_done" not in svc.events():
                await trio.sleep(0.1)
        letter = sql(database_url, "INSERT INTO dead_letters (account_id, reason, payload, "
                                   "source) VALUES (%s, 'refused by an older build', %s, "
                                   "'stream') RETURNING id", ACCOUNT, encode(fixed))[0][0]
        env = {**svc.process.env, "STREAM_SUPERVISOR_LOG_LEVEL": "error"}
        result = await trio.run_process(
            [sys.executable, "-m", "stream_supervisor", "dead-letters", "--replay",
             str(letter), "--json"], env=env, capture_stdout=True, capture_stderr=True,
            check=False)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"id": letter, "how": "by the service",
                                             "outcome": "stored", "stored": True}
        again = await trio.run_process(
            [sys.executable, "-m", "stream_supervisor", "dead-letters", "--replay",
             str(letter), "--json"], env=env, capture_stdout=True, capture_stderr=True,
            check=False)
        assert json.loads(again.stdout)["outcome"] == "already stored"
        code = await svc.drain()
    assert code == 0
    assert stored_keys(database_url) == {fill_key("replayed-later", "2")}
    replayed = [e for e in svc.process.events() if e["event"] == "dead_letter_replayed"]
    assert [(e["id"], e["outcome"], e["by"]) for e in replayed] == [
        (letter, "stored", "service"), (letter, "already stored", "service")]
    svc.assert_no_restart_loop()
