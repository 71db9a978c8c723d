"""The notify protocol over real unix datagram sockets the test binds (path and abstract):
READY once ready, STATUS lines, WATCHDOG only while the actors are alive, STOPPING on
drain."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from stream_supervisor.health import HealthMonitor, HealthPolicy
from stream_supervisor.sdnotify import Notifier, notify_loop, status_line, watchdog_interval
from stream_supervisor.state import SupervisorState

FAST = HealthPolicy(connection_silence=0.4, connecting_limit=1.0, backoff_limit=1.0,
                    stall_limit=1.0)


class Receiver:
    """The systemd side: a bound datagram socket and everything it received."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.messages: list[tuple[float, dict[str, str]]] = []

    async def run(self) -> None:
        while True:
            data = await self.sock.recv(65536)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((trio.current_time(), fields))

    def with_key(self, key: str, since: float = -1.0) -> list[dict[str, str]]:
        return [m for t, m in self.messages if key in m and t >= since]

    async def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 5.0,
                       ) -> dict[str, str]:
        seen = 0
        with trio.fail_after(timeout):
            while True:
                for _, m in self.messages[seen:]:
                    if predicate(m):
                        return m
                seen = len(self.messages)
                await trio.sleep(0.01)


@asynccontextmanager
async def notify_socket(address: str | bytes) -> AsyncIterator[Receiver]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(address)
        receiver = Receiver(sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver.run)
            yield receiver
            nursery.cancel_scope.cancel()


def _abstract_name() -> str:
    return f"stream-supervisor-test-{uuid.uuid4().hex}"


def streaming_state() -> SupervisorState:
    state = SupervisorState(account_id="acct", connection="streaming", connection_id=1,
                            caught_up=True, db_writable=True, pipeline_running=True)
    state.beat("connection", trio.current_time())
    return state


async def test_notifier_sends_to_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    async with notify_socket(path) as rx:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
        assert notifier is not None
        notifier.ready("streaming")
        notifier.ready("again")  # idempotent
        notifier.status("hello")
        notifier.stopping("draining")
        await rx.wait_for(lambda m: "STOPPING" in m)
        notifier.close()
    sent = [m for _, m in rx.messages]
    assert sent == [
        {"READY": "1", "STATUS": "streaming"},
        {"STATUS": "hello"},
        {"STOPPING": "1", "STATUS": "draining"},
    ]


async def test_notifier_sends_to_an_abstract_socket() -> None:
    name = _abstract_name()
    async with notify_socket(b"\0" + name.encode()) as rx:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        assert notifier.send("WATCHDOG=1")
        assert await rx.wait_for(lambda m: "WATCHDOG" in m) == {"WATCHDOG": "1"}
        notifier.close()


def test_no_notify_socket_means_no_notifier() -> None:
    assert Notifier.from_environ({}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"}) is None


def test_a_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.send("READY=1") is False
    assert notifier.ready_sent is False
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env) == expected


def test_status_line_names_the_phase_first() -> None:
    state = SupervisorState(connection="backoff", pipeline_running=True,
                            last_disconnect_reason="upgrade rejected 429", committed_events=7,
                            committed_batches=2, restarts=1)
    assert status_line(state) == ("reconnecting (upgrade rejected 429) | 7 events in 2 batches"
                                  " | 1 restarts")
    state.draining = True
    assert status_line(state).startswith("draining |")
    assert status_line(SupervisorState()).startswith("starting |")


