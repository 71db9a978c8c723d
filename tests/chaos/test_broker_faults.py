"""Seeded broker-fault scenarios, end to end: the simulated broker on real loopback
sockets (WebSocket + REST) with its chaos knobs, the real supervisor, real PostgreSQL,
and the invariant checker against the broker's ground truth.

Each seed picks one fault family as its main fault and mixes in one or two cheap
others, plus pipeline settings (batch size, channel size, LRU size) that move the
dedupe work between layers. Every family is the main fault of several seeds; the last
test checks that, across the suite, each family's fault really happened.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import pytest

from stream_supervisor.testing.broker import ChaosConfig, SimConfig

from .harness import (
    DEAD_LETTER_KINDS,
    FAST_REST_LIMIT,
    Outcome,
    chaos_settings,
    dead_letter_count,
    injected_dead_letters,
    run_scenario,
)

pytestmark = pytest.mark.chaos

Knobs = dict[str, Any]


def _duplicates(r: random.Random) -> Knobs:
    return {"duplicate_prob": r.uniform(0.1, 0.35), "duplicate_burst": r.randint(2, 5)}


def _replay(r: random.Random) -> Knobs:
    # Replays only happen on a reconnect: give it some. Half of them race `listening`.
    return {"replay_on_connect": r.randint(5, 40), "disconnect_every": r.randint(20, 45),
            "replay_before_listening": r.random() < 0.5}


def _disconnect_every(r: random.Random) -> Knobs:
    return {"disconnect_every": r.randint(15, 50)}


def _disconnect_random(r: random.Random) -> Knobs:
    return {"disconnect_prob": r.uniform(0.02, 0.06), "abrupt_prob": 0.5}


def _disconnect_at(r: random.Random) -> Knobs:
    return {"disconnect_at": tuple(sorted(r.sample(range(3, 110), r.randint(2, 4)))),
            "abrupt_prob": r.choice((0.0, 1.0))}


def _abrupt_reset(r: random.Random) -> Knobs:
    return {"disconnect_every": r.randint(20, 50), "abrupt_prob": 1.0}


def _reorder(r: random.Random) -> Knobs:
    return {"reorder_window": r.randint(3, 8)}


def _delay(r: random.Random) -> Knobs:
    return {"delay_prob": r.uniform(0.05, 0.15), "delay_max": r.uniform(0.02, 0.1)}


def _stall(r: random.Random) -> Knobs:
    return {"stall_prob": 0.03, "stall_seconds": r.uniform(0.8, 1.2)}


def _malformed(r: random.Random) -> Knobs:
    return {"malformed_prob": r.uniform(0.04, 0.1)}


def _unknown_event(r: random.Random) -> Knobs:
    return {"unknown_event_prob": r.uniform(0.04, 0.1)}


def _oversized(r: random.Random) -> Knobs:
    return {"oversized_prob": r.uniform(0.02, 0.05),
            "oversized_bytes": r.choice((60_000, 250_000, 1_200_000))}


def _text_frames(r: random.Random) -> Knobs:
    return {"text_frame_prob": r.choice((0.3, 0.7, 1.0))}


def _skip_partial(r: random.Random) -> Knobs:
    # Partial fills the stream never sends; a reconnect's backfill or the next fill's
    # cumulative quantity must make up for them.
    return {"skip_partial_prob": r.uniform(0.3, 0.8), "disconnect_every": r.randint(40, 70)}


def _reject_429(r: random.Random) -> Knobs:
    if r.random() < 0.5:
        return {"reject_429_connects": r.randint(1, 4), "disconnect_every": r.randint(30, 60)}
    return {"reject_429_for": r.uniform(0.3, 1.0), "disconnect_every": r.randint(30, 60)}


def _rest_500(r: random.Random) -> Knobs:
    return {"rest_error_prob": r.uniform(0.1, 0.25), "disconnect_every": r.randint(30, 60)}


def _rest_429(r: random.Random) -> Knobs:
    return {"rest_429_prob": r.uniform(0.1, 0.2), "rest_retry_after": 1.0}


def _rest_slow(r: random.Random) -> Knobs:
    return {"rest_delay_max": r.uniform(0.05, 0.25), "disconnect_every": r.randint(30, 60)}


def _rest_short_pages(r: random.Random) -> Knobs:
    return {"rest_short_pages": True, "disconnect_every": r.randint(25, 50)}


def _everything(r: random.Random) -> Knobs:
    """Roughly what `demo --chaos` injects, all at once."""
    return {
        "duplicate_prob": 0.05, "duplicate_burst": 3, "disconnect_every": r.randint(40, 80),
        "abrupt_prob": 0.5, "malformed_prob": 0.02, "unknown_event_prob": 0.02,
        "text_frame_prob": 0.1, "rest_error_prob": 0.1, "rest_short_pages": True,
        "replay_on_connect": 10,
    }


@dataclass(frozen=True)
class Family:
    name: str
    knobs: Callable[[random.Random], Knobs]
    #: Whether the fault showed up in this run (from the broker's stats and our metrics).
    happened: Callable[[Outcome], bool]
    #: Cheap enough to add to another family's scenario.
    mixable: bool = True
    settings: dict[str, Any] = field(default_factory=dict)


def _stat(name: str) -> Callable[[Outcome], bool]:
    return lambda o: o.truth["stats"].get(name, 0) > 0


def _injected(*kinds: str) -> Callable[[Outcome], bool]:
    return lambda o: sum(o.truth["injected"].get(k, 0) for k in kinds) > 0


FAMILIES: Final = (
    Family("duplicates", _duplicates, _stat("dup_frames")),
    Family("replay_on_connect", _replay, _stat("replay_frames")),
    Family("disconnect_every", _disconnect_every, _stat("disconnects")),
    Family("disconnect_random", _disconnect_random, _stat("disconnects")),
    Family("disconnect_at", _disconnect_at, _stat("disconnects")),
    Family("abrupt_reset", _abrupt_reset, _stat("abrupt_disconnects")),
    Family("reorder", _reorder, lambda o: o.config.chaos.reorder_window > 1, mixable=False),
    Family("delay", _delay, lambda o: o.config.chaos.delay_prob > 0),
    Family("stall", _stall,
           lambda o: o.truth["stats"]["stalls"] > 0
           and o.metric("stream_supervisor_reconnects_total") > 0,
           mixable=False, settings={"ping_interval": 0.3, "ping_timeout": 0.3}),
    Family("malformed", _malformed, _injected("invalid_json", "data_null", "wrong_types",
                                              "unknown_stream")),
    Family("unknown_event", _unknown_event, _injected("unknown_event")),
    Family("oversized", _oversized, _injected("oversized"), settings={"max_frame_bytes": 50_000}),
    Family("text_frames", _text_frames, _stat("text_frames")),
    Family("skip_partial", _skip_partial, _stat("skipped_partials")),
    Family("reject_429", _reject_429, _stat("rejected_429"), mixable=False),
    Family("rest_500", _rest_500, _stat("rest_faults")),
    Family("rest_429", _rest_429, _stat("rest_faults"), mixable=False),
    Family("rest_slow", _rest_slow, lambda o: o.config.chaos.rest_delay_max > 0),
    Family("rest_short_pages", _rest_short_pages,
           lambda o: o.metric("stream_supervisor_backfill_fills_total") > 0),
    Family("everything", _everything, _stat("disconnects"), mixable=False),
)
SCENARIOS_PER_FAMILY: Final = 3
SEEDS: Final = tuple(range(1, len(FAMILIES) * SCENARIOS_PER_FAMILY + 1))


@dataclass(frozen=True)
class Scenario:
    seed: int
    family: Family
    extras: tuple[Family, ...]
    sim: SimConfig
    settings: dict[str, Any]
    strict_prices: bool

    @property
    def label(self) -> str:
        return "+".join(f.name for f in (self.family, *self.extras))


def scenario(seed: int) -> Scenario:
    """Everything about scenario `seed`, from the seed alone."""
    r = random.Random(f"chaos-scenario/{seed}")
    family = FAMILIES[(seed - 1) % len(FAMILIES)]
    others = [f for f in FAMILIES if f.mixable and f is not family]
    extras = tuple(r.sample(others, r.randint(1, 2))) if family.mixable or r.random() < 0.5 \
        else ()
    knobs: Knobs = {}
    settings: dict[str, Any] = {}
    for f in (*extras, family):  # the main family's knobs win a clash
        knobs.update(f.knobs(r))
        settings.update(f.settings)
    # Pipeline shapes: tiny batches or big ones, backpressure, and an LRU that is off or
    # too small, so duplicates must be caught by the in-flight set or the database.
    settings.setdefault("max_batch", r.choice((1, 7, 50, 500)))
    settings.setdefault("channel_size", r.choice((4, 64, 1000)))
    settings.setdefault("lru_size", r.choice((0, 16, 100_000)))
    label = "+".join(f.name for f in (family, *extras))
    sim = SimConfig(seed=seed, orders=r.randint(20, 35), rate=r.choice((300.0, 500.0)),
                    chaos=ChaosConfig(**knobs), scenario=label,
                    rest_rate_limit=FAST_REST_LIMIT)
    # Reordered or never-streamed partial fills apply some fills later, or merged with
    # the next one: quantities stay exact, per-symbol average and P&L may not (as in the
    # deterministic simulation, `testing/worlds/world.py`).
    strict = not any(f.name in ("reorder", "skip_partial") for f in (family, *extras))
    return Scenario(seed, family, extras, sim, settings, strict)


#: What each family's scenarios showed, for the coverage test at the end.
OBSERVED: Counter[str] = Counter()
RAN: Counter[str] = Counter()
PASSED: set[int] = set()


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed-{s}")
async def test_broker_chaos_keeps_exactly_once(seed: int, database_url: str,
                                               node_id: str) -> None:
    sc = scenario(seed)
    outcome = await run_scenario(
        database_url, sc.sim, settings=chaos_settings(database_url, **sc.settings),
        strict_prices=sc.strict_prices,
    )
    print(outcome.report(node_id))
    outcome.assert_exactly_once(node_id)

    # Bad frames are dead-lettered, each once, and the stream went on (it did: the
    # database matches the broker). Frames in flight when a socket was reset are lost on
    # the wire, so only a run without resets must have kept every one.
    truth = outcome.truth
    stats = truth["stats"]
    stored = dead_letter_count(database_url, truth["account_id"])
    injected = injected_dead_letters(truth)
    assert stored <= injected, f"{stored} dead letters for {injected} bad frames\n" + \
        outcome.report(node_id)
    lossless = not (stats["abrupt_disconnects"] or stats["stalls"]
                    or sc.sim.chaos.reorder_window or sc.sim.chaos.delay_prob)
    if lossless:
        assert stored == injected, (
            f"{injected} bad frames ({', '.join(DEAD_LETTER_KINDS)}) sent, "
            f"{stored} dead-lettered\n" + outcome.report(node_id))
    assert outcome.metric("stream_supervisor_dead_letters_total") == stored

    PASSED.add(seed)
    for f in (sc.family, *sc.extras):
        RAN[f.name] += 1
        if f.happened(outcome):
            OBSERVED[f.name] += 1


def test_scenarios_cover_every_fault_family() -> None:
    """Static: every family is the main fault of several seeds, all seeds differ."""
    mains = Counter(scenario(s).family.name for s in SEEDS)
    assert set(mains) == {f.name for f in FAMILIES}
    assert min(mains.values()) >= SCENARIOS_PER_FAMILY
    assert len(SEEDS) >= 50
    labels = {(scenario(s).label, scenario(s).sim.chaos) for s in SEEDS}
    assert len(labels) == len(SEEDS)


def test_every_fault_family_was_injected() -> None:
    """After the scenarios above: each family's fault really happened in at least one of
    its runs (a knob that silently injected nothing would prove nothing)."""
    # It reads what the scenario tests above observed, so it can only judge a session in
    # which all of them ran and passed: under `-k` selection it skips, and when one
    # failed, that failure is already the report. A full run (CI) always reaches it.
    if PASSED != set(SEEDS):
        pytest.skip(f"needs every scenario above to have run and passed in this session "
                    f"({len(PASSED)} of {len(SEEDS)} did)")
    missing = [f.name for f in FAMILIES if OBSERVED[f.name] == 0]
    assert not missing, f"never observed: {missing}; ran {dict(RAN)}, observed {dict(OBSERVED)}"


async def test_unknown_event_about_an_unseen_order_invents_no_order(database_url: str) -> None:
    """Deterministic form of what the unknown_event scenarios hit at random: the broker's
    unknown update carries a snapshot of an order that expired unfilled while we were not
    listening (so nothing else about it ever reaches us)."""
    from functools import partial

    import trio

    from stream_supervisor.pgstore import PgStore
    from stream_supervisor.settings import Settings
    from stream_supervisor.supervisor import Dependencies, Supervisor
    from stream_supervisor.testing.broker.chaos import unknown_event_frame
    from stream_supervisor.testing.verify import verify_against_truth
    from stream_supervisor.wsclient import websocket_connector

    from ..integration.replay import KEY_ID, SECRET_KEY, FixtureRest, ReplayServer, Script
    from .harness import snapshot

    account, order_id = "acct-unknown-event", "0b7c2d1e-0000-4000-8000-00000000e001"
    order = {"id": order_id, "client_order_id": "c-1", "symbol": "AAPL", "side": "buy",
             "status": "expired", "qty": "5", "filled_qty": "0", "filled_avg_price": None,
             "order_type": "limit", "asset_class": "us_equity",
             "created_at": "2026-11-23T15:00:00.000000Z",
             "updated_at": "2026-11-23T20:00:00.000000Z"}
    frame = unknown_event_frame(order, "2026-11-23T20:00:01.000000000Z",
                                "5a1f0c3e-0000-4000-8000-00000000e002")
    server = ReplayServer(Script([frame]))
    settings = Settings(key_id=KEY_ID, secret_key=SECRET_KEY, base_url="http://127.0.0.1:9",
                        database_url=database_url, account_id=account,
                        first_start_lookback=3600.0, drain_timeout=5.0, baseline=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            settings = settings.with_overrides(stream_url=server.url)
            supervisor = Supervisor(settings, Dependencies(
                connector=websocket_connector(connect_timeout=5.0),
                rest=FixtureRest(account),
                store_factory=partial(PgStore, database_url),
                install_signal_handlers=False,
            ))
            stopped = trio.Event()

            async def run() -> None:
                await supervisor.run()
                stopped.set()

            nursery.start_soon(run)
            while supervisor.state.committed_batches < 1:
                await trio.sleep(0.02)
            supervisor.request_drain("test")
            await stopped.wait()
            nursery.cancel_scope.cancel()
    snap = await snapshot(database_url, account)
    assert len(snap.event_keys) == 1  # the update itself is kept
    truth = {"orders": {order_id: {"filled_qty": "0", "filled_avg_price": None,
                                   "status": "expired", "fills": []}},
             "positions": {}, "fills_total": 0}
    assert verify_against_truth(snap, truth) == [], snap.orders
