"""Which accounts this process may lead now: the seam between a supervisor and the
replicas that share accounts out (docs/design.md, section 11).

A supervisor with no `Admission` leads its account whenever it wins the writer lock (one
account per process, section 7). With one, it opens no database session and no broker
connection for its account until `wait_turn` returns, and steps down (drains, then
releases the lock) once `may_lead` turns false: `pgfleet.py` decides both from the
replica registry in PostgreSQL.
"""

from __future__ import annotations

from typing import Protocol


class Admission(Protocol):
    async def wait_turn(self, account_id: str) -> None:
        """Return once this process should lead `account_id` (block until then)."""
        ...

    def may_lead(self, account_id: str) -> bool:
        """Whether this process should (still) lead `account_id`."""
        ...

    def leading(self, account_id: str, held: bool) -> None:
        """This process took (True) or released (False) the account's writer lock."""
        ...


__all__ = ["Admission"]
