"""A simulated Alpaca-compatible broker: seeded order flow, ground truth, chaos, servers.

General layout, each module importing only those above it:

- `wire.py`: how values are written (decimals, timestamps, ids, JSON); `chaos.py`: the
  fault knobs and their seeded decisions.
- `records.py`: symbols, orders, fills, positions; `market.py`: the seeded order flow
  that writes them, recorded as stream updates and FILL activities.
- `feeds.py`: who gets each update (one session per account) and what was streamed;
  `sessions.py`: the stream protocol with one client, through the feeds.
- `ratelimit.py`: Alpaca's per-account REST limit (fixed window, headers, 429);
  `rest.py`: the REST views and their dispatch; `truth.py`: the ground truth.
- `simulated.py`: `SimulatedBroker`, the parts composed; `server.py`: loopback
  WebSocket and HTTP servers; `userbot.py`: the account owner's own bot spending its
  share of the REST limit; `cli.py`: the `stream-supervisor simulate` command.
"""

from .chaos import ChaosConfig
from .market import SimConfig
from .ratelimit import DEFAULT_RATE_LIMIT, RateLimiter
from .rest import RestResponse
from .server import SimServer, serve
from .sessions import SessionClosed, SessionTransport
from .simulated import SimulatedBroker
from .userbot import USER_BOT_AGENT, run_user_bot

__all__ = [
    "DEFAULT_RATE_LIMIT",
    "USER_BOT_AGENT",
    "ChaosConfig",
    "RateLimiter",
    "RestResponse",
    "SessionClosed",
    "SessionTransport",
    "SimConfig",
    "SimServer",
    "SimulatedBroker",
    "run_user_bot",
    "serve",
]
