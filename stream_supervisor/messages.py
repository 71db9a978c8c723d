"""What travels between the actors, in one place.

connection -> dedupe -> writer carry `Item`s (an update, or a frame that could not become
one); writer -> dedupe carries `Ack`s (a batch committed). Every actor imports its
channel types from here, so none imports a neighbour to learn what it receives.
"""

from __future__ import annotations

from typing import NamedTuple

from .events import DeadLetter, Event

#: One unit on the pipeline's channels: an update to apply, or a dead letter to keep.
Item = Event | DeadLetter


class Ack(NamedTuple):
    """The writer's word that a batch committed: every key of it is durable now (stored
    by it, or found already stored), and the newest key it stored itself, if any.
    `rejected` are keys of updates the database refused and the writer dead-lettered:
    not stored, so they leave the in-flight set without being learnt (a later valid copy
    of the update must get through, docs/design.md, section 4)."""

    keys: tuple[str, ...]
    newest_stored: str | None = None
    rejected: tuple[str, ...] = ()
