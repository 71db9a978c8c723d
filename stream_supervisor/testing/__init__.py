"""The test kit: a simulated Alpaca broker, simulated worlds, an in-memory store, a verifier.

Not only for our own tests: `stream-supervisor demo` and `simulate` run on it, and so can
chaos tests of a deployed service. General layout:

- `broker/`: the simulated Alpaca-compatible broker (seeded order flow, ground truth,
  chaos knobs, loopback WebSocket and REST servers). Its main names are re-exported here.
- `worlds/`: the deterministic simulation, the real supervisor in seeded worlds in
  virtual time (`python -m stream_supervisor.testing.worlds`). Import it by name: it
  pulls in the whole supervisor.
- `memstore.py`: the in-memory store, with PostgreSQL's transactional contract.
- `verify.py`: a store's contents against the broker's ground truth, every difference.
- `running.py`: the real supervisor run in the background beside them, and a process's
  resident memory (chaos tests and benchmarks share it). Import it by name.
"""

from .broker import (
    ChaosConfig,
    RestResponse,
    SessionClosed,
    SessionTransport,
    SimConfig,
    SimServer,
    SimulatedBroker,
    serve,
)
from .memstore import MemoryDatabase, MemoryStore
from .verify import Mismatch, summarize, verify_against_truth

__all__ = [
    "ChaosConfig",
    "MemoryDatabase",
    "MemoryStore",
    "Mismatch",
    "RestResponse",
    "SessionClosed",
    "SessionTransport",
    "SimConfig",
    "SimServer",
    "SimulatedBroker",
    "serve",
    "summarize",
    "verify_against_truth",
]
