"""`stream-supervisor` command line: run, demo, simulate, migrate, check, reconcile, rebaseline,
health, prune, dead-letters, stats.

Flags override the environment; every command builds one `Settings` and passes it down.
Exit codes: 0 ok, 1 failure or violation, 2 usage, 78 configuration error.
"""

from __future__ import annotations

import argparse
import http.client
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .deadletters import add_dead_letters_arguments, cmd_dead_letters
from .endpoints import HTTP_ADDR_ENV, parse_http_addr
from .errors import ConfigError, MigrationError, SchemaError, StoreError
from .logs import configure_logging, get_logger, redactor
from .retention import add_prune_arguments, cmd_prune
from .settings import Settings, load_settings
from .stats import add_stats_arguments, cmd_stats
from .supervisor import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

log = get_logger("stream_supervisor.cli")

#: How long `health` waits for the running service's answer.
DEFAULT_HEALTH_TIMEOUT = 3.0


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="libpq URI or conninfo (env DATABASE_URL)")
    p.add_argument("--log-format", choices=["auto", "json", "console"],
                   help="log rendering (env STREAM_SUPERVISOR_LOG_FORMAT; auto = console on a "
                        "terminal, JSON lines otherwise)")
    p.add_argument("--log-level", help="debug, info, warning, error (env STREAM_SUPERVISOR_LOG_LEVEL)")


def _broker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-id", help="broker key id (env APCA_API_KEY_ID)")
    p.add_argument("--secret-key", help="broker secret key (env APCA_API_SECRET_KEY); prefer "
                   "the environment: flags are visible in the process list")
    p.add_argument("--base-url", help="REST base URL (env APCA_API_BASE_URL, default paper)")
    p.add_argument("--stream-url", help="stream URL (env APCA_API_STREAM_URL, default derived "
                   "from the base URL)")
    p.add_argument("--account-id", help="account id (env STREAM_SUPERVISOR_ACCOUNT_ID; default: "
                   "asked from GET /v2/account)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-supervisor",
        description="Alpaca trade updates into PostgreSQL exactly once.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="the service: stream, dedupe and write until signalled")
    _common_flags(run)
    _broker_flags(run)
    run.add_argument("--http-addr", help="serve /healthz, /readyz, /metrics on HOST:PORT "
                     "(env STREAM_SUPERVISOR_HTTP_ADDR; default off)")
    run.add_argument("--migrate", action="store_true",
                     help="apply pending migrations before starting")

    demo = sub.add_parser("demo", help="the incident this service exists for: the pipeline "
                          "and the per-event consumer side by side against a misbehaving "
                          "simulated broker, on embedded PostgreSQL, verified")
    _common_flags(demo)
    from .demo import DemoOptions  # local, as `simulate`'s below: the test kit is big

    defaults = DemoOptions()
    demo.add_argument("--duration", type=float, default=defaults.duration,
                      help=f"seconds of simulated trading (default {defaults.duration:g})")
    demo.add_argument("--rate", type=float, default=defaults.rate,
                      help=f"updates per second (default {defaults.rate:g})")
    demo.add_argument("--seed", type=int, default=None, help="order-flow seed (default random)")
    demo.add_argument("--data-dir", type=Path, default=None,
                      help="embedded PostgreSQL data directory (default: the user data dir)")
    faults = demo.add_mutually_exclusive_group()
    faults.add_argument("--clean", action="store_true",
                        help="a broker without faults (default: repeated frames, a disconnect "
                             "with an outage only REST covers, a burst)")
    faults.add_argument("--chaos", action="store_true",
                        help="the heavier mix: several drops, malformed frames, REST errors")
    demo.add_argument("--json", action="store_true",
                      help="print the summary as JSON instead of the comparison table")
    demo.add_argument("--timeout", type=float, default=defaults.timeout,
                      help=f"give up catching up after this many seconds (default "
                           f"{defaults.timeout:g})")

    simulate = sub.add_parser("simulate", help="the simulated Alpaca-compatible broker alone "
                              "(WebSocket + REST), with chaos options")
    from .testing.broker.cli import add_simulate_arguments  # local: keeps `run` start-up lean

    add_simulate_arguments(simulate)
    _common_flags(simulate)

    migrate = sub.add_parser("migrate", help="apply migrations/*.sql in order, once each")
    _common_flags(migrate)
    migrate.add_argument("--dir", type=Path, default=None, help="migrations directory")

    check = sub.add_parser("check", help="integrity checks on the database; non-zero on a "
                           "violation")
    _common_flags(check)
    check.add_argument("--account-id", help="limit to one account")

    reconcile = sub.add_parser("reconcile", help="compare stored positions with the broker's "
                               "GET /v2/positions")
    _common_flags(reconcile)
    _broker_flags(reconcile)
    reconcile.add_argument("--apply", action="store_true",
                           help="write an adjustment (position_adjustments) setting each "
                                "differing position to the broker's; takes the writer lock")
    rebaseline = sub.add_parser("rebaseline", help="start over from the broker's positions "
                                "and open orders (history kept); takes the writer lock")
    _common_flags(rebaseline)
    _broker_flags(rebaseline)
    _health_flags(sub.add_parser("health", help="exit 0 if the running service's "
                                        "/healthz (--ready: /readyz) answers 200, else 1"))
    prune = sub.add_parser("prune", help="delete old dedupe keys, dead letters and closed "
                           "positions in small batches (never position_history)")
    _common_flags(prune)
    add_prune_arguments(prune)
    dead = sub.add_parser("dead-letters", help="list what could not be stored (newest "
                          "first), or replay one exactly once after a fix (--replay ID)")
    _common_flags(dead)
    add_dead_letters_arguments(dead)
    stats = sub.add_parser("stats", help="per-strategy statistics of closed positions, per UTC "
                           "day (default: yesterday and the lookback days before it)")
    _common_flags(stats)
    add_stats_arguments(stats)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        key_id=getattr(args, "key_id", None),
        secret_key=getattr(args, "secret_key", None),
        base_url=getattr(args, "base_url", None),
        stream_url=getattr(args, "stream_url", None),
        account_id=getattr(args, "account_id", None),
        database_url=getattr(args, "database_url", None),
        log_format=getattr(args, "log_format", None),
        log_level=getattr(args, "log_level", None),
        http_addr=getattr(args, "http_addr", None),
    )


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_cli(argv))


