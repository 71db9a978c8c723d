"""Prometheus metrics of one supervisor, in a registry of its own (no global state).

The actors update these; `/metrics` exposes them through prometheus_client's own text
exposition, and tests read them back by name.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BatchHistogram(Histogram):
    """A histogram that also takes a whole batch of observations at once.

    `observe` costs a lock and a bucket scan per value; the writer observes every
    update of a committed batch (up to `max_batch`), which made the histogram 0.7-0.8 us
    of the writer's Python per update, against 0.1 us batched (BENCHMARKS.md). Here the
    bucket counts are tallied in plain Python first and each touched bucket, and the
    sum, is incremented once. The exposition is the same as `observe`'s, value for value
    (tests/test_metrics.py)."""

    def observe_many(self, amounts: Iterable[float]) -> None:
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]
        bounds = self._upper_bounds  # ascending, the last one +Inf
        counts = [0] * len(bounds)
        total = 0.0
        for amount in amounts:
            total += amount
            # The first bucket whose bound is >= amount: where `observe` counts it.
            counts[bisect_left(bounds, amount)] += 1
        if total:
            self._sum.inc(total)
        for bucket, count in zip(self._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "stream_supervisor_"
        self.events_received = Counter(
            p + "events_received", "Trade updates received, by event type and source",
            ["event", "source"], registry=r)
        self.duplicates_dropped = Counter(
            p + "duplicates_dropped", "Duplicate updates dropped, by layer "
            "(lru, inflight, database, order)", ["layer"], registry=r)
        self.duplicates_undecoded = Counter(
            p + "duplicates_undecoded", "Duplicate frames dropped by their bytes, without "
            "being decoded (also counted in duplicates_dropped, under lru or inflight)",
            registry=r)
        self.batches = Counter(p + "batches", "Batches committed", registry=r)
        self.batch_retries = Counter(p + "batch_retries", "Batch commits retried", registry=r)
        self.batch_size = Histogram(
            p + "batch_size", "Items per committed batch",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r)
        self.commit_seconds = Histogram(
            p + "commit_seconds", "Time to commit one batch", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.frame_to_commit_seconds = BatchHistogram(
            p + "frame_to_commit_seconds", "Time from frame receipt to its batch's commit",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.fills_applied = Counter(p + "fills_applied", "Fills applied to positions",
                                     registry=r)
        self.reconnects = Counter(p + "reconnects", "Stream reconnects, by reason", ["reason"],
                                  registry=r)
        self.backfill_fills = Counter(p + "backfill_fills",
                                      "FILL activities fetched by REST backfill", registry=r)
        self.dead_letters = Counter(p + "dead_letters", "Frames dead-lettered", registry=r)
        self.updates_refused = Counter(
            p + "updates_refused", "Updates the database refused, dead-lettered by the writer "
            "(also counted in dead_letters)", registry=r)
        self.position_drift = Counter(
            p + "position_drift", "Fills after which our net position differed from the "
            "broker's position_qty", registry=r)
        self.channel_fill = Gauge(p + "channel_fill", "Items queued in a channel", ["channel"],
                                  registry=r)
        self.leader = Gauge(p + "leader", "1 while this process holds the account's writer lock",
                            registry=r)
        self.drifted_symbols = Gauge(
            p + "drifted_symbols", "Symbols whose open position differed from the broker's "
            "GET /v2/positions at the last scheduled reconcile", registry=r)
        self.pipeline_restarts = Counter(p + "pipeline_restarts", "Pipeline restarts after a "
                                         "crash", registry=r)

        # The REST budget (docs/design.md, section 12).
        self.rest_requests = Counter(p + "rest_requests", "REST requests sent, by endpoint",
                                     ["endpoint"], registry=r)
        self.rest_rate_limited = Counter(p + "rest_rate_limited",
                                         "REST answers that were 429", registry=r)
        self.rest_budget_remaining = Gauge(
            p + "rest_budget_remaining", "The account's REST requests left in the broker's "
            "window, by the latest answer", registry=r)
        self.rest_budget_per_window = Gauge(
            p + "rest_budget_per_window", "REST requests per 60 s window the service allows "
            "itself (its share of the limit, less a margin)", registry=r)
        self.rest_budget_wait_seconds = Counter(
            p + "rest_budget_wait_seconds", "Seconds REST requests waited for the budget",
            registry=r)
        self.recovery_behind = Gauge(
            p + "recovery_behind", "1 while recovery cannot keep up within the REST "
            "budget: the live buffer would overflow before REST reaches the stream",
            registry=r)
        self.recovery_fill_rate = Gauge(
            p + "recovery_fill_rate", "Fills a second the account made during the latest "
            "backfill's range, by the broker's activity times", registry=r)

    def value(self, name: str, **labels: str) -> float:
        """Read samples back (tests, summaries), summed over the labels not given.
        Counters are read by their `_total` name."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                                for k, v in labels.items()):
                    total += float(sample.value)
        return total
