"""`python -m stream_supervisor.sim`: many seeded worlds, or one replayed and explained."""

import sys

from .runner import main

sys.exit(main())
