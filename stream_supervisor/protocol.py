"""The Alpaca trade-updates wire protocol: control messages and typed decoding.

`decode_frame` turns one WebSocket frame (binary or text) into a `Frame`: an `Event`,
a control reply, or a `DeadLetter` with the reason. It never raises on bad input.
REST FILL activities and order snapshots decode here too, into the same `Event` shape.
Every value is held to `bounds.py`: an update with one value outside them is a dead
letter, never an event. The decoder is pure: the wall-clock limit on timestamps is
passed in (`not_after_ns`), by actors that get the time from their injected clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, Final, TypeVar

import msgspec

from .bounds import (
    DEAD_LETTER_KEEP_BYTES,
    DEFAULT_MAX_FRAME_BYTES,
    MAX_CLIENT_ORDER_ID_CHARS,
    MAX_ID_CHARS,
    MAX_LABEL_CHARS,
    MAX_SYMBOL_CHARS,
    check_opt_text,
    check_price,
    check_qty,
    check_text,
    check_time,
    price_ok,
    qty_ok,
)
from .errors import DecodeError, OutOfBounds, TimestampError
from .events import (
    FILL_EVENTS,
    DeadLetter,
    Event,
    broker_event_key,
    decimal_text,
    event_key,
    parse_timestamp,
)
from .symbols import canonical_symbol


def authenticate_message(key_id: str, secret_key: str) -> bytes:
    return msgspec.json.encode(
        {"action": "authenticate", "data": {"key_id": key_id, "secret_key": secret_key}}
    )


def listen_message(streams: tuple[str, ...] = ("trade_updates",)) -> bytes:
    return msgspec.json.encode({"action": "listen", "data": {"streams": list(streams)}})


# --- wire structs: what the broker sends, decoded without intermediate dicts ----------


class WireOrder(msgspec.Struct, gc=False):
    id: str
    symbol: str
    side: str | None  # None (or "") on a multi-leg parent
    status: str
    filled_qty: Decimal
    client_order_id: str | None = None
    qty: Decimal | None = None
    filled_avg_price: Decimal | None = None
    order_type: str | None = None
    type: str | None = None
    asset_class: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    #: `mleg` for a multi-leg order: its own symbol and side are empty, its legs (orders
    #: of their own, one symbol each) say what trades (docs/design.md, section 10).
    order_class: str | None = None
    legs: list[WireOrder] | None = None


class WireUpdate(msgspec.Struct, gc=False):
    event: str
    order: WireOrder
    timestamp: str
    execution_id: str | None = None
    price: Decimal | None = None
    qty: Decimal | None = None
    position_qty: Decimal | None = None


class _Envelope(msgspec.Struct, gc=False):
    stream: str
    data: msgspec.Raw = msgspec.Raw(b"null")


class _TradeUpdateMessage(msgspec.Struct, tag_field="stream", tag="trade_updates", gc=False):
    """The common case in one pass: a well-formed trade update. Anything else (another
    stream, bad data) falls back to the envelope first, which names what is wrong."""

    data: WireUpdate


class _AuthData(msgspec.Struct, gc=False):
    status: str
    action: str | None = None
    message: str | None = None


class _ListenData(msgspec.Struct, gc=False):
    streams: list[str] = []


class _ErrorData(msgspec.Struct, gc=False):
    error: str | None = None
    message: str | None = None
    code: int | None = None


class WireActivity(msgspec.Struct, gc=False):
    id: str
    order_id: str
    symbol: str
    side: str
    price: Decimal
    qty: Decimal
    cum_qty: Decimal
    transaction_time: str
    type: str = "fill"
    activity_type: str = "FILL"
    leaves_qty: Decimal | None = None
    order_status: str | None = None


@dataclass(frozen=True, slots=True)
class Authorization:
    authorized: bool
    message: str | None


@dataclass(frozen=True, slots=True)
class Listening:
    streams: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    message: str


@dataclass(frozen=True, slots=True)
class OtherStream:
    """A well-formed message for a stream we did not ask for; ignored."""

    stream: str


Frame = Event | DeadLetter | Authorization | Listening | ErrorReply | OtherStream

_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)
_update_decoder: Final = msgspec.json.Decoder(WireUpdate)
_trade_update_decoder: Final = msgspec.json.Decoder(_TradeUpdateMessage)
_auth_decoder: Final = msgspec.json.Decoder(_AuthData)
_listen_decoder: Final = msgspec.json.Decoder(_ListenData)
_error_decoder: Final = msgspec.json.Decoder(_ErrorData)
_activities_decoder: Final = msgspec.json.Decoder(list[WireActivity])
_orders_decoder: Final = msgspec.json.Decoder(list[WireOrder])
_order_decoder: Final = msgspec.json.Decoder(WireOrder)
_activity_decoder: Final = msgspec.json.Decoder(WireActivity)


def _as_bytes(frame: str | bytes) -> bytes:
    return frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame


def decode_frame(
    frame: str | bytes,
    *,
    received_at: float = 0.0,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    not_after_ns: int | None = None,
) -> Frame:
    """Decode one frame. Bad input becomes a `DeadLetter`; this never raises.

    `not_after_ns` (epoch ns: the wall clock plus the tolerance) refuses updates stamped
    later; None skips that one check (the floor and every other bound still hold)."""
    raw = _as_bytes(frame)
    if len(raw) > max_bytes:
        # The transport cuts a longer message to max_bytes + 1 bytes (wsclient): at that
        # length the true size is unknown, only that it is at least that.
        size = f"{'at least ' if len(raw) == max_bytes + 1 else ''}{len(raw)} bytes"
        return DeadLetter(
            reason=f"oversized frame: {size} > limit {max_bytes}",
            payload=raw[:DEAD_LETTER_KEEP_BYTES],
            received_at=received_at,
        )
    try:
        update = _trade_update_decoder.decode(raw).data
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, RecursionError):
        pass  # not a well-formed trade update: the envelope path below says why
    else:
        try:
            return update_to_event(update, received_at, raw=raw, not_after_ns=not_after_ns)
        except (DecodeError, TimestampError, ValueError, ArithmeticError) as exc:
            return _dead_letter(exc, raw, received_at)
    try:
        envelope = _envelope_decoder.decode(raw)
        if bytes(envelope.data).strip() == b"null":
            raise DecodeError(f"message for stream {envelope.stream!r} has no data")
        if envelope.stream == "trade_updates":
            return update_to_event(_update_decoder.decode(envelope.data), received_at,
                                   raw=raw, not_after_ns=not_after_ns)
        if envelope.stream == "authorization":
            auth = _auth_decoder.decode(envelope.data)
            return Authorization(auth.status == "authorized", auth.message)
        if envelope.stream == "listening":
            return Listening(tuple(_listen_decoder.decode(envelope.data).streams))
        if envelope.stream == "error":
            err = _error_decoder.decode(envelope.data)
            return ErrorReply(err.message or err.error or "unknown error")
        return OtherStream(envelope.stream)
    except (msgspec.DecodeError, msgspec.ValidationError, DecodeError, TimestampError,
            UnicodeError, ValueError, ArithmeticError, RecursionError) as exc:
        return _dead_letter(exc, raw, received_at)


def _dead_letter(exc: Exception, raw: bytes, received_at: float) -> DeadLetter:
    if isinstance(exc, msgspec.DecodeError | msgspec.ValidationError | DecodeError
                  | TimestampError):
        return DeadLetter(reason=_reason(exc), payload=raw, received_at=received_at)
    return DeadLetter(
        reason=f"undecodable frame: {type(exc).__name__}: {exc}"[:500],
        payload=raw,
        received_at=received_at,
    )


def _reason(exc: Exception) -> str:
    kind = {
        msgspec.ValidationError: "invalid update",
        msgspec.DecodeError: "invalid JSON",
        TimestampError: "invalid timestamp",
        OutOfBounds: "out of bounds",
    }.get(type(exc), "invalid update")
    return f"{kind}: {exc}"[:500]


def _opt_ts(name: str, text: str | None, not_after_ns: int | None) -> datetime | None:
    if text is None:
        return None
    ts, ts_ns = _created_at(text)
    check_time(name, ts_ns, not_after_ns)
    return ts


@lru_cache(maxsize=4096)
def _created_at(text: str) -> tuple[datetime, int]:
    """An order's `created_at` repeats on every update of the order: parsed once."""
    return parse_timestamp(text)


