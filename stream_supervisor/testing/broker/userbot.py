"""The user's own trading bot on the simulated account: it spends its share of the
account's REST limit (placing, listing, cancelling orders) at a steady pace, so tests and
benchmarks can check the service leaves that share untouched (docs/design.md, section 12).
"""

from __future__ import annotations

from typing import Final

import trio

from .simulated import SimulatedBroker

USER_BOT_AGENT: Final = "user-bot"
"""The `User-Agent` the bot's requests carry: the limiter counts callers by it."""


async def run_user_bot(
    broker: SimulatedBroker,
    per_minute: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send `per_minute` requests a minute, evenly, until cancelled. A 429 is counted by
    the limiter (`refused["user-bot"]`); the bot does not retry it, as a bot whose order
    was refused would have lost that chance to trade."""
    task_status.started()
    if per_minute <= 0:
        await trio.sleep_forever()
    headers = {
        "apca-api-key-id": broker.config.key_id,
        "apca-api-secret-key": broker.config.secret_key,
        "user-agent": USER_BOT_AGENT,
    }
    interval = 60.0 / per_minute
    next_at = trio.current_time()
    while True:
        broker.rest("GET", "/v2/orders?status=open&limit=50", headers)
        next_at += interval
        await trio.sleep_until(next_at)
