"""Hand-offs between actors that cost no scheduler round per item.

`MemorySendChannel.send` and `MemoryReceiveChannel.receive` each yield to the scheduler
even when they could complete at once. Between actors that pass every trade update, that
is several task switches per update; these helpers complete at once when they can and
wait (a checkpoint, cancellable) only when they must, so an actor handles everything
already queued in one turn. Backpressure is unchanged: a full channel still blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import trio

T = TypeVar("T")


async def send_soon(channel: trio.MemorySendChannel[T], value: T) -> None:
    """Send without a checkpoint when there is room; otherwise wait like `send`."""
    try:
        channel.send_nowait(value)
    except trio.WouldBlock:
        await channel.send(value)


def drain(first: T, channel: trio.MemoryReceiveChannel[T], limit: int = 1 << 30) -> Iterator[T]:
    """`first`, then whatever is already queued on `channel` (at most `limit` items in
    all), without waiting. Lazy: an item is taken off the channel only when the caller
    asks for it, so nothing is held outside the channel if the caller stops early."""
    yield first
    taken = 1
    while taken < limit:
        try:
            yield channel.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return
        taken += 1
