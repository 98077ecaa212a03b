"""``cuda.shfl_down_sync`` for numba-cuda's CUDA simulator, which does not provide it.

Imported by the package only when ``NUMBA_ENABLE_CUDASIM=1``; it adds the method to the
simulator's fake ``cuda`` module class unless the simulator already has one. The simulator runs
each CUDA thread as a Python thread and has no notion of warps, so a warp is emulated with a
``threading.Barrier`` of its threads: every lane posts its value, waits for the warp, reads lane
``lane + delta`` (its own value when that lane is past the warp's end, as the hardware does), and
waits again before the slot can be reused. This is correct when every thread of a warp calls it
the same number of times with the full mask, which is how this package's kernels use it (all
threads of a block take part in every reduction, idle ones with neutral values).
"""

from __future__ import annotations

import threading

import numpy as np
from numba.cuda.simulator.kernelapi import FakeCUDAModule

__all__ = ["install"]

_lock = threading.Lock()


def _warp_state(thread):
    """(slots, barrier) of the thread's warp, created by the first lane to arrive."""
    manager = thread._manager
    warp = thread.thread_id // 32
    with _lock:
        warps = manager.__dict__.setdefault("_fastopt_warps", {})
        state = warps.get(warp)
        if state is None:
            threads = int(np.prod(manager._block_dim))
            lanes = min(32, threads - 32 * warp)
            state = warps[warp] = ({}, threading.Barrier(lanes))
    return state


def _shfl_down_sync(self, mask, value, delta):
    thread = threading.current_thread()
    slots, barrier = _warp_state(thread)
    me = thread.thread_id
    slots[me] = value
    barrier.wait()
    source = me + delta if me % 32 + delta < 32 else me
    result = slots.get(source, value)
    barrier.wait()
    return result


def install() -> None:
    if not hasattr(FakeCUDAModule, "shfl_down_sync"):
        FakeCUDAModule.shfl_down_sync = _shfl_down_sync
