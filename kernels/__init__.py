"""fastopt's kernels. Installed as ``fastopt.kernels``; never imported as a top-level ``kernels``.

Subpackages: ``numba_cpu`` (parallel CPU kernels), ``numba_cuda`` and ``cupy`` (GPU kernels);
``_streams`` holds the stream rule both GPU backends follow.
Kernels never import fastopt's API layer.
"""
