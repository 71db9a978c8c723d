"""The benchmark harness end to end at a tiny size: every scenario runs, writes the JSON
the issue asks for, and every database it wrote verifies against the ground truth.

No timing is asserted here (timing belongs in BENCHMARKS.md, not in pass/fail tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.machine import host_loop_ms
from benchmarks.run import cpu_bounds, main

REQUIRED_KEYS = (
    "pipeline_events_per_s",
    "naive_events_per_s",
    "speedup_vs_naive",
    "socket_only_events_per_s",
    "db_copy_rows_per_s",
    "fraction_of_limit",
    "dup_heavy_frames_per_s",
    "latency_p50_ms_at_1k",
    "latency_p99_ms_at_1k",
    "latency_p99_ms_at_5k",
    "peak_rss_mb",
    "pipeline_cpu_us_per_event",
    "pipeline_user_cpu_us_per_event",
    "pipeline_backend_cpu_us_per_event",
    "fraction_one_interpreter_allows",
    "fraction_the_cores_allow",
)


def test_cpu_bounds_turn_the_cost_of_an_update_into_the_fraction_it_allows() -> None:
    # 25 us of supervisor CPU (20 of it user) and 15 us in PostgreSQL an update, against a
    # limit of 100,000 updates/s on 2 cores: one interpreter keeps up with 50,000/s at
    # most, both cores with 2 * 10**6 / 40 = 50,000/s.
    bounds = cpu_bounds(25.0, 20.0, 15.0, 100_000.0, 2)
    assert bounds["fraction_one_interpreter_allows"] == pytest.approx(0.5)
    assert bounds["fraction_the_cores_allow"] == pytest.approx(0.5)
    assert bounds["pipeline_user_cpu_us_per_event"] == 20.0
    # Cheaper updates raise both bounds; one core more raises only the machine's.
    cheaper = cpu_bounds(20.0, 10.0, 5.0, 100_000.0, 4)
    assert cheaper["fraction_one_interpreter_allows"] == pytest.approx(1.0)
    assert cheaper["fraction_the_cores_allow"] == pytest.approx(1.6)
    # A figure that was not measured (a server on another machine: no backend CPU) gives
    # no bound rather than a wrong one.
    unknown = cpu_bounds(25.0, 20.0, None, 100_000.0, 2)
    assert unknown["fraction_the_cores_allow"] is None
    assert unknown["fraction_one_interpreter_allows"] == pytest.approx(0.5)
    assert cpu_bounds(25.0, 20.0, 15.0, None, 2)["fraction_the_cores_allow"] is None


@pytest.mark.slow
def test_tiny_run_of_every_scenario_writes_verified_json(pg_admin_uri: str,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = main([
        "--quick", "--database-url", pg_admin_uri, "--json", str(out),
        "--updates", "1500", "--naive-updates", "150", "--latency-seconds", "0.3",
    ])
    results = json.loads(out.read_text())
    assert code == 0, results["verification"]
    assert results["verified"] is True
    for key in REQUIRED_KEYS:
        assert isinstance(results[key], int | float) and results[key] > 0, key
    assert all(v["verified"] for v in results["verification"].values())
    assert set(results["verification"]) == {
        "socket_only", "pipeline_no_db", "pipeline", "db_copy", "dup_only", "dup_heavy",
        "naive", "latency_1k", "latency_5k", "pipeline_traced"}
    # Every figure is a median over the repetitions, with its spread, and the load the
    # machine was under is part of the report.
    assert results["reps"] == 1 and results["spread"]["pipeline_events_per_s"]
    assert results["machine"]["uptime_start"] and "busy" in results["machine"]
    assert all(isinstance(s["cpu"]["others_cores"], float)
               and isinstance(s["cpu"]["steal_cores"], float)
               for s in results["scenarios"].values() if "cpu" in s)
    # And how fast the host ran Python before each repetition, which the load average
    # of a virtual machine cannot tell.
    assert results["host_loop_ms"] > 0
    assert results["repetitions"][0]["load"]["host_loop_ms"] == results["host_loop_ms"]
    # Duplicates the LRU knows never reach the writer: none committed, all dropped there.
    only = results["scenarios"]["dup_only"]
    assert only["events"] == 0 and only["duplicates"]["lru"] == only["frames"] > 0
    assert results["dup_heavy_duplicates_per_s"] > 0 and results["dup_heavy_fresh_per_s"] > 0
    # The traced runs say where the time of each sampled update went, phase by phase.
    for name in ("latency_1k", "pipeline_traced"):
        trace = results["scenarios"][name]["trace"]
        assert trace["sampled_updates"] > 0 and trace["batches"] > 0
        assert set(trace["phases"]) == {"decode", "to_dedupe", "queue", "commit"}
        assert all(v["n"] > 0 for v in trace["batch_parts"].values())
        assert "collections" in trace["gc"] and "count" in trace["loop_stalls"]
    params = results["parameters"]
    assert params["stream_updates"] >= 1500 and params["naive_updates_replayed"] >= 150
    # Every duplicate frame was dropped, none applied twice.
    dup = results["scenarios"]["dup_heavy"]
    assert dup["events"] == results["scenarios"]["pipeline"]["events"]
    assert sum(dup["duplicates"].values()) == dup["frames"] - dup["events"]


@pytest.mark.slow
def test_the_claim_ahead_benchmark_at_a_tiny_size_verifies(pg_admin_uri: str,
                                                           tmp_path: Path) -> None:
    from benchmarks.claim_ahead import main as claim_ahead_main

    out = tmp_path / "ahead.json"
    assert claim_ahead_main(["--database-url", pg_admin_uri, "--updates", "1500",
                             "--size", "50", "--rounds", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["verified"] is True and results["updates"] >= 1500
    for variant in ("serial", "ahead"):
        assert results[variant]["updates_per_s"] > 0
        assert len(results["rounds"][variant]) == 2
    assert results["ahead_vs_serial"] > 0


@pytest.mark.slow
def test_the_poison_benchmark_at_a_tiny_size_verifies(pg_admin_uri: str, tmp_path: Path) -> None:
    from benchmarks.poison import main as poison_main

    out = tmp_path / "poison.json"
    code = poison_main(["--database-url", pg_admin_uri, "--rounds", "2", "--batch", "40",
                        "--json", str(out)])
    results = json.loads(out.read_text())
    assert code == 0 and results["verified"] is True, results["problems"]
    assert results["clean"]["commits_median"] == 1
    # Binary splitting: one half refused and one committed per level, then the letter.
    assert 2 <= results["poisoned"]["commits_median"] <= 8
    assert isinstance(results["poison_cost_ms"], float)


def test_the_host_loop_times_a_fixed_piece_of_work() -> None:
    """Ten times the work takes longer (the figure measures work, not a constant), and a
    median of runs in ms, rounded for the report."""
    short = host_loop_ms(runs=3, additions=20_000)
    long = host_loop_ms(runs=3, additions=2_000_000)
    assert 0 <= short < long
    assert long == round(long, 1)


def test_a_busy_machine_is_refused_unless_told(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The load-average guard: past `--max-load` (here below any load) the default run
    refuses before it starts anything, and says how to go ahead anyway."""
    out = tmp_path / "never.json"
    code = main(["--max-load", "-1", "--database-url", "postgresql://unused.invalid/x",
                 "--json", str(out)])
    assert code == 3 and not out.exists()
    err = capsys.readouterr().err
    assert "refusing to run" in err and "--busy-ok" in err and "load average" in err