def _update_in_bounds(update: WireUpdate) -> bool:
    """Every bound of a stream update at once (`bounds.py`), for the common case: one
    expression, no call per field; `update_to_event` asks the slow checks why if not."""
    o = update.order
    cid, otype, typ, cls, xid = o.client_order_id, o.order_type, o.type, o.asset_class, \
        update.execution_id
    oqty, avg, qty, price, pos = o.qty, o.filled_avg_price, update.qty, update.price, \
        update.position_qty
    return (
        0 < len(o.id) <= MAX_ID_CHARS and 0 < len(o.symbol) <= MAX_SYMBOL_CHARS
        and len(o.status) <= MAX_LABEL_CHARS and len(update.event) <= MAX_LABEL_CHARS
        and (cid is None or len(cid) <= MAX_CLIENT_ORDER_ID_CHARS)
        and (otype is None or len(otype) <= MAX_LABEL_CHARS)
        and (typ is None or len(typ) <= MAX_LABEL_CHARS)
        and (cls is None or len(cls) <= MAX_LABEL_CHARS)
        and (xid is None or len(xid) <= MAX_ID_CHARS)
        and qty_ok(o.filled_qty)
        and (oqty is None or qty_ok(oqty))
        and (avg is None or price_ok(avg))
        and (qty is None or qty_ok(qty))
        and (price is None or price_ok(price))
        and (pos is None or qty_ok(pos))
    )


