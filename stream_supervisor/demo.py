"""`stream-supervisor demo`: the incident this service exists for, on embedded defaults.

The real supervisor runs against the simulated broker and an embedded PostgreSQL while
the broker misbehaves the way brokers do: the same fill sent two or three times, a
disconnect followed by an outage (the broker still holds the stale session and answers
the reconnect with HTTP 429; fills keep happening that only REST can bring back), and a
burst. Beside it runs the per-event consumer users write today (`testing/per_event.py`),
fed by an identical copy of the broker (same seed: same orders, same repeated frames,
same outage; Alpaca allows one stream connection per account, so each gets its own).
The summary puts broker truth, the per-event consumer and stream-supervisor side by side,
then the day's strategy figures (`stats`). Exit 0 only if stream-supervisor matches the
broker. `--clean` runs without faults; `--chaos` is the heavier fault mix.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, Final, TextIO

import trio

from .errors import ConfigError, StoreError
from .logs import get_logger
from .metrics import Metrics
from .settings import Settings
from .state import SupervisorState
from .stats import StatsError
from .store import StoreSnapshot
from .supervisor import EXIT_FAILURE, EXIT_OK
from .testing.broker import ChaosConfig, SimConfig, SimServer, SimulatedBroker, serve
from .testing.per_event import (
    PerEventResult,
    PerEventStats,
    create_schema,
    read_result,
    run_per_event_consumer,
)
from .testing.verify import Mismatch, summarize, verify_against_truth
from .wiring import open_supervisor, pg_store

log = get_logger("stream_supervisor.demo")

#: Updates per order the simulated market produces on average (pending_new, new, fills).
UPDATES_PER_ORDER: Final = 5.5
#: The strategies the simulated bot tags its orders with (`momentum-<uuid>`).
DEMO_STRATEGIES: Final = ("momentum", "meanrev", "pairs")
#: How long the broker refuses reconnects after it dropped the socket (seconds).
OUTAGE_SECONDS: Final = 3.0
#: A line every this many seconds when the output is not a terminal.
PLAIN_PROGRESS_EVERY: Final = 5.0

#: What brokers do on an ordinary day: repeated frames, one drop with an outage, a burst.
DEMO_INCIDENT: Final = ChaosConfig(
    duplicate_prob=0.06,
    duplicate_burst=3,
    outage_after_disconnect=OUTAGE_SECONDS,
)
#: `--chaos`: everything at once, several drops, malformed frames, REST errors.
DEMO_CHAOS: Final = ChaosConfig(
    duplicate_prob=0.05,
    duplicate_burst=3,
    disconnect_every=400,
    abrupt_prob=0.5,
    outage_after_disconnect=1.0,
    malformed_prob=0.01,
    unknown_event_prob=0.01,
    text_frame_prob=0.1,
    rest_error_prob=0.1,
    rest_short_pages=True,
)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    duration: float = 20.0
    rate: float = 200.0
    seed: int | None = None
    data_dir: Path | None = None
    chaos: bool = False
    clean: bool = False
    json: bool = False
    timeout: float = 120.0


@dataclass(slots=True)
class DemoResult:
    mismatches: list[Mismatch]
    truth: dict[str, Any]
    metrics: Metrics
    state: SupervisorState
    exit_code: int
    snapshot: StoreSnapshot | None = None
    per_event: PerEventResult | None = None
    per_event_stats: PerEventStats = field(default_factory=PerEventStats)


def demo_sim_config(options: DemoOptions, seed: int) -> SimConfig:
    """The simulated session of a demo run: the incident by default."""
    orders = max(1, int(options.duration * options.rate / UPDATES_PER_ORDER))
    updates = orders * UPDATES_PER_ORDER
    if options.clean:
        chaos = ChaosConfig()
    elif options.chaos:
        chaos = DEMO_CHAOS
    else:
        # One drop a third of the way in; a burst of a tenth of the session later on.
        chaos = replace(DEMO_INCIDENT, disconnect_at=(int(updates / 3),))
    return SimConfig(
        seed=seed,
        account_id=str(uuid.uuid4()),  # a fresh account each run: no clash with earlier runs
        orders=orders,
        rate=options.rate,
        chaos=chaos,
        start_time=datetime.now(UTC),  # fixed, so the per-event copy is the same session
        strategies=DEMO_STRATEGIES,
        burst=(0, 0) if options.clean else (int(updates * 0.6), max(50, int(updates / 10))),
        # The heavier mix trades options and crypto too, and ends the day with the fees,
        # expiries, assignments and split they bring (docs/design.md, section 10).
        asset_mix=options.chaos,
        # Posted after the day's updates are delivered: past the outage and its backoff.
        activity_delay=5.0,
    )


async def run_pipeline_against_sim(
    settings: Settings,
    sim_config: SimConfig,
    *,
    timeout: float,
    progress: TextIO | None = None,
    per_event: bool = False,
) -> DemoResult:
    """Serve the simulated broker on loopback, run the real supervisor against it and
    `settings.database_url`, wait until the market is finished and the database has
    caught up, drain, and verify. With `per_event`, the per-event consumer runs beside it
    against an identical copy of the broker. Used by `demo` and the integration tests."""
    broker = SimulatedBroker(sim_config)
    metrics = Metrics()
    state = SupervisorState()
    result = DemoResult([], {}, metrics, state, EXIT_FAILURE)
    exit_code: list[int] = []
    async with trio.open_nursery() as nursery:
        server: SimServer = await nursery.start(serve, broker)
        settings = replace(
            settings,
            key_id=sim_config.key_id,
            secret_key=sim_config.secret_key,
            base_url=server.rest_url,
            stream_url=server.ws_url,
            account_id=None,
            first_start_lookback=3600.0,
            # The simulated account starts empty, with its session, which the lookback
            # covers whole; a baseline taken while the market already runs would rightly
            # give up the P&L realized before it (docs/design.md, section 9).
            baseline=False,
            # A session with the asset mix posts its end-of-day activities seconds after it
            # ends: look often then.
            activity_interval=(min(settings.activity_interval, 1.0) if sim_config.asset_mix
                               else settings.activity_interval),
        )
        twin: SimulatedBroker | None = None
        if per_event:
            twin = SimulatedBroker(sim_config)
            twin_server: SimServer = await nursery.start(serve, twin)
            await trio.to_thread.run_sync(create_schema, settings.database_url)
            listening = trio.Event()
            nursery.start_soon(partial(
                run_per_event_consumer, twin_server.ws_url, sim_config.key_id,
                sim_config.secret_key, settings.database_url, result.per_event_stats,
                listening=listening))
            # Its market opens only once the consumer listens: it has no way to read
            # back what it was not connected for, and a clean session must be fair to it.
            with trio.fail_after(30):
                await listening.wait()
        async with open_supervisor(settings, metrics=metrics, state=state,
                                   install_signal_handlers=False) as supervisor:
            done = trio.Event()

            async def run_supervisor() -> None:
                exit_code.append(await supervisor.run())
                done.set()

            nursery.start_soon(run_supervisor)
            if twin is not None:
                nursery.start_soon(twin.run_market)
            await nursery.start(broker.run_market)
            show = _Progress(progress, broker, metrics, state, result.per_event_stats)
            with trio.move_on_after(timeout):
                while True:
                    show.tick()
                    if done.is_set():
                        break
                    if broker.finished:
                        result.mismatches = await _verify(settings, broker)
                        if not result.mismatches:
                            break
                    await trio.sleep(0.25)
            show.end()
            if twin is not None:
                # The per-event consumer gets what its socket still holds; it will never
                # get what the outage took (nothing would ever bring that back).
                await _quiet(lambda: result.per_event_stats.updates, seconds=1.0, limit=10.0)
            supervisor.request_drain("demo finished")
            with trio.move_on_after(settings.drain_timeout + 5):
                await done.wait()
        nursery.cancel_scope.cancel()
    result.snapshot = await _snapshot(settings, broker)
    result.mismatches = verify_against_truth(result.snapshot, broker.ground_truth())
    if not broker.finished:
        result.mismatches.append(Mismatch("liveness", "market", "finished", "still trading"))
    if per_event:
        result.per_event = await trio.to_thread.run_sync(read_result, settings.database_url)
    result.truth = broker.ground_truth()
    result.exit_code = exit_code[0] if exit_code else EXIT_FAILURE
    return result


async def _quiet(count: Callable[[], int], *, seconds: float, limit: float) -> None:
    """Wait until `count()` stops moving for `seconds` (at most `limit`)."""
    with trio.move_on_after(limit):
        last = count()
        while True:
            await trio.sleep(seconds)
            if count() == last:
                return
            last = count()


async def _snapshot(settings: Settings, broker: SimulatedBroker) -> StoreSnapshot:
    store = pg_store(settings)
    await store.open()
    try:
        return await store.snapshot(broker.account_id)
    finally:
        await store.aclose()


async def _verify(settings: Settings, broker: SimulatedBroker) -> list[Mismatch]:
    return verify_against_truth(await _snapshot(settings, broker), broker.ground_truth())


class _Progress:
    """A live line: redrawn in place on a terminal, a plain line every few seconds
    otherwise (a log file gets no carriage-return spam)."""

    def __init__(self, out: TextIO | None, broker: SimulatedBroker, m: Metrics,
                 s: SupervisorState, per_event: PerEventStats) -> None:
        self.out, self.broker, self.m, self.s, self.per_event = out, broker, m, s, per_event
        self.tty = out is not None and out.isatty()
        self.last_plain = float("-inf")

    def _line(self) -> str:
        m, s = self.m, self.s
        received = sum(m.value("stream_supervisor_events_received_total", source=src)
                       for src in ("stream", "rest"))
        dups = sum(m.value("stream_supervisor_duplicates_dropped_total", layer=layer)
                   for layer in ("lru", "inflight", "database", "order"))
        return (f"market {'done' if self.broker.finished else 'trading'}"
                f" | received {int(received)} | committed {s.committed_events}"
                f" | dups dropped {int(dups)}"
                f" | reconnects {int(m.value('stream_supervisor_reconnects_total'))}"
                f" | {s.connection:<11} | per-event handled {self.per_event.updates}")

    def tick(self) -> None:
        if self.out is None:
            return
        if self.tty:
            self.out.write("\r" + self._line())
            self.out.flush()
        elif trio.current_time() - self.last_plain >= PLAIN_PROGRESS_EVERY:
            self.last_plain = trio.current_time()
            print(self._line(), file=self.out, flush=True)

    def end(self) -> None:
        if self.out is None:
            return
        if self.tty:
            self.out.write("\r" + self._line() + "\n")
        else:
            print(self._line(), file=self.out)
        self.out.flush()


# --------------------------------------------------------------------- the comparison


@dataclass(frozen=True, slots=True)
class Column:
    """One consumer's account of the session, in the broker's terms."""

    fills_applied: int
    applied_twice: int
    fills_lost: int
    positions: dict[str, Decimal]  # symbol -> net quantity (0 when flat)

    def drifting(self, truth: dict[str, Decimal]) -> list[str]:
        return [s for s in sorted(truth) if self.positions.get(s, Decimal(0)) != truth[s]]


def broker_positions(truth: dict[str, Any]) -> dict[str, Decimal]:
    return {sym: Decimal(p["qty"]) for sym, p in truth["positions"].items()}


def broker_fills(truth: dict[str, Any]) -> list[tuple[str, Decimal]]:
    return [(oid, Decimal(f["cum_qty"])) for oid, o in truth["orders"].items()
            for f in o.get("fills", [])]


def supervisor_column(snapshot: StoreSnapshot, truth: dict[str, Any]) -> Column:
    keys = [k for k in snapshot.event_keys if k.startswith("fill:")]
    stored = {oid: o.filled_qty for oid, o in snapshot.orders.items()}
    lost = sum(1 for oid, cum in broker_fills(truth) if stored.get(oid, Decimal(0)) < cum)
    symbols = set(truth["positions"]) | {p.symbol for p in snapshot.positions}
    return Column(
        fills_applied=len(keys),
        # The dedupe table's primary key makes a second row impossible; the first figure
        # that could show one is the quantity, counted here against the broker's fills.
        applied_twice=len(keys) - len(set(keys)),
        fills_lost=lost,
        positions={s: snapshot.net_position(s) for s in symbols},
    )


def per_event_column(result: PerEventResult, truth: dict[str, Any]) -> Column:
    lost = sum(1 for fill in broker_fills(truth) if fill not in result.fills_seen)
    return Column(result.fill_rows, result.duplicate_fill_rows, lost, dict(result.positions))


def comparison_table(truth: dict[str, Any], ours: Column, theirs: Column | None) -> str:
    want = broker_positions(truth)
    heads = ["broker truth", "per-event consumer", "stream-supervisor"]
    cols: list[Column | None] = [None, theirs, ours]
    total = len(broker_fills(truth))

    def row(label: str, values: list[str]) -> str:
        return f"  {label:<26}" + "".join(f"{v:>20}" for v in values)

    def each(value: Callable[[Column], str]) -> list[str]:
        return [value(c) if c is not None else "n/a" for c in cols[1:]]

    lines = [row("", heads)]
    lines.append(row("fills recorded", [str(total), *each(lambda c: str(c.fills_applied))]))
    lines.append(row("fills applied twice", ["0", *each(lambda c: str(c.applied_twice))]))
    lines.append(row("fills lost", ["0", *each(lambda c: str(c.fills_lost))]))
    lines.append(row("symbols whose qty drifts",
                     ["0", *each(lambda c: f"{len(c.drifting(want))} of {len(want)}")]))
    lines.append("  net quantity per symbol (* differs from the broker)")
    for symbol in sorted(want):
        values = [_qty(want[symbol])]
        for c in cols[1:]:
            if c is None:
                values.append("n/a")
                continue
            got = c.positions.get(symbol, Decimal(0))
            values.append(_qty(got) + (" *" if got != want[symbol] else "  "))
        lines.append(row(f"  {symbol}", values))
    return "\n".join(lines)


def _qty(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


def _faults_line(truth: dict[str, Any], options: DemoOptions) -> str:
    s = truth.get("stats", {})
    parts = []
    if s.get("dup_frames"):
        parts.append(f"{s['dup_frames']} repeated frames")
    if s.get("disconnects"):
        outage = DEMO_CHAOS.outage_after_disconnect if options.chaos else OUTAGE_SECONDS
        parts.append(f"{s['disconnects']} disconnect(s), each followed by a {outage:g} s "
                     "outage (reconnects refused with HTTP 429)")
    if s.get("rejected_429"):
        parts.append(f"{s['rejected_429']} refused reconnects")
    injected = sum(truth.get("injected", {}).values())
    if injected:
        parts.append(f"{injected} malformed or unknown frames")
    if s.get("rest_faults"):
        parts.append(f"{s['rest_faults']} REST errors")
    return "faults injected: " + (", ".join(parts) if parts else "none (--clean)")


# --------------------------------------------------------------------- statistics


def strategy_lines(settings: Settings, account_id: str, started: datetime) -> list[str]:
    """The session's per-strategy figures, as the nightly `stats` job computes them."""
    import psycopg

    from .stats import DayRange, compute_stats

    database_url = settings.database_url
    days = DayRange(started.date(), datetime.now(UTC).date())
    compute_stats(database_url, settings.strategy(), days, account_id=account_id,
                  lock_wait_s=10.0)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT strategy, sum(trades), sum(wins), sum(net_pnl), sum(gross_profit),"
            " sum(gross_loss) FROM strategy_stats WHERE account_id = %s"
            " GROUP BY strategy ORDER BY strategy", [account_id]).fetchall()
    if not rows:
        return ["  no position closed in this session"]
    head = (f"  {'strategy':<14}{'trades':>8}{'win rate':>10}{'net P&L':>14}"
            f"{'profit factor':>15}")
    out = [head]
    for strategy, trades, wins, net, gross_profit, gross_loss in rows:
        factor = f"{gross_profit / gross_loss:.2f}" if gross_loss else "n/a"
        out.append(f"  {strategy:<14}{trades:>8}{wins / trades:>10.0%}"
                   f"{net.quantize(Decimal('0.01')):>14}{factor:>15}")
    return out


