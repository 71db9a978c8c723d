"""Giving the C allocator's freed memory back to the system after a recovery.

While REST reads an outage, the live stream waits in the live buffer as decoded updates
(500 updates/s for a minute is 30,000 of them, some 25 MB). Once forwarded they are
freed, but glibc keeps freed memory inside its heap for reuse and returns only the free
space at the heap's very top; the rest stays resident. Over a soak the resident set then
shows the largest buffer any recovery ever held, not what the service holds now. After
each recovery's buffer has gone through the pipeline, `release_freed_memory` asks glibc
to return its free pages (`malloc_trim(0)`: milliseconds, once per recovery), so the
resident set falls back between recoveries (BENCHMARKS.md, the soak). Elsewhere than
glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Final

import trio

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


async def release_after_settling(delay: float = SETTLE) -> None:
    """`release_freed_memory` once the pipeline has taken what a recovery buffered."""
    await trio.sleep(delay)
    release_freed_memory()
