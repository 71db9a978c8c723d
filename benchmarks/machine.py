"""How busy the machine was while the benchmark ran, so that a figure from a shared
machine says so (issue 18: figures people can trust).

- `busy_at_start`: the load-average guard. `run.py` refuses to run on a busy machine
  (or, told to go ahead, marks every figure of the report as measured on one).
- `CpuMeter`: around each scenario, the CPU time the whole machine spent (from
  /proc/stat) and how much of it was ours (this process, the consumer child, the local
  PostgreSQL server and its backends): the rest is other people's work competing for
  the same cores, as cores busy on average.
- `uptime()`: the line `uptime` prints, recorded with every figure.
- `host_loop_ms`: how fast this host runs Python right now, before each repetition. A
  virtual machine's load average says nothing of its neighbours on the host: on idle
  machines of this kind (load average under 1) one and the same loop of ten million
  additions took 0.52 s on one day and 1.19 s on the next, and the pipeline figure
  moved with it (35,416 against 21,000-26,000 updates/s). Figures from runs far apart
  in it are not comparable.
- `pg_activity`: checkpoints and WAL flushes of the server, before and after a scenario.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg

#: Default guard: a 1-minute load average above this, per CPU, is a busy machine (half
#: of a 2-CPU machine already working for someone else).
MAX_LOAD_PER_CPU = 0.5
_TICK = os.sysconf("SC_CLK_TCK")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        load = os.getloadavg()
        return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


#: The loop `host_loop_ms` times: long enough to span several scheduler ticks, short
#: enough that five of them cost a repetition well under a second on a slow day.
HOST_LOOP_ADDITIONS = 1_000_000


def host_loop_ms(runs: int = 5, additions: int = HOST_LOOP_ADDITIONS) -> float:
    """The median wall time, in ms, of `runs` runs of a fixed pure-Python loop (integer
    additions): the kind of work the supervisor's interpreter does, timed by the clock
    the figures are in, so time the host gives to others (steal, a busy sibling thread)
    shows in it as it shows in them. Lower is faster."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        total = 0
        for i in range(additions):
            total += i
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 1)


def busy_at_start(max_load_per_cpu: float = MAX_LOAD_PER_CPU) -> tuple[bool, str]:
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0]
    limit = max_load_per_cpu * cpus
    busy = load > limit
    why = (f"1-minute load average {load:.2f} on {cpus} CPUs "
           f"{'above' if busy else 'within'} the guard's {limit:.2f}")
    return busy, why


def _machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def _machine_steal_ticks() -> int:
    """Jiffies the hypervisor gave to other guests while ours wanted a CPU (0 on bare
    metal, or where the kernel does not say)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    return int(fields[7]) if len(fields) > 7 else 0


def _proc_ticks(pid: int, children: bool = False) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])  # reaped children (exited backends)
    return ticks


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found


class CpuMeter:
    """CPU time of the machine, and of ours, between `start()` and `stop()`."""

    def __init__(self, postmaster_pid: int | None) -> None:
        self.postmaster = postmaster_pid
        self._begin: tuple[float, int, int, float, float, int] | None = None
        self._backends: dict[int, int] = {}
        self._steal = 0

    def _ours(self) -> tuple[float, float, int]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        pg = 0
        if self.postmaster:
            pg = _proc_ticks(self.postmaster, children=True)
            for pid in _children_of(self.postmaster):
                # Live backends: what they used since they started, minus what they had
                # at `start()` (a backend that exits is counted in the postmaster's
                # reaped-children time instead).
                pg += _proc_ticks(pid) - self._backends.get(pid, 0)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime, pg

    def start(self) -> None:
        if self.postmaster:
            self._backends = {pid: _proc_ticks(pid) for pid in _children_of(self.postmaster)}
        busy, total = _machine_busy_ticks()
        me, kids, pg = self._ours()
        self._steal = _machine_steal_ticks()
        self._begin = (time.monotonic(), busy, total, me, kids, pg)

    def stop(self) -> dict[str, Any]:
        assert self._begin is not None
        wall0, busy0, _total0, me0, kids0, pg0 = self._begin
        busy, _total = _machine_busy_ticks()
        me, kids, pg = self._ours()
        wall = time.monotonic() - wall0
        machine = (busy - busy0) / _TICK
        ours = (me - me0) + (kids - kids0) + (pg - pg0) / _TICK
        others = max(0.0, machine - ours)
        steal = (_machine_steal_ticks() - self._steal) / _TICK
        return {
            "wall_s": round(wall, 3),
            "machine_cpu_s": round(machine, 3),
            "ours_cpu_s": round(ours, 3),
            "others_cpu_s": round(others, 3),
            # Cores other people's work kept busy on average while this scenario ran.
            "others_cores": round(others / wall, 2) if wall > 0 else None,
            # Of that, the CPUs the hypervisor gave to other guests (counted in `others`).
            "steal_cores": round(steal / wall, 2) if wall > 0 else None,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        }


def postmaster_pid(admin_uri: str) -> int | None:
    """The local server's postmaster, if it runs on this machine (the embedded one)."""
    try:
        with psycopg.connect(admin_uri, autocommit=True) as conn:
            row = conn.execute("SELECT setting FROM pg_settings "
                               "WHERE name = 'data_directory'").fetchone()
        if row is None:
            return None
        pidfile = Path(row[0]) / "postmaster.pid"
        pid = int(pidfile.read_text().splitlines()[0])
        return pid if Path(f"/proc/{pid}").exists() else None
    except (OSError, ValueError, IndexError, psycopg.Error):
        return None


def enable_wal_timing(admin_uri: str) -> bool:
    """Time WAL writes and flushes on the server (`track_wal_io_timing`), so that the
    report can say how long commits waited for fsync. Needs a superuser (the embedded
    server's is one); without it the flush counts are still there, without times."""
    try:
        with psycopg.connect(admin_uri, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET track_wal_io_timing = on")
            conn.execute("SELECT pg_reload_conf()")
        return True
    except psycopg.Error:
        return False


_ACTIVITY = """
SELECT w.wal_records, w.wal_bytes, w.wal_write, w.wal_sync, w.wal_write_time,
       w.wal_sync_time, b.checkpoints_timed, b.checkpoints_req, b.checkpoint_write_time,
       b.checkpoint_sync_time, b.buffers_checkpoint, b.buffers_backend_fsync
FROM pg_stat_wal w, pg_stat_bgwriter b
"""
_FIELDS = ("wal_records", "wal_bytes", "wal_write", "wal_sync", "wal_write_time_ms",
           "wal_sync_time_ms", "checkpoints_timed", "checkpoints_req",
           "checkpoint_write_time_ms", "checkpoint_sync_time_ms", "buffers_checkpoint",
           "buffers_backend_fsync")


def pg_activity(admin_uri: str) -> dict[str, float] | None:
    try:
        with psycopg.connect(admin_uri, autocommit=True) as conn:
            row = conn.execute(_ACTIVITY).fetchone()
    except psycopg.Error:
        return None
    return None if row is None else {k: float(v) for k, v in zip(_FIELDS, row, strict=True)}


def pg_delta(before: dict[str, float] | None, after: dict[str, float] | None,
             commits: int | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    d = {k: round(after[k] - before[k], 3) for k in _FIELDS}
    d["checkpoints"] = d["checkpoints_timed"] + d["checkpoints_req"]
    if d["wal_sync"]:
        d["wal_sync_ms_mean"] = round(d["wal_sync_time_ms"] / d["wal_sync"], 4)
    if commits:
        d["wal_syncs_per_commit"] = round(d["wal_sync"] / commits, 3)
    return d
