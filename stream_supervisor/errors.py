"""Every error that crosses a module boundary, what each one means for the process, and
the exception-group helpers (Trio nurseries wrap errors in groups; callers want the cause).

How the supervisor treats them:
- `FATAL`: only an operator can fix these (credentials, configuration, schema): the
  process exits 78 (EX_CONFIG) at once, and systemd's `RestartPreventExitStatus=78`
  keeps it from restarting in a loop.
- Transport errors (`TransportClosed`, `UpgradeRejected`, `ProtocolViolation`) and
  `BrokerUnavailable` during recovery: the connection actor reconnects with backoff;
  nothing else restarts.
- `StoreError`: the writer retries the batch; `StoreUnavailable` is waited out;
  `LostLeadership` stops writing at once and the pipeline goes back to standby;
  `StoreDataError` (the database refused one update's values) makes the writer split
  the batch and dead-letter that update; `StoreRejected` repeated for one batch
  (`REPEATS_BEFORE_CRASH` times) becomes `BatchKeepsFailing`, a crash.
- Anything else is a crash: the pipeline restarts from durable state, within the
  restart-intensity limit.
- `DecodeError` / `TimestampError` never leave the decoder as exceptions: bad input
  becomes a dead letter.
"""

from __future__ import annotations

import trio

# --- configuration and schema: fatal --------------------------------------------------


class ConfigError(Exception):
    """A configuration problem the operator must fix; the message names the variable."""


class SchemaError(Exception):
    """The database is reachable but not migrated; `stream-supervisor migrate` fixes it."""


class SchemaNotMigrated(SchemaError):
    """The database lacks the tables or the migration this code needs."""


class MigrationError(Exception):
    """A migration cannot be applied: a changed applied file, a missing directory, or a
    failing statement (the message names the file)."""


# --- the broker -----------------------------------------------------------------------


class Unauthorized(Exception):
    """The broker refused our keys on the stream: a configuration error, never retried."""


class BrokerAuthError(Exception):
    """The broker refused our credentials (HTTP 401/403). Not retryable: fix the config."""


class BrokerUnavailable(Exception):
    """The broker's REST API kept failing after every retry."""


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


class ProtocolViolation(Exception):
    """The server did not follow the handshake (treated like a dropped connection)."""


# --- decoding -------------------------------------------------------------------------


class DecodeError(ValueError):
    """A payload that cannot become an event; the message is the dead-letter reason."""


class TimestampError(ValueError):
    """Text that is not an RFC 3339 timestamp the decoder accepts."""


class OutOfBounds(DecodeError):
    """A well-formed value outside `bounds.py` (too long, too large, too precise, too far
    in the future): the update is dead-lettered before it can reach a batch."""


# --- the store ------------------------------------------------------------------------


class StoreError(Exception):
    """A failure talking to the store; the batch did not commit, or its fate is unknown."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now; waiting and retrying is the answer."""


class LostLeadership(StoreError):
    """This process no longer holds the account's writer lock: stop writing at once."""


class StoreRefusal(StoreError):
    """The database answered the batch with an error of its own (it is reachable, the
    session is sound and kept, with its writer lock). `sqlstate` and `detail` are the
    server's; equal ones on a retry are the same refusal."""

    def __init__(self, message: str, *, sqlstate: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.detail = detail or message

    @property
    def signature(self) -> tuple[str, str | None, str]:
        return (type(self).__name__, self.sqlstate, self.detail)


class StoreDataError(StoreRefusal):
    """The database refused a value of the batch (SQLSTATE class 22 data exception,
    54 program limit, 23502 not-null or 23514 check violation): some update's data is at
    fault, not the connection, and splitting the batch finds it."""


class StoreRejected(StoreRefusal):
    """The database refused the batch for a reason that is neither contention nor one
    row's data (a trigger, a schema that does not match, an internal error): a retry is
    worth a few attempts, not a silent loop."""


class BatchKeepsFailing(Exception):
    """The same `StoreRejected` came back for the same batch on every attempt: a crash
    (counted towards the restart limit), so a loop the database will never end makes the
    process exit non-zero instead of spinning quietly."""


#: Errors that end the process at once with EX_CONFIG: only an operator can fix them.
FATAL: tuple[type[BaseException], ...] = (ConfigError, SchemaError, Unauthorized,
                                          BrokerAuthError)


# --- exception groups -----------------------------------------------------------------


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
