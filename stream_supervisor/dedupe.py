"""The dedupe actor: drops updates already committed or already on their way.

It owns a bounded LRU of committed event keys (the fast path: no database round trip)
and a set of keys in flight to the writer. A key enters the LRU only after the writer
reports its batch committed, so a crash can never make us forget an event we have not
stored; a duplicate of an in-flight key is dropped but the key is not learnt early. The
`alpaca_event_dedupe` table behind it stays the authority.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import trio

from .channels import drain
from .events import Event
from .logs import get_logger
from .messages import Ack, Item
from .metrics import Metrics
from .state import SupervisorState

log = get_logger("stream_supervisor.dedupe")



class KeyCache:
    """Bounded LRU of committed keys plus the in-flight set. Pure bookkeeping."""

    def __init__(self, capacity: int, warm: Iterable[str] = ()) -> None:
        self.capacity = capacity
        self._committed: OrderedDict[str, None] = OrderedDict()
        self._in_flight: set[str] = set()
        #: The newest key a commit stored (not merely found stored): a restart checks it
        #: is still there, which a database that lost acknowledged commits fails.
        self.last_committed: str | None = None
        # `warm` is newest first; insert oldest first so the newest end up most recent.
        for key in reversed(list(warm)[:capacity]):
            self._committed[key] = None

    def __len__(self) -> int:
        return len(self._committed)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def check(self, key: str) -> str | None:
        """`lru` or `inflight` if the key is a known duplicate, else None (and the key is
        now in flight)."""
        if key in self._committed:
            self._committed.move_to_end(key)
            return "lru"
        if key in self._in_flight:
            return "inflight"
        self._in_flight.add(key)
        return None

    def forget_in_flight(self) -> None:
        """A pipeline restart drops whatever was in flight (it was never committed, and
        REST backfill or the broker will bring it again); committed keys stay valid."""
        self._in_flight.clear()

    def released(self, keys: Iterable[str]) -> None:
        """The writer dead-lettered these instead of storing them: out of flight, not
        learnt, so another copy of the same update is not taken for a duplicate."""
        for key in keys:
            self._in_flight.discard(key)

    def committed(self, keys: Iterable[str], newest_stored: str | None = None) -> None:
        """The writer committed these: move them from in flight into the LRU."""
        if newest_stored is not None:
            self.last_committed = newest_stored
        if self.capacity == 0:
            for key in keys:
                self._in_flight.discard(key)
            return
        lru = self._committed
        in_flight = self._in_flight
        for key in keys:
            in_flight.discard(key)
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None  # a new key goes in at the most recent end
        while len(lru) > self.capacity:
            lru.popitem(last=False)


async def dedupe_actor(
    cache: KeyCache,
    inbox: trio.MemoryReceiveChannel[Item],
    outbox: trio.MemorySendChannel[Item],
    acks: trio.MemoryReceiveChannel[Ack],
    metrics: Metrics,
    state: SupervisorState,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward new events from `inbox` to `outbox`; learn committed keys from `acks`.

    Two tasks share the cache: acks are always drained, so the writer never blocks on
    telling us about a commit while we block on handing it more work.
    """
    dropped = {layer: metrics.duplicates_dropped.labels(layer) for layer in ("lru", "inflight")}

    async def learn() -> None:
        async with acks:
            async for ack in acks:
                cache.committed(ack.keys, ack.newest_stored)
                if ack.rejected:
                    cache.released(ack.rejected)
                state.beat("dedupe", trio.current_time())

    async def forward() -> None:
        async with outbox, inbox:
            async for first in inbox:
                state.beat("dedupe", trio.current_time())
                # Everything already queued is handled in one go (no checkpoint per item),
                # which is what makes a duplicate nearly free under load.
                lru = inflight = 0
                check = cache.check
                try:
                    for item in drain(first, inbox):
                        if isinstance(item, Event):
                            # A duplicate costs the lookup and nothing else: no hand-off,
                            # no per-item counter (counted once per turn, below).
                            layer = check(item.key)
                            if layer == "lru":
                                lru += 1
                                continue
                            if layer is not None:
                                inflight += 1
                                continue
                        try:
                            outbox.send_nowait(item)  # `send_soon`, without a coroutine
                        except trio.WouldBlock:
                            await outbox.send(item)
                finally:
                    # Counted once per turn, and also when the turn is cut short.
                    if lru:
                        dropped["lru"].inc(lru)
                    if inflight:
                        dropped["inflight"].inc(inflight)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(learn)
        task_status.started()
        await forward()
