"""Non-trade activities that move a position (docs/design.md, section 10): pure, no I/O.

Options expire, are assigned or exercised; stocks split; crypto fees are charged in the
coin; securities transfer in and out. Alpaca reports these as account activities, each
with an id: decoded here into keyed `Event`s (`event == "activity"`) and applied by the
ledger to the open positions they touch, in the batch transaction like any fill. A type
not understood changes nothing: it is stored and reported, never guessed at.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgspec

from .bounds import (
    MAX_ID_CHARS,
    MAX_LABEL_CHARS,
    MAX_SYMBOL_CHARS,
    check_price,
    check_qty,
    check_text,
    check_time,
)
from .errors import DecodeError
from .events import ACTIVITY_EVENT, Event, activity_key, parse_timestamp
from .orders import FillDelta
from .positions import ZERO, Position, PositionStep, apply_fill
from .protocol import decode_each
from .symbols import (
    AssetClass,
    OptionContract,
    asset_class_of,
    canonical_symbol,
    multiplier,
    parse_occ,
)

#: The position-changing types the service applies.
APPLIED_TYPES: Final = frozenset({"CFEE", "OPEXP", "OPASN", "OPEXC", "SPLIT", "ACATC", "ACATS"})
#: The types backfill asks the broker for: the applied ones, and the ones it stores and
#: reports because they move a position in a way it does not model (a reorganisation,
#: a spin-off, a merger, a name change).
POSITION_TYPES: Final = APPLIED_TYPES | frozenset({"REORG", "SPIN", "MA", "NC"})

#: `account_activities.outcome` values.
APPLIED = "applied"
NOT_UNDERSTOOD = "not understood"
NO_POSITION = "no open position"
MORE_THAN_HELD = "more than the position holds"
#: Its effect is already in a baseline's positions: stored, keyed, reported, not applied.
IN_BASELINE = "in the baseline"
#: Stamped with a date only, and a baseline was taken within that day: whether its effect
#: is in the baseline's positions cannot be told, so it is not applied; `reconcile` shows
#: the difference if it was not, and `reconcile --apply` takes the broker's word.
BASELINE_WITHIN_ITS_DAY = "baseline within its day"
#: A split whose position row opened at or after the split took effect: the position it
#: split was closed since (or never reached us), and what the row holds now is in
#: post-split shares already. Not applied: `reconcile` shows the difference.
OPENED_AFTER_IT = "the position opened after it took effect"
EASTERN: Final = ZoneInfo("America/New_York")


class WireNonTrade(msgspec.Struct, gc=False):
    """A non-trade activity as `GET /v2/account/activities` returns it."""

    id: str
    activity_type: str
    date: str | None = None
    transaction_time: str | None = None
    symbol: str | None = None
    qty: Decimal | None = None
    price: Decimal | None = None
    per_share_amount: Decimal | None = None
    net_amount: Decimal | None = None
    description: str | None = None
    status: str | None = None


class UndecodableNonTrade(WireNonTrade, gc=False):
    """One activity of a page that does not fit `WireNonTrade` (`"qty": "abc"`): the rest
    of the page still decodes, and this one reaches the activities pass, which
    dead-letters it as the JSON it came as (`raw`). A page failing whole for one activity
    would fail every pass, for ever, and no later fee, split or expiry would be applied."""

    raw: bytes = b""
    problem: str = ""


class _LooseNonTrade(msgspec.Struct, gc=False):
    id: Any = None
    activity_type: Any = None


_decoder: Final = msgspec.json.Decoder(list[WireNonTrade])
_one_decoder: Final = msgspec.json.Decoder(WireNonTrade)
_loose: Final = msgspec.json.Decoder(_LooseNonTrade)


def decode_non_trade(body: bytes) -> list[WireNonTrade]:
    """A page of non-trade activities, each decoded on its own: one that does not decode
    comes back as an `UndecodableNonTrade`. Raises DecodeError only if the page is not a
    JSON list."""
    return decode_each(body, _decoder, _non_trade_or_undecodable, "activities page")


def _non_trade_or_undecodable(raw: bytes) -> WireNonTrade:
    try:
        return _one_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            loose = _loose.decode(raw)
            ident, kind = loose.id, loose.activity_type
        except (msgspec.DecodeError, msgspec.ValidationError):
            ident = kind = None
        return UndecodableNonTrade(
            id=ident if isinstance(ident, str) else "",
            activity_type=kind if isinstance(kind, str) else "",
            raw=raw, problem=str(exc)[:300])


def _stamp(activity: WireNonTrade) -> str:
    text = activity.transaction_time or activity.date
    if not text:
        raise DecodeError(f"activity {activity.id[:64]} without date or transaction_time")
    # A bare date (`2024-01-19`) is the end of the trading day it names, in UTC.
    return text if "T" in text or "t" in text else f"{text}T21:00:00Z"


def activity_symbol(activity_type: str, symbol: str) -> str:
    """The stored spelling: crypto fees name the pair without its slash."""
    return canonical_symbol(symbol, AssetClass.CRYPTO if activity_type == "CFEE" else None)


def non_trade_to_event(activity: WireNonTrade, *, not_after_ns: int | None = None) -> Event:
    """An activity as a keyed event (raises DecodeError, OutOfBounds if unusable)."""
    if isinstance(activity, UndecodableNonTrade):
        raise DecodeError(activity.problem)
    if not activity.id:
        raise DecodeError("activity without id")
    check_text("id", activity.id, MAX_ID_CHARS)
    check_text("activity_type", activity.activity_type, MAX_LABEL_CHARS)
    symbol = activity.symbol or ""
    if symbol:
        check_text("symbol", symbol, MAX_SYMBOL_CHARS)
    check_qty("qty", activity.qty)
    check_price("price", activity.price)
    check_price("per_share_amount", activity.per_share_amount)
    ts, ts_ns = parse_timestamp(_stamp(activity))
    check_time("date", ts_ns, not_after_ns)
    price = activity.price if activity.price is not None else activity.per_share_amount
    return Event(
        key=activity_key(activity.id),
        event=ACTIVITY_EVENT,
        source="rest",
        order_id="",
        symbol=activity_symbol(activity.activity_type, symbol) if symbol else "",
        side="",
        status=activity.activity_type,
        cum_qty=ZERO,
        timestamp=ts,
        ts_ns=ts_ns,
        fill_qty=activity.qty,
        fill_price=price,
        activity_id=activity.id,
        activity_type=activity.activity_type,
        raw=msgspec.json.encode(activity),
    )


def decode_stored_activity(payload: bytes) -> WireNonTrade:
    try:
        return _one_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"invalid activity: {exc}") from None


def effect_window(activity: WireNonTrade) -> tuple[datetime, datetime]:
    """When the activity's effect reached the broker's positions, as (earliest, latest).

    A `transaction_time` is that instant (the simulated broker stamps a crypto fee with
    its fill's time, a corporate action with the moment it changed the books; Alpaca
    documents only `date` for non-trade activities, so this is used when present and
    never assumed). A bare `date` is the whole of that day in New York, where Alpaca's
    dates are: from its midnight to the next (docs/design.md, section 10)."""
    if activity.transaction_time:
        at = parse_timestamp(activity.transaction_time)[0]
        return at, at
    if not activity.date:
        raise DecodeError(f"activity {activity.id[:64]} without date or transaction_time")
    try:
        day = date.fromisoformat(activity.date[:10])
    except ValueError:
        raise DecodeError(f"activity {activity.id[:64]}: invalid date "
                          f"{activity.date[:32]!r}") from None
    start = datetime.combine(day, time(), EASTERN)
    end = datetime.combine(day + timedelta(days=1), time(), EASTERN)
    return start, end


def baseline_verdict(window: tuple[datetime, datetime], moment: datetime | None) -> str | None:
    """Whether an activity whose effect lies in `window` is already in the positions of a
    baseline taken at `moment` (the broker's clock; None: no baseline).

    None: apply it (its effect came after the baseline's positions were read, or there
    was no baseline). `IN_BASELINE`: its effect is at or before the moment, so the
    broker's positions the baseline took hold it. `BASELINE_WITHIN_ITS_DAY`: the moment
    falls inside a date-only window: neither can be told."""
    if moment is None:
        return None
    start, end = window
    if end <= moment:
        return IN_BASELINE
    if start > moment:
        return None
    return BASELINE_WITHIN_ITS_DAY


def touched_symbols(ev: Event) -> tuple[str, ...]:
    """Every symbol an activity may change: an assignment or exercise also the underlying."""
    if ev.activity_type in ("OPASN", "OPEXC"):
        contract = parse_occ(ev.symbol)
        if contract is not None:
            return (ev.symbol, contract.underlying)
    return (ev.symbol,)


@dataclass(slots=True)
class ActivityRecord:
    """One row of `account_activities`: the activity, and what it did."""

    activity_id: str
    activity_type: str
    symbol: str
    qty: Decimal | None
    price: Decimal | None
    timestamp: datetime
    outcome: str
    #: Signed quantity change per symbol (what `check` adds to the orders' fills).
    effects: dict[str, Decimal] = field(default_factory=dict)
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class PositionChange:
    """One row of `position_changes`: what an activity did to one symbol's position,
    whether or not it closed the row (docs/design.md, section 10)."""

    activity_id: str
    activity_type: str
    symbol: str
    #: The row changed; None for one opened in the same batch (the store finds its id).
    position_id: int | None
    qty_before: Decimal
    qty_after: Decimal
    avg_before: Decimal | None
    avg_after: Decimal | None
    realized_pnl: Decimal
    changed_at: datetime


def position_change(record: ActivityRecord, symbol: str, before: Position | None,
                    step: PositionStep) -> PositionChange:
    """The change `step` made to `before` (the open row, None when flat)."""
    after = step.open if step.open is not None else step.closed
    pid = before.position_id if before is not None else None
    if pid is None and after is not None:
        pid = after.position_id
    return PositionChange(
        activity_id=record.activity_id, activity_type=record.activity_type, symbol=symbol,
        position_id=pid,
        qty_before=before.qty if before is not None else ZERO,
        qty_after=step.open.qty if step.open is not None else ZERO,
        avg_before=before.avg_entry_price if before is not None else None,
        avg_after=after.avg_entry_price if after is not None else None,
        realized_pnl=after.realized_pnl if after is not None else ZERO,
        changed_at=record.timestamp)


@dataclass(slots=True)
class ActivityOutcome:
    record: ActivityRecord
    steps: list[tuple[str, PositionStep]] = field(default_factory=list)


def _sign(x: Decimal) -> int:
    return (x > 0) - (x < 0)


def _moved(row: Position, qty: Decimal, avg: Decimal, pnl: Decimal,
           closed_at: datetime | None, activity_id: str | None) -> Position:
    return Position(row.account_id, row.symbol, qty, avg, row.opened_by_order_id,
                    row.opened_by_client_order_id, row.opened_at, pnl, closed_at,
                    row.peak_qty, row.position_id, row.multiplier, row.asset_class,
                    activity_id if closed_at is not None else row.closing_activity_id)


def _scale(row: Position, new_qty: Decimal) -> Position:
    """A split: quantity to `new_qty`, cost basis unchanged, so the average scales back."""
    avg = row.avg_entry_price * row.qty / new_qty
    peak = row.peak_qty * new_qty / row.qty
    return Position(row.account_id, row.symbol, new_qty, avg, row.opened_by_order_id,
                    row.opened_by_client_order_id, row.opened_at, row.realized_pnl, None,
                    peak, row.position_id, row.multiplier, row.asset_class,
                    row.closing_activity_id)


def _reduce(row: Position, by: Decimal, when: datetime, activity_id: str) -> PositionStep:
    """Quantity leaves the position without a trade (a fee in the coin, a transfer out):
    the average is unchanged and nothing is realized."""
    remaining = row.qty - by * _sign(row.qty)
    if remaining == 0:
        return PositionStep(None, _moved(row, ZERO, row.avg_entry_price, row.realized_pnl,
                                         when, activity_id), ZERO)
    return PositionStep(_moved(row, remaining, row.avg_entry_price, row.realized_pnl, None, None),
                        None, ZERO)


#: `baseline_moments.symbol` of the account-wide moment: the broker's clock when the
#: latest baseline began, before any of its reads.
ACCOUNT_WIDE: Final = ""
#: An assignment or exercise whose option leg or stock leg (not both) a baseline holds:
#: the other is applied (docs/design.md, section 10).
PARTLY_IN_BASELINE = "applied where the baseline did not hold it"


def baseline_moment(baselines: Mapping[str, datetime] | None, symbol: str) -> datetime | None:
    """The latest baseline's moment for `symbol`: the account-wide one, or the symbol's
    own where that is later (the round its positions were read in)."""
    if not baselines:
        return None
    held = baselines.get(ACCOUNT_WIDE)
    own = baselines.get(symbol)
    if held is None or (own is not None and own > held):
        return own
    return held


def apply_activity(
    account_id: str, current: Mapping[str, Position], ev: Event,
    baselines: Mapping[str, datetime] | None = None,
) -> ActivityOutcome:
    """What one activity does to the open positions (`current`, by symbol).

    - CFEE: the fee (`qty`, negative, in the coin) leaves the position; average unchanged.
    - OPEXP: the option closes at price 0: the premium paid is lost, the premium received kept.
      More contracts than the row holds (we are behind the broker) change nothing
      (`MORE_THAN_HELD`, as for OPASN, OPEXC, CFEE and ACATS): reconcile says so.
    - OPASN, OPEXC: `|qty|` contracts close at price 0 (their premium realized as at expiry)
      and the underlying moves by contracts x multiplier at the strike: a long call
      exercised or a short put assigned buys it, a long put exercised or a short call
      assigned sells it.
    - SPLIT: `qty` shares are added (negative for a reverse split): quantity scales,
      average price scales back, cost basis unchanged. Posted after later fills, it still
      gives the broker's quantity to a row opened before it took effect (a sale between
      realized against the pre-split average: realized P&L and cost basis then share the
      difference); a row opened since (`OPENED_AFTER_IT`) or none (`NO_POSITION`) is
      left, and reconcile shows the difference.
    - ACATC, ACATS: `qty` shares move in (at `price`, the broker's stated value, re-averaged
      like a purchase) or out (average unchanged, nothing realized).

    `baselines`: the latest baseline's broker-clock moments (`baseline_moment`). What an
    activity does to a symbol whose moment is at or after its effect is already in the
    positions the baseline took: not applied (`baseline_verdict`); an activity none of
    whose changes is applied is stored with that verdict as its outcome.
    """
    atype = ev.activity_type or ""
    aid = ev.activity_id or ""
    qty = ev.fill_qty
    record = ActivityRecord(aid, atype, ev.symbol, qty, ev.fill_price, ev.timestamp,
                            NOT_UNDERSTOOD, raw=ev.raw)
    out = ActivityOutcome(record)
    if atype not in APPLIED_TYPES or not ev.symbol:
        return out
    window: tuple[datetime, datetime] | None = None

    def held(symbol: str) -> str | None:
        nonlocal window
        moment = baseline_moment(baselines, symbol)
        if moment is None:
            return None
        if window is None:
            window = effect_window(decode_stored_activity(ev.raw))
        return baseline_verdict(window, moment)

    verdict = held(ev.symbol)
    contract = parse_occ(ev.symbol) if atype in ("OPASN", "OPEXC") else None
    if contract is not None:
        return _assigned(account_id, current, ev, out, contract, verdict,
                         held(contract.underlying))
    if verdict is not None:
        record.outcome = verdict
        return out
    row = current.get(ev.symbol)
    if atype == "ACATC" and qty is not None and qty != 0:
        price = ev.fill_price if ev.fill_price is not None else ZERO
        signed = abs(qty) if row is None or row.qty > 0 else -abs(qty)
        cls = asset_class_of(ev.symbol)
        step = apply_fill(row, account_id, _delta(ev, ev.symbol, signed, price),
                          multiplier(cls), cls.value)
        out.steps.append((ev.symbol, step))
        record.effects[ev.symbol] = signed
        record.outcome = APPLIED
        return out
    if row is None or row.qty == 0:
        record.outcome = NO_POSITION
        return out
    if atype in ("CFEE", "ACATS"):
        if qty is None or qty == 0:
            return out
        if abs(qty) > abs(row.qty):
            record.outcome = MORE_THAN_HELD
            return out
        step = _reduce(row, abs(qty), ev.timestamp, aid)
        record.effects[ev.symbol] = -abs(qty) * _sign(row.qty)
    elif atype == "SPLIT":
        if qty is None:
            return out
        start, _end = effect_window(decode_stored_activity(ev.raw))
        if row.opened_at >= start:
            # Posted after the fills that closed (or turned) what it split: adding its
            # shares to this row would count them in the wrong direction, or twice.
            record.outcome = OPENED_AFTER_IT
            return out
        new_qty = row.qty + qty * _sign(row.qty)
        if _sign(new_qty) != _sign(row.qty):
            record.outcome = MORE_THAN_HELD
            return out
        step = PositionStep(_scale(row, new_qty), None, ZERO)
        record.effects[ev.symbol] = new_qty - row.qty
    else:  # OPEXP (or an assignment of a symbol not in OCC form): from the side held
        contracts = abs(qty) if qty else abs(row.qty)
        if contracts > abs(row.qty):
            # We hold fewer than expired: closing more would open the other side at 0.
            record.outcome = MORE_THAN_HELD
            return out
        change = -contracts * _sign(row.qty)
        step = _closing(apply_fill(row, account_id, _delta(ev, ev.symbol, change, ZERO)), aid)
        record.effects[ev.symbol] = change
    out.steps.append((ev.symbol, step))
    record.outcome = APPLIED
    return out


def _assigned(account_id: str, current: Mapping[str, Position], ev: Event,
              out: ActivityOutcome, contract: OptionContract, option_held: str | None,
              stock_held: str | None) -> ActivityOutcome:
    """An assignment or exercise: the option leg and the stock leg, each applied unless
    the latest baseline already holds it (its symbol's moment is at or after the effect).
    An assignment is of a short, an exercise of a long: that fixes the side when the
    option row is gone (a baseline that held the assignment closed it)."""
    record = out.record
    aid = ev.activity_id or ""
    if option_held is not None and stock_held is not None:
        record.outcome = option_held
        return out
    row = current.get(ev.symbol)
    long = row.qty > 0 if row is not None and row.qty != 0 else ev.activity_type == "OPEXC"
    contracts = abs(ev.fill_qty) if ev.fill_qty else (abs(row.qty) if row is not None
                                                       else ZERO)
    if option_held is None:
        if row is None or row.qty == 0:
            record.outcome = NO_POSITION
            return out
        if contracts > abs(row.qty):
            # More contracts than we hold: neither leg is applied (the option's would
            # open the other side at 0, the stock's move is the broker's, not ours).
            record.outcome = MORE_THAN_HELD
            return out
        change = -contracts * _sign(row.qty)
        out.steps.append((ev.symbol, _closing(
            apply_fill(row, account_id, _delta(ev, ev.symbol, change, ZERO)), aid)))
        record.effects[ev.symbol] = change
    if stock_held is None and contracts:
        mult = row.multiplier if row is not None else multiplier(AssetClass.US_OPTION)
        shares = contracts * mult
        signed = shares if (contract.right == "call") == long else -shares
        under = contract.underlying
        out.steps.append((under, apply_fill(
            current.get(under), account_id, _delta(ev, under, signed, contract.strike),
            multiplier(AssetClass.US_EQUITY), AssetClass.US_EQUITY.value)))
        record.effects[under] = signed
    record.outcome = APPLIED if option_held is None and stock_held is None \
        else PARTLY_IN_BASELINE
    return out


def _closing(step: PositionStep, activity_id: str) -> PositionStep:
    """The step with the row it closed marked as closed by the activity."""
    if step.closed is None:
        return step
    return PositionStep(step.open, msgspec.structs.replace(
        step.closed, closing_activity_id=activity_id), step.realized)


def _delta(ev: Event, symbol: str, signed: Decimal, price: Decimal) -> FillDelta:
    return FillDelta(order_id=ev.key, client_order_id=None, symbol=symbol, qty=signed,
                     price=price, timestamp=ev.timestamp, position_qty=None, exact=True)
