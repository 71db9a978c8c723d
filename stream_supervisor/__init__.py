"""stream-supervisor: Alpaca trade updates into PostgreSQL exactly once, under Trio."""

from .events import DeadLetter, Event
from .ledger import Cursor
from .store import Batch, BatchResult, Store

__all__ = ["Batch", "BatchResult", "Cursor", "DeadLetter", "Event", "Store"]
__version__ = "0.1.0"
