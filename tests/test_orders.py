"""Order level of exactly-once: the cumulative guard, gap pricing and status merging."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_supervisor.events import Event, Source, event_key
from stream_supervisor.orders import (
    TERMINAL_STATUSES,
    OrderOutcome,
    OrderState,
    apply_order_event,
    merge_status,
)

T0 = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)
D = Decimal


def ev(
    event: str,
    *,
    cum: str | Decimal = "0",
    avg: str | Decimal | None = None,
    qty: str | Decimal | None = None,
    price: str | Decimal | None = None,
    status: str | None = None,
    side: str = "buy",
    order_qty: str | None = "10",
    source: Source = "stream",
    t: int = 0,
    order_id: str = "o1",
) -> Event:
    ts = T0 + timedelta(seconds=t)
    ts_ns = int(ts.timestamp()) * 10**9
    cum_d = D(cum)
    return Event(
        key=event_key(event, order_id, cum_d, ts_ns),
        event=event,
        source=source,
        order_id=order_id,
        symbol="AAPL",
        side=side,
        status=status or {"fill": "filled", "partial_fill": "partially_filled"}.get(event, event),
        cum_qty=cum_d,
        timestamp=ts,
        ts_ns=ts_ns,
        client_order_id="c1" if source == "stream" else None,
        order_qty=D(order_qty) if order_qty is not None and source == "stream" else None,
        cum_avg_price=D(avg) if avg is not None else None,
        fill_qty=D(qty) if qty is not None else None,
        fill_price=D(price) if price is not None else None,
    )


def run(*events: Event, prev: OrderState | None = None) -> list[OrderOutcome]:
    out = []
    state = prev
    for e in events:
        outcome = apply_order_event(state, e)
        state = outcome.state
        out.append(outcome)
    return out


def test_first_fill_creates_the_order_and_a_delta() -> None:
    (o,) = run(ev("partial_fill", cum="3", avg="10", qty="3", price="10"))
    assert o.state.filled_qty == D(3)
    assert o.state.filled_avg_price == D(10)
    assert o.state.status == "partially_filled"
    assert o.delta is not None
    assert (o.delta.qty, o.delta.price, o.delta.exact) == (D(3), D(10), True)
    assert not o.stale


def test_sell_deltas_are_negative() -> None:
    (o,) = run(ev("fill", cum="2.5", avg="7", qty="2.5", price="7", side="sell", order_qty="2.5"))
    assert o.delta is not None and o.delta.qty == D("-2.5")


def test_continuing_fill_uses_its_own_price_exactly() -> None:
    _, b = run(
        ev("partial_fill", cum="3", avg="10", qty="3", price="10"),
        # The broker's cumulative average is rounded; the fill's own price is the truth.
        ev("partial_fill", cum="5", avg="10.800000000001", qty="2", price="12", t=1),
    )
    assert b.delta is not None
    assert (b.delta.qty, b.delta.price, b.delta.exact) == (D(2), D(12), True)
    assert b.state.filled_qty == D(5)
    assert b.state.filled_avg_price == D("10.800000000001")  # what the broker reports


def test_missed_intermediate_fill_priced_from_cumulative_averages() -> None:
    # Fills: 2 @ 10, (missed: 3 @ 14), 1 @ 20.  After all three: cum 6, avg 76/6.
    first = ev("partial_fill", cum="2", avg="10", qty="2", price="10")
    third = ev("partial_fill", cum="6", avg=D(76) / D(6), qty="1", price="20", t=2)
    a, b = run(first, third)
    assert b.delta is not None
    assert b.delta.qty == D(4)
    # (C*P_C - c0*p0) / (C - c0) = (76 - 20) / 4 = 14: the average of what was missed.
    expected = (D(6) * (D(76) / D(6)) - D(2) * D(10)) / D(4)
    assert b.delta.price == expected
    assert abs(b.delta.price - D(14)) < D("1e-20")
    assert b.delta.exact
    # Everything that reached positions, at its price, adds up to the broker's total.
    total = a.delta.qty * a.delta.price + b.delta.qty * b.delta.price  # type: ignore[union-attr]
    assert abs(total - D(76)) < D("1e-20")


def test_first_fill_seen_is_past_a_gap() -> None:
    (o,) = run(ev("partial_fill", cum="5", avg="11", qty="2", price="12"))
    assert o.delta is not None
    assert (o.delta.qty, o.delta.price, o.delta.exact) == (D(5), D(11), True)


def test_rest_fill_past_a_gap_uses_its_price_and_says_inexact() -> None:
    a, b = run(
        ev("partial_fill", cum="2", qty="2", price="10", source="rest"),
        ev("partial_fill", cum="6", qty="1", price="20", source="rest", t=2),
    )
    assert a.delta is not None and a.delta.exact
    assert a.state.filled_avg_price == D(10)
    assert b.delta is not None
    assert (b.delta.qty, b.delta.price, b.delta.exact) == (D(4), D(20), False)
    assert b.state.filled_qty == D(6)
    assert b.state.filled_avg_price == (D(20) + D(80)) / D(6)


def test_rest_fills_in_order_reproduce_the_average() -> None:
    outs = run(
        ev("partial_fill", cum="2", qty="2", price="10", source="rest"),
        ev("partial_fill", cum="5", qty="3", price="14", source="rest", t=1),
        ev("fill", cum="6", qty="1", price="20", source="rest", t=2),
    )
    assert all(o.delta is not None and o.delta.exact for o in outs)
    assert [o.delta.price for o in outs] == [D(10), D(14), D(20)]  # type: ignore[union-attr]
    assert outs[-1].state.filled_qty == D(6)
    # 2 @ 10 + 3 @ 14 + 1 @ 20 = 82 over 6.
    assert abs(outs[-1].state.filled_avg_price - D(82) / D(6)) < D("1e-20")  # type: ignore[operator]


@pytest.mark.parametrize("dup_cum", ["3", "2", "0.5"])
def test_fill_at_or_below_the_stored_cumulative_is_stale(dup_cum: str) -> None:
    _, b = run(
        ev("partial_fill", cum="3", avg="10", qty="3", price="10"),
        ev("partial_fill", cum=dup_cum, avg="9", qty="1", price="9", t=5),
    )
    assert b.delta is None
    assert b.stale
    assert b.state.filled_qty == D(3)
    assert b.state.filled_avg_price == D(10)


def test_rest_duplicate_of_a_stream_fill_is_stale() -> None:
    stream = ev("partial_fill", cum="3", avg="10", qty="3", price="10")
    rest = ev("partial_fill", cum="3", qty="3", price="10", source="rest", t=1)
    assert stream.key == rest.key  # normally the dedupe layer drops it before this
    _, b = run(stream, rest)
    assert b.delta is None and b.stale


def test_late_smaller_fill_after_a_larger_cumulative_is_stale() -> None:
    _, _, c = run(
        ev("partial_fill", cum="2", avg="10", qty="2", price="10"),
        ev("partial_fill", cum="6", avg="12", qty="1", price="16", t=2),
        ev("partial_fill", cum="5", avg="11.2", qty="3", price="12", t=1),  # arrived late
    )
    assert c.delta is None and c.stale
    assert c.state.filled_qty == D(6) and c.state.filled_avg_price == D(12)


def test_non_fill_updates_never_create_deltas_below_the_cumulative() -> None:
    _, b = run(
        ev("partial_fill", cum="3", avg="10", qty="3", price="10"),
        ev("pending_cancel", cum="3", avg="10", t=1),
    )
    assert b.delta is None and not b.stale
    assert b.state.status == "pending_cancel"
    assert b.state.filled_qty == D(3)


def test_cancel_revealing_missed_fills_lands_them() -> None:
    _, b = run(
        ev("new", cum="0"),
        ev("canceled", cum="4", avg="11", t=3),
    )
    assert b.delta is not None
    assert (b.delta.qty, b.delta.price) == (D(4), D(11))
    assert b.state.status == "canceled"
    assert b.state.filled_qty == D(4)


def test_unknown_event_type_changes_nothing() -> None:
    a, b = run(
        ev("partial_fill", cum="3", avg="10", qty="3", price="10"),
        ev("order_exploded", cum="9", avg="50", qty="6", price="60", status="exploded", t=1),
    )
    assert b.delta is None and not b.stale
    assert b.state == a.state


def test_rest_snapshot_above_cumulative_changes_status_not_quantity() -> None:
    # A REST order snapshot is taken now, ahead of live frames still queued: its fills
    # arrive through FILL activities, so it must not apply them itself.
    _, b = run(
        ev("partial_fill", cum="3", avg="10", qty="3", price="10"),
        ev("refresh", cum="10", avg="11", status="filled", source="rest", t=5),
    )
    assert b.delta is None
    assert b.state.filled_qty == D(3) and b.state.filled_avg_price == D(10)
    assert b.state.status == "filled"


def test_non_fill_update_above_cumulative_without_average_changes_no_quantity() -> None:
    (o,) = run(ev("canceled", cum="4", avg=None))
    assert o.delta is None
    assert o.state.filled_qty == D(0)
    assert o.state.status == "canceled"


def test_reaching_the_order_quantity_means_filled() -> None:
    # A REST activity of the last fill, reported as a partial fill, still completes it.
    _, b = run(
        ev("new", cum="0", order_qty="6"),
        ev(
            "partial_fill",
            cum="6",
            qty="6",
            price="10",
            status="partially_filled",
            order_qty="6",
            t=1,
        ),
    )
    assert b.state.status == "filled"


# --- status merging -------------------------------------------------------------------


def test_late_new_after_filled_does_not_regress() -> None:
    outs = run(
        ev("fill", cum="10", avg="10", qty="10", price="10"),
        ev("new", t=-5),
        ev("pending_new", t=-6),
        ev("accepted", t=-7),
    )
    assert [o.state.status for o in outs] == ["filled"] * 4
    assert outs[-1].state.filled_qty == D(10)


def test_pending_new_after_partially_filled_does_not_regress() -> None:
    outs = run(
        ev("partial_fill", cum="3", avg="10", qty="3", price="10"),
        ev("pending_new", t=-2),
        ev("new", t=-1),
    )
    assert [o.state.status for o in outs] == ["partially_filled"] * 3


def test_status_progresses_forward() -> None:
    outs = run(
        ev("pending_new"),
        ev("new", t=1),
        ev("partial_fill", cum="3", avg="10", qty="3", price="10", t=2),
        ev("pending_cancel", cum="3", avg="10", t=3),
        ev("canceled", cum="3", avg="10", t=4),
    )
    assert [o.state.status for o in outs] == [
        "pending_new",
        "new",
        "partially_filled",
        "pending_cancel",
        "canceled",
    ]


_TERMINAL_EVENTS = {
    "filled": ev("fill", cum="10", avg="10", qty="10", price="10"),
    "canceled": ev("canceled"),
    "expired": ev("expired"),
    "replaced": ev("replaced"),
    "rejected": ev("rejected"),
}


def test_every_terminal_status_is_covered() -> None:
    assert set(_TERMINAL_EVENTS) == TERMINAL_STATUSES


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATUSES))
def test_terminal_statuses_stick(terminal: str) -> None:
    first = run(_TERMINAL_EVENTS[terminal])[0].state
    assert first.status == terminal
    for later in (
        "new",
        "partially_filled",
        "pending_cancel",
        "filled",
        "canceled",
        "expired",
        "whatever",
    ):
        assert merge_status(terminal, later) == terminal
    late = [
        ev("pending_new", t=20),
        ev("new", t=21),
        ev("pending_cancel", t=22),
        ev("canceled", t=23),
        ev("expired", t=24),
    ]
    assert [o.state.status for o in run(*late, prev=first)] == [terminal] * len(late)
    # Even a late fill does not change the status, though its quantity still counts.
    c0 = first.filled_qty
    (o,) = run(ev("partial_fill", cum=c0 + 2, avg="10", qty="2", price="10", t=9), prev=first)
    assert o.state.status == terminal
    assert o.state.filled_qty == c0 + 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "pending_new",
                "accepted",
                "held",
                "new",
                "partially_filled",
                "calculated",
                "pending_cancel",
                "pending_replace",
                "stopped",
                "suspended",
                "done_for_day",
                "filled",
                "canceled",
                "expired",
                "replaced",
                "rejected",
                "some_future_status",
            ]
        ),
        min_size=1,
        max_size=12,
    )
)
def test_a_terminal_status_is_never_left_once_reached(statuses: list[str]) -> None:
    status = statuses[0]
    reached: str | None = status if status in TERMINAL_STATUSES else None
    for s in statuses[1:]:
        status = merge_status(status, s)
        if reached is not None:
            assert status == reached
        elif status in TERMINAL_STATUSES:
            reached = status


def test_order_fields_filled_in_by_a_richer_update() -> None:
    a, b = run(
        ev("partial_fill", cum="2", qty="2", price="10", source="rest"),
        ev("partial_fill", cum="3", avg="10", qty="1", price="10", t=1),
    )
    assert a.state.client_order_id is None and a.state.order_qty is None
    assert b.state.client_order_id == "c1" and b.state.order_qty == D(10)


def test_updated_at_is_the_latest_instant_seen() -> None:
    _, b = run(
        ev("partial_fill", cum="3", avg="10", qty="3", price="10", t=10),
        ev("new", t=1),
    )
    assert b.state.updated_at == T0 + timedelta(seconds=10)


def test_everything_is_decimal() -> None:
    a, b = run(
        ev("partial_fill", cum="1.5", avg="10.25", qty="1.5", price="10.25"),
        ev("partial_fill", cum="4", avg="11", qty="1", price="12", t=2),
    )
    for o in (a, b):
        assert isinstance(o.state.filled_qty, Decimal)
        assert isinstance(o.state.filled_avg_price, Decimal)
        assert o.delta is not None
        assert isinstance(o.delta.qty, Decimal) and isinstance(o.delta.price, Decimal)


# --- the status rule (docs/design.md, section 9, "Status") ------------------------------


@pytest.mark.parametrize(("refused", "pending"), [
    ("order_cancel_rejected", "pending_cancel"),
    ("order_replace_rejected", "pending_replace"),
])
def test_a_refused_cancel_or_replace_returns_the_order_to_the_status_it_carries(
        refused: str, pending: str) -> None:
    outcomes = run(
        ev("new", t=0),
        ev("partial_fill", cum="4", avg="10", qty="4", price="10", t=1),
        ev(pending, cum="4", avg="10", status=pending, t=2),
        ev(refused, cum="4", avg="10", status="partially_filled", t=3),
    )
    assert [o.state.status for o in outcomes] == ["new", "partially_filled", pending,
                                                  "partially_filled"]
    # Refused even when the broker stamped it in the same instant as the request.
    (same,) = run(ev(refused, status="new", t=2), prev=run(ev(pending, t=2))[0].state)
    assert same.state.status == "new"


def test_a_gtc_order_new_again_the_morning_after_done_for_day() -> None:
    outcomes = run(ev("new", t=0), ev("done_for_day", t=10), ev("new", t=20))
    assert [o.state.status for o in outcomes] == ["new", "done_for_day", "new"]


def test_among_statuses_that_are_not_final_the_later_broker_stamp_wins() -> None:
    # A `new` delivered late (stamped before the pending_cancel) does not undo it.
    (late,) = run(ev("new", t=1), prev=run(ev("pending_cancel", t=5))[0].state)
    assert late.state.status == "pending_cancel"


def test_the_rest_refresh_repairs_a_stuck_status_by_the_same_rule() -> None:
    stuck = run(ev("new", t=0), ev("pending_cancel", t=2))[-1].state
    # The refusal never reached us; the broker's order says `new` again, stamped later.
    (fixed,) = run(ev("refresh", status="new", source="rest", t=3), prev=stuck)
    assert fixed.state.status == "new"
    # Stamped at the very instant we have, the snapshot is still the broker's word now.
    (tie,) = run(ev("refresh", status="new", source="rest", t=2), prev=stuck)
    assert tie.state.status == "new"
    # An older snapshot (taken before the pending_cancel) does not move it back.
    (old,) = run(ev("refresh", status="new", source="rest", t=1), prev=stuck)
    assert old.state.status == "pending_cancel"
    # And nothing, refresh included, leaves a final status.
    done = run(ev("canceled", t=4), prev=stuck)[0].state
    (after,) = run(ev("refresh", status="new", source="rest", t=9), prev=done)
    assert after.state.status == "canceled"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(
    ["new", "partially_filled", "pending_cancel", "pending_replace", "done_for_day",
     "filled", "canceled", "replaced"]), st.integers(0, 20)), min_size=1, max_size=10))
def test_final_never_regresses_and_the_latest_stamp_wins_otherwise(
        steps: list[tuple[str, int]]) -> None:
    state: OrderState | None = None
    final: str | None = None
    for status, t in steps:
        before = state
        # `restated`: an update that carries a status and no fill.
        state = apply_order_event(state, ev("restated", status=status, t=t)).state
        if final is not None:
            assert state.status == final
        elif status in TERMINAL_STATUSES:
            final = status
            assert state.status == status
        elif before is not None and before.updated_at is not None and (
                T0 + timedelta(seconds=t) > before.updated_at):
            assert state.status == status
