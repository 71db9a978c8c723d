"""Errors shared across modules, and exception-group helpers (Trio nurseries wrap errors
in groups; actors want the cause)."""

from __future__ import annotations

import trio


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for inner in exc.exceptions:
            out.extend(leaves(inner))
        return out
    return [exc]


def collapse(exc: BaseException, *, prefer: tuple[type[BaseException], ...] = ()) -> BaseException:
    """The one exception that explains a group: a preferred type (fatal errors) first,
    then the first that is not a cancellation. A group of only cancellations is kept as
    it is, so cancellation keeps propagating the way Trio expects."""
    found = leaves(exc)
    for kind in prefer:
        for leaf in found:
            if isinstance(leaf, kind):
                return leaf
    for leaf in found:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return exc


class TransportClosed(Exception):
    """The stream connection is gone (peer closed, reset, or failed to open)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpgradeRejected(Exception):
    """The server refused the WebSocket upgrade with an HTTP status (429: one connection
    per account, the broker still holds our previous one)."""

    def __init__(self, status_code: int, body: str = "") -> None:
        super().__init__(f"upgrade rejected with HTTP {status_code}")
        self.status_code = status_code
        self.body = body
