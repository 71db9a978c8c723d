"""The store's hand-off to its worker thread, without a scheduler round on the way out.

`trio.to_thread.run_sync` takes its limiter with `CapacityLimiter.acquire_on_behalf_of`,
which yields to the scheduler even when the limiter is free: the calling task goes to the
back of the run queue, and the thread starts only after every other runnable task has had
its turn. For the writer that turn is the connection actor decoding a whole socket read
and the dedupe actor forwarding it, about 2 ms per batch in which the database and the
writer thread both wait (BENCHMARKS.md, issue 18, fourth session). `run_in_thread` starts
the thread at once when the limiter is free and waits only for its result; everything
else is as `trio.to_thread.run_sync(fn, limiter=limiter)` does it for a function that
never calls back into Trio: one call at a time per limiter, not abandoned on cancel (a
cancelled caller waits for the thread, gets its result, and sees `Cancelled` at its next
checkpoint), and the caller's context variables.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    import outcome  # Trio's own dependency: only its types are named here

T = TypeVar("T")


async def run_in_thread(fn: Callable[[], T], limiter: trio.CapacityLimiter) -> T:
    """`fn()` in a worker thread, holding one of `limiter`'s tokens while it runs."""
    await trio.lowlevel.checkpoint_if_cancelled()
    borrower = object()  # one token per call: a task may wait on several in turn
    try:
        limiter.acquire_on_behalf_of_nowait(borrower)
    except trio.WouldBlock:
        await limiter.acquire_on_behalf_of(borrower)
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    context = contextvars.copy_context()

    def back_in_trio(result: outcome.Outcome[T]) -> None:
        limiter.release_on_behalf_of(borrower)
        trio.lowlevel.reschedule(task, result)

    def deliver(result: outcome.Outcome[T]) -> None:
        # Trio cannot have finished: the task below is still waiting for this.
        token.run_sync_soon(back_in_trio, result)

    try:
        trio.lowlevel.start_thread_soon(lambda: context.run(fn), deliver,
                                        name="stream-supervisor store")
    except BaseException:
        limiter.release_on_behalf_of(borrower)
        raise

    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        # The thread holds the connection: the caller waits for it, whatever happens.
        return trio.lowlevel.Abort.FAILED

    # Rescheduled with the thread's outcome: its value is returned, its exception raised.
    value: T = await trio.lowlevel.wait_task_rescheduled(abort)
    return value
