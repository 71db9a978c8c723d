"""`threadhop.run_in_thread`: the store's hand-off to its worker thread."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest
import trio
import trio.testing

from stream_supervisor.threadhop import run_in_thread

CALLER = contextvars.ContextVar[str]("caller", default="none")


async def test_returns_the_functions_value_from_another_thread() -> None:
    here = threading.get_ident()
    assert await run_in_thread(threading.get_ident, trio.CapacityLimiter(1)) != here
    assert await run_in_thread(lambda: 42, trio.CapacityLimiter(1)) == 42


async def test_raises_what_the_function_raised() -> None:
    def fail() -> None:
        raise LookupError("in the thread")

    with pytest.raises(LookupError, match="in the thread"):
        await run_in_thread(fail, trio.CapacityLimiter(1))


async def test_the_thread_sees_the_callers_context_variables() -> None:
    CALLER.set("writer")
    assert await run_in_thread(CALLER.get, trio.CapacityLimiter(1)) == "writer"


async def test_the_thread_starts_before_other_runnable_tasks_take_their_turn() -> None:
    # The point of the module: `trio.to_thread.run_sync` yields to the scheduler before
    # it starts the thread, so another runnable task (the connection actor decoding a
    # socket read) runs first while the database waits. Here the other task blocks the
    # event loop until the thread has started: it only sees it if the thread was
    # started before the scheduler ran anyone else.
    started = threading.Event()
    seen: list[bool] = []

    def work() -> None:
        started.set()

    async def other() -> None:
        seen.append(started.wait(timeout=2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await run_in_thread(work, trio.CapacityLimiter(1))
    assert seen == [True]


async def test_one_call_at_a_time_per_limiter() -> None:
    limiter = trio.CapacityLimiter(1)
    lock = threading.Lock()
    running = 0
    most = 0

    def work() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(run_in_thread, work, limiter)
    assert most == 1
    assert limiter.borrowed_tokens == 0


async def test_a_cancelled_caller_waits_for_the_thread_then_sees_the_cancellation() -> None:
    # The thread holds the store's connection: nothing may use it until it returns. The
    # call returns what the thread did (it happened), and the cancellation is delivered
    # at the caller's next checkpoint, as with `trio.to_thread.run_sync`.
    finished = threading.Event()
    limiter = trio.CapacityLimiter(1)
    results: list[str] = []

    def slow() -> str:
        time.sleep(0.2)
        finished.set()
        return "done"

    with trio.move_on_after(0.01) as scope:
        results.append(await run_in_thread(slow, limiter))
        assert finished.is_set()
        await trio.lowlevel.checkpoint()
        results.append("not reached")
    assert scope.cancelled_caught
    assert results == ["done"]
    assert limiter.borrowed_tokens == 0


async def test_an_already_cancelled_caller_starts_no_thread() -> None:
    ran = threading.Event()
    with trio.CancelScope() as scope:
        scope.cancel()
        await run_in_thread(ran.set, trio.CapacityLimiter(1))
    assert scope.cancelled_caught
    await trio.sleep(0.05)
    assert not ran.is_set()


async def test_a_busy_limiter_makes_the_caller_wait_for_its_turn() -> None:
    limiter = trio.CapacityLimiter(1)
    order: list[str] = []
    gate = threading.Event()

    def first() -> None:
        gate.wait(timeout=5)
        order.append("first")

    def second() -> None:
        order.append("second")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_in_thread, first, limiter)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(run_in_thread, second, limiter)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        gate.set()
    assert order == ["first", "second"]
