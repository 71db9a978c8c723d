"""Logs during chaos stay structured and say what happened: the real `run` process in
JSON mode against a broker that drops the socket, sends bad frames and fails REST calls,
and a database that times out its statements. Every stdout line is a JSON object; the
reconnect reasons, retries and dead letters are there; no secret is anywhere.
"""

from __future__ import annotations

import json
import os

import pytest
import trio

from stream_supervisor.testing.broker import (
    ChaosConfig,
    SimConfig,
    SimServer,
    SimulatedBroker,
    serve,
)
from stream_supervisor.testing.verify import summarize

from .harness import (
    FAST_REST_LIMIT,
    SupervisorProcess,
    TableLock,
    admin_uri_of,
    committed_rows,
    dbname_of,
    final_verify,
    process_env,
    replay_hint,
    wait_for_blocked_writer,
    with_password,
)

pytestmark = pytest.mark.chaos


async def test_chaos_logs_are_json_say_what_happened_and_hold_no_secret(
    database_url: str, pg_admin_uri: str, node_id: str
) -> None:
    key_id = "PKCHAOS" + os.urandom(7).hex().upper()
    secret_key = "chaos-secret-" + os.urandom(16).hex()
    url, password = with_password(database_url)
    config = SimConfig(
        seed=401, orders=40, rate=80.0, key_id=key_id, secret_key=secret_key,
        scenario="logs", rest_rate_limit=FAST_REST_LIMIT,
        chaos=ChaosConfig(duplicate_prob=0.1, duplicate_burst=2, disconnect_every=35,
                          abrupt_prob=0.5, malformed_prob=0.06, oversized_prob=0.02,
                          oversized_bytes=80_000, rest_error_prob=0.25),
    )
    broker = SimulatedBroker(config)
    admin, dbname = admin_uri_of(pg_admin_uri), dbname_of(database_url)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            env = process_env(url, server, config,
                              STREAM_SUPERVISOR_STATEMENT_TIMEOUT_MS="300",
                              STREAM_SUPERVISOR_MAX_FRAME_BYTES="50000")
            async with SupervisorProcess(env, nursery) as proc:
                await proc.wait_for_event("listening", timeout=60)
                await nursery.start(broker.run_market)
                with trio.fail_after(30):
                    while await trio.to_thread.run_sync(
                            committed_rows, database_url, broker.account_id) < 20:
                        await trio.sleep(0.1)
                # Statements time out behind a lock: the batch is retried, not lost.
                async with TableLock(database_url):
                    await wait_for_blocked_writer(admin, dbname, timeout=20)
                    await trio.sleep(1.0)
                mismatches, code, _ = await proc.match_then_drain(database_url, broker)
            nursery.cancel_scope.cancel()
    mismatches = mismatches or await final_verify(database_url, broker)

    context = "\n".join([replay_hint(node_id, config), summarize(mismatches), proc.tail()])
    assert mismatches == [], context
    assert code == 0, context

    # Every line on stdout is one JSON object with an event name, a level and a time.
    events = []
    for number, line in enumerate(proc.stdout, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"stdout line {number} is not JSON: {line[:300]!r}")
        assert isinstance(event, dict), line
        assert {"event", "level", "timestamp"} <= event.keys(), line
        events.append(event)
    for line in proc.stderr:
        assert not line.strip(), f"unexpected stderr output: {line[:300]!r}"

    def named(name: str) -> list[dict[str, object]]:
        return [e for e in events if e["event"] == name]

    # Reconnects say why; retries say what failed; dead letters say what was wrong.
    disconnects = named("disconnected")
    assert disconnects and all(e.get("reason") for e in disconnects), context
    rest_retries = named("rest_retry")
    assert any("500" in str(e.get("reason")) for e in rest_retries), rest_retries[:3]
    assert all(e.get("path") for e in rest_retries)
    batch_retries = named("batch_retry")
    assert any("statement timeout" in str(e.get("error")) for e in batch_retries), \
        batch_retries[:3]
    dead = named("frame_dead_lettered")
    assert dead and all(e.get("reason") for e in dead), context
    assert any("oversized" in str(e["reason"]) for e in dead), [e["reason"] for e in dead]
    assert named("draining") and named("drained")
    assert named("stopped")[-1]["exit_code"] == 0
    stats = broker.ground_truth()["stats"]
    # Each broker drop was logged: as a disconnect, or (a drop racing a pipeline restart,
    # which abandons its connection) as the restart.
    restarts = named("pipeline_restarting")
    assert len(disconnects) + len(restarts) >= stats["disconnects"] > 0, context

    # No secret anywhere: not the key id, not the secret key, not the database password.
    everything = "\n".join([*proc.stdout, *proc.stderr])
    for name, secret in (("key id", key_id), ("secret key", secret_key),
                         ("database password", password)):
        assert secret not in everything, f"the {name} appears in the output"
