"""The benchmark's workload: one deterministic stream from the simulated broker.

Frames are generated once, before anything is timed, with the broker's ground truth
captured at the prefix lengths the smaller scenarios replay, so every scenario's
database can be verified against the truth of exactly the frames it was sent.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from stream_supervisor.testing.broker import SimConfig, SimulatedBroker

#: Fixed simulated epoch: the same seed gives byte-identical frames on every run.
START_TIME: Final = datetime(2024, 11, 5, 15, 0, tzinfo=UTC)
#: Updates the simulated market produces per order, on average (pending_new, new, fills,
#: sometimes pending_cancel and canceled): used to size the market for N updates.
UPDATES_PER_ORDER: Final = 5.0
KEY_ID: Final = "BENCHKEYID"
SECRET_KEY: Final = "BENCHSECRETKEY"
#: Pre-encoded frames are sent in writes of about this many bytes.
CHUNK_BYTES: Final = 64 * 1024


@dataclass
class Workload:
    seed: int
    symbols: int
    account_id: str
    frames: list[bytes]  # the wire JSON of each update, in stream order
    fills: int
    truth: dict[str, Any]  # ground truth after every frame
    # prefix length (a step boundary) -> ground truth after exactly those frames
    prefix_truth: dict[int, dict[str, Any]] = field(default_factory=dict)
    event_counts: dict[str, int] = field(default_factory=dict)

    def prefix(self, wanted: int) -> tuple[int, dict[str, Any]]:
        """The shortest captured prefix of at least `wanted` frames, and its truth."""
        for length in sorted(self.prefix_truth):
            if length >= wanted:
                return length, self.prefix_truth[length]
        return len(self.frames), self.truth


def generate(updates: int, *, seed: int, symbols: int, prefixes: Sequence[int]) -> Workload:
    """About `updates` updates across many orders and `symbols` symbols."""
    config = SimConfig(
        seed=seed,
        account_id=None,
        orders=max(1, round(updates / UPDATES_PER_ORDER)),
        rate=0.0,
        symbols=tuple(f"SYM{i:03d}" for i in range(symbols)),
        start_time=START_TIME,
        key_id=KEY_ID,
        secret_key=SECRET_KEY,
        scenario="benchmark",
    )
    broker = SimulatedBroker(config)
    wanted = sorted(set(prefixes))
    captured: dict[int, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    while (batch := broker.step()) is not None:
        for update in batch:
            counts[update["event"]] = counts.get(update["event"], 0) + 1
        while wanted and broker.updates_total >= wanted[0]:
            captured[broker.updates_total] = broker.ground_truth()
            wanted.pop(0)
    frames = [broker.frame(i) for i in range(broker.updates_total)]
    return Workload(
        seed=seed,
        symbols=symbols,
        account_id=broker.account_id,
        frames=frames,
        fills=broker.fills_total,
        truth=broker.ground_truth(),
        prefix_truth=captured,
        event_counts=counts,
    )


def with_duplicates(frames: Sequence[bytes], lag: int) -> list[bytes]:
    """Every frame twice: the stream, merged with a replay of itself `lag` frames behind.

    Half the frames are duplicates; with a lag longer than a batch, most of them are of
    updates already committed (the LRU fast path), the rest still in flight.
    """
    out: list[bytes] = list(frames[:lag])
    for i in range(lag, len(frames)):
        out.append(frames[i])
        out.append(frames[i - lag])
    out.extend(frames[max(0, len(frames) - lag):])
    return out


def ws_frame(payload: bytes) -> bytes:
    """One unmasked server-to-client binary WebSocket frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x82, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x82, 126, n)
    else:
        header = struct.pack("!BBQ", 0x82, 127, n)
    return header + payload


def chunks(encoded: Sequence[bytes], size: int = CHUNK_BYTES) -> list[bytes]:
    """Consecutive encoded frames joined into writes of about `size` bytes."""
    out: list[bytes] = []
    pending: list[bytes] = []
    length = 0
    for frame in encoded:
        pending.append(frame)
        length += len(frame)
        if length >= size:
            out.append(b"".join(pending))
            pending, length = [], 0
    if pending:
        out.append(b"".join(pending))
    return out
