"""Issue 14 end to end: the real `run` process takes the broker's positions as its
starting state on a first start, and the `reconcile`, `reconcile --apply`,
`rebaseline` and `check` commands, as processes, over the REST stub's HTTP and the
test's PostgreSQL (docs/design.md, section 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest
import trio

from .replay import KEY_ID, SECRET_KEY
from .rest_stub import RestStub
from .test_bad_values import ACCOUNT, encode, fill_key, service, sql, update

pytestmark = pytest.mark.slow


def held(url: str) -> dict[str, tuple[str, Decimal, Decimal]]:
    return {r[0]: (r[1], r[2], r[3]) for r in sql(
        url, "SELECT symbol, side, qty, avg_entry_price FROM active_positions "
             "WHERE status = 'open' AND account_id = %s", ACCOUNT)}


async def command(rest: RestStub, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APCA_", "STREAM_SUPERVISOR_")) and k != "DATABASE_URL"}
    env.update({"APCA_API_KEY_ID": KEY_ID, "APCA_API_SECRET_KEY": SECRET_KEY,
                "APCA_API_BASE_URL": rest.url, "DATABASE_URL": database_url,
                "STREAM_SUPERVISOR_ACCOUNT_ID": ACCOUNT, "STREAM_SUPERVISOR_LOG_FORMAT": "json"})
    done = await trio.run_process([sys.executable, "-m", "stream_supervisor", *args], env=env,
                                  capture_stdout=True, capture_stderr=True, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(),
                                       done.stderr.decode())


def position(symbol: str, qty: str, avg: str, **extra: Any) -> dict[str, Any]:
    return {"symbol": symbol, "qty": qty, "side": "short" if qty.startswith("-") else "long",
            "avg_entry_price": avg, "asset_class": "us_equity", **extra}


async def test_the_first_start_takes_the_broker_positions_and_reconcile_keeps_them(
        database_url: str) -> None:
    # Reproduction 1 through the service: long 100 AAPL bought yesterday; today the
    # stream sells 100 @190 and buys 50 @185.
    sell = update("fill", "sell-1", cum="100", price="190", side="sell")
    sell["data"]["position_qty"] = "0"
    buy = update("fill", "buy-1", cum="50", price="185")
    async with service(database_url, [encode(sell), encode(buy)],
                       positions=[position("AAPL", "100", "150")],
                       STREAM_SUPERVISOR_BASELINE="on") as svc:
        await svc.wait_until({fill_key("sell-1", "100"), fill_key("buy-1", "50")}, 0)
        code = await svc.drain()
        assert code == 0, svc.process.tail()
        assert "baseline_taken" in svc.events()
        assert held(database_url) == {"AAPL": ("long", Decimal(50), Decimal(185))}
        rest = svc.rest
        rest.positions = [position("AAPL", "50", "185")]

        agreed = await command(rest, database_url, "reconcile")
        assert agreed.returncode == 0, agreed.stdout + agreed.stderr

        # Drift the stream cannot show: a 2-for-1 split of AAPL, 3 ETH transferred in.
        rest.positions = [position("AAPL", "100", "92.5"),
                          {"symbol": "ETHUSD", "qty": "3", "side": "long",
                           "avg_entry_price": "3000", "asset_class": "crypto"}]
        drifted = await command(rest, database_url, "reconcile")
        assert drifted.returncode == 1
        assert "AAPL: stored 50, broker 100" in drifted.stdout
        assert "ETH/USD: stored 0, broker 3" in drifted.stdout
        applied = await command(rest, database_url, "reconcile", "--apply")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert "2 adjustment(s)" in applied.stdout
        again = await command(rest, database_url, "reconcile")
        assert again.returncode == 0, again.stdout + again.stderr
        checked = await command(rest, database_url, "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert sql(database_url, "SELECT symbol, reason, qty_before, qty_after FROM "
                                 "position_adjustments ORDER BY id") == [
            ("AAPL", "baseline", 0, 100), ("AAPL", "reconcile", 50, 100),
            ("ETH/USD", "reconcile", 0, 3)]

        # Start over from the broker's word: history kept, nothing else to change.
        rest.positions = [position("AAPL", "100", "92.5")]
        redone = await command(rest, database_url, "rebaseline")
        assert redone.returncode == 0, redone.stdout + redone.stderr
        assert held(database_url) == {"AAPL": ("long", Decimal(100), Decimal("92.5"))}
        assert sql(database_url, "SELECT close_reason, count(*) FROM position_history "
                                 "GROUP BY 1 ORDER BY 1") == [
            ("rebaseline", 1), ("reconcile", 1), (None, 1)]
        checked = await command(rest, database_url, "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
