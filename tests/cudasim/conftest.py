"""The simulator suite runs only in a process started with NUMBA_ENABLE_CUDASIM=1.

numba reads the variable once, at import, so it cannot be switched on from inside a test run that
has already imported numba.cuda. ``tests/test_numba_cuda_sim.py`` runs each file of this directory
in a subprocess with the variable set. A plain ``pytest tests`` does not collect the files here at
all (rather than reporting hundreds of skips that would hide a real one, or running the kernels
against a real GPU): their results arrive through ``test_numba_cuda_sim.py``.
"""

from __future__ import annotations

import os

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

if SIMULATOR:
    # The simulator runs each CUDA thread as a Python thread; numba's own scheduler polls them for
    # syncthreads in a loop that holds the GIL. block_barrier replaces the polling with a condition
    # variable: the suite runs ~2x faster (tests/cudasim/block_barrier.py).
    from .block_barrier import install as _install_block_barrier

    _install_block_barrier()
else:
    collect_ignore_glob = ["test_*.py"]
