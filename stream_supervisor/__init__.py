"""stream-supervisor: Alpaca trade updates into PostgreSQL exactly once, under Trio.

General layout (docs/design.md, "How the code is laid out", has every module):
a pure core (`events`, `protocol`, `orders`, `positions`, `ledger`), interfaces (`store`,
`rest`, `transport`, `settings`), three actors under a supervisor (`connection` with
`recovery`, `dedupe`, `writer`; `supervisor`), implementations (`pgstore`, `rest_http`,
`wsclient`, `endpoints`), `wiring` that builds a supervisor from `Settings`, the
commands (`cli`), and the test kit (`testing`). Imports run one way, from the commands
down to the core.
"""

from .events import DeadLetter, Event
from .ledger import Cursor
from .store import Batch, BatchResult, Store

__all__ = ["Batch", "BatchResult", "Cursor", "DeadLetter", "Event", "Store"]
__version__ = "0.1.0"
