"""Stream sessions (`sessions.py`, `feeds.py`) over an in-memory transport: injected and
text frames, reordering, skipped partials, live-only feeds."""

from __future__ import annotations

import json

import trio

from stream_supervisor.testing.broker import ChaosConfig, SessionClosed, SimulatedBroker

from .helpers import AUTH_MSG, LISTEN_MSG, all_activities, config


class MemoryTransport:
    """Both ends of an in-memory connection: the server side is the SessionTransport."""

    def __init__(self) -> None:
        self.up_send, self.up_recv = trio.open_memory_channel[str | bytes](100)
        self.down_send, self.down_recv = trio.open_memory_channel[str | bytes](100_000)
        self.closed: str | None = None

    async def get_message(self) -> str | bytes:
        try:
            return await self.up_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise SessionClosed from None

    async def send_message(self, data: str | bytes) -> None:
        try:
            await self.down_send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SessionClosed from None

    async def aclose(self, *, abrupt: bool = False) -> None:
        self.closed = self.closed or ("abrupt" if abrupt else "clean")
        self.down_send.close()
        self.up_recv.close()

    async def drain(self) -> list[str | bytes]:
        """Everything the client was sent (the session is over: nothing more comes)."""
        out: list[str | bytes] = []
        while True:
            try:
                out.append(self.down_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out


async def memory_session(broker: SimulatedBroker) -> MemoryTransport:
    """Run a listening session to the end of the market; return the client's view."""
    conn = MemoryTransport()
    before = broker.updates_total
    await conn.up_send.send(AUTH_MSG)
    await conn.up_send.send(LISTEN_MSG)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(broker.handle_session, conn)
            while broker.stats["listen"] == 0:
                await trio.sleep(0.001)
            await broker.run_market()
            done = ("update_frames", "skipped_partials")
            while sum(broker.stats[k] for k in done) < broker.updates_total - before:
                await trio.sleep(0.001)
            conn.up_send.close()  # the client leaves
    return conn


async def test_injected_frames_and_text_frames_in_memory() -> None:
    knobs = ChaosConfig(
        malformed_prob=0.3,
        unknown_event_prob=0.2,
        text_frame_prob=0.5,
        oversized_prob=0.05,
        oversized_bytes=5000,
    )
    broker = SimulatedBroker(config(seed=4, orders=20, rate=0, chaos=knobs))
    conn = await memory_session(broker)
    frames = await conn.drain()
    assert json.loads(frames[0]) == {
        "stream": "authorization",
        "data": {"status": "authorized", "action": "authenticate"},
    }
    stats, injected = broker.stats, broker.injected
    assert sum(injected.values()) == stats["injected_frames"] > 0
    assert injected["invalid_json"] and injected["unknown_event"] and injected["oversized"]
    assert stats["text_frames"] == sum(isinstance(f, str) for f in frames) > 0
    assert stats["frames_sent"] == len(frames) - 2
    real = unknown = 0
    for f in frames[2:]:
        try:
            msg = json.loads(f)
        except ValueError:
            continue
        data = msg.get("data") if isinstance(msg, dict) else None
        if (
            msg.get("stream") == "trade_updates"
            and isinstance(data, dict)
            and isinstance(data.get("event"), str)
        ):
            if data["event"] == "future_event":
                unknown += 1
                assert data["order"]["id"] in broker.ground_truth()["orders"]
            elif isinstance(data.get("order"), dict):
                real += 1
    assert real == broker.updates_total == stats["update_frames"]
    assert unknown == injected["unknown_event"] + injected["oversized"]
    assert any(len(f) >= 5000 for f in frames)


async def test_reorder_window_shuffles_but_delivers_everything() -> None:
    broker = SimulatedBroker(config(seed=6, orders=30, rate=0, chaos=ChaosConfig(reorder_window=8)))
    conn = await memory_session(broker)
    frames = [json.loads(f) for f in (await conn.drain())[2:]]
    expected = [json.loads(broker.frame(i)) for i in range(broker.updates_total)]
    assert sorted(map(json.dumps, frames)) == sorted(map(json.dumps, expected))
    assert frames != expected


async def test_skipped_partials_are_still_in_rest() -> None:
    broker = SimulatedBroker(
        config(seed=6, orders=30, rate=0, chaos=ChaosConfig(skip_partial_prob=0.5))
    )
    await memory_session(broker)
    truth = broker.ground_truth()
    unstreamed = [f for o in truth["orders"].values() for f in o["fills"] if not f["streamed"]]
    assert len(unstreamed) == broker.stats["skipped_partials"] == broker.stats["fills_unsent"] > 0
    rest_ids = {a["id"] for a in all_activities(broker)}
    assert {f["activity_id"] for f in unstreamed} <= rest_ids


async def test_updates_while_nobody_listens_are_never_streamed() -> None:
    broker = SimulatedBroker(config(seed=12, orders=10, rate=0))
    for _ in range(15):
        broker.step()
    early = broker.updates_total
    conn = await memory_session(broker)
    got = [json.loads(f) for f in (await conn.drain())[2:]]
    assert got == [json.loads(broker.frame(i)) for i in range(early, broker.updates_total)]
    truth = broker.ground_truth()
    assert truth["updates_played"] == broker.updates_total - early
    assert broker.stats["updates_unsent"] == early
