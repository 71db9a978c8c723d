"""A simulated Broker API partner: the trade events of many simulated accounts on one
Server-Sent Events stream, `GET /v2/events/trades` (docs/design.md, section 11).

The partner watches each account's market and appends every update, with the account's
id and a ULID `event_id`, to one log; `since_id` replays the log after an id, then the
stream goes live. Like Alpaca's, ids of one millisecond are not in log order (their
random part is random), so a client resuming from its last id can miss events it never
saw: it must resume from a little before. Faults: disconnects, slow-reader drops (events
skipped, announced by a `: you are reading too slowly, dropped N messages` comment),
history sent twice, silence (no heartbeats). Busts and corrections of fills are added to
the log and to the partner's truth of the account (`ground_truth`).
"""

from __future__ import annotations

import base64
import copy
import random
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import h11
import structlog
import trio

from .simulated import SimulatedBroker
from .wire import decimal_text, dumps

log = structlog.get_logger("stream_supervisor.testing.broker.partner")

EVENTS_PATH: Final = "/v2/events/trades"
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
HEARTBEAT: Final = b":heartbeat\n\n"


def ulid(ms: int, rand: int) -> str:
    """A ULID: 48 bits of milliseconds, 80 random bits, Crockford base32 (26 chars)."""
    value = (ms << 80) | rand
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in range(25, -1, -1))


def ulid_ms(text: str) -> int:
    value = 0
    for ch in text.upper():
        value = value * 32 + _CROCKFORD.index(ch)
    return value >> 80


@dataclass(frozen=True)
class PartnerChaos:
    disconnect_every: int = 0
    """Close the stream after every this many new events, counted over the log: events
    sent again to a client resuming from before its position do not count, or a client
    whose overlap is longer than the interval would never get past it (0 = never)."""
    drop_prob: float = 0.0
    """Before an event, skip it and the next few (`drop_max` at most) with this probability,
    and say so in a comment, as Alpaca does with a slow reader."""
    drop_max: int = 5
    replay_prob: float = 0.0
    """After an event, send up to `replay_max` earlier events again with this probability."""
    replay_max: int = 5
    bust_prob: float = 0.0
    """After an order's final fill, bust it with this probability..."""
    correct_prob: float = 0.0
    """...or correct its price."""
    heartbeat_every: float = 0.5
    silent_every: int = 0
    """After every this many new events, stop sending anything on that connection, not
    even heartbeats (0 = never): a dead connection only the client's deadline notices."""


