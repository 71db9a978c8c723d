"""Where a process's memory goes, over time: `python -m stream_supervisor.testing.memtrace
OUT EVERY -- ARGS...` runs `stream-supervisor ARGS...` with tracemalloc on and, every
EVERY seconds, appends to OUT what grew since the first snapshot (by line, the biggest
first, each with the traceback that allocated most of it), plus the interpreter's live
object counts by type. A debugging aid for long soaks (the chaos harness starts the
service through it when `STREAM_SUPERVISOR_TEST_MEMTRACE` names a file): tracemalloc
slows the process and costs memory of its own, so no figure taken with it is a benchmark.
With `STREAM_SUPERVISOR_TEST_MEMTRACE_MODE=malloc` it reports instead, cheaply, the C
allocator's and Python's totals beside the resident set.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

#: Frames kept per allocation: enough to see which structure a dict entry belongs to.
FRAMES = 12
#: Lines reported per snapshot.
TOP = 25


def _report(out: Path, first: tracemalloc.Snapshot, started: float) -> None:
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    current, peak = tracemalloc.get_traced_memory()
    head = (f"=== t={time.monotonic() - started:.0f}s traced={current / 1e6:.1f}MB "
            f"peak={peak / 1e6:.1f}MB")
    lines = [head]
    for stat in snap.compare_to(first, "lineno")[:TOP]:
        lines.append(f"{stat.size_diff / 1e6:+8.2f} MB {stat.count_diff:+9d} blocks "
                     f"{stat.size / 1e6:8.2f} MB now  {stat.traceback[0]}")
    lines.append("--- biggest growers, allocated from:")
    for stat in snap.compare_to(first, "traceback")[:6]:
        lines.append(f"{stat.size_diff / 1e6:+8.2f} MB")
        lines.extend("      " + str(frame) for frame in stat.traceback[-FRAMES:])
    kinds = Counter(type(o).__name__ for o in gc.get_objects())
    lines.append("--- live objects: " + ", ".join(f"{k}={v}" for k, v in kinds.most_common(15)))
    with out.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _allocators(out: Path, started: float) -> None:
    """Without tracemalloc: the C allocator's view (glibc's mallinfo2: bytes its arenas
    hold, in use and free; mmapped blocks) beside Python's (pymalloc blocks allocated),
    and the resident set: which one grows, and whether what grows is in use."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text()
               .splitlines() if line.startswith("VmRSS:"))
    with out.open("a") as fh:
        fh.write(f"t={time.monotonic() - started:.0f}s rss={rss / 1024:.1f}MB "
                 f"malloc_arena={info.arena / 1e6:.1f}MB in_use={info.uordblks / 1e6:.1f}MB "
                 f"free={info.fordblks / 1e6:.1f}MB mmapped={info.hblkhd / 1e6:.1f}MB "
                 f"pymalloc_blocks={sys.getallocatedblocks()} "
                 f"gc_objects={len(gc.get_objects())} threads={threading.active_count()}\n")


def _watch(out: Path, every: float, traced: bool) -> None:
    started = time.monotonic()
    if not traced:
        while True:
            _allocators(out, started)
            time.sleep(every)
    time.sleep(every)  # past start-up: what grows after, not what start-up allocated
    first = tracemalloc.take_snapshot()
    while True:
        time.sleep(every)
        _report(out, first, started)


def main(argv: list[str]) -> None:
    out, every, rest = Path(argv[0]), float(argv[1]), argv[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    traced = os.environ.get("STREAM_SUPERVISOR_TEST_MEMTRACE_MODE", "tracemalloc") != "malloc"
    if traced:
        tracemalloc.start(FRAMES)
    threading.Thread(target=_watch, args=(out, every, traced), daemon=True).start()
    from ..cli import main as cli_main

    cli_main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
