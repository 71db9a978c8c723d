"""Metrics internals: a batch of observations exposes exactly what one-by-one would."""

from __future__ import annotations

import gc
import sys

from hypothesis import given
from hypothesis import strategies as st

from stream_supervisor.metrics import Metrics
from stream_supervisor.service import tune_interpreter

_AMOUNTS = st.lists(st.floats(min_value=0.0, max_value=30.0, allow_nan=False), max_size=60)


def _samples(metrics: Metrics, name: str) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    return sorted(
        (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
        for metric in metrics.registry.collect() if metric.name == name
        for s in metric.samples if not s.name.endswith("_created"))


@given(_AMOUNTS, _AMOUNTS)
def test_observe_many_exposes_what_observing_one_by_one_does(first: list[float],
                                                             second: list[float]) -> None:
    one, many = Metrics(), Metrics()
    for amount in [*first, *second]:
        one.frame_to_commit_seconds.observe(amount)
    many.frame_to_commit_seconds.observe_many(first)
    many.frame_to_commit_seconds.observe_many(second)
    name = "stream_supervisor_frame_to_commit_seconds"
    assert _samples(many, name) == _samples(one, name)


def test_a_bucket_bound_counts_in_its_own_bucket_as_observe_does() -> None:
    one, many = Metrics(), Metrics()
    bounds = [0.001, 0.0025, 0.005, 10.0, 11.0]
    for amount in bounds:
        one.frame_to_commit_seconds.observe(amount)
    many.frame_to_commit_seconds.observe_many(bounds)
    name = "stream_supervisor_frame_to_commit_seconds"
    assert _samples(many, name) == _samples(one, name)


def test_a_supervisor_process_freezes_its_start_up_heap_out_of_the_collector() -> None:
    gc.unfreeze()
    interval = sys.getswitchinterval()
    try:
        tune_interpreter()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        sys.setswitchinterval(interval)
