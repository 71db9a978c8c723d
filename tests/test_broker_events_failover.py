"""The Broker API's events stream (docs/design.md, section 11): after a database failover
that lost acknowledged commits, the events the new primary never had are read again from
its stream position, and must not be taken for duplicates by a dedupe cache that
remembers the lost primary's commits; and an event id the resume cursor could not be
moved to is refused."""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from stream_supervisor.broker_events import EventsSettings, EventsSupervisor
from stream_supervisor.errors import LostLeadership
from stream_supervisor.events import DeadLetter, Event
from stream_supervisor.eventstream import SseMessage
from stream_supervisor.pgstore import PgStore
from stream_supervisor.protocol import decode_broker_event
from stream_supervisor.store import Batch, BatchResult
from stream_supervisor.testing.memstore import MemoryDatabase, MemoryStore

from .fixtures import RECORDING

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ulid(ms: int, rnd: int) -> str:
    value = (ms << 80) | rnd
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in range(25, -1, -1))


def _fill_data() -> dict[str, Any]:
    lines = (RECORDING / "trade_updates.jsonl").read_bytes().splitlines()[2:]
    data: dict[str, Any] = json.loads(next(x for x in lines if b'"event":"fill"' in x))["data"]
    return data


def _event(n: int, account: str, template: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(template)
    data["execution_id"] = f"exec-{n}"
    data["order"]["id"] = f"order-{n}"
    data["order"]["client_order_id"] = f"c-{n}"
    data["account_id"] = account
    data["event_id"] = _ulid(int(time.time() * 1000) + n, random.getrandbits(80))
    return data


async def _until(ready: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not ready():
            await trio.sleep(0.02)


async def test_events_a_failover_lost_are_read_again_and_committed() -> None:
    template = _fill_data()
    published: list[dict[str, Any]] = []

    @asynccontextmanager
    async def connector(since_id: str | None) -> AsyncIterator[AsyncIterator[SseMessage]]:
        async def items() -> AsyncIterator[SseMessage]:
            sent = 0
            while True:
                while sent < len(published):
                    event = published[sent]
                    sent += 1
                    if since_id is None or event["event_id"] > since_id:
                        yield SseMessage(json.dumps(event).encode(), event["event_id"])
                await trio.sleep(0.02)
        yield items()

    primary = [MemoryDatabase()]
    fail_next = [False]

    class FailingOver(MemoryStore):
        async def commit_batch(self, batch: Batch) -> BatchResult:
            if fail_next[0]:
                fail_next[0] = False
                raise LostLeadership("the writer lock's connection died (a failover)")
            return await super().commit_batch(batch)

    def keys(db: MemoryDatabase) -> set[str]:
        return {k for account in db.accounts.values() for k in account.keys}

    sup = EventsSupervisor(EventsSettings(stream="partner", heartbeat_timeout=60), connector,
                           lambda: FailingOver(primary[0]), install_signal_handlers=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        published.append(_event(1, "A", template))
        await _until(lambda: primary[0].stream_positions.get("partner")
                     == published[0]["event_id"])
        standby = copy.deepcopy(primary[0])  # what the standby had when the primary died
        published.extend([_event(2, "A", template), _event(3, "B", template)])
        await _until(lambda: primary[0].stream_positions.get("partner")
                     == published[2]["event_id"])
        primary[0] = standby
        fail_next[0] = True
        published.append(_event(4, "B", template))
        await _until(lambda: standby.stream_positions.get("partner")
                     == published[3]["event_id"])
        sup.request_drain("test")
    assert {f"event:{e['event_id']}" for e in published} <= keys(standby)


def test_an_event_id_that_is_no_ulid_or_minted_in_the_future_is_a_dead_letter() -> None:
    """The event id is the stream's resume cursor, which only moves forward: one that is
    no ULID could not be resumed from, and one minted an hour ahead would skip every event
    after it on the next connection. Both are dead letters of their account."""
    template = _fill_data()
    now_ms = int(time.time() * 1000)
    not_after = (now_ms + 120_000) * 1_000_000

    def decoded(event_id: str) -> tuple[str | None, Event | DeadLetter]:
        event = {**_event(1, "A", template), "event_id": event_id}
        return decode_broker_event(json.dumps(event).encode(), not_after_ns=not_after)

    fine = _ulid(now_ms, 7)
    assert isinstance(decoded(fine)[1], Event)
    assert isinstance(decoded(fine.lower())[1], Event)
    for bad, why in [("not-a-ulid-at-all-0123456U", "not a ULID"),
                     (fine[:-1], "not a ULID"),
                     (_ulid(now_ms + 3_600_000, 7), "minted in the future")]:
        account, letter = decoded(bad)
        assert account == "A" and isinstance(letter, DeadLetter) and why in letter.reason


async def test_an_account_id_postgresql_cannot_hold_is_a_letter_of_the_stream(
        database_url: str) -> None:
    """An event whose account_id holds a NUL: filed under it, both its update and its
    dead letter were refused by PostgreSQL, and the writer stopped for every account on
    the stream (each restart read it again). It is a letter of the stream itself (no
    account), stored, and the stream goes on; so are an empty one and one with `|`."""
    template = _fill_data()
    fine = _ulid(int(time.time() * 1000), 3)
    for bad in ["acct\u0000", "", "a|b", "acct\n"]:
        event = {**_event(1, "A", template), "account_id": bad, "event_id": fine}
        account, letter = decode_broker_event(json.dumps(event).encode())
        assert account is None and isinstance(letter, DeadLetter)
        assert "invalid account_id" in letter.reason
    store = PgStore(database_url)
    await store.open()
    try:
        assert await store.try_leadership("events:partner")
        event = {**_event(1, "A", template), "account_id": "acct\u0000", "event_id": fine}
        _, letter = decode_broker_event(json.dumps(event).encode())
        assert isinstance(letter, DeadLetter)
        await store.commit_batch(Batch("events:partner", [], dead_letters=[letter]))
        [stored] = (await store.snapshot("events:partner")).dead_letters
        assert stored.payload == json.dumps(event).encode()
    finally:
        await store.aclose()
