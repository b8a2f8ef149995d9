"""Time limits that hold on a loaded machine: a limit is what a step may take on an idle one,
stretched by how loaded the machine is when the limit is set.

The suite runs beside other work (CI neighbours, a build, two busy CPU hogs): a rank that takes
20 s on an idle 2-core machine took over 60 s there. A limit that does not stretch fails such a
run for no fault of the code; one that stretches still catches a hang, only later.
"""

from __future__ import annotations

import os

# Set to a number (e.g. 3) to stretch every limit by that much instead of measuring the load.
SLOWDOWN_ENV = "CLUSTER_PIPELINE_TEST_SLOWDOWN"


def slowdown() -> float:
    """How many times longer than on an idle machine work takes now: $CLUSTER_PIPELINE_TEST_
    SLOWDOWN when set, else the 1-minute load average per core (the suite's own 2 ranks on 2
    cores count as 1), at least 1. Read when a limit is set, so it follows the load."""
    if os.environ.get(SLOWDOWN_ENV):
        return max(1.0, float(os.environ[SLOWDOWN_ENV]))
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def limit(seconds: float) -> float:
    """A limit of `seconds` on an idle machine, at the current load."""
    return seconds * slowdown()
