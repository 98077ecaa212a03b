"""The simulator suite runs only in a process started with NUMBA_ENABLE_CUDASIM=1.

numba reads the variable once, at import, so it cannot be switched on from inside a test run that
has already imported numba.cuda. ``tests/test_numba_cuda_sim.py`` runs this directory in a
subprocess with the variable set; a plain ``pytest tests`` skips every test here (with this reason)
instead of running the kernels against a real GPU or failing without one.
"""

from __future__ import annotations

import os
import sys

import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

if SIMULATOR:
    # The simulator runs each CUDA thread as a Python thread while the launching thread polls them
    # in a loop that holds the GIL; with the default 5 ms switch interval every step of a thread
    # towards a syncthreads waits out a slice of that polling. 0.2 ms makes the suite ~4x faster.
    sys.setswitchinterval(2e-4)

try:  # without numba-cuda the test modules cannot even be imported; tests/test_numba_cuda_sim.py skips
    import numba.cuda  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_*.py"]

REASON = ("the CUDA-simulator suite needs NUMBA_ENABLE_CUDASIM=1 at interpreter start; "
          "tests/test_numba_cuda_sim.py runs it in a subprocess")


def pytest_runtest_setup(item):
    if not SIMULATOR:
        pytest.skip(REASON)
