"""`check`: silent on a database written by real batches, and naming the layer of every
planted inconsistency."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
import trio

from stream_supervisor.check import Violation, format_violations, run_checks
from stream_supervisor.errors import SchemaNotMigrated
from stream_supervisor.events import fill_key
from stream_supervisor.pgstore import PgStore

from .test_store_conformance import ACCOUNT, REST, STREAM, replay


@pytest.fixture
async def written(database_url: str) -> AsyncIterator[str]:
    """A database holding the whole recorded session, stream and REST, as batches wrote it."""
    store = PgStore(database_url)
    with trio.fail_after(30):
        await store.open()
        await replay(store, STREAM + REST, 64)
        await store.aclose()
    yield database_url


async def checks(url: str, account_id: str | None = None) -> list[Violation]:
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(run_checks, url, account_id)


def execute(url: str, *statements: str, params: tuple[object, ...] = ()) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement, params or None)


def layers(violations: list[Violation]) -> set[tuple[str, str]]:
    return {(v.layer, v.what) for v in violations}


async def test_a_database_written_by_batches_passes(written: str) -> None:
    violations = await checks(written)
    assert violations == []
    assert await checks(written, ACCOUNT) == []
    assert "OK" in format_violations(violations)


async def test_two_keys_for_one_fill_compared_numerically(written: str) -> None:
    integral = next(e for e in STREAM if e.is_fill and e.cum_qty == e.cum_qty.to_integral())
    stored = fill_key(integral.order_id, integral.cum_qty)
    planted = f"{stored}.0"  # the same fill, spelled differently
    execute(written,
            "INSERT INTO alpaca_event_dedupe (event_key, account_id, event_type, source) "
            "VALUES (%s, %s, 'fill', 'rest')",
            params=(planted, ACCOUNT))

    violations = await checks(written)
    assert layers(violations) == {("event", "duplicate fill keys")}
    assert stored in violations[0].detail and planted in violations[0].detail
    assert "event layer" in format_violations(violations)


async def test_a_fill_key_beyond_the_orders_filled_qty(written: str) -> None:
    order = STREAM[-1].order_id
    execute(written,
            "INSERT INTO alpaca_event_dedupe (event_key, account_id, event_type, source) "
            "VALUES (%s, %s, 'fill', 'stream')",
            params=(fill_key(order, STREAM[-1].cum_qty + 1000), ACCOUNT))

    assert layers(await checks(written)) == {("event", "fill key beyond the order")}


async def test_an_order_filled_beyond_its_quantity(written: str) -> None:
    execute(written,
            "UPDATE broker_orders SET qty = filled_qty - 1 WHERE alpaca_order_id = ("
            " SELECT alpaca_order_id FROM broker_orders WHERE filled_qty > 1 LIMIT 1)")

    assert layers(await checks(written)) == {("order", "filled more than ordered")}


async def test_a_bumped_position_quantity(written: str) -> None:
    execute(written,
            "UPDATE active_positions SET qty = qty + 1 WHERE id = ("
            " SELECT min(id) FROM active_positions WHERE status = 'open')")

    violations = await checks(written)
    assert layers(violations) == {("position", "net position differs from the orders")}


async def test_two_open_positions_for_one_symbol(written: str) -> None:
    # The partial unique index forbids it; the check must not rely on the index existing.
    execute(written,
            "DROP INDEX active_positions_one_open_per_symbol",
            "INSERT INTO active_positions (account_id, symbol, side, qty, avg_entry_price, "
            " alpaca_order_id, status, opened_at, peak_qty) "
            "SELECT account_id, symbol, 'short', qty, avg_entry_price, alpaca_order_id, 'open', "
            " opened_at, qty FROM active_positions WHERE status = 'open' AND side = 'long' "
            "ORDER BY id LIMIT 1")

    found = layers(await checks(written))
    assert ("position", "several open positions for one symbol") in found
    assert {layer for layer, _ in found} == {"position"}


async def test_a_dropped_history_row(written: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        execute(written, "DELETE FROM position_history")
    execute(written,
            "ALTER TABLE position_history DISABLE TRIGGER position_history_no_update_delete",
            "DELETE FROM position_history WHERE position_id = ("
            " SELECT min(position_id) FROM position_history)")

    assert layers(await checks(written)) == {("position", "closed position without history")}


async def test_history_whose_row_is_open_again(written: str) -> None:
    """A closed row pruned away (what `prune` does once history holds it) is no
    violation; one whose row reads open again is."""
    execute(written,
            "DELETE FROM active_positions WHERE id = ("
            " SELECT min(id) FROM active_positions WHERE status = 'closed')")
    assert await checks(written) == []
    execute(written,
            "UPDATE active_positions SET status = 'open', qty = 1, closed_at = NULL WHERE id = ("
            " SELECT min(c.id) FROM active_positions c WHERE c.status = 'closed' AND NOT EXISTS"
            " (SELECT 1 FROM active_positions o WHERE o.status = 'open'"
            "  AND o.account_id = c.account_id AND o.symbol = c.symbol))")

    assert ("position", "history without a closed position") in layers(await checks(written))


async def test_a_cursor_in_the_future(written: str) -> None:
    execute(written, "UPDATE stream_cursors SET fill_time = now() + interval '1 day'")

    assert layers(await checks(written)) == {("cursor", "cursor in the future")}


async def test_checks_limited_to_one_account(written: str) -> None:
    execute(written, "UPDATE stream_cursors SET fill_time = now() + interval '1 day'")

    assert await checks(written, "some-other-account") == []
    assert layers(await checks(written, ACCOUNT)) == {("cursor", "cursor in the future")}


async def test_an_unmigrated_database_is_named_not_crashed_on(empty_database_url: str) -> None:
    with pytest.raises(SchemaNotMigrated, match="stream-supervisor migrate"):
        await checks(empty_database_url)
