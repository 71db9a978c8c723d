"""The fleet's policy (stream_supervisor/fleet.py), with stand-in runners: what one
account's exit code does to it and to the process, in virtual time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing

from stream_supervisor.accounts import AccountSpec
from stream_supervisor.admission import Admission
from stream_supervisor.fleet import Fleet, Runner
from stream_supervisor.metrics import Metrics
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.supervisor import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK


class FakeRunner:
    def __init__(self, behave: Callable[[FakeRunner], object]) -> None:
        self.behave = behave
        self.fatal_error: str | None = None
        self.drained = trio.Event()

    async def run(self) -> int:
        code = self.behave(self)
        if isinstance(code, int):
            return code
        await self.drained.wait()  # runs until drained
        return EXIT_OK

    def request_drain(self, why: str = "requested") -> None:
        self.drained.set()


def opener(plans: dict[str, list[Callable[[FakeRunner], object]]],
           starts: dict[str, int]) -> Callable[..., object]:
    @asynccontextmanager
    async def open_account(spec: AccountSpec, settings: Settings, metrics: Metrics,
                           state: SupervisorState,
                           admission: Admission | None) -> AsyncIterator[Runner]:
        starts[spec.name] = starts.get(spec.name, 0) + 1
        plan = plans[spec.name]
        yield FakeRunner(plan.pop(0) if len(plan) > 1 else plan[0])

    return open_account


def refused(runner: FakeRunner) -> int:
    runner.fatal_error = "the broker refused the credentials"
    return EXIT_CONFIG


def boom(runner: FakeRunner) -> int:
    raise RuntimeError("unexpected")


async def test_each_account_fails_alone_and_the_drain_ends_the_rest(
        autojump_clock: trio.testing.MockClock) -> None:
    specs = [AccountSpec("good", "k", "s", "env K, env S"),
             AccountSpec("bad", "k", "s", "env BAD_KEY, env BAD_SECRET"),
             AccountSpec("looping", "k", "s"), AccountSpec("raising", "k", "s"),
             AccountSpec("unset", problem="environment variable X is not set")]
    plans: dict[str, list[Callable[[FakeRunner], object]]] = {
        "good": [lambda r: None], "bad": [refused],
        "looping": [lambda r: EXIT_FAILURE, lambda r: None],
        "raising": [boom, lambda r: None], "unset": [lambda r: None]}
    starts: dict[str, int] = {}
    fleet = Fleet(Settings(), specs, opener(plans, starts),  # type: ignore[arg-type]
                  install_signal_handlers=False, failure_cooldown=60)
    codes: list[int] = []
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            codes.append(await fleet.run())

        nursery.start_soon(run)
        await trio.sleep(1)
        failed = fleet.failed()
        assert set(failed) == {"bad", "looping", "raising", "unset"}
        assert "env BAD_KEY, env BAD_SECRET" in failed["bad"]
        assert failed["looping"] == "restart intensity exceeded"
        assert "RuntimeError: unexpected" in failed["raising"]
        assert failed["unset"] == "environment variable X is not set"
        assert fleet.accounts["good"].status == "running"
        await trio.sleep(61)  # the cool-down: the two crash loops start again
        assert set(fleet.failed()) == {"bad", "unset"}
        assert starts == {"good": 1, "bad": 1, "looping": 2, "raising": 2}
        fleet.request_drain("test")
    assert codes == [EXIT_OK]


async def test_every_account_refused_is_a_configuration_exit() -> None:
    specs = [AccountSpec("a", "k", "s"), AccountSpec("b", problem="no key")]
    fleet = Fleet(Settings(), specs, opener({"a": [refused]}, {}),  # type: ignore[arg-type]
                  install_signal_handlers=False)
    with trio.fail_after(5):
        assert await fleet.run() == EXIT_CONFIG


async def test_readyz_and_metrics_answer_per_account_by_name() -> None:
    """What `run` with an accounts file serves (fleet_service.py): `/readyz` with each
    account's verdict by name and the failed ones listed, `/metrics` labelled by
    account."""
    import json

    from stream_supervisor.endpoints import HealthServer
    from stream_supervisor.fleet import FleetMonitor

    specs = [AccountSpec("momentum", "k", "s"), AccountSpec("hedge", problem="no key")]
    fleet = Fleet(Settings(), specs, opener({"momentum": [lambda r: None]},  # type: ignore[arg-type]
                                            {}), install_signal_handlers=False)
    server = HealthServer(SupervisorState(), Metrics(), FleetMonitor(fleet, Settings()),
                          ready=fleet.readiness, registry=fleet.registry)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet.run)
        await trio.sleep(0.1)
        run = fleet.accounts["momentum"]
        run.metrics.dead_letters.inc(3)
        run.state.pipeline_running = run.state.db_writable = run.state.caught_up = True
        run.state.connection = "streaming"
        ready = server.answer("GET", "/readyz")
        body = json.loads(ready.body)
        assert ready.status == 503  # one account failed
        assert body["failed"] == {"hedge": "no key"}
        assert body["accounts"]["momentum"]["ready"] is True
        assert body["accounts"]["momentum"]["dead_letters"] == 3
        assert body["accounts"]["hedge"]["status"] == "failed"
        metrics = server.answer("GET", "/metrics").body.decode()
        assert 'stream_supervisor_dead_letters_total{account="momentum"} 3.0' in metrics
        assert server.answer("GET", "/healthz").status == 200
        fleet.request_drain("test")