class PartnerFeed:
    """The partner's log of events over `brokers`, and its server."""

    def __init__(self, brokers: list[SimulatedBroker], *, key_id: str = "PARTNERKEY",
                 secret_key: str = "PARTNERSECRET", chaos: PartnerChaos | None = None,
                 seed: int = 1) -> None:
        self.brokers = {b.account_id: b for b in brokers}
        self.key_id = key_id
        self.secret_key = secret_key
        self.chaos = chaos or PartnerChaos()
        self._rng = random.Random(f"{seed}/partner")
        self.ids: list[str] = []
        self.frames: list[bytes] = []
        self._seen = dict.fromkeys(self.brokers, 0)
        self._fresh = 0
        self._high = 0  # log index past every event ever sent: beyond it, events are new
        self._ms = 0
        self._grew = trio.Event()
        # account -> order id -> (filled_qty, avg) after busts/corrections; symbol deltas
        self._orders: dict[str, dict[str, tuple[Decimal, Decimal | None]]] = {
            a: {} for a in self.brokers}
        self._positions: dict[str, dict[str, Decimal]] = {a: {} for a in self.brokers}
        self.stats = {"connections": 0, "events_sent": 0, "dropped": 0, "replayed": 0,
                      "busts": 0, "corrections": 0, "disconnects": 0, "auth_failed": 0,
                      "silenced": 0}

    # --- the log

    def _next_id(self, ms: int) -> str:
        self._ms = max(self._ms, ms)
        return ulid(self._ms, self._rng.getrandbits(80))

    def _append(self, account: str, data: dict[str, Any], ms: int) -> None:
        event_id = self._next_id(ms)
        body = {**data, "account_id": account, "event_id": event_id}
        self.ids.append(event_id)
        self.frames.append(dumps(body))

    async def run(self, *, poll: float = 0.005) -> None:
        """Follow every account's market until cancelled."""
        while True:
            grew = False
            for account, broker in self.brokers.items():
                start, end = self._seen[account], broker.updates_total
                for index in range(start, end):
                    self._publish(account, broker, broker.update(index))
                    grew = True
                self._seen[account] = end
            if grew:
                self._grew.set()
                self._grew = trio.Event()
            await trio.sleep(poll)

    def _publish(self, account: str, broker: SimulatedBroker, data: dict[str, Any]) -> None:
        ms = broker.market.now_ns // 1_000_000
        order = data["order"]
        adjusted = self._orders[account].get(order["id"])
        if adjusted is not None:  # a later update of an order we revised: its figures
            order = {**order, "filled_qty": decimal_text(adjusted[0]),
                     "filled_avg_price": (decimal_text(adjusted[1])
                                          if adjusted[1] is not None else None)}
            data = {**data, "order": order}
        self._append(account, data, ms)
        if data["event"] != "fill":
            return
        roll = self._rng.random()
        if roll < self.chaos.bust_prob:
            self._revise(account, data, ms, bust=True)
        elif roll < self.chaos.bust_prob + self.chaos.correct_prob:
            self._revise(account, data, ms, bust=False)

    def _revise(self, account: str, fill: dict[str, Any], ms: int, *, bust: bool) -> None:
        order = fill["order"]
        cum, avg = Decimal(order["filled_qty"]), Decimal(order["filled_avg_price"])
        qty, price = Decimal(fill["qty"]), Decimal(fill["price"])
        sign = 1 if order["side"] == "buy" else -1
        if bust:
            new_cum = cum - qty
            new_avg = (cum * avg - qty * price) / new_cum if new_cum else None
            moved = -qty * sign
            event, fill_qty, fill_price = "trade_bust", -qty, price
            self.stats["busts"] += 1
        else:
            new_price = price + Decimal("0.05")
            new_cum, new_avg = cum, (cum * avg - qty * price + qty * new_price) / cum
            moved = Decimal(0)
            event, fill_qty, fill_price = "trade_correct", qty, new_price
            self.stats["corrections"] += 1
        self._orders[account][order["id"]] = (new_cum, new_avg)
        positions = self._positions[account]
        positions[order["symbol"]] = positions.get(order["symbol"], Decimal(0)) + moved
        revised = {**order, "filled_qty": decimal_text(new_cum),
                   "filled_avg_price": decimal_text(new_avg) if new_avg is not None else None}
        data = {"event": event, "execution_id": f"x-{self._rng.getrandbits(64):016x}",
                "previous_execution_id": fill["execution_id"], "order": revised,
                "timestamp": fill["timestamp"], "qty": decimal_text(fill_qty),
                "price": decimal_text(fill_price)}
        # A revision comes a moment after its fill (its own time, later than the fill's).
        data["timestamp"] = _later(fill["timestamp"])
        self._append(account, data, ms + 1)

    def ground_truth(self, account: str) -> dict[str, Any]:
        """The account's broker truth with this partner's busts and corrections in it."""
        truth = copy.deepcopy(self.brokers[account].ground_truth())
        for order_id, (cum, avg) in self._orders[account].items():
            order = truth["orders"][order_id]
            order["filled_qty"] = decimal_text(cum)
            order["filled_avg_price"] = decimal_text(avg) if avg is not None else None
            order["fills"] = []  # fill keys are not this source's keys
        for symbol, moved in self._positions[account].items():
            pos = truth["positions"].setdefault(symbol, {"qty": "0"})
            pos["qty"] = decimal_text(Decimal(pos["qty"]) + moved)
        return truth

    # --- serving

    def events_after(self, since_id: str | None) -> int:
        """Index of the first event sorting after `since_id` in log order: the first whose
        id is greater, as the broker compares ids (so same-millisecond ids that sort lower
        are skipped: the client's overlap covers them)."""
        if since_id is None:
            return 0
        for i, event_id in enumerate(self.ids):
            if event_id > since_id:
                return i
        return len(self.ids)

    async def serve(self, *, host: str = "127.0.0.1",
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=host)
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.run)
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(f"http://{host}:{port}")

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            with trio.move_on_after(10):
                request = await _read_request(conn, stream)
            if request is None:
                return
            await self._answer(conn, stream, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream,
                      request: h11.Request) -> None:
        target = urlsplit(request.target.decode())
        if target.path != EVENTS_PATH:
            await _reply(conn, stream, 404, b'{"message":"not found"}')
            return
        if dict(request.headers).get(b"authorization") != _basic(self.key_id, self.secret_key):
            self.stats["auth_failed"] += 1
            await _reply(conn, stream, 401, b'{"message":"unauthorized"}')
            return
        query = parse_qs(target.query)
        since = query.get("since_id", [None])[0]
        self.stats["connections"] += 1
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            (b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")])) or b"")
        chaos, rng = self.chaos, self._rng
        index = self.events_after(since)
        last_beat = trio.current_time()
        while True:
            if index >= len(self.ids):
                with trio.move_on_after(max(0.0, chaos.heartbeat_every
                                            - (trio.current_time() - last_beat))):
                    await self._grew.wait()
                if index >= len(self.ids):
                    await stream.send_all(conn.send(h11.Data(data=HEARTBEAT)) or b"")
                    last_beat = trio.current_time()
                continue
            fresh = index >= self._high
            if fresh and chaos.drop_prob and rng.random() < chaos.drop_prob:
                n = min(rng.randint(1, chaos.drop_max), len(self.ids) - index)
                index += n
                self._high = max(self._high, index)
                self.stats["dropped"] += n
                note = f": you are reading too slowly, dropped {n} messages\n\n".encode()
                await stream.send_all(conn.send(h11.Data(data=note)) or b"")
                continue
            chunk = b"data: " + self.frames[index] + b"\n\n"
            if chaos.replay_prob and rng.random() < chaos.replay_prob and index:
                back = rng.randint(1, min(chaos.replay_max, index))
                for j in range(index - back, index):
                    chunk += b"data: " + self.frames[j] + b"\n\n"
                self.stats["replayed"] += back
            await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
            index += 1
            self._high = max(self._high, index)
            self.stats["events_sent"] += 1
            if fresh:
                self._fresh += 1
                if chaos.silent_every and self._fresh % chaos.silent_every == 0:
                    self.stats["silenced"] += 1
                    await trio.sleep_forever()
                if chaos.disconnect_every and self._fresh % chaos.disconnect_every == 0:
                    self.stats["disconnects"] += 1
                    return
            if chaos.heartbeat_every and trio.current_time() - last_beat > chaos.heartbeat_every:
                await stream.send_all(conn.send(h11.Data(data=HEARTBEAT)) or b"")
                last_beat = trio.current_time()


def _later(stamp: str) -> str:
    """An RFC 3339 time one millisecond after `stamp` (which has a fraction and a Z or
    an offset): a revision is stamped after the fill it revises."""
    from stream_supervisor.events import parse_timestamp

    from .wire import rfc3339_ns

    _, ns = parse_timestamp(stamp)
    return rfc3339_ns(ns + 1_000_000, eastern=False)


def _basic(key: str, secret: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{key}:{secret}".encode())


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            if not data:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _reply(conn: h11.Connection, stream: trio.SocketStream, status: int,
                 body: bytes) -> None:
    out = conn.send(h11.Response(status_code=status, headers=[
        (b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close")])) or b""
    out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


__all__ = ["EVENTS_PATH", "PartnerChaos", "PartnerFeed", "ulid", "ulid_ms"]
