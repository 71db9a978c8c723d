"""What the simulated broker's tests share: a deterministic config, the recording, keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from stream_supervisor.testing.broker import SimConfig, SimulatedBroker

from ...fixtures import RECORDING

START = datetime(2026, 11, 23, 20, 47, 37, 758317, tzinfo=UTC)
AUTH = {"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}
AUTH_MSG = json.dumps(
    {"action": "authenticate", "data": {"key_id": "SIMKEY", "secret_key": "SIMSECRET"}}
)
LISTEN_MSG = json.dumps({"action": "listen", "data": {"streams": ["trade_updates"]}})


def config(**kw: Any) -> SimConfig:
    kw.setdefault("start_time", START)
    return SimConfig(**kw)


def play_all(broker: SimulatedBroker) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while (batch := broker.step()) is not None:
        out.extend(batch)
    return out


def all_activities(
    broker: SimulatedBroker, page_size: int = 100, **kw: Any
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    token = None
    while page := broker.fill_activities(after=None, page_size=page_size, page_token=token, **kw):
        out.extend(page)
        token = page[-1]["id"]
    return out


def fixture_lines() -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (RECORDING / "trade_updates.jsonl").read_text().splitlines()
    ]
