"""The warp shuffles the package adds to the simulator (``kernels/numba_cuda/_simulator.py``) read
the lanes the hardware's would: ``shfl_down_sync`` lane + delta (its own value past the warp's
end), ``shfl_xor_sync`` lane ^ mask, within each warp of 32 threads."""

from __future__ import annotations

import numpy as np
from numba import cuda

import fastopt.kernels.numba_cuda  # noqa: F401  (installs the shuffles)

THREADS = 64
OFFSETS = (1, 2, 4, 8, 16)


@cuda.jit
def _shuffles(values, down, xor):
    i = cuda.threadIdx.x
    for k in range(len(OFFSETS)):
        down[k, i] = cuda.shfl_down_sync(0xFFFFFFFF, values[i], OFFSETS[k])
        xor[k, i] = cuda.shfl_xor_sync(0xFFFFFFFF, values[i], OFFSETS[k])


def test_each_lane_reads_the_lane_the_hardware_would():
    values = np.arange(THREADS, dtype=np.int32) * 7 + 3
    down = np.zeros((len(OFFSETS), THREADS), np.int32)
    xor = np.zeros_like(down)
    _shuffles[1, THREADS](values, down, xor)
    lanes = np.arange(THREADS)
    for k, offset in enumerate(OFFSETS):
        source = np.where(lanes % 32 + offset < 32, lanes + offset, lanes)
        np.testing.assert_array_equal(down[k], values[source], err_msg=f"down {offset}")
        np.testing.assert_array_equal(xor[k], values[lanes ^ offset], err_msg=f"xor {offset}")
