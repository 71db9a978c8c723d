

def test_a_bust_that_arrives_before_its_fill_makes_the_fill_stale() -> None:
    # Read again after a loss, the stream can hand the bust over before the fill it
    # busts reached the store: the bust's cumulative quantity is the truth from then on.
    first = apply_events("a", {}, {}, [ev("partial_fill", "4", "10", qty="4", price="10", at=1)])
    bust = ev("trade_bust", "4", "10", qty="-6", price="12", at=3)
    late_fill = ev("fill", "10", "11.2", qty="6", price="12", at=2)
    result = apply_events("a", first.orders, {p.symbol: p for p in first.positions},
                          [bust, late_fill])
    assert result.orders["o1"].filled_qty == D(4)
    (pos,) = result.positions if result.positions else first.positions
    assert pos.qty == D(4) and result.stale_fills == 1


def test_a_revision_reporting_more_than_we_hold_applies_the_gap_once() -> None:
    first = apply_events("a", {}, {}, [ev("partial_fill", "4", "10", qty="4", price="10", at=1)])
    # fills to 10 missed; one of 6 busted... of 14 in all: the bust says 8 at 10.5 remain
    bust = ev("trade_bust", "8", "10.5", qty="-6", price="12", at=5)
    result = apply_events("a", first.orders, {p.symbol: p for p in first.positions}, [bust])
    assert result.orders["o1"].filled_qty == D(8)
    (pos,) = result.positions
    assert pos.qty == D(8) and pos.avg_entry_price == D("10.5")
