"""Several accounts in one process: one supervisor per account under one nursery
(docs/design.md, section 11).

Each account keeps what section 7 gives one: its own cursor, dedupe keys, writer lock,
restart budget, metrics and state. What one account does never stops another: bad
credentials (exit 78 of its supervisor) leave it failed, reported by name, until the
process restarts; a crash loop past its restart budget (exit 1) leaves it failed for a
cool-down, then it starts again. The fleet owns the signals and drains every account.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import structlog
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from .accounts import AccountSpec
from .admission import Admission
from .health import Health, HealthMonitor, HealthPolicy, readiness
from .logs import get_logger
from .metrics import Metrics
from .settings import Settings, derive_stream_url
from .state import SupervisorState
from .supervisor import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

log = get_logger("stream_supervisor.fleet")

#: How long an account that ran out of restart budget waits before it starts again. Its
#: supervisor has already retried `restart_limit` times in `restart_window`; waiting
#: longer than the window lets a passing cause (a broker incident) end on its own.
DEFAULT_FAILURE_COOLDOWN: Final = 60.0

class Runner(Protocol):
    """What the fleet runs per entry of the accounts file: a `Supervisor` (one
    account), or a `broker_events.EventsSupervisor` (a broker partner's events stream)."""

    fatal_error: str | None

    async def run(self) -> int: ...

    def request_drain(self, why: str = "requested") -> None: ...


#: Opens one entry's runner: its spec and settings, metrics, state and admission.
OpenAccount = Callable[
    [AccountSpec, Settings, Metrics, SupervisorState, Admission | None],
    AbstractAsyncContextManager[Runner],
]


def account_settings(base: Settings, spec: AccountSpec) -> Settings:
    """The process's settings with one account's credentials and broker URLs."""
    base_url = (spec.base_url or base.base_url).rstrip("/")
    stream_url = spec.stream_url or (
        derive_stream_url(base_url) if spec.base_url else base.stream_url)
    return replace(base, key_id=spec.key_id, secret_key=spec.secret_key, base_url=base_url,
                   stream_url=stream_url, account_id=spec.account_id, accounts_file=None,
                   account_name=None)


@dataclass
class AccountRun:
    """One account of the fleet as health, readiness and the tests see it."""

    spec: AccountSpec
    state: SupervisorState = field(default_factory=SupervisorState)
    metrics: Metrics = field(default_factory=Metrics)
    #: starting, running, failed (config: until restart), cooling (crash loop), stopped
    status: str = "starting"
    error: str | None = None
    exit_code: int | None = None
    failures: int = 0
    #: The drain of this account missed its deadline (exit 1 for the process).
    drain_failed: bool = False
    supervisor: Runner | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def report(self, health: Health | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "account_id": self.state.account_id}
        if self.error is not None:
            out["error"] = self.error
        out.update(readiness(self.state, health))
        out["dead_letters"] = int(self.metrics.value("stream_supervisor_dead_letters_total"))
        out["restarts"] = self.state.restarts
        return out


class Fleet:
    """Run every account of `accounts` until drained; `run` returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        accounts: Sequence[AccountSpec],
        open_account: OpenAccount,
        *,
        admission: Callable[[str], Admission] | None = None,
        install_signal_handlers: bool = True,
        failure_cooldown: float = DEFAULT_FAILURE_COOLDOWN,
    ) -> None:
        names = [a.name for a in accounts]
        if len(set(names)) != len(names):
            raise ValueError("account names must be unique")
        self.settings = settings
        self.accounts: dict[str, AccountRun] = {a.name: AccountRun(a) for a in accounts}
        self._open_account = open_account
        self._admission = admission
        self._install_signal_handlers = install_signal_handlers
        self._failure_cooldown = failure_cooldown
        self._drain = trio.Event()
        self.draining = False
        self.registry = CollectorRegistry()
        self.registry.register(AccountsCollector(self.accounts))

    # --- control

    def request_drain(self, why: str = "requested") -> None:
        if self.draining:
            return
        self.draining = True
        log.info("fleet_draining", why=why, accounts=len(self.accounts))
        self._drain.set()
        for run in self.accounts.values():
            if run.supervisor is not None:
                run.supervisor.request_drain(why)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        async with trio.open_nursery() as outer:
            if self._install_signal_handlers:
                await outer.start(self._watch_signals)
            async with trio.open_nursery() as nursery:
                for run in self.accounts.values():
                    nursery.start_soon(self._run_account, run)
                task_status.started()
            outer.cancel_scope.cancel()
        code = self.exit_code()
        log.info("fleet_stopped", exit_code=code, failed=self.failed())
        return code

    # --- what health and the tests read

    def failed(self) -> dict[str, str]:
        """Accounts that failed, by name, with why."""
        return {n: r.error or r.status for n, r in self.accounts.items()
                if r.status in ("failed", "cooling")}

    def exit_code(self) -> int:
        codes = [r.exit_code for r in self.accounts.values()]
        if self.draining:
            # A drain that missed its deadline in any account is exit 1, as for one.
            return EXIT_FAILURE if any(r.drain_failed for r in self.accounts.values()) \
                else EXIT_OK
        if codes and all(c == EXIT_CONFIG for c in codes):
            return EXIT_CONFIG
        return EXIT_FAILURE

    def readiness(self, monitor: FleetMonitor | None = None) -> dict[str, Any]:
        """`/readyz`: ready when every account is streaming and caught up or stands by
        for another replica, none failed; each account's own verdict by name (with
        `monitor`, an account whose writer is stuck is not ready)."""
        accounts = {n: r.report(monitor.monitors[n].assess()
                                if monitor is not None and n in monitor.monitors else None)
                    for n, r in self.accounts.items()}
        ready = not self.draining and all(
            a["ready"] or (a["connection"] == "standby" and not a["pipeline_running"])
            for a in accounts.values())
        return {"ready": ready, "draining": self.draining, "failed": self.failed(),
                "accounts": accounts}

    # --- internals

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                self.request_drain(signal.Signals(signum).name)

    async def _run_account(self, run: AccountRun) -> None:
        # Every line of this account's actors carries its name (the supervisor adds the
        # broker's account id as `account` once it knows it).
        structlog.contextvars.bind_contextvars(account_name=run.name, account=run.name)
        if run.spec.problem is not None:
            self._fail(run, EXIT_CONFIG, run.spec.problem)
            return
        settings = account_settings(self.settings, run.spec)
        admission = self._admission(run.name) if self._admission is not None else None
        while not self.draining:
            run.status = "running"
            run.error = None
            error: str | None = None
            try:
                async with self._open_account(run.spec, settings, run.metrics, run.state,
                                              admission) as supervisor:
                    run.supervisor = supervisor
                    if self.draining:
                        supervisor.request_drain("fleet draining")
                    code = await supervisor.run()
            except Exception as exc:  # one account's surprise must not end the others
                code, error = EXIT_FAILURE, f"{type(exc).__name__}: {exc}"[:500]
                log.error("account_crashed", error=error, exc_info=exc)
            else:
                error = supervisor.fatal_error or (
                    "restart intensity exceeded" if code == EXIT_FAILURE else None)
            finally:
                run.supervisor = None
            run.exit_code = code
            if self.draining:
                run.status = "stopped"
                run.drain_failed = code == EXIT_FAILURE
                return
            if code == EXIT_CONFIG:
                # The message names the single-account variables; say where this
                # account's credentials really come from.
                self._fail(run, code, f"{error or 'configuration error'} (account "
                           f"{run.name!r} takes its credentials from "
                           f"{run.spec.credentials_from})")
                return
            run.failures += 1
            self._fail(run, code, error or f"stopped with exit code {code}",
                       cooling=self._failure_cooldown)
            with trio.move_on_after(self._failure_cooldown):
                await self._drain.wait()
        run.status = "stopped"

    def _fail(self, run: AccountRun, code: int, error: str, *,
              cooling: float | None = None) -> None:
        run.exit_code = code
        run.error = error
        run.status = "failed" if cooling is None else "cooling"
        log.error("account_failed", account_name=run.name, exit_code=code, error=error[:500],
                  restart_in_s=cooling)


class AccountsCollector(Collector):
    """Every account's metrics in one exposition, each sample labelled `account` (the
    account's name in the accounts file)."""

    def __init__(self, accounts: Mapping[str, AccountRun]) -> None:
        self._accounts = accounts

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for name, run in self._accounts.items():
            for family in run.metrics.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    merged.samples.append(sample._replace(
                        labels={**sample.labels, "account": name}))
        return list(families.values())


class FleetMonitor:
    """`/healthz` for a fleet: alive while every running account's actors are."""

    def __init__(self, fleet: Fleet, settings: Settings) -> None:
        self.fleet = fleet
        self.monitors = {n: HealthMonitor(r.state, HealthPolicy.from_settings(settings),
                                          r.metrics)
                         for n, r in fleet.accounts.items()}

    def assess(self, now: float | None = None) -> Health:
        problems: list[str] = []
        detail: dict[str, Any] = {}
        for name, monitor in self.monitors.items():
            health = monitor.assess(now)
            problems.extend(f"{name}: {p}" for p in health.problems)
            detail[name] = health.detail
        return Health(not problems, tuple(problems), {"accounts": detail})


def fair_share(accounts: int, replicas: int) -> int:
    return math.ceil(accounts / max(1, replicas))


__all__ = [
    "DEFAULT_FAILURE_COOLDOWN",
    "AccountRun",
    "AccountsCollector",
    "Fleet",
    "FleetMonitor",
    "OpenAccount",
    "Runner",
    "account_settings",
    "fair_share",
]
