"""`stream-supervisor run` with an accounts file: every account of the file in this
process, shared out with any other replica running the same file (docs/design.md,
section 11), plus the health/metrics listener and systemd notify.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import trio

from .accounts import load_accounts_file
from .drain import exit_backstop
from .endpoints import open_health_listeners, serve_health
from .errors import FATAL, ConfigError
from .fleet import Fleet, FleetMonitor
from .logs import get_logger, redactor
from .metrics import Metrics
from .pgfleet import ReplicaSet
from .sdnotify import Notifier, watchdog_interval, watchdog_verdict
from .settings import Settings
from .state import SupervisorState
from .supervisor import EXIT_CONFIG
from .wiring import account_opener, pg_store

log = get_logger("stream_supervisor.fleet_service")


async def serve_fleet(settings: Settings, *, environ: Mapping[str, str],
                      backstop: bool = False) -> int:
    assert settings.accounts_file is not None
    specs = load_accounts_file(settings.accounts_file, environ)
    if settings.account_name:
        # One process per account (deploy/systemd/stream-supervisor@.service).
        specs = [s for s in specs if s.name == settings.account_name]
        if not specs:
            raise ConfigError(f"STREAM_SUPERVISOR_ACCOUNT_NAME={settings.account_name!r}: no "
                              f"[accounts.{settings.account_name}] in {settings.accounts_file}")
    redactor.add(s for spec in specs for s in (spec.key_id, spec.secret_key))
    replicas = ReplicaSet(settings.database_url, [s.name for s in specs])
    # Each replica's sessions say whose they are (pg_stat_activity, pg_locks joined to it).
    app = f"stream-supervisor@{replicas.replica_id}"[:63]
    fleet = Fleet(settings, specs,
                  account_opener(store_factory=lambda s: pg_store(s, application_name=app)),
                  admission=replicas.view)
    log.info("accounts_loaded", accounts=len(specs), replica_id=replicas.replica_id,
             file=settings.accounts_file,
             unusable={s.name: s.problem for s in specs if s.problem})
    listeners = await open_health_listeners(settings.http_addr) if settings.http_addr else None
    notifier = Notifier.from_environ(environ)
    monitor = FleetMonitor(fleet, settings)
    code: int | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replicas.run)
            if listeners is not None:
                await nursery.start(partial(
                    serve_health, listeners, SupervisorState(), Metrics(), monitor,
                    ready=partial(fleet.readiness, monitor), registry=fleet.registry))
            if notifier is not None:
                # Accounts start on their own schedule; each one's readiness is /readyz's.
                notifier.ready(f"serving {len(specs)} accounts")
                watchdog = watchdog_interval(environ)
                if watchdog is not None:
                    nursery.start_soon(watchdog_loop, notifier, monitor, watchdog)
            if backstop:  # `service.serve`'s, for every account of the process
                nursery.start_soon(exit_backstop, lambda: fleet.draining,
                                   settings.drain_timeout)
            code = await fleet.run()
            nursery.cancel_scope.cancel()
    except FATAL as exc:  # the replica registry's schema is missing
        log.error("fatal_configuration_error", error=str(exc), kind=type(exc).__name__)
        code = EXIT_CONFIG
    finally:
        if notifier is not None:
            notifier.stopping("stopping")
            notifier.status("stopped" if code is None else f"stopped, exit code {code}")
            notifier.close()
    return code


async def watchdog_loop(notifier: Notifier, monitor: FleetMonitor, period: float) -> None:
    """`WATCHDOG=1` every `period` seconds while every running account's actors are
    alive, as `/healthz` judges them (`FleetMonitor`); withheld while one is wedged, so
    systemd restarts the process, as it would one account's (`sdnotify.notify_loop`)."""
    alive = True
    while True:
        alive = watchdog_verdict(monitor.assess(trio.current_time()), alive)
        if alive:
            notifier.send("WATCHDOG=1")
        await trio.sleep(period)