def _check_order(order: WireOrder, prefix: str = "order.") -> None:
    """Bounds of the order fields every source shares (stream update, REST snapshot)."""
    if not order.id or not order.symbol:
        raise DecodeError("update without order id or symbol")
    check_text(prefix + "id", order.id, MAX_ID_CHARS)
    check_text(prefix + "symbol", order.symbol, MAX_SYMBOL_CHARS)
    check_opt_text(prefix + "client_order_id", order.client_order_id, MAX_CLIENT_ORDER_ID_CHARS)
    check_text(prefix + "status", order.status, MAX_LABEL_CHARS)
    check_opt_text(prefix + "order_type", order.order_type, MAX_LABEL_CHARS)
    check_opt_text(prefix + "type", order.type, MAX_LABEL_CHARS)
    check_opt_text(prefix + "asset_class", order.asset_class, MAX_LABEL_CHARS)
    check_qty(prefix + "filled_qty", order.filled_qty)
    check_qty(prefix + "qty", order.qty)
    check_price(prefix + "filled_avg_price", order.filled_avg_price)
    if order.side not in ("buy", "sell"):
        raise DecodeError(f"unknown order side {order.side!r}")
    if order.filled_qty < 0:
        raise DecodeError("negative filled_qty")


def update_to_event(
    update: WireUpdate,
    received_at: float = 0.0,
    *,
    raw: bytes = b"",
    not_after_ns: int | None = None,
) -> Event:
    """Normalise a decoded stream update into an `Event` (raises DecodeError if unusable,
    OutOfBounds if a value is outside `bounds.py`). `raw` is the frame it came from."""
    order = update.order
    if order.legs:
        return _mleg_update(update, received_at, raw=raw, not_after_ns=not_after_ns)
    if not _update_in_bounds(update):
        # The slow path names the first value out of bounds (or what else is wrong).
        _check_order(order)
        check_text("event", update.event, MAX_LABEL_CHARS)
        check_opt_text("execution_id", update.execution_id, MAX_ID_CHARS)
        check_qty("qty", update.qty)
        check_price("price", update.price)
        check_qty("position_qty", update.position_qty)
    if order.side not in ("buy", "sell"):
        raise DecodeError(f"unknown order side {order.side!r}")
    if order.filled_qty < 0:
        raise DecodeError("negative filled_qty")
    ts, ts_ns = parse_timestamp(update.timestamp)
    check_time("timestamp", ts_ns, not_after_ns)
    if update.event in FILL_EVENTS:
        if update.qty is None or update.price is None:
            raise DecodeError(f"{update.event} without qty or price")
        if update.qty <= 0 or update.price < 0 or order.filled_qty <= 0:
            raise DecodeError(f"{update.event} with non-positive quantity")
    return Event(
        key=event_key(update.event, order.id, order.filled_qty, ts_ns, update.execution_id),
        event=update.event,
        source="stream",
        order_id=order.id,
        symbol=stored_symbol(order.symbol, order.asset_class),
        side=order.side,
        status=order.status,
        cum_qty=order.filled_qty,
        timestamp=ts,
        ts_ns=ts_ns,
        client_order_id=order.client_order_id,
        order_qty=order.qty,
        cum_avg_price=order.filled_avg_price,
        fill_qty=update.qty,
        fill_price=update.price,
        position_qty=update.position_qty,
        order_type=order.order_type or order.type,
        asset_class=order.asset_class,
        created_at=_opt_ts("order.created_at", order.created_at, not_after_ns),
        received_at=received_at,
        raw=raw,
    )


