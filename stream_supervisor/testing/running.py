"""Running the real supervisor beside a simulated broker, for chaos tests and benchmarks
alike: in the background with a `done` event, and a process's resident memory."""

from __future__ import annotations

from pathlib import Path

import trio

from ..supervisor import Supervisor


def start_supervising(sup: Supervisor, nursery: trio.Nursery) -> trio.Event:
    """`sup.run()` in `nursery`; the event is set once it returns (or fails)."""
    done = trio.Event()

    async def supervise() -> None:
        try:
            await sup.run()
        finally:
            done.set()

    nursery.start_soon(supervise)
    return done


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident set in MB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
