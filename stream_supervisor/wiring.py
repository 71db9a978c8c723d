"""Settings -> a running supervisor, in one place.

`open_supervisor` is how every caller gets a supervisor: the service, the demo, the
deterministic simulation, the benchmarks and the chaos suite. Each passes only what it
substitutes (an in-memory socket, a REST transport, a store); everything else comes
from `Settings`, through the per-actor `from_settings` constructors, so a default is
stated once (in `settings.py`) and every caller runs the same wiring.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial

import httpx

from .accounts import AccountSpec
from .admission import Admission
from .broker_events import EventsSettings, EventsSupervisor
from .eventstream import EventStreamConnector
from .fleet import OpenAccount, Runner
from .metrics import Metrics
from .pgstore import PgStore
from .rest import BrokerRest
from .rest_http import HttpBrokerRest, RestSettings
from .settings import Settings
from .sse_http import sse_connector
from .state import SupervisorState
from .store import Store
from .supervisor import Dependencies, Supervisor
from .transport import Connector
from .wsclient import websocket_connector


def pg_store(settings: Settings, *, application_name: str = "stream-supervisor") -> PgStore:
    """The production store, bounded by the configured statement timeout."""
    return PgStore(settings.database_url, statement_timeout_ms=settings.statement_timeout_ms,
                   application_name=application_name)


def http_rest(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    rng: random.Random | None = None,
    metrics: Metrics | None = None,
) -> HttpBrokerRest:
    """The broker's REST API over HTTP (`transport` answers in memory for the simulation).
    The caller closes it (`async with`)."""
    return HttpBrokerRest(RestSettings.from_settings(settings), rng=rng, transport=transport,
                          metrics=metrics)


@asynccontextmanager
async def open_supervisor(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    state: SupervisorState | None = None,
    connector: Connector | None = None,
    rest: BrokerRest | None = None,
    rest_transport: httpx.AsyncBaseTransport | None = None,
    store_factory: Callable[[], Store] | None = None,
    wallclock: Callable[[], datetime] | None = None,
    rng: random.Random | None = None,
    install_signal_handlers: bool = True,
    admission: Admission | None = None,
) -> AsyncIterator[Supervisor]:
    """A supervisor wired from `settings`; await its `run()` inside the block.

    Defaults are production's: the wsproto client, the HTTP REST client (opened here and
    closed on leaving), PostgreSQL. A caller-supplied `rest` is the caller's to close.
    """
    rng = rng if rng is not None else random.Random()
    metrics = metrics if metrics is not None else Metrics()
    own_rest: HttpBrokerRest | None = None
    if rest is None:
        rest = own_rest = http_rest(settings, transport=rest_transport, rng=rng,
                                    metrics=metrics)
    deps = Dependencies(
        connector=connector or websocket_connector(connect_timeout=settings.connect_timeout,
                                                   max_message_size=settings.max_frame_bytes),
        rest=rest,
        store_factory=store_factory or partial(pg_store, settings),
        wallclock=wallclock or (lambda: datetime.now(UTC)),
        rng=rng,
        install_signal_handlers=install_signal_handlers,
        admission=admission,
    )
    try:
        yield Supervisor(settings, deps, metrics=metrics, state=state)
    finally:
        if own_rest is not None:
            await own_rest.aclose()


def events_connector(settings: Settings, spec: AccountSpec) -> EventStreamConnector:
    """The Broker API events stream of an accounts-file entry (`source = "broker-events"`,
    `base_url` the Broker API host)."""
    return sse_connector(settings.base_url, settings.key_id, settings.secret_key,
                         connect_timeout=settings.connect_timeout,
                         read_timeout=settings.ping_interval + settings.ping_timeout,
                         credentials_hint=spec.credentials_from or "the key and secret")


def account_opener(
    *,
    connector: Connector | None = None,
    store_factory: Callable[[Settings], Store] | None = None,
    rng: random.Random | None = None,
    events_connect: Callable[[Settings], EventStreamConnector] | None = None,
) -> OpenAccount:
    """How a `Fleet` (fleet.py) opens each account's supervisor: `open_supervisor` with
    the account's settings, without signal handlers (the fleet owns them)."""

    @asynccontextmanager
    async def open_account(spec: AccountSpec, settings: Settings, metrics: Metrics,
                           state: SupervisorState,
                           admission: Admission | None) -> AsyncIterator[Runner]:
        if spec.source == "broker-events":
            # A partner's events stream: every account on it, in one pipeline (section 11).
            events = EventsSupervisor(
                EventsSettings.from_settings(settings, spec.name),
                events_connector(settings, spec) if events_connect is None
                else events_connect(settings),
                partial(store_factory or pg_store, settings), metrics=metrics, state=state,
                rng=rng, install_signal_handlers=False)
            yield events
            return
        async with open_supervisor(
            settings, metrics=metrics, state=state, connector=connector,
            store_factory=partial(store_factory or pg_store, settings),
            rng=rng, install_signal_handlers=False, admission=admission,
        ) as supervisor:
            yield supervisor

    return open_account


__all__ = ["account_opener", "events_connector", "http_rest", "open_supervisor", "pg_store"]
