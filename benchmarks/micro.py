#!/usr/bin/env python3
"""Micro-benchmarks in CPU time (robust on a shared machine), for BENCHMARKS.md:

  dedupe     the dedupe actor's turn over 2,000 queued items, per item: fresh updates
             and duplicates the LRU knows (real channels, the real actor)
  histogram  the writer's frame-to-commit histogram: 1,000 `observe` calls against one
             `observe_many` of the same 1,000 values
  frames     what a duplicate costs the connection actor, per frame of the benchmark's
             stream: decoding it (what a duplicate cost before `dedupe.FrameMemo`, and
             what every fresh frame costs), finding it in the memo by its bytes, and
             what remembering adds to a fresh frame (the lookup that misses, the insert)
  framing    the WebSocket client's framing, per frame of the benchmark's stream sent as
             the broker sends it (one binary frame per update, read 64 KiB at a time):
             wsproto's frame parser alone, and the client's whole read path (with
             `--root` on an older checkout: its own path, all through wsproto)
  params     the writer's client side of a 1,000-update batch's statements (the key
             claim, the orders upsert, the positions insert and update): building their
             parameters and psycopg dumping them (what `execute` does before anything
             reaches the server)

    python benchmarks/micro.py dedupe --root ../baseline    # a checkout to import
    python benchmarks/micro.py histogram
    python benchmarks/micro.py params --root ../baseline
    python benchmarks/micro.py frames
    python benchmarks/micro.py framing --root ../baseline
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
import time
from pathlib import Path
from typing import Any

TURN = 2_000
TURNS = 10


def dedupe() -> dict[str, float]:
    import trio
    import trio.testing

    from benchmarks.poison import fills
    from stream_supervisor.dedupe import KeyCache, dedupe_actor
    from stream_supervisor.metrics import Metrics
    from stream_supervisor.state import SupervisorState

    events = fills(TURN * TURNS * 2, "micro")
    known = events[:TURN * TURNS]
    result: dict[str, float] = {}

    async def main() -> None:
        cache = KeyCache(len(events))
        cache.committed([e.key for e in known])
        s_in, r_in = trio.open_memory_channel[Any](TURN)
        s_out, r_out = trio.open_memory_channel[Any](TURN)
        _s_ack, r_ack = trio.open_memory_channel[Any](10)
        async with trio.open_nursery() as nursery:
            await nursery.start(dedupe_actor, cache, r_in, s_out, r_ack, Metrics(),
                                SupervisorState())
            for label, start in (("duplicate_us", 0), ("fresh_us", TURN * TURNS)):
                cpu = 0.0
                for turn in range(TURNS):
                    for event in events[start + turn * TURN: start + (turn + 1) * TURN]:
                        s_in.send_nowait(event)
                    before = time.process_time()
                    await trio.testing.wait_all_tasks_blocked()
                    cpu += time.process_time() - before
                    while True:
                        try:
                            r_out.receive_nowait()
                        except trio.WouldBlock:
                            break
                result[label] = round(cpu / (TURN * TURNS) * 1e6, 3)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result


def histogram() -> dict[str, float]:
    from stream_supervisor.metrics import Metrics

    values = [random.random() * 0.05 for _ in range(1_000)]
    h: Any = Metrics().frame_to_commit_seconds
    rounds = 200

    def cpu_ms(fn: Any) -> float:
        before = time.process_time()
        for _ in range(rounds):
            fn()
        return round((time.process_time() - before) / rounds * 1e3, 4)

    def one_by_one() -> None:
        for v in values:
            h.observe(v)

    return {"observe_x1000_ms": cpu_ms(one_by_one),
            "observe_many_1000_ms": cpu_ms(lambda: h.observe_many(values))}


def params() -> dict[str, float]:
    import msgspec
    from psycopg._queries import PostgresQuery
    from psycopg.adapt import Transformer

    from benchmarks.poison import fills
    from stream_supervisor import pgstore
    from stream_supervisor.ledger import apply_events

    events = fills(1_000, "micro")
    acct = "micro"
    first = {ev.key: ev for ev in events}
    applied = apply_events(acct, {}, {}, list(first.values()))
    orders = list(applied.orders.values())
    positions = list(applied.positions)
    held = [msgspec.structs.replace(p, position_id=i) for i, p in enumerate(positions, 1)]
    by_stored_key = {k: k for k in first}
    mod: Any = pgstore

    def claim() -> dict[str, Any]:
        if hasattr(mod, "_claim_params"):
            return dict(mod._claim_params(acct, first, by_stored_key))
        keys = list(by_stored_key)  # before: three arrays
        return {"acct": acct, "keys": keys,
                "types": [mod._text(first[by_stored_key[k]].event) for k in keys],
                "sources": [first[by_stored_key[k]].source for k in keys]}

    def run(sql: str, build: Any) -> None:
        query = PostgresQuery(Transformer())
        values = build()
        query.convert(sql, values)
        query.dump(values)

    rounds = 100

    def cpu_ms(sql: str, build: Any) -> float:
        run(sql, build)  # dumpers chosen and cached, as in a session
        before = time.process_time()
        for _ in range(rounds):
            run(sql, build)
        return round((time.process_time() - before) / rounds * 1e3, 3)

    return {"orders": len(orders), "positions": len(positions),
            "positions_insert_ms": cpu_ms(mod._INSERT_POSITIONS,
                                          lambda: mod._insert_params(acct, positions)),
            "positions_update_ms": cpu_ms(mod._UPDATE_POSITIONS,
                                          lambda: mod._update_params(held)),
            "claim_ms": cpu_ms(mod._CLAIM_KEYS, claim),
            "orders_upsert_ms": cpu_ms(mod._UPSERT_ORDERS,
                                       lambda: mod._orders_params(acct, orders))}


def frames() -> dict[str, float]:
    from benchmarks.workload import generate
    from stream_supervisor.dedupe import FrameMemo, KeyCache
    from stream_supervisor.events import Event
    from stream_supervisor.protocol import decode_frame

    stream = generate(TURN * TURNS // 2, seed=7, symbols=50, prefixes=[]).frames
    n = min(len(stream), 4096)
    stream = stream[:n]

    def copies() -> list[bytes]:
        # As the socket delivers them: new bytes objects, whose hash is not cached yet.
        return [bytes(bytearray(frame)) for frame in stream]

    decoded = [decode_frame(frame) for frame in stream]
    keys = [(e.key, e.event) for e in decoded if isinstance(e, Event)]
    assert len(keys) == n
    cache = KeyCache(n)
    memo = FrameMemo(cache, capacity=n)
    fresh = copies()
    before = time.process_time()
    for frame, (key, event) in zip(fresh, keys, strict=True):
        if memo.duplicate(frame) is None:  # a miss: the lookup a fresh frame pays
            memo.remember(frame, key, event)
    remember_us = (time.process_time() - before) / n * 1e6
    again = copies()
    before = time.process_time()
    for frame in again:
        decode_frame(frame)
    decode_us = (time.process_time() - before) / n * 1e6
    cache.committed([key for key, _event in keys])
    dups = copies()
    before = time.process_time()
    for frame in dups:
        assert memo.duplicate(frame) is not None
    known_us = (time.process_time() - before) / n * 1e6
    return {"frames": n, "decode_us": decode_us, "known_duplicate_us": known_us,
            "fresh_frame_lookup_and_remember_us": remember_us}


def framing() -> dict[str, float]:
    import trio
    from wsproto import ConnectionType, WSConnection
    from wsproto.connection import Connection
    from wsproto.events import AcceptConnection, BytesMessage, Request

    from benchmarks.workload import generate
    from stream_supervisor.wsclient import RECEIVE_BYTES, WebSocketClient

    stream = generate(TURN * TURNS // 2, seed=7, symbols=50, prefixes=[]).frames
    client_ws = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client_ws.send(Request(host="bench", target="/stream")))
    assert any(isinstance(e, Request) for e in server.events())
    client_ws.receive_data(server.send(AcceptConnection()))
    assert any(isinstance(e, AcceptConnection) for e in client_ws.events())
    wire = b"".join(server.send(BytesMessage(data=frame)) for frame in stream)
    reads = [wire[i:i + RECEIVE_BYTES] for i in range(0, len(wire), RECEIVE_BYTES)]
    n = len(stream)

    alone = Connection(ConnectionType.CLIENT)
    before = time.process_time()
    got = 0
    for data in reads:
        alone.receive_data(data)
        for event in alone.events():  # a frame cut by a read comes in two parts
            got += isinstance(event, BytesMessage) and event.message_finished
    wsproto_us = (time.process_time() - before) / n * 1e6
    assert got == n

    async def client_path() -> float:
        # The stream is never touched: ordinary frames need no reply.
        client = WebSocketClient(None, client_ws, max_message_size=1 << 24)  # type: ignore[arg-type]
        split = getattr(client, "_split", None)
        count = 0
        start = time.process_time()
        for data in reads:
            # Synchronous since control replies are queued; a coroutine in older
            # checkouts (A/B runs against them).
            if split is not None:
                done: object = split(data)
            else:  # a checkout from before the fast path
                client._ws.receive_data(data)
                done = client._handle_events()
            if inspect.isawaitable(done):
                await done
            count += len(client._ready)
            client._ready.clear()
        assert count == n
        return (time.process_time() - start) / n * 1e6

    return {"frames": n, "bytes_per_frame": len(wire) / n, "wsproto_alone_us": wsproto_us,
            "client_us": trio.run(client_path)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=("dedupe", "histogram", "params", "frames", "framing"))
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the checkout whose stream_supervisor to import")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.root.resolve()))
    run = {"dedupe": dedupe, "histogram": histogram, "params": params,
           "frames": frames, "framing": framing}[args.which]
    print(args.root, run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
