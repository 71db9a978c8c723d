"""The commands as a user runs them: real processes, real PostgreSQL, real loopback broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _demo(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "stream_supervisor", "demo", "--json",
         "--data-dir", str(tmp_path / "pg"), *flags],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{"):])
    return proc, summary


def test_demo_shows_the_incident_the_per_event_consumer_gets_wrong(tmp_path: Path) -> None:
    """The README's first command, minus the install: no DATABASE_URL, no server running,
    no flags but a shorter session. Repeated frames double the per-event consumer's fills,
    the outage loses some; stream-supervisor ends equal to the broker."""
    proc, summary = _demo(tmp_path, "--duration", "8", "--seed", "11")
    ours, theirs = summary["stream_supervisor"], summary["per_event_consumer"]
    assert summary["mismatches"] == 0
    assert summary["faults_injected"]["duplicate_frames"] > 0
    assert summary["faults_injected"]["disconnects"] == 1
    assert summary["backfill_fills"] > 0  # the outage's fills came over REST
    assert theirs["applied_twice"] > 0 and theirs["fills_lost"] > 0
    assert theirs["drifting_symbols"]
    assert ours["applied_twice"] == 0 and ours["fills_lost"] == 0
    assert ours["drifting_symbols"] == []
    assert ours["positions"] == {s: q for s, q in summary["broker"]["positions"].items()
                                 if s in ours["positions"]}
    assert "exactly-once held" in proc.stderr


def test_demo_clean_the_two_consumers_agree(tmp_path: Path) -> None:
    """Without faults the per-event consumer is right too, so the comparison is fair. As
    a person sees it (no --json): the three columns side by side, then the session's
    strategy figures; plain progress lines, since stderr is not a terminal here."""
    proc = subprocess.run(
        [sys.executable, "-m", "stream_supervisor", "demo", "--clean", "--duration", "3",
         "--seed", "11", "--data-dir", str(tmp_path / "pg")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "faults injected: none" in out
    header = next(line for line in out.splitlines() if "broker truth" in line)
    assert header.split() == ["broker", "truth", "per-event", "consumer", "stream-supervisor"]
    for label in ("fills applied twice", "fills lost"):
        row = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert row.split()[-3:] == ["0", "0", "0"], row
    drift = next(line for line in out.splitlines() if "symbols whose qty drifts" in line)
    assert drift.split()[-7:] == ["0", "0", "of", "6", "0", "of", "6"], drift
    assert " *" not in out  # no symbol differs from the broker in either column
    assert "strategy figures" in out
    assert any(name in out for name in ("momentum", "meanrev", "pairs"))
    assert "\r" not in proc.stderr


def test_demo_with_chaos_reports_faults_and_holds(tmp_path: Path) -> None:
    _, summary = _demo(tmp_path, "--chaos", "--duration", "4", "--seed", "5")
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


