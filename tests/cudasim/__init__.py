"""numba-cuda kernels under numba-cuda's CUDA simulator (run with NUMBA_ENABLE_CUDASIM=1).

A package, so that its ``conftest.py`` imports as ``cudasim.conftest`` and does not shadow
``tests/conftest.py``, which the tests here import as ``conftest``.
"""