@lru_cache(maxsize=8192)
def stored_symbol(symbol: str, asset_class: str | None = None) -> str:
    """The one spelling a symbol is stored under (`symbols.canonical_symbol`); an asset
    class the service does not know yet is ignored rather than refusing the update."""
    try:
        return canonical_symbol(symbol, asset_class)
    except ValueError:
        return canonical_symbol(symbol)


def _check_parent(order: WireOrder) -> None:
    """Bounds of a multi-leg parent: its symbol and side may be empty."""
    if not order.id:
        raise DecodeError("multi-leg update without order id")
    check_text("order.id", order.id, MAX_ID_CHARS)
    if order.symbol:
        check_text("order.symbol", order.symbol, MAX_SYMBOL_CHARS)
    check_opt_text("order.client_order_id", order.client_order_id, MAX_CLIENT_ORDER_ID_CHARS)
    check_text("order.status", order.status, MAX_LABEL_CHARS)
    check_opt_text("order.order_class", order.order_class, MAX_LABEL_CHARS)
    check_qty("order.filled_qty", order.filled_qty)
    check_qty("order.qty", order.qty)
    check_price("order.filled_avg_price", order.filled_avg_price)
    if order.filled_qty < 0:
        raise DecodeError("negative filled_qty")
    if len(order.legs or ()) > MAX_LEGS:
        raise DecodeError(f"multi-leg order with more than {MAX_LEGS} legs")


#: Alpaca allows four legs; more is not a multi-leg order we know how to read.
MAX_LEGS: Final = 8


