"""`python -m stream_supervisor.testing.worlds`: many seeded worlds, or one replayed and
explained."""

import sys

from .runner import main

sys.exit(main())
