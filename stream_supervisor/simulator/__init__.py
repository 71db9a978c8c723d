"""A simulated Alpaca-compatible broker: seeded order flow, ground truth, chaos, servers."""

from .broker import RestResponse, SimConfig, SimulatedBroker
from .chaos import ChaosConfig
from .server import SimServer, serve
from .session import SessionClosed, SessionTransport

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
