"""The simulator suite runs only in a process started with NUMBA_ENABLE_CUDASIM=1.

numba reads the variable once, at import, so it cannot be switched on from inside a test run that
has already imported numba.cuda. ``tests/test_numba_cuda_sim.py`` runs each file of this directory
in a subprocess with the variable set. A plain ``pytest tests`` does not collect the files here at
all (rather than reporting hundreds of skips that would hide a real one, or running the kernels
against a real GPU): their results arrive through ``test_numba_cuda_sim.py``.
"""

from __future__ import annotations

import os
import sys

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

if SIMULATOR:
    # The simulator runs each CUDA thread as a Python thread while the launching thread polls them
    # in a loop that holds the GIL; with the default 5 ms switch interval every step of a thread
    # towards a syncthreads waits out a slice of that polling. 0.2 ms makes the suite ~4x faster.
    sys.setswitchinterval(2e-4)
else:
    collect_ignore_glob = ["test_*.py"]
