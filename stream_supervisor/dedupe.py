"""The dedupe actor: drops updates already committed or already on their way.

It owns a bounded LRU of committed event keys (the fast path: no database round trip)
and a set of keys in flight to the writer. A key enters the LRU only after the writer
reports its batch committed, so a crash can never make us forget an event we have not
stored; a duplicate of an in-flight key is dropped but the key is not learnt early. The
`alpaca_event_dedupe` table behind it stays the authority.

In front of it, `FrameMemo` (used by the connection actor, which alone sees the bytes):
a frame byte for byte equal to a recent one that decoded to an update whose key this
cache holds (committed, in flight, or on its way here from a streaming session) is that
update again, and is dropped without being decoded (docs/design.md, section 4).
"""

from __future__ import annotations

from collections import OrderedDict, deque
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
        #: Keys of updates the connection actor has put on their way to the dedupe actor
        #: since the session began, which it has not checked yet (`forwarded`).
        self._on_the_way: set[str] = set()
        #: The newest key a commit stored (not merely found stored): a restart checks it
        #: is still there, which a database that lost acknowledged commits fails.
        self.last_committed: str | None = None
        #: Duplicates the dedupe actor has dropped (lru and inflight), added once a turn:
        #: what tells `FrameMemo` the stream carries duplicates.
        self.hits = 0
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
        on_the_way = self._on_the_way
        if on_the_way:
            on_the_way.discard(key)  # here now: in flight or dropped from this turn on
        if key in self._committed:
            self._committed.move_to_end(key)
            return "lru"
        if key in self._in_flight:
            return "inflight"
        self._in_flight.add(key)
        return None

    def known(self, key: str) -> str | None:
        """`lru` or `inflight` if the key is held, else None; never puts a key in flight
        (the question `FrameMemo` asks for the connection actor: only the dedupe actor
        adds keys). A committed key is touched, as `check` touches it."""
        if key in self._committed:
            self._committed.move_to_end(key)
            return "lru"
        if key in self._in_flight or key in self._on_the_way:
            return "inflight"
        return None

    def forwarded(self, key: str) -> None:
        """The connection actor is handing an update with this key to the pipeline, on the
        stream buffer of a session past its recovery: a channel from which nothing is let
        go while the session and the pipeline last, so the update reaches `check`, which
        clears the mark, before any copy of it read later. Marked before it is sent, so
        the check cannot come first. `known` counts it in flight meanwhile."""
        self._on_the_way.add(key)

    def session_ended(self) -> None:
        """A session's end may leave updates it read short of the dedupe actor (a session
        cancelled with its buffers full): none is on its way any more."""
        self._on_the_way.clear()

    def forget_in_flight(self) -> None:
        """A pipeline restart drops whatever was in flight (it was never committed, and
        REST backfill or the broker will bring it again); committed keys stay valid."""
        self._in_flight.clear()
        self._on_the_way.clear()

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


#: Frames `FrameMemo` remembers, the newest first out last: the benchmark's replays come
#: 2,000 frames behind, a reconnect's within its overlap. At most this many times
#: `FRAME_MEMO_MAX_BYTES` of frames held (16 MiB; about 4 MiB at the stream's ~1 KB).
FRAME_MEMO_FRAMES = 4096
#: A longer frame (a multi-leg order, say) is never remembered: it is decoded each time.
FRAME_MEMO_MAX_BYTES = 4096


