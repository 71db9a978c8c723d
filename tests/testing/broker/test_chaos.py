"""The chaos knobs' decisions (`chaos.py`): seeded, so a chaos run replays."""

from __future__ import annotations

from stream_supervisor.testing.broker import ChaosConfig
from stream_supervisor.testing.broker.chaos import ChaosDecider


def test_chaos_decisions_are_seeded() -> None:
    knobs = ChaosConfig(
        duplicate_prob=0.3, disconnect_prob=0.1, malformed_prob=0.2, rest_error_prob=0.3
    )
    runs = []
    for _ in range(2):
        d = ChaosDecider(knobs, seed=11)
        runs.append(
            [(d.copies(), d.disconnect_after(i), d.injection(), d.rest_fault()) for i in range(200)]
        )
    assert runs[0] == runs[1]
    slow = ChaosDecider(ChaosConfig(delay_prob=1.0, delay_max=0.25, rest_delay_max=0.5), seed=1)
    assert all(0 <= slow.delay() <= 0.25 and 0 <= slow.rest_delay() <= 0.5 for _ in range(50))
    assert any(c > 1 for c, *_ in runs[0]) and any(f for *_, f in runs[0])
