"""PgStore beyond the shared contract: connection failures, timeouts, schema checks,
secrets, two writers at once, and inputs PostgreSQL would otherwise choke on."""

from __future__ import annotations

from datetime import timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import pytest
import trio

from stream_supervisor import pgstore
from stream_supervisor.adjustments import RECONCILE, BrokerPosition
from stream_supervisor.errors import (
    ConfigError,
    LostLeadership,
    SchemaError,
    SchemaNotMigrated,
    StoreDataError,
    StoreError,
    StoreRejected,
    StoreUnavailable,
)
from stream_supervisor.events import DeadLetter
from stream_supervisor.pgstore import LEADER_LOCK_PREFIX, PgStore
from stream_supervisor.store import Batch, BatchResult, BrokerWord

from .test_store_conformance import (
    ACCOUNT,
    STREAM,
    T0,
    TRUTH,
    fill,
    full_mismatches,
    replay,
    replay_ahead,
)

SECRET = "s3cr3t-Pa55word"
WAIT = 30


async def opened(url: str, **kw: object) -> PgStore:
    store = PgStore(url, **kw)  # type: ignore[arg-type]
    with trio.fail_after(WAIT):
        await store.open()
    return store


def sql(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params or None).fetchall()


async def test_unmigrated_database_is_refused_with_the_fix(empty_database_url: str) -> None:
    store = PgStore(empty_database_url)
    with trio.fail_after(WAIT), pytest.raises(SchemaNotMigrated) as err:
        await store.open()

    assert isinstance(err.value, SchemaError)  # the supervisor's fatal "not migrated" error
    assert "stream-supervisor migrate" in str(err.value)
    assert "alpaca_event_dedupe" in str(err.value)
    await store.aclose()


@pytest.mark.parametrize(
    "conninfo",
    [
        f"postgresql://trader:{SECRET}@127.0.0.1:1/trading",
        f"host=127.0.0.1 port=1 user=trader password={SECRET} dbname=trading",
        f"postgresql://trader@127.0.0.1:1/trading?password={SECRET}",
    ],
)
async def test_unreachable_server_raises_unavailable_without_the_password(conninfo: str) -> None:
    store = PgStore(conninfo, connect_timeout_s=2)
    with trio.fail_after(WAIT), pytest.raises(StoreUnavailable) as err:
        await store.open()

    message = str(err.value)
    assert SECRET not in message and SECRET not in repr(err.value)
    assert "127.0.0.1" in message
    # Not chained: a traceback never shows the driver's own text either.
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert SECRET not in repr(store)


async def test_garbled_conninfo_is_a_config_error_without_the_password() -> None:
    store = PgStore(f"postgresql://trader:{SECRET}@127.0.0.1:1/trading?no_such_option=1")
    with trio.fail_after(WAIT), pytest.raises(ConfigError) as err:
        await store.open()
    assert SECRET not in str(err.value)


async def test_lost_connection_fails_one_call_then_reconnects(database_url: str) -> None:
    store = await opened(database_url, application_name="ss-test-kill")
    half = len(STREAM) // 2
    await replay(store, STREAM[:half], 50)

    killed = sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = 'ss-test-kill'")
    assert killed == [(True,)]
    with trio.fail_after(WAIT), pytest.raises(StoreUnavailable):
        await store.commit_batch(Batch(ACCOUNT, STREAM[half:]))

    results = await replay(store, STREAM[half:], 50)
    assert sum(len(r.applied_keys) for r in results) == len({e.key for e in STREAM[half:]})
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []
    await store.aclose()


async def test_statement_timeout_bounds_a_blocked_batch(database_url: str) -> None:
    store = await opened(database_url, statement_timeout_ms=300)
    await replay(store, STREAM[:20], 20)
    order_id = STREAM[20].order_id
    assert sql(database_url, "SELECT count(*) FROM broker_orders WHERE alpaca_order_id = %s",
               order_id) == [(1,)]

    # Another session holds the order's row lock: the batch must give up, not hang.
    with psycopg.connect(database_url) as blocker:
        blocker.execute("SELECT 1 FROM broker_orders WHERE alpaca_order_id = %s FOR UPDATE",
                        [order_id])
        with trio.fail_after(WAIT), pytest.raises(StoreError, match="statement timeout"):
            await store.commit_batch(Batch(ACCOUNT, STREAM[20:]))
        blocker.rollback()

    assert sql(database_url, "SELECT count(*) FROM alpaca_event_dedupe") == [(20,)]
    await replay(store, STREAM[20:], 200)
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []
    await store.aclose()


