"""The Alpaca trade-updates wire protocol: control messages and typed decoding.

`decode_frame` turns one WebSocket frame (binary or text) into a `Frame`: an `Event`,
a control reply, or a `DeadLetter` with the reason. It never raises on bad input.
REST FILL activities and order snapshots decode here too, into the same `Event` shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, Final

import msgspec

from .errors import DecodeError, TimestampError
from .events import FILL_EVENTS, DeadLetter, Event, event_key, parse_timestamp

#: Frames larger than this are dead-lettered without being parsed (the broker's own are ~2 KB).
DEFAULT_MAX_FRAME_BYTES: Final = 1_000_000
#: What is kept of an oversized frame in the dead-letter table.
DEAD_LETTER_KEEP_BYTES: Final = 64_000


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
    side: str
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


#: Amounts beyond 10**20 are not money or share counts; NaN and Infinity never are.
_MAX_DECIMAL_ADJUSTED: Final = 20


def _check_amounts(**values: Decimal | None) -> None:
    for name, value in values.items():
        if value is not None and (
            not value.is_finite() or value.adjusted() > _MAX_DECIMAL_ADJUSTED
        ):
            raise DecodeError(f"{name} is not a finite decimal in range: {str(value)[:40]}")


def _as_bytes(frame: str | bytes) -> bytes:
    return frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame


def decode_frame(
    frame: str | bytes, *, received_at: float = 0.0, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Frame:
    """Decode one frame. Bad input becomes a `DeadLetter`; this never raises."""
    raw = _as_bytes(frame)
    if len(raw) > max_bytes:
        return DeadLetter(
            reason=f"oversized frame: {len(raw)} bytes > limit {max_bytes}",
            payload=raw[:DEAD_LETTER_KEEP_BYTES],
            received_at=received_at,
        )
    try:
        update = _trade_update_decoder.decode(raw).data
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, RecursionError):
        pass  # not a well-formed trade update: the envelope path below says why
    else:
        try:
            return update_to_event(update, received_at)
        except (DecodeError, TimestampError, ValueError, ArithmeticError) as exc:
            return _dead_letter(exc, raw, received_at)
    try:
        envelope = _envelope_decoder.decode(raw)
        if bytes(envelope.data).strip() == b"null":
            raise DecodeError(f"message for stream {envelope.stream!r} has no data")
        if envelope.stream == "trade_updates":
            return update_to_event(_update_decoder.decode(envelope.data), received_at)
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
    }.get(type(exc), "invalid update")
    return f"{kind}: {exc}"[:500]


def _opt_ts(text: str | None) -> datetime | None:
    if text is None:
        return None
    return _created_at(text)


@lru_cache(maxsize=4096)
def _created_at(text: str) -> datetime:
    """An order's `created_at` repeats on every update of the order: parsed once."""
    return parse_timestamp(text)[0]


def update_to_event(update: WireUpdate, received_at: float = 0.0) -> Event:
    """Normalise a decoded stream update into an `Event` (raises DecodeError if unusable)."""
    order = update.order
    _check_amounts(
        filled_qty=order.filled_qty,
        filled_avg_price=order.filled_avg_price,
        order_qty=order.qty,
        qty=update.qty,
        price=update.price,
        position_qty=update.position_qty,
    )
    if not order.id or not order.symbol:
        raise DecodeError("update without order id or symbol")
    if order.side not in ("buy", "sell"):
        raise DecodeError(f"unknown order side {order.side!r}")
    if order.filled_qty < 0:
        raise DecodeError("negative filled_qty")
    ts, ts_ns = parse_timestamp(update.timestamp)
    if update.event in FILL_EVENTS:
        if update.qty is None or update.price is None:
            raise DecodeError(f"{update.event} without qty or price")
        if update.qty <= 0 or update.price < 0 or order.filled_qty <= 0:
            raise DecodeError(f"{update.event} with non-positive quantity")
    return Event(
        key=event_key(update.event, order.id, order.filled_qty, ts_ns),
        event=update.event,
        source="stream",
        order_id=order.id,
        symbol=order.symbol,
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
        created_at=_opt_ts(order.created_at),
        received_at=received_at,
    )


def activity_to_event(activity: WireActivity) -> Event:
    """A REST FILL activity as an `Event`; its key equals the stream fill's key."""
    _check_amounts(price=activity.price, qty=activity.qty, cum_qty=activity.cum_qty,
                   leaves_qty=activity.leaves_qty)
    if activity.side not in ("buy", "sell"):
        raise DecodeError(f"unknown activity side {activity.side!r}")
    if activity.qty <= 0 or activity.cum_qty <= 0:
        raise DecodeError("activity with non-positive quantity")
    ts, ts_ns = parse_timestamp(activity.transaction_time)
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
    )


def decode_activities(body: bytes) -> list[WireActivity]:
    try:
        return _activities_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"invalid FILL activities page: {exc}") from None


def decode_orders(body: bytes) -> list[WireOrder]:
    try:
        return _orders_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"invalid orders list: {exc}") from None


def decode_order(body: bytes) -> WireOrder:
    try:
        return _order_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"invalid order: {exc}") from None


def snapshot_to_event(order: WireOrder) -> Event:
    """An order snapshot from REST (`/v2/orders`) as a status refresh.

    It carries no fill: fills come only from the stream and FILL activities, so a
    snapshot can change status and order fields but never positions.
    """
    stamp = order.updated_at or order.created_at
    if stamp is None:
        raise DecodeError("order snapshot without updated_at")
    ts, ts_ns = parse_timestamp(stamp)
    return Event(
        key=f"refresh:{order.id}:{order.status}:{ts_ns}",
        event="refresh",
        source="rest",
        order_id=order.id,
        symbol=order.symbol,
        side=order.side,
        status=order.status,
        cum_qty=order.filled_qty,
        timestamp=ts,
        ts_ns=ts_ns,
        client_order_id=order.client_order_id,
        order_qty=order.qty,
        cum_avg_price=order.filled_avg_price,
        order_type=order.order_type or order.type,
        asset_class=order.asset_class,
        created_at=_opt_ts(order.created_at),
    )


def encode_json(value: Any) -> bytes:
    return msgspec.json.encode(value)