def _legs(order: WireOrder, parent_event: str, ts: datetime, ts_ns: int, source: str,
          not_after_ns: int | None) -> tuple[Event, ...]:
    """Each leg as an update of its own order: its cumulative `filled_qty` is its
    high-water mark, its cumulative average prices what it adds."""
    out = []
    for i, leg in enumerate(order.legs or ()):
        _check_order(leg, f"order.legs[{i}].")
        if leg.filled_qty > 0 and source == "stream":
            if leg.filled_avg_price is None:
                # Its cumulative average is what prices a leg's fills: without it the
                # quantity could not reach a position (a dead letter names it, and the
                # leg's next update or its FILL activities carry the fill).
                raise DecodeError(f"order.legs[{i}] has filled_qty {leg.filled_qty} "
                                  "but no filled_avg_price")
            event = "fill" if leg.status == "filled" else "partial_fill"
        else:
            event = "refresh" if source == "rest" else parent_event
        out.append(Event(
            key=event_key(event, leg.id, leg.filled_qty, ts_ns),
            event=event,
            source="stream" if source == "stream" else "rest",
            order_id=leg.id,
            symbol=stored_symbol(leg.symbol, leg.asset_class),
            side=leg.side or "",
            status=leg.status,
            cum_qty=leg.filled_qty,
            timestamp=ts,
            ts_ns=ts_ns,
            client_order_id=leg.client_order_id,
            order_qty=leg.qty,
            cum_avg_price=leg.filled_avg_price,
            order_type=leg.order_type or leg.type,
            asset_class=leg.asset_class,
            created_at=_opt_ts(f"order.legs[{i}].created_at", leg.created_at, not_after_ns),
            parent_order_id=order.id,
        ))
    return tuple(out)


def mleg_key(event: str, order: WireOrder, ts_ns: int) -> str:
    """A multi-leg fill's key: the parent's cumulative quantity and every leg's, since a
    leg can fill further while the parent's count (whole strategy units) stands still."""
    if event not in FILL_EVENTS:
        return event_key(event, order.id, order.filled_qty, ts_ns)
    legs = ",".join(decimal_text(leg.filled_qty) for leg in order.legs or ())
    return f"mleg:{order.id}:{decimal_text(order.filled_qty)}:{legs}"


def _mleg_update(update: WireUpdate, received_at: float, *, raw: bytes,
                 not_after_ns: int | None) -> Event:
    order = update.order
    _check_parent(order)
    check_text("event", update.event, MAX_LABEL_CHARS)
    ts, ts_ns = parse_timestamp(update.timestamp)
    check_time("timestamp", ts_ns, not_after_ns)
    return Event(
        key=mleg_key(update.event, order, ts_ns),
        event=update.event,
        source="stream",
        order_id=order.id,
        symbol=order.symbol,
        side=order.side or "",
        status=order.status,
        cum_qty=order.filled_qty,
        timestamp=ts,
        ts_ns=ts_ns,
        client_order_id=order.client_order_id,
        order_qty=order.qty,
        cum_avg_price=order.filled_avg_price,
        order_type=order.order_type or order.type,
        asset_class=order.asset_class or None,
        created_at=_opt_ts("order.created_at", order.created_at, not_after_ns),
        received_at=received_at,
        raw=raw,
        order_class="mleg",
        legs=_legs(order, update.event, ts, ts_ns, "stream", not_after_ns),
    )


def activity_json(activity: WireActivity) -> bytes:
    """One FILL activity as JSON: what a dead letter keeps, and `activity_from_json`
    (the dead-letter replay) reads back. One that did not decode: as it came."""
    if isinstance(activity, UndecodableActivity):
        return activity.raw
    return msgspec.json.encode(activity)


def activity_from_json(payload: bytes) -> WireActivity:
    try:
        return _activity_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"invalid FILL activity: {exc}") from None