# --------------------------------------------------------------------- the command


def run_demo(settings: Settings, options: DemoOptions) -> int:
    from .embedded import default_data_dir, start_embedded_postgres
    from .migrate import apply_migrations
    from .service import tune_interpreter

    tune_interpreter()
    seed = options.seed if options.seed is not None else uuid.uuid4().int % 1_000_000
    sim_config = demo_sim_config(options, seed)
    out = sys.stderr
    embedded = None
    if settings.database_url:
        database_url = settings.database_url
        print("demo: using DATABASE_URL", file=out)
    else:
        data_dir = options.data_dir or default_data_dir()
        data_dir.mkdir(parents=True, exist_ok=True)
        print(f"demo: starting embedded PostgreSQL in {data_dir}", file=out)
        embedded = start_embedded_postgres(data_dir)
        database_url = embedded.uri
    mode = "clean" if options.clean else "chaos" if options.chaos else "incident"
    try:
        apply_migrations(database_url)
        print(f"demo: seed {seed}, {sim_config.orders} orders at {options.rate:g} updates/s,"
              f" {mode}", file=out)
        result = trio.run(partial(
            run_pipeline_against_sim,
            replace(settings, database_url=database_url),
            sim_config,
            timeout=options.timeout,
            progress=out,
            per_event=True,
        ))
        stats = [] if options.json else _strategies(
            replace(settings, database_url=database_url), sim_config)
    finally:
        if embedded is not None:
            embedded.stop()
    return _report(result, seed, options, stats)


