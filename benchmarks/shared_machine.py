"""What the CPU benchmarks do so that a shared machine slows every compared implementation alike."""

import os
import sys


def passive_omp_wait() -> str:
    """Re-run this script with OMP_WAIT_POLICY=PASSIVE unless the variable is set; returns its value.

    By default OpenMP threads spin at the end of every parallel op waiting for the others. When
    other processes hold the cores, a spinning thread takes CPU from the one it waits for, and an
    implementation made of many small parallel ops (the tiled HSTU attention) loses far more
    than one large fused call (SDPA) or a few large ops. Passive waiting (sleep) removes that
    effect; set OMP_WAIT_POLICY=ACTIVE to measure the default behaviour instead.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return os.environ["OMP_WAIT_POLICY"]
