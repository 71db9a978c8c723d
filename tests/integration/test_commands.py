"""The commands as a user runs them: real processes, real PostgreSQL, real loopback broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from stream_supervisor.demo import run_pipeline_against_sim
from stream_supervisor.reconcile import reconcile
from stream_supervisor.settings import Settings
from stream_supervisor.testing.broker import SimConfig, SimulatedBroker, serve

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APCA_", "STREAM_SUPERVISOR_")) and k != "DATABASE_URL"}
    env.update(extra)
    return env


def test_demo_runs_on_embedded_postgres_and_verifies(tmp_path: Path) -> None:
    """The README's first command, minus the install: no DATABASE_URL, no server running."""
    proc = subprocess.run(
        [sys.executable, "-m", "stream_supervisor", "demo", "--duration", "3",
         "--data-dir", str(tmp_path / "pg"), "--seed", "11"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["mismatches"] == 0
    assert summary["events_committed"] > 0
    assert summary["fills"] > 0
    assert "exactly-once held" in proc.stderr


def test_demo_with_chaos_reports_faults_and_holds(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stream_supervisor", "demo", "--duration", "4", "--chaos",
         "--data-dir", str(tmp_path / "pg"), "--seed", "5"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["mismatches"] == 0
    assert summary["faults_injected"].get("duplicate_frames", 0) > 0
    assert sum(summary["duplicates_dropped"].values()) > 0


def test_run_refuses_missing_configuration_naming_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stream_supervisor", "run"],
        cwd=ROOT, env=_env(APCA_API_KEY_ID="k" * 20), capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert proc.returncode == 78
    assert "APCA_API_SECRET_KEY" in proc.stderr
    assert "DATABASE_URL" in proc.stderr
    assert "k" * 20 not in proc.stderr + proc.stdout


def test_bad_setting_names_the_variable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stream_supervisor", "run"],
        cwd=ROOT, env=_env(STREAM_SUPERVISOR_MAX_BATCH="many"), capture_output=True,
        text=True, timeout=60, check=False,
    )
    assert proc.returncode == 78
    assert "STREAM_SUPERVISOR_MAX_BATCH" in proc.stderr


def test_migrate_and_check_commands(pg_admin_uri: str, database_url: str) -> None:
    for _ in range(2):  # the second run applies nothing
        proc = subprocess.run(
            [sys.executable, "-m", "stream_supervisor", "migrate"],
            cwd=ROOT, env=_env(DATABASE_URL=database_url), capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "applied 0 migration(s)" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "stream_supervisor", "check"],
        cwd=ROOT, env=_env(DATABASE_URL=database_url), capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_reconcile_agrees_with_the_broker_after_a_run(database_url: str) -> None:
    sim = SimConfig(seed=23, orders=40, rate=2000.0)
    settings = Settings(database_url=database_url, drain_timeout=10.0)
    with trio.fail_after(120):
        result = await run_pipeline_against_sim(settings, sim, timeout=90)
    assert result.mismatches == []
    # The run above served its own broker; serve one with the same seed (same market,
    # played to the end) to ask for positions over real HTTP.
    broker = SimulatedBroker(sim)
    while broker.step() is not None:
        pass
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, broker)
        code = await reconcile(Settings(
            key_id=sim.key_id, secret_key=sim.secret_key, base_url=server.rest_url,
            database_url=database_url, account_id=broker.account()["id"],
        ))
        nursery.cancel_scope.cancel()
    assert code == 0


