"""Deterministic simulation: the real supervisor in a simulated world, one seed a world."""

from .faults import schedule_for_seed, shrink
from .runner import Report, replay, run_seeds
from .world import Outcome, Schedule, run_schedule

__all__ = [
    "Outcome",
    "Report",
    "Schedule",
    "replay",
    "run_schedule",
    "run_seeds",
    "schedule_for_seed",
    "shrink",
]