def run_cli(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"stream-supervisor: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    level = settings.log_level
    if args.command == "demo" and args.log_level is None:
        # A person watches the progress line and the summary; the faults the demo injects
        # would otherwise log warnings by design. Errors still show.
        level = "error"
    configure_logging(fmt=settings.log_format, level=level, secrets=settings.secrets(),
                      stream=sys.stderr if args.command == "demo" else None)
    try:
        handler = _COMMANDS[args.command]
        return int(handler(args, settings))
    except ConfigError as exc:
        message = redactor.scrub(str(exc))
        log.error("configuration_error", error=message)
        print(f"stream-supervisor: configuration error: {message}", file=sys.stderr)
        return EXIT_CONFIG
    except (StoreError, SchemaError, MigrationError) as exc:
        message = redactor.scrub(str(exc))
        log.error("database_error", error=message, kind=type(exc).__name__)
        print(f"stream-supervisor: {message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_run()
    from .service import run_service

    return run_service(settings, migrate_first=args.migrate)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import DemoOptions, run_demo

    return run_demo(settings, DemoOptions(
        duration=args.duration, rate=args.rate, seed=args.seed, data_dir=args.data_dir,
        chaos=args.chaos, clean=args.clean, json=args.json, timeout=args.timeout,
    ))


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from .testing.broker.cli import run_simulate

    return run_simulate(args)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set (or pass --database-url)")
    from .migrate import apply_migrations

    applied = apply_migrations(settings.database_url, args.dir)
    log.info("migrations_applied", versions=applied, count=len(applied))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return EXIT_OK


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set (or pass --database-url)")
    from .check import format_violations, run_checks

    violations = run_checks(settings.database_url, args.account_id)
    print(format_violations(violations))
    for v in violations:
        log.error("check_violation", layer=v.layer, what=v.what, detail=v.detail)
    return EXIT_FAILURE if violations else EXIT_OK


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set (or pass --database-url)")
    if not settings.key_id or not settings.secret_key:
        raise ConfigError("APCA_API_KEY_ID and APCA_API_SECRET_KEY are required for reconcile")
    from .reconcile import reconcile

    return trio.run(partial(reconcile, settings, apply=bool(getattr(args, "apply", False))))


def cmd_rebaseline(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set (or pass --database-url)")
    if not settings.key_id or not settings.secret_key:
        raise ConfigError("APCA_API_KEY_ID and APCA_API_SECRET_KEY are required for rebaseline")
    from .reconcile import rebaseline

    return trio.run(rebaseline, settings)


def _health_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-addr", help=f"where `run` serves health (env {HTTP_ADDR_ENV})")
    p.add_argument("--ready", action="store_true",
                   help="check /readyz (streaming, caught up, database writable) instead of "
                        "/healthz (process and actors alive)")
    p.add_argument("--timeout", type=float, default=DEFAULT_HEALTH_TIMEOUT,
                   help=f"seconds to wait for the answer (default {DEFAULT_HEALTH_TIMEOUT:g})")


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 if the running service answers 200 on /healthz (or /readyz), else 1.

    Liveness is the default because a container health check that fails restarts the
    task: a standby replica, a long backfill or a broker outage are not ready, yet a
    restart would not help (and a reconnect storm earns HTTP 429s)."""
    path = "/readyz" if args.ready else "/healthz"
    if not settings.http_addr:
        print(f"unhealthy: {HTTP_ADDR_ENV} is not set, so `run` serves no health endpoint")
        return 1
    try:
        host, port = parse_http_addr(settings.http_addr)
    except ConfigError as exc:
        print(f"unhealthy: {exc}")
        return 1
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "stream-supervisor-health"})
        response = conn.getresponse()
        body = response.read(4096).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        print(f"unhealthy: {path} on {host}:{port}: {exc}")
        return 1
    finally:
        conn.close()
    verdict = "healthy" if response.status == 200 else "unhealthy"
    print(f"{verdict}: {path} {response.status} {body}")
    return 0 if response.status == 200 else 1


_COMMANDS: dict[str, Any] = {
    "run": cmd_run,
    "demo": cmd_demo,
    "simulate": cmd_simulate,
    "migrate": cmd_migrate,
    "check": cmd_check,
    "reconcile": cmd_reconcile,
    "rebaseline": cmd_rebaseline,
    "health": cmd_health,
    "prune": cmd_prune,
    "dead-letters": cmd_dead_letters,
    "stats": cmd_stats,
}
