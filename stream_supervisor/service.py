"""`stream-supervisor run`: the supervisor as production wires it (`wiring.py`), plus
what the process's home needs: the health/metrics listener and systemd notify.

One nursery holds the supervisor, the HTTP listener and the notify loop; the last two
stop when the supervisor returns.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial

import trio

from .backoff import Backoff
from .drain import exit_backstop
from .endpoints import open_health_listeners, serve_health
from .errors import StoreUnavailable
from .health import HealthMonitor, HealthPolicy
from .logs import get_logger
from .metrics import Metrics
from .sdnotify import Notifier, notify_loop, watchdog_interval
from .settings import Settings
from .state import SupervisorState
from .supervisor import STORE_WAIT_POLICY
from .wiring import open_supervisor
from .wsclient import shown_proxy, stream_proxy

log = get_logger("stream_supervisor.service")

#: How long a thread holding the GIL keeps it while another thread waits for it (CPython's
#: default is 5 ms). The writer's database calls run in a worker thread and release the
#: GIL while they wait; when a result arrives while the event loop is busy reading and
#: decoding, the writer waited up to a whole interval for it, a few times per batch.
#: At 0.5 ms a batch committed in half the time under load. At 0.1 ms the pipeline ran
#: 1.05-1.08x faster again on an idle machine, duplicates 0.98x, for 2% more CPU an
#: update; 0.05 ms gained nothing more, 2 ms lost 16% (BENCHMARKS.md, issue 18).
GIL_SWITCH_INTERVAL = 0.0001


def tune_interpreter() -> None:
    """Process-wide settings for a supervisor process (`run`, `demo`, the benchmarks).

    The heap built so far (every imported module, class and function: about 50,000
    objects) is frozen out of the cyclic garbage collector: it lives as long as the
    process, and each full collection scanned all of it while holding the GIL, a
    15-35 ms stall of the event loop and the writer together, the longest single pause
    of a quiet stream (BENCHMARKS.md, "The tail"). Collections of what the service
    allocates from here on still run as usual."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    gc.collect()  # whatever start-up left as garbage is not frozen forever
    gc.freeze()


async def serve(settings: Settings, *, environ: Mapping[str, str] | None = None,
                backstop: bool = False) -> int:
    """Run the service until drained or failed; returns the exit code.

    `environ` carries systemd's protocol variables (`NOTIFY_SOCKET`, `WATCHDOG_USEC`);
    they are not settings: systemd sets them per start, not the operator. `backstop`
    (the `run` process only): a drain that cannot finish ends the process
    (`drain.exit_backstop`)."""
    env = os.environ if environ is None else environ
    if settings.accounts_file:
        from .fleet_service import serve_fleet  # several accounts (design.md, section 11)

        return await serve_fleet(settings, environ=env, backstop=backstop)
    metrics = Metrics()
    state = SupervisorState()
    monitor = HealthMonitor(state, HealthPolicy.from_settings(settings), metrics)
    # Bind before anything else starts: a bad or taken address is a configuration error.
    listeners = await open_health_listeners(settings.http_addr) if settings.http_addr else None
    notifier = Notifier.from_environ(env)
    watchdog = watchdog_interval(env) if notifier is not None else None
    code: int | None = None
    try:
        async with (open_supervisor(settings, metrics=metrics, state=state) as supervisor,
                    trio.open_nursery() as nursery):
            if listeners is not None:
                await nursery.start(serve_health, listeners, state, metrics, monitor)
            if notifier is not None:
                await nursery.start(partial(notify_loop, state, notifier, monitor,
                                            watchdog=watchdog))
            if backstop:
                nursery.start_soon(exit_backstop, lambda: state.draining,
                                   settings.drain_timeout)
            code = await supervisor.run()
            nursery.cancel_scope.cancel()
    finally:
        if notifier is not None:
            # Also on a fatal exit or a crash: systemd then knows the stop was ours.
            notifier.stopping("stopping")
            notifier.status("stopped" if code is None else f"stopped, exit code {code}")
            notifier.close()
    assert code is not None  # set unless an exception is on its way out
    return code


def migrate_waiting(conninfo: str, *, sleep: Callable[[float], None] = time.sleep,
                    rng: random.Random | None = None) -> list[str]:
    """`run --migrate`'s migrations, waiting out a database outage as the service does
    (`database_unavailable`, backoff to 10 s): exiting 1 at once had systemd give up on
    the unit within a minute of a database outage at boot. A bad file, or a conninfo
    that can never work, still stops it."""
    from .migrate import apply_migrations

    wait = Backoff(STORE_WAIT_POLICY, rng)
    while True:
        try:
            return apply_migrations(conninfo)
        except StoreUnavailable as exc:
            delay = wait.next_delay()
            log.warning("database_unavailable", error=str(exc)[:300], delay=round(delay, 3),
                        during="migrate")
            sleep(delay)


def run_service(settings: Settings, *, migrate_first: bool = False) -> int:
    if migrate_first:
        applied = migrate_waiting(settings.database_url)
        log.info("migrations_applied", versions=applied, count=len(applied))
    log.info("starting", stream_url=settings.stream_url, base_url=settings.base_url,
             account_id=settings.account_id, http_addr=settings.http_addr)
    proxy = stream_proxy(settings.stream_url)
    if proxy is not None:
        log.info("stream_proxy", proxy=shown_proxy(proxy), stream_url=settings.stream_url)
    tune_interpreter()
    return trio.run(partial(serve, settings, backstop=True))
