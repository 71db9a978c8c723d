"""Wiring for `stream-supervisor run`: the real transport, REST client and PostgreSQL."""

from __future__ import annotations

from functools import partial

import trio

from .logs import get_logger
from .rest import HttpBrokerRest, RestSettings
from .settings import Settings
from .supervisor import Dependencies, Supervisor
from .transport import websocket_connector

log = get_logger("stream_supervisor.service")


def make_rest(settings: Settings) -> HttpBrokerRest:
    return HttpBrokerRest(RestSettings(
        base_url=settings.base_url, key_id=settings.key_id, secret_key=settings.secret_key,
        timeout=settings.rest_timeout, retries=settings.rest_retries,
    ))


def make_dependencies(settings: Settings, rest: HttpBrokerRest) -> Dependencies:
    from .pgstore import PgStore

    return Dependencies(
        connector=websocket_connector(connect_timeout=settings.connect_timeout),
        rest=rest,
        store_factory=partial(PgStore, settings.database_url,
                              statement_timeout_ms=settings.statement_timeout_ms),
    )


async def serve(settings: Settings) -> int:
    async with make_rest(settings) as rest:
        supervisor = Supervisor(settings, make_dependencies(settings, rest))
        return await supervisor.run()


def run_service(settings: Settings, *, migrate_first: bool = False) -> int:
    if migrate_first:
        from .migrate import apply_migrations

        applied = apply_migrations(settings.database_url)
        log.info("migrations_applied", versions=applied, count=len(applied))
    log.info("starting", stream_url=settings.stream_url, base_url=settings.base_url,
             account_id=settings.account_id)
    return trio.run(serve, settings)