def activity_to_event(activity: WireActivity, *, not_after_ns: int | None = None) -> Event:
    """A REST FILL activity as an `Event`; its key equals the stream fill's key. Raises
    DecodeError (OutOfBounds) if it cannot be used."""
    if isinstance(activity, UndecodableActivity):
        raise DecodeError(activity.problem)
    if not activity.id or not activity.order_id or not activity.symbol:
        raise DecodeError("activity without id, order id or symbol")
    check_text("id", activity.id, MAX_ID_CHARS)
    check_text("order_id", activity.order_id, MAX_ID_CHARS)
    check_text("symbol", activity.symbol, MAX_SYMBOL_CHARS)
    check_text("type", activity.type, MAX_LABEL_CHARS)
    check_text("activity_type", activity.activity_type, MAX_LABEL_CHARS)
    check_opt_text("order_status", activity.order_status, MAX_LABEL_CHARS)
    check_price("price", activity.price)
    check_qty("qty", activity.qty)
    check_qty("cum_qty", activity.cum_qty)
    check_qty("leaves_qty", activity.leaves_qty)
    if activity.side not in ("buy", "sell"):
        raise DecodeError(f"unknown activity side {activity.side!r}")
    if activity.qty <= 0 or activity.cum_qty <= 0:
        raise DecodeError("activity with non-positive quantity")
    if activity.price < 0:
        raise DecodeError("activity with a negative price")
    ts, ts_ns = parse_timestamp(activity.transaction_time)
    check_time("transaction_time", ts_ns, not_after_ns)
    event = activity.type if activity.type in FILL_EVENTS else "fill"
    return Event(
        key=event_key(event, activity.order_id, activity.cum_qty, ts_ns),
        event=event,
        source="rest",
        order_id=activity.order_id,
        symbol=activity.symbol,
        side=activity.side,
        status=activity.order_status or ("filled" if event == "fill" else "partially_filled"),
        cum_qty=activity.cum_qty,
        timestamp=ts,
        ts_ns=ts_ns,
        fill_qty=activity.qty,
        fill_price=activity.price,
        activity_id=activity.id,
        raw=activity_json(activity),
    )


class UndecodableActivity(WireActivity, gc=False):
    """One FILL activity of a page that does not fit `WireActivity` (a wrong type, a
    missing field): the rest of the page still decodes, and this one reaches backfill,
    whose `activity_to_event` refuses it, to be dead-lettered as the JSON it came as.
    (A whole page failing for one activity would fail every backfill, for ever.)"""

    raw: bytes = b""
    problem: str = ""


class _LooseActivity(msgspec.Struct, gc=False):
    """What paging needs of an activity that does not decode, if it has it."""

    id: Any = None
    transaction_time: Any = None


T = TypeVar("T")
_raw_items_decoder: Final = msgspec.json.Decoder(list[msgspec.Raw])
_loose_decoder: Final = msgspec.json.Decoder(_LooseActivity)


def decode_each(body: bytes, whole: msgspec.json.Decoder[list[T]],
                one: Callable[[bytes], T | None], what: str) -> list[T]:
    """A JSON list from REST, decoded whole when every item decodes (the fast path), else
    item by item: `one` turns an item's bytes into the item, the stand-in that says it
    did not decode, or None to leave it out. One bad item never fails its list (a list
    failing whole would fail every recovery that reads it). Raises DecodeError only if
    `body` is not a JSON list (`what` names it)."""
    try:
        return whole.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            items = _raw_items_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise DecodeError(f"invalid {what}: {exc}") from None
    return [item for raw in items if (item := one(bytes(raw))) is not None]


def decode_activities(body: bytes) -> list[WireActivity]:
    """A page of FILL activities; an activity that does not decode comes back as an
    `UndecodableActivity`. Raises DecodeError only if the page is not a JSON list."""
    return decode_each(body, _activities_decoder, _activity_or_undecodable,
                       "FILL activities page")


def _activity_or_undecodable(raw: bytes) -> WireActivity:
    try:
        return _activity_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            loose = _loose_decoder.decode(raw)
            ident, stamp = loose.id, loose.transaction_time
        except (msgspec.DecodeError, msgspec.ValidationError):
            ident = stamp = None
        return UndecodableActivity(
            id=ident if isinstance(ident, str) else "", order_id="", symbol="", side="",
            price=Decimal(0), qty=Decimal(0), cum_qty=Decimal(0),
            transaction_time=stamp if isinstance(stamp, str) else "",
            raw=raw, problem=f"invalid update: {exc}"[:300])


