"""`stream-supervisor demo`: the real supervisor against the simulated broker and an
embedded PostgreSQL, with a live progress line and a summary verified against the
simulated broker's ground truth. Exit 0 only if exactly-once held.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import trio

from .logs import get_logger
from .metrics import Metrics
from .settings import Settings
from .state import SupervisorState
from .supervisor import EXIT_FAILURE, EXIT_OK
from .testing.broker import ChaosConfig, SimConfig, SimServer, SimulatedBroker, serve
from .testing.verify import Mismatch, summarize, verify_against_truth
from .wiring import open_supervisor, pg_store

log = get_logger("stream_supervisor.demo")

#: Updates per order the simulated market produces on average (pending_new, new, fills).
UPDATES_PER_ORDER = 5.5

DEMO_CHAOS = ChaosConfig(
    duplicate_prob=0.05,
    duplicate_burst=3,
    disconnect_every=400,
    abrupt_prob=0.5,
    malformed_prob=0.01,
    unknown_event_prob=0.01,
    text_frame_prob=0.1,
    rest_error_prob=0.1,
    rest_short_pages=True,
)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    duration: float = 10.0
    rate: float = 200.0
    seed: int | None = None
    data_dir: Path | None = None
    chaos: bool = False
    timeout: float = 120.0


@dataclass(slots=True)
class DemoResult:
    mismatches: list[Mismatch]
    truth: dict[str, Any]
    metrics: Metrics
    state: SupervisorState
    exit_code: int


async def run_pipeline_against_sim(
    settings: Settings,
    sim_config: SimConfig,
    *,
    timeout: float,
    progress: TextIO | None = None,
) -> DemoResult:
    """Serve the simulated broker on loopback, run the real supervisor against it and
    `settings.database_url`, wait until the market is finished and the database has
    caught up, drain, and verify. Used by `demo`, benchmarks and integration tests."""
    broker = SimulatedBroker(sim_config)
    metrics = Metrics()
    state = SupervisorState()
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
        )
        async with open_supervisor(settings, metrics=metrics, state=state,
                                   install_signal_handlers=False) as supervisor:
            done = trio.Event()
            exit_code: list[int] = []

            async def run_supervisor() -> None:
                exit_code.append(await supervisor.run())
                done.set()

            nursery.start_soon(run_supervisor)
            await nursery.start(broker.run_market)
            mismatches: list[Mismatch] = []
            with trio.move_on_after(timeout):
                while True:
                    if progress is not None:
                        _progress_line(progress, broker, metrics, state)
                    if done.is_set():
                        break
                    if broker.finished:
                        mismatches = await _verify(settings, broker)
                        if not mismatches:
                            break
                    await trio.sleep(0.25)
            if progress is not None:
                _progress_line(progress, broker, metrics, state)
                progress.write("\n")
            supervisor.request_drain("demo finished")
            with trio.move_on_after(settings.drain_timeout + 5):
                await done.wait()
        nursery.cancel_scope.cancel()
    mismatches = await _verify(settings, broker)
    if not broker.finished:
        mismatches.append(Mismatch("liveness", "market", "finished", "still trading"))
    code = exit_code[0] if exit_code else EXIT_FAILURE
    return DemoResult(mismatches, broker.ground_truth(), metrics, state, code)


async def _verify(settings: Settings, broker: SimulatedBroker) -> list[Mismatch]:
    store = pg_store(settings)
    await store.open()
    try:
        snapshot = await store.snapshot(broker.account()["id"])
    finally:
        await store.aclose()
    return verify_against_truth(snapshot, broker.ground_truth())


def _progress_line(out: TextIO, broker: SimulatedBroker, m: Metrics, s: SupervisorState) -> None:
    received = sum(
        m.value("stream_supervisor_events_received_total", source=src) for src in ("stream", "rest")
    )
    line = (
        f"\rmarket {'done' if broker.finished else 'trading'}"
        f" | received {int(received)}"
        f" | committed {s.committed_events}"
        f" | batches {s.committed_batches}"
        f" | dups dropped {int(_dups(m))}"
        f" | reconnects {int(m.value('stream_supervisor_reconnects_total'))}"
        f" | {s.connection:<11}"
    )
    out.write(line)
    out.flush()


def _dups(m: Metrics) -> float:
    return sum(
        m.value("stream_supervisor_duplicates_dropped_total", layer=layer)
        for layer in ("lru", "inflight", "database", "order")
    )


def run_demo(settings: Settings, options: DemoOptions) -> int:
    from .embedded import default_data_dir, start_embedded_postgres
    from .migrate import apply_migrations
    from .service import tune_interpreter

    tune_interpreter()

    seed = options.seed if options.seed is not None else uuid.uuid4().int % 1_000_000
    orders = max(1, int(options.duration * options.rate / UPDATES_PER_ORDER))
    sim_config = SimConfig(
        seed=seed,
        account_id=str(uuid.uuid4()),  # a fresh account each run: no clash with earlier runs
        orders=orders,
        rate=options.rate,
        chaos=DEMO_CHAOS if options.chaos else ChaosConfig(),
    )
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
    try:
        apply_migrations(database_url)
        print(f"demo: seed {seed}, {orders} orders at {options.rate:g} updates/s"
              + (", chaos on" if options.chaos else ""), file=out)
        result = trio.run(partial(
            run_pipeline_against_sim,
            replace(settings, database_url=database_url),
            sim_config,
            timeout=options.timeout,
            progress=out,
        ))
    finally:
        if embedded is not None:
            embedded.stop()
    return _report(result, seed, options)


def _report(result: DemoResult, seed: int, options: DemoOptions) -> int:
    m, truth = result.metrics, result.truth
    stats = truth.get("stats", {})
    injected = {k: v for k, v in {**truth.get("injected", {}), 
        "duplicate_frames": stats.get("dup_frames", 0),
        "disconnects": stats.get("disconnects", 0),
        "rest_faults": stats.get("rest_faults", 0),
        "rejected_429": stats.get("rejected_429", 0)
    }.items() if v}
    summary = {
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
        "mismatches": len(result.mismatches),
    }
    print(json.dumps(summary, indent=2))
    print(summarize(result.mismatches), file=sys.stderr)
    ok = not result.mismatches and result.exit_code == EXIT_OK
    if ok:
        print("demo: exactly-once held: every order and position matches the broker",
              file=sys.stderr)
    else:
        print(f"demo: FAILED (replay with: stream-supervisor demo --seed {seed}"
              f"{' --chaos' if options.chaos else ''})", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILURE


__all__ = ["DemoOptions", "run_demo", "run_pipeline_against_sim"]