async def test_loop_sends_ready_only_once_ready_then_stopping_on_drain(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    state = SupervisorState(pipeline_running=True, connection="backfilling", connection_id=1,
                            db_writable=True)
    async with notify_socket(path) as rx, trio.open_nursery() as nursery:
        notifier = Notifier(path)
        await nursery.start(partial(notify_loop, state, notifier, HealthMonitor(state, FAST),
                                    status_interval=0.1, tick=0.02))
        # Not ready while backfilling: status lines and start-timeout extensions only.
        await rx.wait_for(lambda m: m.get("STATUS", "").startswith("backfilling"))
        extend = await rx.wait_for(lambda m: "EXTEND_TIMEOUT_USEC" in m)
        assert int(extend["EXTEND_TIMEOUT_USEC"]) > 0
        await trio.sleep(0.2)
        assert rx.with_key("READY") == []

        state.connection, state.caught_up = "streaming", True
        ready = await rx.wait_for(lambda m: "READY" in m)
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("streaming")
        ready_at = trio.current_time()
        await trio.sleep(0.25)
        assert rx.with_key("EXTEND_TIMEOUT_USEC", since=ready_at + 0.05) == []

        state.draining = True
        stopping = await rx.wait_for(lambda m: "STOPPING" in m)
        assert stopping["STATUS"].startswith("draining")
        nursery.cancel_scope.cancel()
        notifier.close()
    assert len(rx.with_key("READY")) == 1
    assert len(rx.with_key("STOPPING")) == 1


async def test_watchdog_pings_stop_while_an_actor_is_wedged_and_resume_after() -> None:
    name = _abstract_name()
    state = streaming_state()
    beating = True

    async def connection_actor() -> None:
        # A quiet stream: no frames, only a pong now and then.
        while True:
            if beating:
                state.beat("connection", trio.current_time())
            await trio.sleep(0.1)

    async with notify_socket(b"\0" + name.encode()) as rx, trio.open_nursery() as nursery:
        notifier = Notifier("@" + name)
        nursery.start_soon(connection_actor)
        await nursery.start(partial(notify_loop, state, notifier, HealthMonitor(state, FAST),
                                    watchdog=0.05, status_interval=1.0, tick=0.01))
        await trio.sleep(0.5)
        healthy = rx.with_key("WATCHDOG")
        assert len(healthy) >= 5  # every 50 ms while alive

        beating = False  # the connection actor is wedged: no pong, no frame
        wedged_at = trio.current_time()
        await trio.sleep(0.4 + 0.1)  # its silence limit, plus a tick
        stopped_at = trio.current_time()
        await trio.sleep(0.5)
        assert rx.with_key("WATCHDOG", since=stopped_at) == []
        assert rx.with_key("WATCHDOG", since=wedged_at)  # pinged until the limit passed

        beating = True  # it recovers: pings resume
        resumed_at = trio.current_time()
        await trio.sleep(0.4)
        assert len(rx.with_key("WATCHDOG", since=resumed_at)) >= 3
        nursery.cancel_scope.cancel()
        notifier.close()


async def test_watchdog_keeps_pinging_through_a_drain() -> None:
    name = _abstract_name()
    state = streaming_state()
    state.draining = True  # the connection actor was cancelled; the drain has a deadline
    async with notify_socket(b"\0" + name.encode()) as rx, trio.open_nursery() as nursery:
        notifier = Notifier("@" + name)
        await nursery.start(partial(notify_loop, state, notifier, HealthMonitor(state, FAST),
                                    watchdog=0.05, status_interval=1.0, tick=0.01))
        await trio.sleep(0.7)  # longer than the connection silence limit
        assert len(rx.with_key("WATCHDOG", since=trio.current_time() - 0.2)) >= 2
        assert len(rx.with_key("STOPPING")) == 1
        assert rx.with_key("READY") == []  # never ready once draining
        nursery.cancel_scope.cancel()
        notifier.close()


async def test_a_standby_replica_is_ready_for_systemd(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    state = SupervisorState(connection="standby")  # waiting for the writer lock
    async with notify_socket(path) as rx, trio.open_nursery() as nursery:
        notifier = Notifier(path)
        await nursery.start(partial(notify_loop, state, notifier, HealthMonitor(state, FAST),
                                    status_interval=0.1, tick=0.02))
        ready = await rx.wait_for(lambda m: "READY" in m)
        assert ready["STATUS"].startswith("standby")
        nursery.cancel_scope.cancel()
        notifier.close()
    assert not state.ready  # /readyz stays 503: a standby does not stream