@pytest.mark.slow
def test_the_recovery_benchmark_at_a_tiny_size_catches_up_within_the_budget(
        pg_admin_uri: str, tmp_path: Path) -> None:
    from benchmarks.recovery import main as recovery_main

    out = tmp_path / "recovery.json"
    code = recovery_main(["--database-url", pg_admin_uri, "--rates", "100", "--warmup", "3",
                          "--outage", "3", "--after", "20", "--json", str(out)])
    assert code == 0
    (case,) = json.loads(out.read_text())["catch_up"]
    assert case["disconnects"] == 1 and case["catch_up_s"] is not None, case
    assert case["rest_429_service"] == case["rest_429_user_bot"] == 0
    assert case["service_peak_in_window"] <= case["service_share_per_window"]
    assert case["rest_requests_user_bot"] > 0


def test_the_many_accounts_benchmark_at_a_tiny_size_verifies(pg_admin_uri: str,
                                                             tmp_path: Path) -> None:
    from benchmarks.many_accounts import main as many_main

    out = tmp_path / "many.json"
    code = many_main(["--database-url", pg_admin_uri, "--sse-accounts", "6", "--ws-accounts",
                      "3", "--replica-accounts", "6", "--orders", "3", "--json", str(out)])
    results = json.loads(out.read_text())
    assert code == 0, results
    assert results["sse"]["verified"] and results["websockets"]["verified"], results
    assert results["sse"]["updates"] > 0 and results["websockets"]["updates"] > 0
    assert results["takeover"]["survivor_exit_codes"] == [0, 0]
    assert isinstance(results["takeover"]["takeover_s"], float)
