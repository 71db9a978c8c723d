"""Giving the C allocator's freed memory back to the system after a recovery.

While REST reads an outage, the live stream waits in the live buffer as decoded updates
(500 updates/s for a minute is 30,000 of them, some 40 MB). Once forwarded they are
freed; glibc keeps what it freed inside its heap, returning only the free space at the
heap's very top. After each recovery's buffer has gone through the pipeline,
`release_freed_memory` asks glibc to return its free pages (`malloc_trim(0)`:
milliseconds, once per recovery): 22-27 MB after each recovery of a soak at 500
updates/s. The rest stays in pymalloc's arenas, which the objects that outlive the
recovery keep allocated (docs/design.md, section 12, memory across recoveries).
Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

import trio

from .logs import get_logger

log = get_logger("stream_supervisor.heap")

#: Seconds after the live buffer is forwarded before trimming: the writer commits what
#: it held meanwhile (a few batches), and those updates are freed by then.
SETTLE: Final = 3.0


def _find_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM: Final = _find_trim()


def release_freed_memory() -> bool:
    """Return the allocator's free pages to the system; whether anything was returned
    (False also where the allocator cannot)."""
    return _TRIM is not None and bool(_TRIM(0))


def resident_mb() -> float | None:
    """This process's resident set in MB (None where /proc does not say)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def release_after_settling(delay: float = SETTLE) -> None:
    """`release_freed_memory` once the pipeline has taken what a recovery buffered,
    logged with the resident set before and after."""
    await trio.sleep(delay)
    before = resident_mb()
    released = release_freed_memory()
    after = resident_mb()
    log.info("freed_memory_released", released=released,
             rss_mb_before=None if before is None else round(before, 1),
             rss_mb_after=None if after is None else round(after, 1))