class FrameMemo:
    """Layer 0 of dedupe: the exact bytes of recent frames that decoded to an update,
    with that update's key and event type.

    A frame equal, byte for byte, to a remembered one decodes to the same update (the
    decoder is a function of the bytes; the wall-clock bound only ever lets more through
    as time passes), so if the key cache holds that update's key (committed, in flight
    to the writer, or on its way to the dedupe actor: `forwarded`) the frame is a
    duplicate the dedupe actor would drop, and the connection actor drops it without
    decoding it: what a duplicate then costs is the WebSocket framing, one dict lookup
    and one key lookup. (On its way: a copy that comes while the first is still queued
    ahead of the dedupe actor, as most do when the writer is the bottleneck.) Only
    frames that decoded to an update are remembered: one refused (out of bounds, stamped
    in the future) is decoded, and judged, again each time it comes. A remembered frame
    whose key the cache does not hold (evicted, or released after the database refused
    the update) takes the normal path, as does any frame that differs by one byte (a
    real replay with another timestamp, say). Equality is on the bytes, never a hash
    alone.

    Ownership: the connection actor remembers and asks (it alone has the bytes); the
    dedupe actor still owns the key cache and is the only one to add keys to it
    (`KeyCache.known` only reads, and touches a committed key as a hit does). Both run
    on the one Trio thread. Memory: at most `capacity` frames of at most `max_frame_bytes`
    each, oldest out first; the frames are the ones the updates in flight already hold.

    Remembering costs a fresh frame a microsecond or two (hashing its bytes, the insert),
    a few percent of what the pipeline spends on it, for nothing on a stream without
    duplicates; so the memo is `active` only while duplicates come: from the first one
    the dedupe actor drops (or the memo itself) until `capacity` frames have passed
    without one, when it lets go of every frame it held. The duplicates in between take
    the normal path, as before.
    """

    __slots__ = ("_cache", "_frames", "_hits", "_order", "_quiet", "_seen",
                 "capacity", "max_frame_bytes")

    def __init__(self, cache: KeyCache, capacity: int = FRAME_MEMO_FRAMES,
                 max_frame_bytes: int = FRAME_MEMO_MAX_BYTES) -> None:
        self._cache = cache
        self.capacity = capacity
        self.max_frame_bytes = max_frame_bytes
        self._frames: dict[bytes, tuple[str, str]] = {}  # frame -> (key, event type)
        self._order: deque[bytes] = deque()  # the same frames, oldest first
        self._hits = 0  # duplicates found here
        self._seen = 0  # duplicates (the dedupe actor's and ours) when last asked
        self._quiet = capacity  # frames since the last duplicate: inactive at first

    def active(self, frames: int) -> bool:
        """Whether to remember and look up the next `frames` (one socket read's): while a
        duplicate came within the last `capacity` frames. Asked once a read."""
        seen = self._cache.hits + self._hits
        if seen != self._seen:
            self._seen = seen
            self._quiet = frames
            return True
        quiet = self._quiet
        if quiet >= self.capacity:
            if self._order:
                # Asleep: what it held goes, so a quiet account (one of many in a fleet)
                # keeps no frames.
                self._frames.clear()
                self._order.clear()
            return False
        self._quiet = quiet + frames
        return True

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def held_bytes(self) -> int:
        return sum(len(frame) for frame in self._order)

    def duplicate(self, frame: bytes) -> tuple[str, str] | None:
        """(layer, event type) if `frame` is a remembered frame whose key the cache holds:
        a duplicate, to drop undecoded. None: decode it."""
        entry = self._frames.get(frame)
        if entry is None:
            return None
        layer = self._cache.known(entry[0])
        if layer is None:
            return None
        self._hits += 1
        return layer, entry[1]

    def forwarded(self, key: str) -> None:
        """An update decoded from a frame is on its way to the dedupe actor, on a
        session's stream buffer (`KeyCache.forwarded`): a copy read before the dedupe
        actor gets to it is dropped here undecoded, as one read after would be there."""
        self._cache.forwarded(key)

    def session_ended(self) -> None:
        self._cache.session_ended()

    def remember(self, frame: bytes, key: str, event: str) -> None:
        """`frame` decoded to an update with this key and event type."""
        if len(frame) > self.max_frame_bytes or self.capacity <= 0:
            return
        frames = self._frames
        before = len(frames)
        frames[frame] = (key, event)
        if len(frames) > before:  # new: the same bytes again only refresh the entry
            order = self._order
            order.append(frame)
            if len(order) > self.capacity:
                del frames[order.popleft()]


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
                    cache.hits += lru + inflight
                    if lru:
                        dropped["lru"].inc(lru)
                    if inflight:
                        dropped["inflight"].inc(inflight)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(learn)
        task_status.started()
        await forward()
