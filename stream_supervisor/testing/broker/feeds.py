"""Who gets each update: one live feed per listening session, at most one session per
account (a second upgrade gets HTTP 429, as on Alpaca), and the record of which updates
were ever handed to a client. Sessions (`sessions.py`) talk to the broker through this.
"""

from __future__ import annotations

from typing import Final

import trio

from .chaos import ChaosDecider
from .market import Market

FEED_BUFFER: Final = 100_000
"""Updates queued for one session before it is dropped as a slow consumer."""


class Feeds:
    """The stream side of one simulated account.

    It holds the market a session reads frames from, the chaos decisions and the
    counters every session of the broker shares.
    """

    def __init__(
        self,
        market: Market,
        chaos: ChaosDecider,
        stats: dict[str, int],
        injected: dict[str, int],
    ) -> None:
        self.market = market
        self.chaos = chaos
        self.stats = stats
        self.injected = injected
        #: Poison frames handed to a client, with their kind (`chaos.POISON_KINDS`).
        self.poisons_sent: list[tuple[str, bytes]] = []
        self._feeds: list[trio.MemorySendChannel[int]] = []
        self._sent: list[bool] = []
        self._fill_updates: set[int] = set()
        # One trade_updates session per account (docs/design.md, section 2).
        self._slot: object | None = None
        self._reservation: object | None = None
        self._started_at: float | None = None
        self._outage_until = float("-inf")

    # --- publishing

    def publish(self, indices: list[int]) -> None:
        """Record the market's new updates as not yet streamed and hand them to every feed."""
        for index in indices:
            self._sent.append(False)
            self.stats["updates_unsent"] += 1
            if self.market.update(index)["event"] in ("fill", "partial_fill"):
                self._fill_updates.add(index)
                self.stats["fills_unsent"] += 1
        for feed in list(self._feeds):
            for index in indices:
                try:
                    feed.send_nowait(index)
                except trio.WouldBlock:
                    # A real server drops a consumer that cannot keep up; the session
                    # sees the end of its feed and resets the connection.
                    self.stats["slow_consumer_drops"] += 1
                    self.close_feed(feed)
                    break
                except trio.BrokenResourceError:
                    self.close_feed(feed)
                    break

    def open_feed(self) -> tuple[trio.MemorySendChannel[int], trio.MemoryReceiveChannel[int]]:
        """Subscribe to live update indices from now on (live only: no history)."""
        send, receive = trio.open_memory_channel[int](FEED_BUFFER)
        self._feeds.append(send)
        return send, receive

    def close_feed(self, feed: trio.MemorySendChannel[int]) -> None:
        if feed in self._feeds:
            self._feeds.remove(feed)
        feed.close()

    # --- what was streamed

    def mark_sent(self, index: int) -> None:
        """Update `index` was handed to a listening client's socket."""
        if not self._sent[index]:
            self._sent[index] = True
            self.stats["updates_unsent"] -= 1
            if index in self._fill_updates:
                self.stats["fills_unsent"] -= 1

    def streamed(self, index: int) -> bool:
        return self._sent[index]

    @property
    def updates_played(self) -> int:
        """How many updates were streamed at least once."""
        return sum(self._sent)

    def sent_indices(self, last: int) -> list[int]:
        """Up to `last` most recent updates that were already streamed once."""
        out: list[int] = []
        for index in range(len(self._sent) - 1, -1, -1):
            if len(out) >= last:
                break
            if self._sent[index]:
                out.append(index)
        out.reverse()
        return out

    # --- the one session slot

    def mark_server_started(self, now: float) -> None:
        self._started_at = now

    def admit(self) -> int | None:
        """Decide a WebSocket upgrade: None to accept (the slot is then reserved), else 429."""
        self.stats["upgrade_attempts"] += 1
        now = trio.current_time()
        if self._started_at is None:
            self._started_at = now
        chaos = self.chaos.reject_upgrade(
            attempt=self.stats["upgrade_attempts"], since_start=now - self._started_at
        )
        if chaos or now < self._outage_until or self._slot is not None:
            self.stats["rejected_429"] += 1
            return 429
        self._reservation = self._slot = object()
        return None

    def begin_outage(self) -> None:
        """A chaos disconnect just happened: refuse upgrades for the configured outage."""
        seconds = self.chaos.config.outage_after_disconnect
        if seconds > 0:
            self._outage_until = trio.current_time() + seconds

    def cancel_admission(self) -> None:
        """The upgrade that `admit()` accepted never completed: free the slot."""
        if self._reservation is not None and self._slot is self._reservation:
            self._slot = None
        self._reservation = None

    @property
    def session_active(self) -> bool:
        return self._slot is not None

    def claim_slot(self) -> object | None:
        """Take the slot for a session starting now (the one `admit()` reserved, or a free
        one for a transport that skipped the upgrade); None if another session holds it."""
        if self._reservation is not None and self._slot is self._reservation:
            token, self._reservation = self._reservation, None
            return token
        if self._slot is None:
            token = self._slot = object()
            return token
        self.stats["rejected_429"] += 1
        return None

    def release_slot(self, token: object) -> None:
        if self._slot is token:
            self._slot = None
