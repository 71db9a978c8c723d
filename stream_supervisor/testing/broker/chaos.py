"""Fault knobs of the simulated broker and the seeded decisions that apply them.

Every random choice a fault makes comes from a `random.Random` seeded from the
simulation seed, one stream per concern, so a chaos run is reproducible and turning one
knob does not reshuffle the decisions of another.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Final, Literal

from .wire import dumps, rfc3339_ns

MalformedKind = Literal["invalid_json", "data_null", "wrong_types", "unknown_stream"]

#: Every kind of injected frame, as counted in `ground_truth()["injected"]`.
INJECTED_KINDS: Final = (
    "invalid_json",
    "unknown_event",
    "data_null",
    "wrong_types",
    "unknown_stream",
    "oversized",
    "poison_bounds",
    "poison_store",
)
#: Poison updates: about an order the market never had, with a value the decoder's bounds
#: refuse (`poison_bounds`), or a value within them that the store refuses
#: (`poison_store`: the symbol `POISON_SYMBOL`, which `poison_refusal` names).
POISON_KINDS: Final = ("poison_bounds", "poison_store")
POISON_SYMBOL: Final = "POISON"

_MALFORMED_KINDS: Final[tuple[MalformedKind, ...]] = (
    "invalid_json",
    "data_null",
    "wrong_types",
    "unknown_stream",
)

#: The event name of injected unknown updates: no client can know it today.
UNKNOWN_EVENT: Final = "future_event"


@dataclass(frozen=True)
class ChaosConfig:
    """What the simulated broker does wrong, and how often. All zero: a perfect broker."""

    duplicate_prob: float = 0.0
    """Each update frame is sent again (a burst of `duplicate_burst` copies) with this probability."""
    duplicate_burst: int = 2
    """Copies in a burst, counting the original."""
    disconnect_every: int = 0
    """Close the socket after every N update frames (global count; 0 = never)."""
    disconnect_prob: float = 0.0
    """Or close it at random after an update frame."""
    disconnect_at: tuple[int, ...] = ()
    """Or right after the update frames with these 0-based global indices."""
    abrupt_prob: float = 0.0
    """Fraction of disconnects done as a TCP reset instead of a WebSocket close."""
    reorder_window: int = 0
    """Shuffle updates within windows of this size before sending."""
    delay_prob: float = 0.0
    delay_max: float = 0.0
    """Sleep up to `delay_max` seconds before a frame, with probability `delay_prob`."""
    stall_prob: float = 0.0
    stall_seconds: float = 0.0
    """Go half-open (no reads, no pongs, no sends) for `stall_seconds`, then reset."""
    malformed_prob: float = 0.0
    """Inject invalid JSON, truncated JSON, wrong types, `data: null` or unknown streams."""
    unknown_event_prob: float = 0.0
    """Inject updates with an event no client knows, carrying a real order snapshot."""
    oversized_prob: float = 0.0
    oversized_bytes: int = 2_000_000
    text_frame_prob: float = 0.0
    """Send this fraction of frames as text instead of binary."""
    skip_partial_prob: float = 0.0
    """Never stream this fraction of `partial_fill` updates (REST still has the fill)."""
    replay_on_connect: int = 0
    """After `listen`, replay up to this many of the most recent updates again."""
    replay_before_listening: bool = False
    """Send that replay before the `listening` reply, not after it: updates racing the
    reply, which the real stream does not promise never to send (docs/design.md,
    section 2)."""
    reject_429_for: float = 0.0
    """Seconds after the server started during which every upgrade gets HTTP 429."""
    reject_429_connects: int = 0
    """The first N upgrade attempts get HTTP 429."""
    outage_after_disconnect: float = 0.0
    """After a chaos disconnect, every upgrade gets HTTP 429 for this many seconds, as
    Alpaca answers while it still holds the stale session (up to ~90 s): the updates of
    that outage reach a client only through REST."""
    rest_error_prob: float = 0.0
    rest_429_prob: float = 0.0
    rest_retry_after: float = 1.0
    rest_short_pages: bool = False
    """Return fewer than `page_size` items, but never zero while more remain."""
    rest_delay_max: float = 0.0
    poison_prob: float = 0.0
    """Inject an update of an order the market never had, holding a value the decoder's
    bounds refuse (a 3,000-character id or symbol, a quantity of 1E-20000, a price of
    1E+30, a time a day ahead) or one the store refuses (`POISON_SYMBOL`)."""


RestFault = Literal["error", "rate_limited"]


class ChaosDecider:
    """Seeded decisions for one broker. Not thread-safe; Trio runs it in one thread."""

    def __init__(self, config: ChaosConfig, seed: int) -> None:
        self.config = config
        # One stream per concern: the order in which REST calls and frames interleave
        # depends on the client, and must not change what the stream faults look like.
        self._stream = random.Random(f"{seed}/chaos/stream")
        self._upgrade = random.Random(f"{seed}/chaos/upgrade")
        self._rest = random.Random(f"{seed}/chaos/rest")

    @property
    def stream_rng(self) -> random.Random:
        return self._stream

    # --- the WebSocket upgrade

    def reject_upgrade(self, *, attempt: int, since_start: float) -> bool:
        """Whether upgrade attempt number `attempt` (1-based) gets a chaos 429."""
        cfg = self.config
        return attempt <= cfg.reject_429_connects or since_start < cfg.reject_429_for

    # --- frames of a session

    def skip_partial(self) -> bool:
        return self._chance(self.config.skip_partial_prob)

    def injection(self) -> str | None:
        """Which extra frame, if any, to send before the next update frame."""
        cfg = self.config
        if self._chance(cfg.malformed_prob):
            return self._stream.choice(_MALFORMED_KINDS)
        if self._chance(cfg.unknown_event_prob):
            return "unknown_event"
        if self._chance(cfg.oversized_prob):
            return "oversized"
        if self._chance(cfg.poison_prob):
            return self._stream.choice(POISON_KINDS)
        return None

    def delay(self) -> float:
        cfg = self.config
        if cfg.delay_max > 0 and self._chance(cfg.delay_prob):
            return self._stream.uniform(0.0, cfg.delay_max)
        return 0.0

    def stall(self) -> float:
        cfg = self.config
        if cfg.stall_seconds > 0 and self._chance(cfg.stall_prob):
            return cfg.stall_seconds
        return 0.0

    def as_text(self) -> bool:
        return self._chance(self.config.text_frame_prob)

    def copies(self) -> int:
        """How many times to send the next update frame (1 = no duplicate)."""
        cfg = self.config
        if cfg.duplicate_burst > 1 and self._chance(cfg.duplicate_prob):
            return cfg.duplicate_burst
        return 1

    def disconnect_after(self, frame_index: int) -> bool:
        """Whether to drop the socket right after global update frame `frame_index` (0-based)."""
        cfg = self.config
        if frame_index in cfg.disconnect_at:
            return True
        if cfg.disconnect_every > 0 and (frame_index + 1) % cfg.disconnect_every == 0:
            return True
        return self._chance(cfg.disconnect_prob)

    def abrupt(self) -> bool:
        return self._chance(self.config.abrupt_prob)

    def shuffle(self, items: list[int]) -> None:
        if self.config.reorder_window > 1 and len(items) > 1:
            self._stream.shuffle(items)

    # --- REST

    def rest_fault(self) -> RestFault | None:
        cfg = self.config
        if self._chance(cfg.rest_error_prob, self._rest):
            return "error"
        if self._chance(cfg.rest_429_prob, self._rest):
            return "rate_limited"
        return None

    def rest_delay(self) -> float:
        if self.config.rest_delay_max > 0:
            return self._rest.uniform(0.0, self.config.rest_delay_max)
        return 0.0

    def page_size(self, requested: int) -> int:
        """The page size actually served: short pages when the knob is on, never zero."""
        if self.config.rest_short_pages and requested > 1:
            return self._rest.randint(1, requested - 1)
        return requested

    def _chance(self, prob: float, rng: random.Random | None = None) -> bool:
        # Draw only when the knob is on, so a perfect broker consumes no randomness.
        if prob <= 0.0:
            return False
        return (rng or self._stream).random() < prob


# --- injected frames: pure builders, so the in-memory harness can reuse them


def malformed_frame(kind: str, rng: random.Random, sample: bytes) -> bytes:
    """A frame of the given malformed kind. `sample` is a real update frame to mangle."""
    if kind == "invalid_json":
        variant = rng.randrange(3)
        if variant == 0 and len(sample) > 2:
            return sample[: rng.randrange(1, len(sample) - 1)]  # truncated mid-frame
        if variant == 1:
            return b'{"stream":"trade_updates","data":{"event":"fill",'
        return b"\xff\xfe not json at all"
    if kind == "data_null":
        return b'{"stream":"trade_updates","data":null}'
    if kind == "wrong_types":
        variants: list[dict[str, Any]] = [
            {"stream": "trade_updates", "data": {"event": 7, "order": "not-an-order"}},
            {"stream": "trade_updates", "data": ["fill", "AAPL"]},
            {"stream": "trade_updates", "data": "partial_fill"},
            {
                "stream": "trade_updates",
                "data": {"event": "fill", "order": [1, 2, 3], "timestamp": 1.5, "qty": {}},
            },
        ]
        return dumps(rng.choice(variants))
    if kind == "unknown_stream":
        return dumps({"stream": "account_updates", "data": {"status": "ACTIVE"}})
    raise ValueError(f"unknown malformed kind {kind!r}")


def unknown_event_frame(order: dict[str, Any], timestamp: str, execution_id: str) -> bytes:
    """An update with an event no client knows, about a real order, changing nothing."""
    data = {
        "event": UNKNOWN_EVENT,
        "execution_id": execution_id,
        "order": order,
        "timestamp": timestamp,
    }
    return dumps({"stream": "trade_updates", "data": data})


def oversized_frame(order: dict[str, Any], timestamp: str, size: int) -> bytes:
    """A harmless unknown update padded to at least `size` bytes."""
    data: dict[str, Any] = {
        "event": UNKNOWN_EVENT,
        "execution_id": None,
        "order": order,
        "timestamp": timestamp,
        "padding": "",
    }
    base = len(dumps({"stream": "trade_updates", "data": data}))
    data["padding"] = "x" * max(0, size - base)
    return dumps({"stream": "trade_updates", "data": data})


def poison_frame(kind: str, rng: random.Random, now_ns: int) -> bytes:
    """A fill of an order the market never had, poisoned by one value (`POISON_KINDS`).
    Stored, it would show as an order the broker never had."""
    order_id = f"poison-{rng.getrandbits(64):016x}"
    qty, price, symbol = "1", "10", "PSN"
    stamp = rfc3339_ns(now_ns, eastern=False)
    if kind == "poison_store":
        symbol = POISON_SYMBOL
    else:
        variant = rng.randrange(5)
        if variant == 0:
            order_id += "-" + "x" * 3000
        elif variant == 1:
            symbol = "S" * 3000
        elif variant == 2:
            qty = "1E-20000"
        elif variant == 3:
            price = "1E+30"
        else:
            stamp = rfc3339_ns(now_ns + 86_400 * 1_000_000_000, eastern=False)
    order = {"id": order_id, "client_order_id": f"c-{order_id[:40]}", "symbol": symbol,
             "side": "buy", "status": "filled", "qty": qty, "filled_qty": qty,
             "filled_avg_price": price, "order_type": "market", "type": "market",
             "asset_class": "us_equity", "created_at": stamp, "updated_at": stamp}
    data = {"event": "fill", "execution_id": f"x-{order_id[:40]}", "order": order,
            "timestamp": stamp, "price": price, "qty": qty, "position_qty": qty}
    return dumps({"stream": "trade_updates", "data": data})


def poison_refusal(event: Any) -> str | None:
    """The store's side of `poison_store`: `MemoryStore(refuse=poison_refusal)` refuses
    what the simulated broker poisoned, as PostgreSQL refuses a value it cannot hold."""
    if getattr(event, "symbol", None) == POISON_SYMBOL:
        return f"the simulation's store refuses symbol {POISON_SYMBOL}"
    return None
