"""fastopt's kernels. Installed as ``fastopt.kernels``; never imported as a top-level ``kernels``.

Subpackages: ``numba_cpu`` (parallel CPU kernels). GPU kernels (``numba_cuda``, ``cupy``) come later.
Kernels never import fastopt's API layer.
"""
