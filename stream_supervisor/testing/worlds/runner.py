"""Run many seeded schedules (in parallel processes), report failures with the command
that replays each, and shrink a failing schedule to its fewest faults."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ...logs import configure_logging
from .faults import describe, schedule_for_seed, shrink
from .world import Outcome, Schedule, run_schedule

REPLAY = "python -m stream_supervisor.testing.worlds --seed {seed}"


@dataclass
class Report:
    seeds: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)  # (seed, first problem)
    families: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    virtual_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [
            (f"simulated {self.seeds} seeded schedules in {self.seconds:.1f}s "
             f"({self.virtual_seconds:.0f} virtual seconds): {len(self.failures)} failed")
        ]
        lines.append("fault families covered: " + ", ".join(
            f"{name}={n}" for name, n in sorted(self.families.items())))
        for seed, problem in self.failures[:20]:
            lines.append(f"FAILED seed {seed}: {problem}\n  replay: {REPLAY.format(seed=seed)}")
        return "\n".join(lines)


def _quiet() -> None:
    configure_logging(fmt="json", level="critical")


def _one(seed: int) -> tuple[int, bool, str, dict[str, int], float]:
    schedule = schedule_for_seed(seed)
    try:
        outcome = run_schedule(schedule)
    except Exception as exc:  # noqa: BLE001 - a crashed world is a failure to report
        return seed, False, f"world raised {type(exc).__name__}: {exc}", schedule.faults(), 0.0
    return seed, outcome.ok, _problem(outcome), schedule.faults(), outcome.virtual_seconds


def _problem(outcome: Outcome) -> str:
    if outcome.mismatches:
        return f"{len(outcome.mismatches)} invariant violations, first: {outcome.mismatches[0]}"
    if not outcome.finished:
        return "market never finished (liveness)"
    return "ok"


def run_seeds(seeds: Iterable[int], *, jobs: int = 1) -> Report:
    report = Report()
    started = time.perf_counter()
    seeds = list(seeds)
    if jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs, initializer=_quiet) as pool:
            results = pool.imap_unordered(_one, seeds, chunksize=32)
            _collect(report, results)
    else:
        _quiet()
        _collect(report, map(_one, seeds))
    report.seconds = time.perf_counter() - started
    report.failures.sort()
    return report


def _collect(report: Report, results: Iterable[tuple[int, bool, str, dict[str, int], float]]) -> None:
    for seed, ok, problem, faults, virtual in results:
        report.seeds += 1
        report.virtual_seconds += virtual
        for family in faults:
            report.families[family] += 1
        if not ok:
            report.failures.append((seed, problem))


def replay(seed: int, *, shrink_it: bool = False) -> Outcome:
    """Run one seed (twice, to show the replay is exact) and print what happened."""
    _quiet()
    schedule = schedule_for_seed(seed)
    first = run_schedule(schedule)
    second = run_schedule(schedule)
    print(describe(schedule))
    print(f"finished={first.finished} lives={first.lives} commits={first.commits} "
          f"virtual={first.virtual_seconds:.2f}s digest={first.digest}")
    print("trace: " + " ".join(first.trace))
    print("replayed identically" if first.digest == second.digest and first.trace == second.trace
          else f"NOT DETERMINISTIC: {first.digest} vs {second.digest}")
    for m in first.mismatches:
        print(f"  {m}")
    if shrink_it and not first.ok:
        smallest = shrink(schedule, lambda s: not run_schedule(s).ok)
        print("shrunk to: " + describe(smallest))
    return first


def default_jobs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m stream_supervisor.testing.worlds",
        description="Run the real supervisor against simulated brokers, stores and faults "
                    "in virtual time, one world per seed.")
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds (default 1000)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seed", type=int, help="replay this one seed (twice) and explain it")
    parser.add_argument("--shrink", action="store_true",
                        help="with --seed: shrink a failing schedule to its fewest faults")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="worker processes (default: the CPUs available)")
    args = parser.parse_args(argv)
    if args.seed is not None:
        return 0 if replay(args.seed, shrink_it=args.shrink).ok else 1
    report = run_seeds(range(args.start, args.start + args.seeds), jobs=args.jobs)
    print(report.summary())
    return 0 if report.ok else 1


__all__ = ["Report", "Schedule", "main", "replay", "run_seeds"]

if __name__ == "__main__":
    sys.exit(main())
