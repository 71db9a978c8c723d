"""Hostile values end to end (hypothesis): well-formed trade updates carrying huge, tiny,
negative, non-ASCII, empty, far-future, far-past and NUL-holding values, mixed with valid
updates, through the real decoder and the real writer into the real PostgreSQL.

Whatever the values: every valid update is stored exactly once; every hostile one is
either stored as it was sent or kept in `dead_letters` with its frame; and the cursor is
never ahead of the wall clock (plus the tolerance)."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import psycopg
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stream_supervisor.backoff import BackoffPolicy
from stream_supervisor.bounds import not_after_ns
from stream_supervisor.events import DeadLetter, Event
from stream_supervisor.messages import Ack, Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.pgstore import PgStore
from stream_supervisor.protocol import decode_frame
from stream_supervisor.settings import DEFAULT_FUTURE_TOLERANCE
from stream_supervisor.state import SupervisorState
from stream_supervisor.writer import WriterSettings, writer_actor

NOW = datetime.now(UTC).replace(microsecond=0)
LIMIT_NS = not_after_ns(NOW, DEFAULT_FUTURE_TOLERANCE)


def stamp(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def template(event: str, order_id: str, cum: str, seconds_ago: float) -> dict[str, Any]:
    when = NOW - timedelta(seconds=seconds_ago)
    data: dict[str, Any] = {
        "event": event,
        "execution_id": str(uuid.uuid4()),
        "order": {
            "id": order_id, "client_order_id": "c-" + order_id, "symbol": "SYM",
            "side": "buy", "status": "partially_filled", "qty": "100", "filled_qty": cum,
            "filled_avg_price": "10.5" if event != "new" else None, "order_type": "limit",
            "type": "limit", "asset_class": "us_equity", "created_at": stamp(when),
        },
        "timestamp": stamp(when),
    }
    if event in ("fill", "partial_fill"):
        data.update(qty=cum, price="10.5", position_qty=cum)
    return {"stream": "trade_updates", "data": data}


TEXT_FIELDS = ("order.id", "order.symbol", "order.client_order_id", "order.status",
               "order.order_type", "order.asset_class", "event", "execution_id")
AMOUNT_FIELDS = ("qty", "price", "position_qty", "order.filled_qty", "order.qty",
                 "order.filled_avg_price")
TIME_FIELDS = ("timestamp", "order.created_at")

hostile_text = st.one_of(
    st.just(""),
    st.text(max_size=8),
    st.text(min_size=60, max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=100, max_size=3000),
    st.text(alphabet="\x00\x01\u0000\ufffd\U0001d518ab", max_size=200),
)
hostile_amount = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.decimals(min_value=-10**20, max_value=10**20, places=14).map(str),
    st.sampled_from(["1E-20000", "0E-20000", "1E+30", "-1E+15", "999999999999999.999999999999",
                     "1000000000000000", "0.0000000000001", "-0", "1e-28", "1E-29",
                     "123456789012.1234567890123456789012345678", "1." + "0" * 40,
                     # equal to 1, so within the bounds, but numeric cannot hold its
                     # 20,000 places: the writer's isolation is what catches this one
                     "1." + "0" * 20_000]),
    st.integers(min_value=-10**25, max_value=10**25).map(str),
)
hostile_time = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31),
                 timezones=st.just(UTC)).map(stamp),
    st.integers(min_value=-600, max_value=600).map(
        lambda s: stamp(NOW + timedelta(seconds=DEFAULT_FUTURE_TOLERANCE + s))),
    st.sampled_from(["2099-01-01T00:00:00Z", "1970-01-01T00:00:00Z",
                     "1999-12-31T23:59:59.999999999Z", "2000-01-01T00:00:00Z"]),
)


@st.composite
def hostile_frame(draw: st.DrawFn, n: int) -> bytes:
    event = draw(st.sampled_from(["fill", "partial_fill", "new", "canceled"]))
    msg = template(event, f"h{n}-{uuid.uuid4().hex[:8]}", "3", 5)
    # One to three fields replaced, so a refusal is usually about one value.
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["text", "amount", "time"]))
        path = draw(st.sampled_from({"text": TEXT_FIELDS, "amount": AMOUNT_FIELDS,
                                     "time": TIME_FIELDS}[kind]))
        value = draw({"text": hostile_text, "amount": hostile_amount,
                      "time": hostile_time}[kind])
        node = msg["data"]
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return json.dumps(msg).encode()


Fetched = tuple[set[str], list[tuple[str, bytes]], datetime | None, dict[str, tuple[Any, ...]]]


def _fetch(url: str, account: str) -> Fetched:
    with psycopg.connect(url, autocommit=True) as conn:
        orders = {r[0]: tuple(r[1:]) for r in conn.execute(
            "SELECT alpaca_order_id, symbol, client_order_id, filled_qty, filled_avg_price "
            "FROM broker_orders WHERE account_id = %s", [account])}
        keys = {r[0] for r in conn.execute(
            "SELECT event_key FROM alpaca_event_dedupe WHERE account_id = %s", [account])}
        letters = [(r[0], bytes(r[1])) for r in conn.execute(
            "SELECT reason, payload FROM dead_letters WHERE account_id = %s", [account])]
        row = conn.execute("SELECT fill_time FROM stream_cursors WHERE account_id = %s",
                           [account]).fetchone()
    return keys, letters, (row[0] if row else None), orders


def _stored(text: str) -> str:
    """How PostgreSQL keeps a text (pgstore maps NUL, which text cannot hold)."""
    return text.replace("\x00", "\ufffd")


async def _write(url: str, account: str, items: list[Item]) -> list[Ack]:
    store = PgStore(url, statement_timeout_ms=10_000)
    await store.open()
    try:
        assert await store.try_leadership(account)
        inbox_send, inbox_recv = trio.open_memory_channel[Item](len(items) + 1)
        ack_send, ack_recv = trio.open_memory_channel[Ack](len(items) + 1)
        for item in items:
            inbox_send.send_nowait(item)
        inbox_send.close()
        settings = WriterSettings(account_id=account, max_batch=len(items) + 1,
                                  retry=BackoffPolicy(initial=0.01, factor=2.0, cap=0.05))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(writer_actor, settings, store, inbox_recv, ack_send,
                                            Metrics(), SupervisorState(),
                                            rng=random.Random(1)))
        return [ack async for ack in ack_recv]
    finally:
        await store.aclose()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_values_are_stored_as_sent_or_dead_lettered(database_url: str,
                                                            data: st.DataObject) -> None:
    account = f"fuzz-{uuid.uuid4().hex[:12]}"
    # Event keys are unique across accounts, and hypothesis replays the same hostile ids
    # while it shrinks: each example starts from empty tables.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE alpaca_event_dedupe, broker_orders, active_positions, "
                     "stream_cursors, dead_letters")
    valid_msgs = [template(ev, f"v{i}-{uuid.uuid4().hex[:8]}", cum, 30 - i)
                  for i, (ev, cum) in enumerate(
                      data.draw(st.lists(st.sampled_from([("fill", "2"), ("new", "0"),
                                                          ("partial_fill", "1")]),
                                         min_size=1, max_size=6)))]
    valid = [json.dumps(m).encode() for m in valid_msgs]
    hostile = [data.draw(hostile_frame(i)) for i in range(data.draw(st.integers(1, 8)))]
    frames = valid + hostile
    data.draw(st.randoms(use_true_random=False)).shuffle(frames)
    decoded = {f: decode_frame(f, not_after_ns=LIMIT_NS) for f in frames}
    items: list[Item] = []
    for f in frames:
        item = decoded[f]
        assert isinstance(item, Event | DeadLetter)
        items.append(item)

    acks = trio.run(_write, database_url, account, items)
    keys, letters, cursor, orders = _fetch(database_url, account)
    owners = [i.order_id for i in items if isinstance(i, Event)]

    payloads = [p for _, p in letters]
    for f in valid:
        ev = decoded[f]
        assert isinstance(ev, Event), ev
        assert _stored(ev.key) in keys  # exactly once: the key is the primary key
    for f in hostile:
        item = decoded[f]
        assert isinstance(item, Event | DeadLetter)
        if isinstance(item, DeadLetter):
            event("hostile: refused by the decoder")
            assert (_stored(item.reason), f) in letters
        elif _stored(item.key) not in keys:
            # Stored unless the database refused it: then its frame is a dead letter.
            refused = [r for r, p in letters if p == f]
            assert refused and refused[0].startswith("refused by the database"), item
            assert item.key in acks[0].rejected
            event("hostile: refused by the database")
        else:
            event("hostile: stored")
            if item.is_fill and owners.count(item.order_id) == 1:
                # Stored as sent: the order row holds exactly the values of the frame.
                assert orders[_stored(item.order_id)] == (
                    _stored(item.symbol), None if item.client_order_id is None
                    else _stored(item.client_order_id), item.cum_qty, item.cum_avg_price)
    # Nothing else was stored, and nothing was dead-lettered twice.
    expected = {_stored(i.key) for i in items if isinstance(i, Event)}
    assert keys <= expected
    decoder_letters = sum(isinstance(i, DeadLetter) for i in items)
    assert len(letters) == decoder_letters + len(acks[0].rejected)
    assert all(payloads.count(f) <= 1 for f in hostile if hostile.count(f) == 1)
    assert cursor is None or cursor <= NOW + timedelta(seconds=DEFAULT_FUTURE_TOLERANCE)