async def test_a_statement_timeout_does_not_cost_the_leader_its_writer_lock(
    database_url: str,
) -> None:
    # Found by the chaos log test: a timed-out batch used to drop the connection, and with
    # it the session's advisory lock, so a transient lock wait restarted the pipeline.
    store = await opened(database_url, statement_timeout_ms=300)
    assert await store.try_leadership(ACCOUNT)
    with psycopg.connect(database_url) as blocker:
        blocker.execute("LOCK TABLE broker_orders IN EXCLUSIVE MODE")
        with trio.fail_after(WAIT), pytest.raises(StoreError, match="statement timeout"):
            await store.commit_batch(Batch(ACCOUNT, STREAM[:10]))
        blocker.rollback()
    # Still the leader (no LostLeadership), and no other session can take the lock.
    await replay(store, STREAM, 100)
    rival = await opened(database_url)
    assert not await rival.try_leadership(ACCOUNT)
    await rival.aclose()
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []
    await store.aclose()


async def test_cancelled_caller_waits_for_the_statement_then_the_store_goes_on(
    database_url: str,
) -> None:
    # A thread cannot be interrupted: the cancelled call returns only once the statement
    # ended (here by statement_timeout), so the connection is never used by two threads.
    store = await opened(database_url, statement_timeout_ms=500)
    with psycopg.connect(database_url) as blocker:
        blocker.execute("LOCK TABLE broker_orders IN EXCLUSIVE MODE")
        with (
            trio.fail_after(WAIT),
            trio.move_on_after(0.05),
            pytest.raises(StoreError, match="statement timeout"),
        ):
            await store.commit_batch(Batch(ACCOUNT, STREAM[:10]))
        blocker.rollback()
    assert sql(database_url, "SELECT count(*) FROM alpaca_event_dedupe") == [(0,)]

    await replay(store, STREAM, 100)
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []
    await store.aclose()


async def test_two_writers_on_one_account_apply_each_fill_once(database_url: str) -> None:
    stores = [await opened(database_url) for _ in range(2)]
    applied: list[int] = []

    async def writer(store: PgStore, size: int) -> None:
        for i in range(0, len(STREAM), size):
            batch = Batch(ACCOUNT, STREAM[i : i + size])
            while True:  # what the writer actor does: retry until it sticks
                try:
                    result = await store.commit_batch(batch)
                except StoreError:
                    await trio.sleep(0.01)
                    continue
                applied.append(result.fills_applied)
                break

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, stores[0], 7)
            nursery.start_soon(writer, stores[1], 11)

    assert sum(applied) == TRUTH["fills_total"]
    assert full_mismatches(await stores[0].snapshot(ACCOUNT)) == []
    for store in stores:
        await store.aclose()


async def test_nul_characters_do_not_poison_a_batch(database_url: str) -> None:
    store = await opened(database_url)
    odd = msgspec.structs.replace(fill("ord\x00er", "buy", "3", "3", "10", 1), symbol="X\x00Y")
    letter = DeadLetter("invalid JSON: \x00", b"\x00\x01", "stream")

    with trio.fail_after(WAIT):
        result = await store.commit_batch(Batch("acct-nul", [odd], [letter]))
        snap = await store.snapshot("acct-nul")

    assert result.applied_keys == {odd.key}  # the caller's key, as it gave it
    assert [p.qty for p in snap.positions] == [Decimal(3)]
    assert snap.dead_letters[0].payload == b"\x00\x01"
    again = await store.commit_batch(Batch("acct-nul", [odd]))
    assert again.duplicate_keys == {odd.key}
    await store.aclose()