class OrderList(list[WireOrder]):
    """A list of orders from REST, less those that did not decode: `skipped` says which
    (an id if it had one, and why). A list failing whole for one order would fail every
    recovery that reads it, for ever; a snapshot carries no fill (the refresh skips one
    out of bounds as well), so one skipped costs a status until the next update."""

    skipped: tuple[str, ...] = ()


class _LooseOrder(msgspec.Struct, gc=False):
    id: Any = None


_loose_order_decoder: Final = msgspec.json.Decoder(_LooseOrder)


def decode_orders(body: bytes) -> OrderList:
    """A list of orders, each decoded on its own: one that does not decode is left out and
    named in `skipped`. Raises DecodeError only if the body is not a JSON list."""
    skipped: list[str] = []

    def one(raw: bytes) -> WireOrder | None:
        try:
            return _order_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            skipped.append(f"order {_loose_id(raw)}: {exc}"[:300])
            return None

    out = OrderList(decode_each(body, _orders_decoder, one, "orders list"))
    out.skipped = tuple(skipped)
    return out


def _loose_id(raw: bytes) -> str:
    """An undecodable order's id for a log line, if it has a printable one."""
    try:
        ident = _loose_order_decoder.decode(raw).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "without an id"
    if isinstance(ident, str) and ident.isprintable():
        return repr(ident[:MAX_ID_CHARS])
    return "without an id"


def decode_order(body: bytes) -> WireOrder:
    try:
        return _order_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"invalid order: {exc}") from None


def snapshot_to_event(order: WireOrder, *, not_after_ns: int | None = None) -> Event:
    """An order snapshot from REST (`/v2/orders`) as a status refresh.

    It carries no fill: fills come only from the stream and FILL activities, so a
    snapshot can change status and order fields but never positions.
    """
    mleg = bool(order.legs) or order.order_class == "mleg"
    if mleg:
        _check_parent(order)
    else:
        _check_order(order)
    stamp = order.updated_at or order.created_at
    if stamp is None:
        raise DecodeError("order snapshot without updated_at")
    ts, ts_ns = parse_timestamp(stamp)
    check_time("order.updated_at", ts_ns, not_after_ns)
    return Event(
        key=f"refresh:{order.id}:{order.status}:{ts_ns}",
        event="refresh",
        source="rest",
        order_id=order.id,
        symbol=order.symbol if mleg else stored_symbol(order.symbol, order.asset_class),
        side=order.side or "",
        status=order.status,
        cum_qty=order.filled_qty,
        timestamp=ts,
        ts_ns=ts_ns,
        client_order_id=order.client_order_id,
        order_qty=order.qty,
        cum_avg_price=order.filled_avg_price,
        order_type=order.order_type or order.type,
        asset_class=order.asset_class,
        created_at=_opt_ts("order.created_at", order.created_at, not_after_ns),
        raw=msgspec.json.encode(order),
        order_class="mleg" if mleg else order.order_class,
        legs=_legs(order, "refresh", ts, ts_ns, "rest", not_after_ns) if order.legs else (),
    )


def decode_stored(
    payload: bytes,
    source: str,
    *,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    not_after_ns: int | None = None,
) -> Event | DeadLetter:
    """A dead letter's payload decoded again with today's code (the replay): a stream
    frame, or a REST FILL activity or order snapshot (their JSON). An `Event`, or a
    `DeadLetter` saying why it still cannot be one; never raises."""
    if source != "rest":
        frame = decode_frame(payload, max_bytes=max_bytes, not_after_ns=not_after_ns)
        if isinstance(frame, Event | DeadLetter):
            return frame
        return DeadLetter(f"not a trade update: {type(frame).__name__}", payload)
    try:
        try:
            activity = _activity_decoder.decode(payload)
        except msgspec.ValidationError:
            return snapshot_to_event(decode_order(payload), not_after_ns=not_after_ns)
        return activity_to_event(activity, not_after_ns=not_after_ns)
    except (msgspec.DecodeError, msgspec.ValidationError, DecodeError, TimestampError,
            ValueError, ArithmeticError, RecursionError) as exc:
        return msgspec.structs.replace(_dead_letter(exc, payload, 0.0), source="rest")


