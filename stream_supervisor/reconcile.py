"""`stream-supervisor reconcile`: stored open positions against the broker's
`GET /v2/positions`, symbol by symbol (docs/design.md, section 9). Exit 1 on any
difference; with `--apply`, each difference becomes an adjustment row setting the
position to the broker's, after which reconcile exits 0 and `check` passes.
`stream-supervisor rebaseline` starts over from the broker's word (history kept)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from .activities import APPLIED, ActivityRecord
from .adjustments import (
    REBASELINE,
    Adjustment,
    BrokerPosition,
    Difference,
    broker_clock_reading,
    broker_position,
    broker_positions,
    compare,
)
from .baseline import broker_filled, take_baseline
from .errors import BrokerUnavailable, ConfigError
from .logs import get_logger
from .rest import BrokerRest
from .settings import Settings
from .store import Store, StoreSnapshot, reconcile_word
from .symbols import canonical_symbol
from .wiring import http_rest, pg_store

log = get_logger("stream_supervisor.reconcile")
ZERO = Decimal(0)


def compare_positions(
    stored: Mapping[str, Decimal], broker: list[dict[str, Any]]
) -> list[tuple[str, Decimal, Decimal]]:
    """(symbol, ours, broker's) for every canonical symbol whose signed net differs."""
    ours: dict[str, Decimal] = {}
    for symbol, qty in stored.items():
        key = canonical_symbol(symbol)
        ours[key] = ours.get(key, ZERO) + qty
    theirs = {b.symbol: b.qty for b in map(broker_position, broker)}
    return [(s, ours.get(s, ZERO), theirs.get(s, ZERO))
            for s in sorted(set(ours) | set(theirs))
            if ours.get(s, ZERO) != theirs.get(s, ZERO)]


def known_assets(snapshot: StoreSnapshot) -> dict[str, str]:
    """Asset id -> our symbol, from the adjustments that stored the broker's asset ids."""
    return {a.asset_id: a.symbol for a in snapshot.adjustments if a.asset_id}


#: Why a reconcile left a symbol it found different (`adjustments.plan_adjustments`).
DEFERRED: Final = ("an order of it is still working and the broker filled more of it than "
                   "reached us (its next update brings that), or a fill moved it since it "
                   "was compared: run again later, or `stream-supervisor rebaseline`, which "
                   "takes the broker's orders too")


async def apply_differences(
    store: Store, account_id: str, diffs: Sequence[Difference], *, taken_at: datetime,
    moment: datetime | None = None, working_filled: Mapping[str, Decimal] | None = None,
) -> list[Adjustment]:
    """One adjustment per difference, setting the position to the broker's, in one
    transaction (`store.reconcile_word`: a symbol whose quantity is no longer what
    `diffs` found as ours, a fill committed since, is left for the next run, and so is
    one with a working order `working_filled` does not give as filled as ours)."""
    if not diffs:
        return []
    return await store.apply_broker_word(reconcile_word(
        account_id, diffs, taken_at=taken_at, moment=moment, working_filled=working_filled))


def unapplied_activities(activities: Sequence[ActivityRecord]) -> list[str]:
    """One line per stored non-trade activity that changed nothing: a type the service
    does not understand, or one that found no position to change. Never guessed at;
    an operator decides (docs/design.md, section 10)."""
    return [
        f"activity {a.activity_id} {a.activity_type} {a.symbol or '-'} qty {a.qty}: {a.outcome}"
        for a in activities if a.outcome != APPLIED
    ]


async def reconcile(settings: Settings, *, apply: bool = False) -> int:
    store = pg_store(settings)
    await store.open()
    try:
        async with http_rest(settings) as rest:
            account_id = settings.account_id or await rest.account_id()
            if apply and not await store.try_leadership(account_id):
                raise ConfigError(
                    f"a running service holds the writer lock of account {account_id}: "
                    "stop it (or let its scheduled reconcile apply) before reconcile --apply")
            return await reconcile_account(store, rest, account_id, apply=apply)
    finally:
        await store.aclose()


async def reconcile_account(
    store: Store, rest: BrokerRest, account_id: str, *, apply: bool = False,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int:
    """Compare (and with `apply`, adjust) one account; with `apply` the caller holds its
    writer lock. To apply, the broker's clock and then its positions are read again, and
    only a symbol the broker held alike in both positions reads is adjusted, its moment
    that clock (sections 9 and 10): no fill came between the reads, so every fill stamped
    up to the clock is in the quantity taken and every later one is not (the scheduled
    reconcile's two runs do the same)."""
    broker, refused = broker_positions(await rest.positions())
    for line in refused:
        log.warning("reconcile_position_refused", detail=line)
        print(f"reconcile: a position row of the broker's is refused: {line}")
    taken_at = now()
    snapshot = await store.snapshot(account_id)
    compared, diffs = compare(snapshot.positions, broker, known_assets(snapshot))
    for d in diffs:
        log.warning("reconcile_difference", symbol=d.symbol, ours=str(d.ours),
                    broker=str(d.broker))
        print(f"{d.symbol}: stored {d.ours}, broker {d.broker}")
    for line in unapplied_activities(snapshot.activities):
        log.warning("reconcile_unapplied_activity", detail=line)
        print(line)
    print(f"reconcile: {compared} symbols compared, {len(diffs)} differ")
    if apply and diffs and refused:
        print("reconcile: nothing applied: the broker's positions hold a row outside the "
              "bounds (above), and a symbol missing from them would read as flat")
        return 1
    if apply and diffs:
        moment, again, refused = await _clock_and_positions(rest, now())
        if refused:
            print(f"reconcile: nothing applied: the broker's positions read again hold a "
                  f"row outside the bounds: {refused[0]}")
            return 1
        if moment is None:
            print("reconcile: nothing applied: the broker's clock (GET /v2/clock) gave no "
                  "time (or one before 2000, or ahead of ours by more than the "
                  "tolerance), and its moment decides which fills reaching us later an "
                  "adjustment holds; run it again")
            return 1
        # The broker's quantity per symbol in the first read: where it did not differ
        # from ours, ours (symbols as `compare` matches them, renamed tickers too).
        first = {d.symbol: d.broker for d in diffs}
        _, diffs = compare(snapshot.positions, again, known_assets(snapshot))
        moved = [d.symbol for d in diffs if first.get(d.symbol, d.ours) != d.broker]
        for symbol in moved:
            print(f"reconcile: {symbol} left as it is: the broker's quantity moved between "
                  "two reads (a fill): run again")
        diffs = [d for d in diffs if d.symbol not in moved]
        # Orders still working, read after the positions: a symbol is adjusted only if
        # each of its has all its fills with us (nothing of it is still to reach us).
        working = await broker_filled(
            rest, await store.open_order_ids(account_id, [d.symbol for d in diffs]))
        made = await apply_differences(store, account_id, diffs, taken_at=taken_at,
                                       moment=moment, working_filled=working)
        for adj in made:
            log.info("position_adjusted", symbol=adj.symbol, reason=adj.reason,
                     before=str(adj.qty_before), after=str(adj.qty_after))
        print(f"reconcile: {len(made)} adjustment(s) written to position_adjustments")
        adjusted = {adj.symbol for adj in made}
        left = [d.symbol for d in diffs if d.symbol not in adjusted]
        for symbol in left:
            log.info("reconcile_deferred", symbol=symbol)
            print(f"reconcile: {symbol} left as it is: {DEFERRED}")
        return 1 if left or moved else 0
    return 1 if diffs or refused else 0


async def _clock_and_positions(rest: BrokerRest, now: datetime,
                               ) -> tuple[datetime | None, list[BrokerPosition], list[str]]:
    """The broker's clock (None if it gives no time within the bounds at our `now`), then
    its positions (and the rows refused: `broker_positions`)."""
    try:
        moment = broker_clock_reading(await rest.clock(), now=now)
    except BrokerUnavailable:
        moment = None
    positions, refused = broker_positions(await rest.positions())
    return moment, positions, refused


async def rebaseline(settings: Settings) -> int:
    """Start over from the broker's word: every position set to the broker's (rows we
    held closed with close_reason rebaseline, kept in history), orders' marks raised."""
    store = pg_store(settings)
    await store.open()
    try:
        async with http_rest(settings) as rest:
            account_id = settings.account_id or await rest.account_id()
            if not await store.try_leadership(account_id):
                raise ConfigError(
                    f"a running service holds the writer lock of account {account_id}: "
                    "stop it before rebaseline")
            snapshot, made = await take_baseline(
                store, rest, account_id, reason=REBASELINE, now=datetime.now(UTC),
                window=2 * settings.backfill_overlap)
    finally:
        await store.aclose()
    for adj in made:
        print(f"{adj.symbol}: {adj.qty_before} -> {adj.qty_after}")
    print(f"rebaseline: {len(snapshot.positions)} broker positions, "
          f"{len(snapshot.orders)} orders marked, {len(made)} adjustment(s)")
    return 0