async def test_values_json_must_escape_are_stored_as_given(database_url: str) -> None:
    """The batch statements take their rows as one JSON document: text that JSON escapes
    (quotes, backslashes, control characters, line separators, astral characters),
    decimals in exponent form and with many places, and offsets other than UTC come back
    exactly, keys and order rows alike."""
    store = await opened(database_url)
    odd_id = 'o"1\\\n\t\x01\u2028\U0001d518é'
    base = fill(odd_id, "buy", "1E+1", "1E+1", "0.000000001", 1)
    east = timezone(timedelta(hours=5, minutes=30))
    odd = msgspec.structs.replace(
        base, symbol='X"\\Y', client_order_id="\u2029\\", order_type='lim"it',
        created_at=base.timestamp.astimezone(east))

    with trio.fail_after(WAIT):
        result = await store.commit_batch(Batch("acct-json", [odd]))
        snap = await store.snapshot("acct-json")

    assert result.applied_keys == {odd.key}
    assert snap.event_keys == {odd.key}
    order = snap.orders[odd_id]
    assert (order.symbol, order.client_order_id, order.order_type) == (
        'X"\\Y', "\u2029\\", 'lim"it')
    assert order.filled_qty == Decimal(10) and order.filled_avg_price == Decimal("1E-9")
    assert order.created_at == base.timestamp
    again = await store.commit_batch(Batch("acct-json", [odd]))
    assert again.duplicate_keys == {odd.key}
    await store.aclose()


async def test_rows_are_what_other_jobs_read(database_url: str) -> None:
    """The columns of docs/design.md, section 5, as a user's SQL sees them."""
    store = await opened(database_url)
    await replay(store, STREAM, 40)
    await store.aclose()

    net = dict(sql(database_url, """
        SELECT symbol, sum(CASE side WHEN 'long' THEN qty ELSE -qty END)
        FROM active_positions WHERE status = 'open' AND account_id = %s GROUP BY symbol
    """, ACCOUNT))
    want = {s: Decimal(p["qty"]) for s, p in TRUTH["positions"].items() if Decimal(p["qty"])}
    assert net == want
    orders = dict(sql(database_url, "SELECT alpaca_order_id, filled_qty FROM broker_orders"))
    assert orders == {oid: Decimal(o["filled_qty"]) for oid, o in TRUTH["orders"].items()}
    assert sql(database_url, "SELECT count(*) FROM active_positions WHERE status = 'closed'") == \
        sql(database_url, "SELECT count(*) FROM position_history")
    cursor = sql(database_url, "SELECT fill_time FROM stream_cursors WHERE account_id = %s",
                 ACCOUNT)
    assert cursor == [(max(e.timestamp for e in STREAM if e.is_fill),)]


async def test_recent_keys_with_nothing_asked(database_url: str) -> None:
    store = await opened(database_url)
    await replay(store, STREAM[:5], 5)
    assert await store.recent_keys(ACCOUNT, 0) == []
    assert len(await store.recent_keys(ACCOUNT, 3)) == 3
    await store.aclose()


async def test_a_refused_value_keeps_the_session_and_its_writer_lock(database_url: str) -> None:
    # Issue 13, observation 1: a value PostgreSQL refuses used to drop the connection,
    # which released the writer lock and made every later call "lost leadership".
    store = await opened(database_url)
    assert await store.try_leadership(ACCOUNT)
    bad = msgspec.structs.replace(STREAM[5], fill_price=Decimal("1E-20000"),
                                  cum_avg_price=Decimal("1E-20000"))
    with trio.fail_after(WAIT), pytest.raises(StoreDataError) as err:
        await store.commit_batch(Batch(ACCOUNT, [*STREAM[:5], bad]))
    assert err.value.sqlstate == "22003"
    assert "numeric" in err.value.detail
    assert sql(database_url, "SELECT count(*) FROM alpaca_event_dedupe") == [(0,)]
    rival = await opened(database_url)
    assert not await rival.try_leadership(ACCOUNT)
    await rival.aclose()
    await replay(store, STREAM, 100)  # same session, no LostLeadership
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []
    await store.aclose()