def encode_json(value: Any) -> bytes:
    return msgspec.json.encode(value)


# --- the Broker API's events stream (docs/design.md, section 11) -------------------------


class _BrokerEventIds(msgspec.Struct, gc=False):
    account_id: str
    event_id: str


_broker_ids_decoder = msgspec.json.Decoder(_BrokerEventIds)


#: A ULID (the events stream's `event_id`): 26 Crockford base-32 characters, any case,
#: the first ten its millisecond since the epoch.
_ULID: Final = re.compile(r"[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}\Z")
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid_ms(event_id: str) -> int:
    """The millisecond a ULID was minted (`event_id` is one: `_ULID`)."""
    value = 0
    for ch in event_id[:10].upper():
        value = value * 32 + _CROCKFORD.index(ch)
    return value


def decode_broker_event(
    data: bytes,
    *,
    received_at: float = 0.0,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    not_after_ns: int | None = None,
) -> tuple[str | None, Event | DeadLetter]:
    """One `data:` payload of `GET /v2/events/trades`: a trade update like the stream's,
    plus `account_id` and `event_id` (a ULID). Returns the account (None if unreadable)
    and the update keyed by its event id, or a dead letter keeping at most
    `DEAD_LETTER_KEEP_BYTES` of it. Never raises."""
    kept = data[:DEAD_LETTER_KEEP_BYTES]
    if len(data) > max_bytes:
        # Before its ids are decoded: their decoder would read the whole of it.
        return None, DeadLetter(f"oversized event: {len(data)} bytes > limit {max_bytes}",
                                kept, received_at=received_at)
    try:
        ids = _broker_ids_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return None, DeadLetter(f"broker event without account_id and event_id: {exc}"[:300],
                                kept, received_at=received_at)
    if len(ids.account_id) > MAX_ID_CHARS or len(ids.event_id) > MAX_ID_CHARS:
        return None, DeadLetter("out of bounds: account_id or event_id over "
                                f"{MAX_ID_CHARS} characters", kept, received_at=received_at)
    # The account names the part of the batch, and the letter, the event is filed under:
    # one PostgreSQL text refuses (a NUL) would refuse its letter too and stop the whole
    # stream; `|` separates an account from the stream's name in a letter's tag.
    if not ids.account_id or not ids.account_id.isprintable() or "|" in ids.account_id:
        return None, DeadLetter(f"invalid account_id {ids.account_id[:40]!r}", kept,
                                received_at=received_at)
    # The event id is the stream's resume cursor (only ever moved forward): one that is no
    # ULID could not be resumed from, and one minted in the future would skip every event
    # after it on the next connection.
    if _ULID.match(ids.event_id) is None:
        return ids.account_id, DeadLetter(
            f"invalid event_id {ids.event_id[:40]!r}: not a ULID", kept,
            received_at=received_at)
    if not_after_ns is not None and ulid_ms(ids.event_id) * 1_000_000 > not_after_ns:
        return ids.account_id, DeadLetter(
            f"out of bounds: event_id {ids.event_id} minted in the future", kept,
            received_at=received_at)
    frame = decode_frame(b'{"stream":"trade_updates","data":' + data + b"}",
                         received_at=received_at, max_bytes=max_bytes + 34,
                         not_after_ns=not_after_ns)
    if isinstance(frame, Event):
        return ids.account_id, msgspec.structs.replace(
            frame, key=broker_event_key(ids.event_id), account_id=ids.account_id,
            event_id=ids.event_id, raw=data)
    if isinstance(frame, DeadLetter):
        return ids.account_id, DeadLetter(frame.reason, kept, received_at=received_at)
    return ids.account_id, DeadLetter("broker event that is not a trade update", kept,
                                      received_at=received_at)
