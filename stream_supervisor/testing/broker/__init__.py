"""A simulated Alpaca-compatible broker: seeded order flow, ground truth, chaos, servers."""

from .chaos import ChaosConfig
from .market import RestResponse, SimConfig, SimulatedBroker
from .server import SimServer, serve
from .sessions import SessionClosed, SessionTransport

__all__ = [
    "ChaosConfig",
    "RestResponse",
    "SessionClosed",
    "SessionTransport",
    "SimConfig",
    "SimServer",
    "SimulatedBroker",
    "serve",
]