async def test_losing_the_lock_names_the_cause_not_another_replica(database_url: str) -> None:
    store = await opened(database_url, application_name="ss-test-lost")
    assert await store.try_leadership(ACCOUNT)
    sql(database_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = 'ss-test-lost'")
    with trio.fail_after(WAIT), pytest.raises(StoreUnavailable):
        await store.commit_batch(Batch(ACCOUNT, STREAM[:3]))
    with trio.fail_after(WAIT), pytest.raises(LostLeadership) as err:
        await store.commit_batch(Batch(ACCOUNT, STREAM[:3]))
    message = str(err.value)
    assert "another replica" not in message
    assert "connection lost" in message and "commit_batch" in message
    await store.aclose()


async def test_a_refusal_that_is_not_about_data_is_rejected_not_retried_as_data(
    database_url: str,
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("""
            CREATE FUNCTION no_orders() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'no orders today'; END $$;
            CREATE TRIGGER no_orders BEFORE INSERT ON broker_orders
                FOR EACH ROW EXECUTE FUNCTION no_orders();
        """)
    store = await opened(database_url)
    assert await store.try_leadership(ACCOUNT)
    for _ in range(2):  # the same refusal each time, and the session stays
        with trio.fail_after(WAIT), pytest.raises(StoreRejected) as err:
            await store.commit_batch(Batch(ACCOUNT, STREAM[:3]))
        assert err.value.sqlstate == "P0001" and "no orders today" in err.value.detail
    assert not isinstance(err.value, StoreDataError)
    await store.aclose()


async def test_a_graceful_close_gives_the_writer_lock_back_at_once(database_url: str) -> None:
    # The server frees a session's advisory locks when its backend exits, a moment after
    # the client closed the connection: a standby asking right after a graceful stop found
    # the lock still held (about one time in ten on an idle machine) unless the store
    # released it before closing.
    key = LEADER_LOCK_PREFIX + ACCOUNT
    with psycopg.connect(database_url, autocommit=True) as standby:
        for attempt in range(40):
            store = await opened(database_url)
            assert await store.try_leadership(ACCOUNT)
            await store.aclose()
            row = standby.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                  [key]).fetchone()
            assert row is not None and row[0], f"still held after close {attempt + 1}"
            standby.execute("SELECT pg_advisory_unlock_all()")


# --- claim ahead (docs/design.md, section 4) --------------------------------------------


def open_transactions(url: str, application_name: str) -> int:
    rows = sql(url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                    "AND state LIKE 'idle in transaction%%'", application_name)
    return int(rows[0][0])


async def leader_with_a_claim(url: str, application_name: str) -> tuple[PgStore, Batch]:
    """A store holding the writer lock, with the stream's first 30 updates claimed ahead."""
    store = await opened(url, application_name=application_name)
    assert await store.try_leadership(ACCOUNT)
    batch = Batch(ACCOUNT, STREAM[:30])
    with trio.fail_after(WAIT):
        assert await store.claim_ahead(batch)
    return store, batch


async def test_keys_claimed_ahead_are_held_by_an_open_transaction_until_the_commit(
    database_url: str,
) -> None:
    store, batch = await leader_with_a_claim(database_url, "ss-test-ahead")
    # Claimed, not committed: another session sees none of it yet.
    assert open_transactions(database_url, "ss-test-ahead") == 1
    assert sql(database_url, "SELECT count(*) FROM alpaca_event_dedupe") == [(0,)]
    with trio.fail_after(WAIT):
        result = await store.commit_batch(batch)
    assert result.applied_keys == {e.key for e in STREAM[:30]}
    assert open_transactions(database_url, "ss-test-ahead") == 0
    await replay(store, STREAM[30:], 50)
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []
    await store.aclose()


async def test_a_failing_batch_leaves_no_claim_of_the_next_one_open(database_url: str) -> None:
    store = await opened(database_url, application_name="ss-test-ahead-fail")
    bad = msgspec.structs.replace(STREAM[5], fill_price=Decimal("1E-20000"),
                                  cum_avg_price=Decimal("1E-20000"))
    failing = Batch(ACCOUNT, [*STREAM[:5], bad])
    behind = Batch(ACCOUNT, STREAM[6:40])
    with trio.fail_after(WAIT):
        assert await store.claim_ahead(failing)
        with pytest.RaisesGroup(StoreDataError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.claim_ahead, behind)
                await store.commit_batch(failing)
        # Whichever came first, the claim of the batch behind or the failure: nothing
        # is held open while the failed batch is isolated and retried.
        assert open_transactions(database_url, "ss-test-ahead-fail") == 0
        assert not await store.claim_ahead(behind)  # nor claimed until a batch commits
        await store.commit_batch(Batch(ACCOUNT, STREAM[:5]))
        assert await store.claim_ahead(behind)
        result = await store.commit_batch(behind)
    assert result.applied_keys == {e.key for e in STREAM[6:40]}
    await store.aclose()


async def test_a_batch_claimed_ahead_never_commits_once_the_writer_lock_is_gone(
    database_url: str,
) -> None:
    store, batch = await leader_with_a_claim(database_url, "ss-test-ahead-lock")
    # The session holding the lock dies (not the one holding the claim): the lock is free
    # for another replica, so this process must not commit through its other connection.
    # Waiting for the backend to exit (up to 10 s): its locks go with it.
    killed = sql(database_url, "SELECT pg_terminate_backend(pid, 10000) FROM pg_locks "
                               "WHERE locktype = 'advisory' AND granted AND pid IN (SELECT pid "
                               "FROM pg_stat_activity WHERE application_name = %s)",
                 "ss-test-ahead-lock")
    assert killed == [(True,)]
    with trio.fail_after(WAIT), pytest.raises(LostLeadership, match="no longer holds it"):
        await store.commit_batch(batch)
    assert sql(database_url, "SELECT count(*) FROM alpaca_event_dedupe") == [(0,)]
    assert open_transactions(database_url, "ss-test-ahead-lock") == 0
    await store.aclose()


async def test_a_lost_claim_ahead_connection_is_retried_on_the_main_one(database_url: str) -> None:
    store, batch = await leader_with_a_claim(database_url, "ss-test-ahead-side")
    killed = sql(database_url, "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                               "WHERE application_name = %s "
                               "AND state LIKE 'idle in transaction%%'", "ss-test-ahead-side")
    assert killed == [(True,)]
    with trio.fail_after(WAIT), pytest.raises(StoreUnavailable):
        await store.commit_batch(batch)
    # Not a lost leadership: the writer's retry commits on the main session, which still
    # holds the lock.
    with trio.fail_after(WAIT):
        result = await store.commit_batch(batch)
    assert result.applied_keys == {e.key for e in STREAM[:30]}
    rival = await opened(database_url)
    assert not await rival.try_leadership(ACCOUNT)
    await rival.aclose()
    await replay(store, STREAM[30:], 50)
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []
    await store.aclose()


async def test_closing_the_store_lets_go_of_a_batch_claimed_ahead(database_url: str) -> None:
    store = await opened(database_url, application_name="ss-test-ahead-close")
    with trio.fail_after(WAIT):
        assert await store.claim_ahead(Batch(ACCOUNT, STREAM[:30]))
    await store.aclose()
    # Every session closed: each backend exits a moment after its client hung up.
    with trio.fail_after(WAIT):
        while sql(database_url, "SELECT count(*) FROM pg_stat_activity "
                                "WHERE application_name = 'ss-test-ahead-close'") != [(0,)]:
            await trio.sleep(0.02)
    # Nobody waits for those keys: another store commits them at once.
    other = await opened(database_url, statement_timeout_ms=2_000)
    result = await replay(other, STREAM[:30], 30)
    assert result[0].applied_keys == {e.key for e in STREAM[:30]}
    await other.aclose()


async def test_a_commit_cancelled_before_it_started_leaves_no_claim_open(
    database_url: str,
) -> None:
    store = await opened(database_url, application_name="ss-test-ahead-cancel")
    batch = Batch(ACCOUNT, STREAM[:30])
    with trio.fail_after(WAIT):
        assert await store.claim_ahead(batch)
        with trio.CancelScope() as scope:
            scope.cancel()  # the commit never reaches its thread
            await store.commit_batch(batch)
    assert scope.cancelled_caught
    assert open_transactions(database_url, "ss-test-ahead-cancel") == 0
    with trio.fail_after(WAIT):
        result = await store.commit_batch(batch)  # claims the keys itself, all new
    assert result.applied_keys == {e.key for e in STREAM[:30]}
    await store.aclose()


async def test_a_batch_claimed_ahead_is_read_committed_whatever_the_default(
    database_url: str,
) -> None:
    # The claim's transaction begins before the batch before it commits; under a
    # REPEATABLE READ default its row locks would find that batch's updates and fail.
    with psycopg.connect(database_url, autocommit=True) as conn:
        dbname = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{dbname}" '
                     "SET default_transaction_isolation = 'repeatable read'")
    store = await opened(database_url)
    results = await replay_ahead(store, STREAM, 17)
    assert sum(r.fills_applied for r in results) == TRUTH["fills_total"]
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []
    await store.aclose()