def _strategies(settings: Settings, sim_config: SimConfig) -> list[str]:
    """The figures are an extra: a failure is shown, never what decides the exit code."""
    assert sim_config.account_id is not None and sim_config.start_time is not None
    try:
        return strategy_lines(settings, sim_config.account_id, sim_config.start_time)
    except (ConfigError, StoreError, StatsError) as exc:
        return [f"  (could not compute: {str(exc)[:200]})"]


def _report(result: DemoResult, seed: int, options: DemoOptions, stats: list[str]) -> int:
    truth = result.truth
    assert result.snapshot is not None
    ours = supervisor_column(result.snapshot, truth)
    theirs = per_event_column(result.per_event, truth) if result.per_event else None
    ok = not result.mismatches and result.exit_code == EXIT_OK
    if options.json:
        print(json.dumps(_summary(result, seed, ours, theirs), indent=2))
    else:
        print(_faults_line(truth, options))
        print(comparison_table(truth, ours, theirs))
        print("strategy figures of the session (stream-supervisor stats):")
        print("\n".join(stats))
    print(summarize(result.mismatches), file=sys.stderr)
    if ok:
        print("demo: exactly-once held: every order and position matches the broker",
              file=sys.stderr)
    else:
        flag = " --clean" if options.clean else " --chaos" if options.chaos else ""
        print(f"demo: FAILED (replay with: stream-supervisor demo --seed {seed}{flag})",
              file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILURE


def _summary(result: DemoResult, seed: int, ours: Column, theirs: Column | None
             ) -> dict[str, Any]:
    m, truth = result.metrics, result.truth
    stats = truth.get("stats", {})
    injected = {k: v for k, v in {
        **truth.get("injected", {}),
        "duplicate_frames": stats.get("dup_frames", 0),
        "disconnects": stats.get("disconnects", 0),
        "rest_faults": stats.get("rest_faults", 0),
        "rejected_429": stats.get("rejected_429", 0),
    }.items() if v}
    want = broker_positions(truth)

    def column(c: Column) -> dict[str, Any]:
        return {"fills_applied": c.fills_applied, "applied_twice": c.applied_twice,
                "fills_lost": c.fills_lost, "drifting_symbols": c.drifting(want),
                "positions": {s: str(q) for s, q in sorted(c.positions.items())}}

    return {
        "seed": seed,
        "orders": len(truth["orders"]),
        "fills": truth.get("fills_total"),
        "updates_sent": stats.get("update_frames"),
        "events_received": int(sum(m.value("stream_supervisor_events_received_total", source=s)
                                   for s in ("stream", "rest"))),
        "events_committed": result.state.committed_events,
        "batches": result.state.committed_batches,
        "duplicates_dropped": {layer: int(m.value("stream_supervisor_duplicates_dropped_total",
                                                  layer=layer))
                               for layer in ("lru", "inflight", "database", "order")},
        "backfill_fills": int(m.value("stream_supervisor_backfill_fills_total")),
        "dead_letters": int(m.value("stream_supervisor_dead_letters_total")),
        "reconnects": int(m.value("stream_supervisor_reconnects_total")),
        "faults_injected": injected,
        "broker": {"positions": {s: str(q) for s, q in sorted(want.items())}},
        "stream_supervisor": column(ours),
        "per_event_consumer": column(theirs) if theirs is not None else None,
        "mismatches": len(result.mismatches),
    }

__all__ = ["DemoOptions", "demo_sim_config", "run_demo", "run_pipeline_against_sim"]
