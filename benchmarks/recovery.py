#!/usr/bin/env python3
"""Benchmark: recovery that keeps up, within the broker's REST limit.

The real supervisor (PgStore, the HTTP REST client, the WebSocket client) against the
simulated broker on loopback, the broker enforcing Alpaca's 200 requests a minute, the
account's own bot spending its half of them. Two modes:

- catch-up (default): the market trades at each `--rates` value; after `--warmup`
  seconds the broker drops the stream and refuses it for `--outage` seconds (only REST
  covers that range). Reported: seconds from the reconnect until the lag (the broker's
  newest fill vs the committed cursor) is under 5 s, REST requests the service used
  for it, its most requests in one broker window, 429s, peak RSS, and whether the
  service said it could not keep up (`recovery_over_budget`).
- soak (`--soak SECONDS`): trade at `--rate` for that long with a disconnect (and a
  short outage) every `--disconnect-every` seconds; then let it catch up. Reported: RSS
  after warm-up (flat within 15%?), the database against the ground truth, 429s, the
  user's bot refused (its share untouched?).

    python benchmarks/recovery.py                            # 100, 500, 1000/s; ~12 min
    python benchmarks/recovery.py --rates 500 --outage 60
    python benchmarks/recovery.py --soak 1800 --rate 500     # the 30-minute soak
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trio

from stream_supervisor.backoff import BackoffPolicy
from stream_supervisor.embedded import create_database, drop_database, start_embedded_postgres
from stream_supervisor.logs import configure_logging
from stream_supervisor.metrics import Metrics
from stream_supervisor.migrate import apply_migrations
from stream_supervisor.pgstore import PgStore
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.testing.broker import (
    USER_BOT_AGENT,
    ChaosConfig,
    SimConfig,
    SimServer,
    SimulatedBroker,
    run_user_bot,
    serve,
)
from stream_supervisor.testing.running import rss_mb, start_supervising
from stream_supervisor.testing.verify import verify_against_truth
from stream_supervisor.wiring import open_supervisor

SERVICE = "stream-supervisor"
LAG_TARGET = 5.0
UPDATES_PER_ORDER = 5.0  # the simulated market's average, to size a run
POLL = 0.25


@dataclass
class Watch:
    """What the run looked like, sampled every POLL seconds."""

    rss: list[tuple[float, float]] = field(default_factory=list)
    lag: list[tuple[float, float]] = field(default_factory=list)


def lag_seconds(broker: SimulatedBroker, state: SupervisorState) -> float | None:
    market = broker.market
    if not market.activity_ids:
        return 0.0
    newest = market.activity_ns[market.activity_ids[-1]]
    cursor = state.committed_cursor
    if cursor is None or cursor.fill_time is None:
        return None
    return max(0.0, (newest - cursor.fill_time.timestamp() * 1e9) / 1e9)


def settings_for(database_url: str, server: SimServer, config: SimConfig, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "database_url": database_url, "key_id": config.key_id, "secret_key": config.secret_key,
        "base_url": server.rest_url, "stream_url": server.ws_url,
        "backoff": BackoffPolicy(initial=0.2, factor=2.0, cap=2.0, rate_limited_floor=1.0),
        "first_start_lookback": 60.0, "log_level": "warning", "log_format": "json",
    }
    base.update(kw)
    return Settings(**base)


async def run_case(admin_uri: str, *, rate: float, seconds: float, chaos: ChaosConfig,
                   limit: int, bot_per_minute: float, share: float, seed: int,
                   stop_when_caught_up_after: float | None, verify: bool,
                   keep: bool) -> dict[str, Any]:
    name = f"bench_recovery_{int(rate)}_{random.randrange(1 << 30)}"
    db = create_database(admin_uri, name)
    apply_migrations(db)
    orders = int(rate * seconds / UPDATES_PER_ORDER) + 1
    config = SimConfig(seed=seed, orders=orders, rate=rate, chaos=chaos,
                       rest_rate_limit=limit, account_id=str(uuid.uuid4()))
    broker = SimulatedBroker(replace(config, start_time=datetime.now(UTC)))
    metrics, state = Metrics(), SupervisorState()
    watch = Watch()
    result: dict[str, Any] = {"rate": rate, "seconds": seconds, "orders": orders}
    try:
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            await nursery.start(run_user_bot, broker, bot_per_minute)
            settings = settings_for(db, server, config, rest_budget_share=share)
            async with open_supervisor(settings, metrics=metrics, state=state,
                                       install_signal_handlers=False) as sup:
                done = start_supervising(sup, nursery)
                # The market trades once the service streams (its first start's baseline
                # and backfill are not what is measured), its clock starting then, so
                # its times are the wall clock's, as the broker's are.
                with trio.fail_after(300):
                    while state.connection != "streaming":
                        await trio.sleep(POLL)
                broker.market.start_clock(datetime.now(UTC))
                start = trio.current_time()
                await nursery.start(broker.run_market)
                reconnected_at = caught_at = None
                disconnected_at = None
                conn_at_disconnect = 0
                rest_at_reconnect = 0
                deadline = start + seconds + (900 if verify else 60)
                while trio.current_time() < deadline:
                    await trio.sleep(POLL)
                    now = trio.current_time() - start
                    # This process: the broker and the service both live here.
                    watch.rss.append((now, rss_mb()))
                    lag = lag_seconds(broker, state)
                    if lag is not None:
                        watch.lag.append((now, lag))
                    if disconnected_at is None and broker.stats["disconnects"]:
                        disconnected_at = now
                        conn_at_disconnect = state.connection_id
                    if (disconnected_at is not None and reconnected_at is None
                            and state.connection_id > conn_at_disconnect
                            and state.connection in ("backfilling", "streaming")):
                        reconnected_at = now
                        rest_at_reconnect = broker.rate_limiter.by_caller.get(SERVICE, 0)
                    if (reconnected_at is not None and caught_at is None and lag is not None
                            and lag < LAG_TARGET and state.connection == "streaming"):
                        caught_at = now
                        result["rest_requests_to_catch_up"] = (
                            broker.rate_limiter.by_caller.get(SERVICE, 0) - rest_at_reconnect)
                    if (stop_when_caught_up_after is not None and caught_at is not None
                            and now > caught_at + stop_when_caught_up_after):
                        break
                    if broker.finished and verify and state.caught_up and lag is not None \
                            and lag < 1.0:
                        snap = await _snapshot(db, broker.account_id)
                        if not verify_against_truth(snap, broker.ground_truth(),
                                                    strict_prices=False):
                            break
                result["disconnected_at_s"] = disconnected_at
                result["reconnected_at_s"] = reconnected_at
                result["catch_up_s"] = (None if caught_at is None or reconnected_at is None
                                        else round(caught_at - reconnected_at, 1))
                sup.request_drain("benchmark done")
                with trio.move_on_after(30):
                    await done.wait()
            nursery.cancel_scope.cancel()
        limiter = broker.rate_limiter
        result.update({
            "fills": broker.fills_total,
            "updates": broker.updates_total,
            "disconnects": broker.stats["disconnects"],
            "rest_requests_service": limiter.by_caller.get(SERVICE, 0),
            "rest_requests_user_bot": limiter.by_caller.get(USER_BOT_AGENT, 0),
            "rest_by_endpoint": dict(limiter.requests),
            "service_peak_in_window": limiter.peak_in_window.get(SERVICE, 0),
            "service_share_per_window": int(limit * share),
            "rest_429_service": limiter.refused.get(SERVICE, 0),
            "rest_429_user_bot": limiter.refused.get(USER_BOT_AGENT, 0),
            "over_budget_warned": metrics.value("stream_supervisor_recovery_behind") > 0,
            "recovery_fill_rate": round(metrics.value("stream_supervisor_recovery_fill_rate"), 1),
            "peak_rss_mb": round(max(r for _, r in watch.rss), 1) if watch.rss else None,
            "max_lag_s": round(max(lag for _, lag in watch.lag), 1) if watch.lag else None,
        })
        if verify:
            snap = await _snapshot(db, broker.account_id)
            # Quantities and every order's values; the per-symbol path figures (average
            # entry, realized P&L) reported apart (docs/design.md, section 8).
            mismatches = verify_against_truth(snap, broker.ground_truth(), strict_prices=False)
            strict = verify_against_truth(snap, broker.ground_truth())
            result["db_equals_truth"] = broker.finished and not mismatches
            result["mismatches"] = [str(m) for m in mismatches[:5]]
            result["path_figure_mismatches"] = [str(m) for m in strict[:5]
                                                if m not in mismatches]
        result["rss_samples"] = _thin(watch.rss)
        result["lag_samples"] = _thin(watch.lag)
        return result
    finally:
        if not keep:
            drop_database(admin_uri, name)


def _thin(samples: list[tuple[float, float]], every: float = 5.0) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for t, v in samples:
        if not out or t - out[-1][0] >= every:
            out.append((round(t, 1), round(v, 1)))
    return out


async def _snapshot(db: str, account_id: str) -> Any:
    store = PgStore(db, application_name="bench-observer")
    await store.open()
    try:
        return await store.snapshot(account_id)
    finally:
        with trio.move_on_after(5, shield=True):
            await store.aclose()


def rss_flatness(samples: list[tuple[float, float]], warmup: float) -> float | None:
    after = [r for t, r in samples if t >= warmup]
    if len(after) < 2:
        return None
    return (max(after) - after[0]) / after[0]


async def run(args: argparse.Namespace, admin_uri: str) -> dict[str, Any]:
    out: dict[str, Any] = {"parameters": {
        "limit_per_minute": args.limit, "share": args.share,
        "user_bot_per_minute": args.limit * (1 - args.share),
        "machine": f"{platform.system()} {platform.machine()}, python {platform.python_version()}",
    }}
    common = {"limit": args.limit, "bot_per_minute": args.limit * (1 - args.share),
              "share": args.share, "seed": args.seed, "keep": args.keep}
    if args.soak:
        every = int(args.rate * args.disconnect_every)
        chaos = ChaosConfig(disconnect_every=every, outage_after_disconnect=args.soak_outage)
        res = await run_case(admin_uri, rate=args.rate, seconds=args.soak, chaos=chaos,
                             stop_when_caught_up_after=None, verify=True, **common)
        res["rss_growth_after_warmup"] = rss_flatness(res["rss_samples"], args.soak * 0.2)
        out["soak"] = res
        return out
    cases = []
    for rate in args.rates:
        chaos = ChaosConfig(disconnect_at=(int(rate * args.warmup),),
                            outage_after_disconnect=args.outage)
        seconds = args.warmup + args.outage + args.after
        print(f"recovery: {rate:g} updates/s, outage {args.outage:g}s ...", file=sys.stderr)
        res = await run_case(admin_uri, rate=rate, seconds=seconds, chaos=chaos,
                             stop_when_caught_up_after=10.0, verify=False, **common)
        cases.append(res)
        print(json.dumps({k: v for k, v in res.items() if not k.endswith("_samples")}),
              file=sys.stderr)
    out["catch_up"] = cases
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = []
    if "catch_up" in summary:
        lines += [("| updates/s | fills | catch-up after reconnect | REST used to catch up | "
                  "service peak / window (share) | 429 service / bot | over budget said | "
                  "peak RSS |"), "|---|---|---|---|---|---|---|---|"]
        for r in summary["catch_up"]:
            lines.append(
                f"| {r['rate']:g} | {r['fills']} | "
                f"{'not within the run' if r['catch_up_s'] is None else str(r['catch_up_s']) + ' s'}"
                f" | {r.get('rest_requests_to_catch_up', '-')} | "
                f"{r['service_peak_in_window']} ({r['service_share_per_window']}) | "
                f"{r['rest_429_service']} / {r['rest_429_user_bot']} | "
                f"{'yes' if r['over_budget_warned'] else 'no'} | {r['peak_rss_mb']} MB |")
    if "soak" in summary:
        r = summary["soak"]
        lines += [
            (f"soak: {r['seconds']:g} s at {r['rate']:g} updates/s, {r['disconnects']} "
            f"disconnects, {r['fills']} fills; DB == truth: {r['db_equals_truth']}; "
            f"429 service/bot: {r['rest_429_service']}/{r['rest_429_user_bot']}; service peak "
            f"{r['service_peak_in_window']} per window (share {r['service_share_per_window']});"
            f" RSS growth after warm-up {r['rss_growth_after_warmup']}; peak RSS "
            f"{r['peak_rss_mb']} MB; max lag {r['max_lag_s']} s")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[100.0, 500.0, 1000.0])
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--after", type=float, default=240.0,
                    help="seconds the market keeps trading after the outage (at most)")
    ap.add_argument("--limit", type=int, default=200, help="the broker's REST limit a minute")
    ap.add_argument("--share", type=float, default=0.5, help="the service's share of it")
    ap.add_argument("--soak", type=float, default=0.0, help="soak for this many seconds")
    ap.add_argument("--rate", type=float, default=500.0, help="soak: updates per second")
    ap.add_argument("--disconnect-every", type=float, default=180.0,
                    help="soak: seconds of trading between disconnects")
    ap.add_argument("--soak-outage", type=float, default=10.0,
                    help="soak: seconds the broker refuses the stream after each")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--database-url", default=None,
                    help="a server where databases may be created (default: embedded)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    args = ap.parse_args(argv)
    configure_logging(fmt="json", level="warning", stream=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="stream-supervisor-recovery-"))
    embedded = None
    try:
        admin_uri = args.database_url
        if not admin_uri:
            embedded = start_embedded_postgres(tmp / "pgdata", delete_on_stop=True)
            admin_uri = embedded.uri
        summary = trio.run(partial(run, args, admin_uri))
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if "soak" in summary:
        s = summary["soak"]
        ok = (s["db_equals_truth"] and s["rest_429_service"] == 0
              and s["rest_429_user_bot"] == 0
              and s["service_peak_in_window"] <= s["service_share_per_window"])
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
