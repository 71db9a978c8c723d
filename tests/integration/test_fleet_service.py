"""`stream-supervisor run` with an accounts file, as systemd and ECS run it: a real process
with the health listener and the notify socket (docs/design.md, section 11). It started
the listener with the wrong arguments (every start with `STREAM_SUPERVISOR_HTTP_ADDR` and
an accounts file crashed) and never pinged systemd's watchdog (killed every
`WatchdogSec`)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import httpx
import trio

from stream_supervisor.testing.broker import SimConfig, SimulatedBroker, serve

from ..chaos.harness import FAST_REST_LIMIT, PROCESS_DRAIN_TIMEOUT, SupervisorProcess
from ..chaos.test_replica_fleet import _env
from ..test_sdnotify import notify_socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_accounts_file_process_serves_health_and_pings_the_watchdog(
        database_url: str, tmp_path: Path) -> None:
    broker = SimulatedBroker(SimConfig(seed=2101, key_id="FKEY", secret_key="FSECRET-x",
                                       orders=4, rate=8.0, rest_rate_limit=FAST_REST_LIMIT))
    port = _free_port()
    notify = f"@stream-supervisor-test-{uuid.uuid4().hex}"
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, broker)
            accounts = tmp_path / "accounts.toml"
            accounts.write_text("\n".join([
                "[accounts.one]", 'key_id_env = "F_KEY"', 'secret_key_env = "F_SECRET"',
                f'base_url = "{server.rest_url}"', f'stream_url = "{server.ws_url}"', ""]))
            env = _env(database_url, accounts, {"F_KEY": "FKEY", "F_SECRET": "FSECRET-x"})
            env.update({"STREAM_SUPERVISOR_HTTP_ADDR": f"127.0.0.1:{port}",
                        "NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "1000000"})
            async with (notify_socket(b"\0" + notify[1:].encode()) as rx,
                        SupervisorProcess(env, nursery, name="fleet") as proc):
                await rx.wait_for(lambda m: m.get("READY") == "1", timeout=60)
                first = await rx.wait_for(lambda m: m.get("WATCHDOG") == "1", timeout=30)
                assert first == {"WATCHDOG": "1"}
                async with httpx.AsyncClient() as client:
                    while True:
                        try:
                            health = await client.get(f"http://127.0.0.1:{port}/healthz")
                            break
                        except httpx.TransportError:
                            assert proc.returncode is None, proc.tail()
                            await trio.sleep(0.1)
                    assert health.status_code == 200, health.text
                    ready = await client.get(f"http://127.0.0.1:{port}/readyz")
                    assert "one" in ready.text
                before = len(rx.with_key("WATCHDOG"))
                await trio.sleep(2.5)
                assert len(rx.with_key("WATCHDOG")) >= before + 2  # one a 0.5 s period
                proc.terminate()
                assert await proc.wait(timeout=PROCESS_DRAIN_TIMEOUT + 20) == 0, proc.tail()
            nursery.cancel_scope.cancel()
