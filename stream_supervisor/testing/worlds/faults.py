"""Fault schedules from one seed, and shrinking a failing schedule to its fewest faults.

Every fault family is switched on or off per seed, with its intensity drawn from the
same seeded generator, so the 10,000 seeds of a CI run cover every family alone and in
combination. `shrink` removes faults one at a time while the schedule still fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import fields, replace

from ..broker import ChaosConfig
from .world import Schedule

#: Broker-side fault families and the ChaosConfig fields that switch each one off.
CHAOS_FAMILIES: dict[str, dict[str, object]] = {
    "duplicates": {"duplicate_prob": 0.0},
    "disconnects": {"disconnect_prob": 0.0, "disconnect_at": (), "abrupt_prob": 0.0},
    "reorder": {"reorder_window": 0},
    "delays": {"delay_prob": 0.0, "delay_max": 0.0},
    "stalls": {"stall_prob": 0.0, "stall_seconds": 0.0},
    "malformed": {"malformed_prob": 0.0},
    "unknown_events": {"unknown_event_prob": 0.0},
    "oversized": {"oversized_prob": 0.0},
    "text_frames": {"text_frame_prob": 0.0},
    "skipped_partials": {"skip_partial_prob": 0.0},
    "replay": {"replay_on_connect": 0},
    "upgrade_429": {"reject_429_connects": 0},
    "rest_errors": {"rest_error_prob": 0.0, "rest_429_prob": 0.0},
    "short_pages": {"rest_short_pages": False},
    "slow_rest": {"rest_delay_max": 0.0},
    "poison": {"poison_prob": 0.0},
}


def _poison_prob(seed: int) -> float:
    """Poison values for about a third of the seeds, from a generator of their own: the
    family came later, and drawing it from the schedule's generator would have changed
    every other fault of every seed."""
    rng = random.Random(f"schedule/{seed}/poison")
    return rng.uniform(0.02, 0.1) if rng.random() < 0.35 else 0.0


def _replay_before_listening(seed: int) -> bool:
    """For half the seeds, a replay on connect races the `listening` reply; a generator
    of its own (like `_poison_prob`)."""
    return random.Random(f"schedule/{seed}/replay-before-listening").random() < 0.5


def _asset_mix(seed: int) -> bool:
    """Crypto, options and the day's non-trade activities for about a third of the seeds,
    from a generator of their own (like `_poison_prob`)."""
    return random.Random(f"schedule/{seed}/assets").random() < 0.35
def _history(seed: int, market_seconds: float) -> tuple[tuple[tuple[str, str, str], ...],
                                                       float]:
    """An account with history for about 40% of the seeds (docs/design.md, section 9):
    positions held before the session (long and short), and the first start in the
    middle of it, orders partly filled by then. A generator of its own, like poison, so
    the other faults of every seed stay what they were."""
    rng = random.Random(f"schedule/{seed}/history")
    if rng.random() >= 0.4:
        return (), 0.0
    held = []
    for symbol in rng.sample(["AAPL", "QQQ", "TSLA", "NVDA", "SPY", "MSFT"], rng.randint(0, 3)):
        qty = rng.randint(1, 300) * rng.choice((1, -1))
        held.append((symbol, str(qty), f"{rng.randint(2_000, 60_000) / 100:.2f}"))
    delay = rng.uniform(0.0, market_seconds) if rng.random() < 0.8 else 0.0
    if not held and delay == 0.0:
        delay = market_seconds / 2
    return tuple(held), delay


def schedule_for_seed(seed: int) -> Schedule:
    """The fault schedule of `seed`: deterministic, roughly half the families on."""
    rng = random.Random(f"schedule/{seed}")

    def on(p: float = 0.45) -> bool:
        return rng.random() < p

    orders = rng.randint(3, 14)
    rate = rng.choice((50.0, 100.0, 200.0, 400.0))
    market_seconds = orders * 5.5 / rate
    chaos = ChaosConfig(
        duplicate_prob=rng.uniform(0.05, 0.3) if on() else 0.0,
        duplicate_burst=rng.randint(2, 4),
        disconnect_prob=rng.uniform(0.01, 0.08) if on() else 0.0,
        abrupt_prob=rng.random(),
        reorder_window=rng.randint(2, 5) if on(0.2) else 0,
        delay_prob=rng.uniform(0.05, 0.3) if on(0.3) else 0.0,
        delay_max=rng.uniform(0.01, 0.5),
        stall_prob=rng.uniform(0.005, 0.03) if on(0.25) else 0.0,
        stall_seconds=rng.uniform(11.0, 20.0),
        malformed_prob=rng.uniform(0.01, 0.08) if on(0.35) else 0.0,
        unknown_event_prob=rng.uniform(0.01, 0.05) if on(0.3) else 0.0,
        oversized_prob=0.01 if on(0.05) else 0.0,
        oversized_bytes=1_100_000,
        text_frame_prob=rng.uniform(0.1, 0.5) if on(0.3) else 0.0,
        skip_partial_prob=rng.uniform(0.05, 0.3) if on(0.3) else 0.0,
        replay_on_connect=rng.randint(1, 8) if on(0.3) else 0,
        replay_before_listening=_replay_before_listening(seed),
        reject_429_connects=rng.randint(1, 3) if on(0.15) else 0,
        rest_error_prob=rng.uniform(0.05, 0.25) if on(0.3) else 0.0,
        rest_429_prob=rng.uniform(0.02, 0.1) if on(0.2) else 0.0,
        rest_retry_after=rng.choice((0.5, 1.0, 2.0)),
        rest_short_pages=on(0.3),
        rest_delay_max=rng.uniform(0.01, 1.0) if on(0.2) else 0.0,
        poison_prob=_poison_prob(seed),
    )
    attempts = max(4, orders)

    def some(p: float, k: int) -> frozenset[int]:
        return frozenset(rng.randrange(attempts) for _ in range(k)) if on(p) else frozenset()

    crashes: tuple[float, ...] = ()
    if on(0.35):
        crashes = tuple(sorted(rng.uniform(0.05, market_seconds + 2.0)
                               for _ in range(rng.randint(1, 3))))
    preexisting, start_delay = _history(seed, market_seconds)
    return Schedule(
        seed=seed,
        preexisting=preexisting,
        start_delay=start_delay,
        orders=orders,
        rate=rate,
        chaos=chaos,
        fail_before=some(0.3, rng.randint(1, 3)),
        fail_after=some(0.3, rng.randint(1, 3)),
        actor_crash=some(0.15, 1),
        writer_stall=some(0.2, rng.randint(1, 2)),
        stall_seconds=rng.uniform(0.5, 4.0),
        crashes=crashes,
        max_batch=rng.choice((1, 8, 64)),
        lru_size=rng.choice((0, 16, 10_000)),
        # With history too: a baseline already holds the crypto fees and corporate
        # actions before it, whose activities post after it (docs/design.md, section 10).
        asset_mix=_asset_mix(seed),
    )


def _candidates(s: Schedule) -> Iterator[Schedule]:
    """Schedules with one fault fewer (or a smaller world), most drastic first."""
    for crash in s.crashes:
        yield replace(s, crashes=tuple(c for c in s.crashes if c != crash))
    for name in ("fail_before", "fail_after", "actor_crash", "writer_stall"):
        for attempt in sorted(getattr(s, name)):
            yield replace(s, **{name: getattr(s, name) - {attempt}})
    for switches in CHAOS_FAMILIES.values():
        off = replace(s.chaos, **switches)  # type: ignore[arg-type]
        if off != s.chaos:
            yield replace(s, chaos=off)
    if s.asset_mix:
        yield replace(s, asset_mix=False)
    if s.orders > 1:
        yield replace(s, orders=max(1, s.orders // 2))
        yield replace(s, orders=s.orders - 1)


def shrink(schedule: Schedule, fails: Callable[[Schedule], bool], budget: int = 200) -> Schedule:
    """Greedy delta-debugging: keep removing faults while the run still fails."""
    current = schedule
    tries = 0
    progress = True
    while progress and tries < budget:
        progress = False
        for candidate in _candidates(current):
            tries += 1
            if fails(candidate):
                current = candidate
                progress = True
                break
            if tries >= budget:
                break
    return current


def describe(s: Schedule) -> str:
    """A short human line of what a schedule injects."""
    parts = [f"seed={s.seed}", f"orders={s.orders}", f"rate={s.rate:g}"]
    defaults = ChaosConfig()
    for f in fields(ChaosConfig):
        value = getattr(s.chaos, f.name)
        if value != getattr(defaults, f.name):
            parts.append(f"{f.name}={value:.3g}" if isinstance(value, float) else
                         f"{f.name}={value}")
    for name in ("fail_before", "fail_after", "actor_crash", "writer_stall"):
        if getattr(s, name):
            parts.append(f"{name}={sorted(getattr(s, name))}")
    if s.crashes:
        parts.append("crashes=" + ",".join(f"{c:.2f}" for c in s.crashes))
    parts.append(f"max_batch={s.max_batch} lru={s.lru_size}")
    if s.asset_mix:
        parts.append("asset_mix")
    return " ".join(parts)