async def test_claiming_again_the_batch_already_claimed_answers_at_once(
    database_url: str,
) -> None:
    store = await opened(database_url, application_name="ss-test-ahead-again")
    batch, other = Batch(ACCOUNT, STREAM[:30]), Batch(ACCOUNT, STREAM[30:60])
    with trio.fail_after(WAIT):
        assert await store.claim_ahead(batch)
        assert await store.claim_ahead(batch)  # still held: no second transaction
        assert not await store.claim_ahead(other)  # one batch ahead at most
    assert open_transactions(database_url, "ss-test-ahead-again") == 1
    with trio.fail_after(WAIT):
        await store.release_ahead()
        assert await store.claim_ahead(batch)  # given up: claimed again, now
        result = await store.commit_batch(batch)
    assert result.applied_keys == {e.key for e in STREAM[:30]}
    await store.aclose()


async def test_a_batch_finishing_ahead_waits_for_the_reconcile_that_replaces_its_row(
    database_url: str,
) -> None:
    """The store's other writes (here the reconcile's broker word, on the main session)
    and the finish of a batch claimed ahead (on a side session) take turns, as every write
    did before claim ahead. Interleaved, the batch would wait on the open row the word
    closes and, reading committed, not see the row the word opens in its place: it would
    open a second row and be refused by the one-open-row-per-symbol index."""
    store = await opened(database_url, application_name="ss-test-ahead-word")
    assert await store.try_leadership(ACCOUNT)
    with trio.fail_after(WAIT):
        await store.commit_batch(Batch(ACCOUNT, [fill("o0", "buy", "1", "1", "10", 0)]))
        batch = Batch(ACCOUNT, [fill("o1", "buy", "1", "1", "10", 1)])
        assert await store.claim_ahead(batch)
    word = BrokerWord(ACCOUNT, RECONCILE, T0 + timedelta(minutes=2),
                      [BrokerPosition("XYZ", Decimal(5), Decimal(10))], symbols=["XYZ"])
    outcome: dict[str, object] = {}

    async def reconcile() -> None:
        outcome["word"] = await store.apply_broker_word(word)

    async def finish() -> None:
        try:
            outcome["batch"] = await store.commit_batch(batch)
        except StoreError as exc:
            outcome["batch"] = exc

    def waiting_on_a_lock() -> int:
        return len(sql(database_url, "SELECT pid FROM pg_stat_activity "
                                     "WHERE application_name = 'ss-test-ahead-word' "
                                     "AND wait_event_type = 'Lock'"))

    # Someone else's lock holds the word after it has locked and closed the open row, and
    # opened the one that replaces it (its adjustment record is what waits).
    with psycopg.connect(database_url) as blocker, trio.fail_after(WAIT):
        blocker.execute("LOCK TABLE position_adjustments IN ACCESS EXCLUSIVE MODE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reconcile)
            while waiting_on_a_lock() < 1:
                await trio.sleep(0.02)
            nursery.start_soon(finish)
            # Time for the batch's row locks to reach the row the word holds, if they may.
            with trio.move_on_after(1):
                while waiting_on_a_lock() < 2:
                    await trio.sleep(0.02)
            blocker.commit()
    assert isinstance(outcome["batch"], BatchResult), outcome["batch"]
    assert outcome["batch"].fills_applied == 1
    # The broker said 5; the batch's fill came after: 6, in the one open row.
    rows = sql(database_url, "SELECT qty, alpaca_order_id FROM active_positions "
                             "WHERE status = 'open'")
    assert rows == [(Decimal(6), "reconcile")]
    await store.aclose()


async def test_a_replay_on_the_main_connection_never_waits_for_a_claim_ahead(
    database_url: str,
) -> None:
    """A dead-letter replay commits on the main connection, one of its keys claimed (not
    committed) by the batch held ahead. Waiting for that claim would wait for that batch's
    finish, which waits for the main connection: the claim is given up instead, and the
    batch claims its keys itself when its commit comes."""
    store, batch = await leader_with_a_claim(database_url, "ss-test-ahead-replay")
    with trio.fail_after(5):  # well inside the 10 s statement timeout
        replayed = await store.commit_batch(Batch(ACCOUNT, [STREAM[0]]))
    assert replayed.applied_keys == {STREAM[0].key}
    assert open_transactions(database_url, "ss-test-ahead-replay") == 0
    with trio.fail_after(WAIT):
        result = await store.commit_batch(batch)
    assert result.applied_keys == {e.key for e in STREAM[1:30]}
    await replay(store, STREAM[30:], 50)
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []
    await store.aclose()


async def test_the_server_gives_up_on_a_vanished_leader_within_seconds(
    database_url: str,
) -> None:
    """Each store session sets the server's TCP keepalives: a leader whose host froze
    holds the writer lock for about 25 s, not the kernel's two hours. (A Unix socket has
    no keepalives: the server reads them as 0 there.)"""
    store = await opened(database_url)

    def keepalives(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
        # Our side: unacknowledged data ends the connection after 30 s (pgconn.py).
        options = {o.keyword: o.val for o in conn.pgconn.info}
        assert options[b"tcp_user_timeout"] == b"30000"
        row = conn.execute("SELECT current_setting('tcp_keepalives_idle'), "
                           "current_setting('tcp_keepalives_interval'), "
                           "current_setting('tcp_keepalives_count'), "
                           "inet_server_addr() IS NULL").fetchone()
        assert row is not None
        return tuple(row)

    with trio.fail_after(WAIT):
        idle, interval, count, unix_socket = await store._run(
            lambda: store._guarded("keepalives", keepalives))
    assert (idle, interval, count) == (("0", "0", "0") if unix_socket else ("10", "5", "3"))
    await store.aclose()


async def test_a_pooler_that_moves_statements_between_sessions_is_a_config_error(
    database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind a pooler in transaction mode, the statement after the lock may run on
    another server session than the one holding it (which fencing cannot survive). The
    store asks, right after taking the lock, which session it is on: here a query that
    answers with another live session stands for the pooler's hand-over."""
    other = await opened(database_url, application_name="ss-test-pooler-other")
    await other.open()  # a second live session for the hand-over to land on
    monkeypatch.setattr(pgstore, "_BACKEND_IDENTITY", """
        SELECT pid, backend_start FROM pg_stat_activity
        WHERE application_name = 'ss-test-pooler-other' AND pid <> pg_backend_pid()
        LIMIT 1""")
    store = await opened(database_url)
    with trio.fail_after(WAIT), pytest.raises(ConfigError, match="session mode"):
        await store.try_leadership(ACCOUNT)
    monkeypatch.undo()
    # Nothing kept the lock: a store on a direct connection leads.
    rival = await opened(database_url)
    assert await rival.try_leadership(ACCOUNT)
    for s in (store, rival, other):
        await s.aclose()


async def test_a_server_that_turned_read_only_is_waited_out_not_counted_as_a_refusal(
    database_url: str,
) -> None:
    """A failover turns the old writer into a replica while DNS still names it: every
    write is refused with read_only_sql_transaction. That refusal counted toward the
    restart limit (the process exited 1 within seconds); it is an outage: the session
    goes, and the store waits for a writable server (no lock taken on a read-only one)."""
    store = await opened(database_url)
    assert await store.try_leadership(ACCOUNT)
    await store.commit_batch(Batch(ACCOUNT, [fill("ro-1", "buy", "1", "1", "10", 1)]))
    # The session's server stops taking writes.
    await store._run(lambda: store._guarded(
        "read only", lambda conn: conn.execute("SET default_transaction_read_only = on")))
    with trio.fail_after(WAIT), pytest.raises(StoreUnavailable, match="read-only"):
        await store.commit_batch(Batch(ACCOUNT, [fill("ro-2", "buy", "1", "1", "10", 2)]))
    await store.aclose()
    [(db,)] = sql(database_url, "SELECT current_database()")
    alter = f'ALTER DATABASE "{db}" {{}} default_transaction_read_only'
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(alter.format("SET") + " = on")
    try:
        standby = await opened(database_url)
        with trio.fail_after(WAIT), pytest.raises(StoreUnavailable, match="read-only"):
            await standby.try_leadership(ACCOUNT)
        await standby.aclose()
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(alter.format("RESET"))
    store = await opened(database_url)
    assert await store.try_leadership(ACCOUNT)
    await store.commit_batch(Batch(ACCOUNT, [fill("ro-2", "buy", "1", "1", "10", 2)]))
    await store.aclose()


@pytest.mark.parametrize("change", [{"port": "notaport"}, {"sslmode": "bogus"}])
async def test_a_database_url_that_cannot_work_is_a_config_error_naming_it(
    database_url: str, change: dict[str, str],
) -> None:
    """A value libpq refuses was waited out as an outage for ever (database_unavailable,
    never exit 78, the variable not named). A database the server does not have yet is
    still waited for (tests/chaos/test_database_faults.py: it may be being created)."""
    from psycopg.conninfo import make_conninfo

    bad = make_conninfo(database_url, password=SECRET, **change)
    store = PgStore(bad)
    with trio.fail_after(WAIT), pytest.raises(ConfigError, match="DATABASE_URL") as err:
        await store.open()
    assert SECRET not in str(err.value)
