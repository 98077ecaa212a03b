"""``cuda.shfl_down_sync`` and ``cuda.shfl_xor_sync`` for numba-cuda's CUDA simulator, which does
not provide them.

Imported by the package only when ``NUMBA_ENABLE_CUDASIM=1``; it adds the methods to the
simulator's fake ``cuda`` module class unless the simulator already has them. The simulator runs
each CUDA thread as a Python thread and has no notion of warps, so a warp is emulated with a
``threading.Barrier`` of its threads: every lane posts its value, waits for the warp, reads lane
``lane + delta`` (down) or ``lane ^ lane_mask`` (xor), its own value when that lane is past the
warp's end, as the hardware does, and waits again before the slot can be reused. This is correct when every thread of a warp calls it
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


def _exchange(value, source_of):
    """The value lane ``source_of(me)`` posted (this thread's own when that lane does not exist)."""
    thread = threading.current_thread()
    slots, barrier = _warp_state(thread)
    me = thread.thread_id
    slots[me] = value
    barrier.wait()
    result = slots.get(source_of(me), value)
    barrier.wait()
    return result


def _shfl_down_sync(self, mask, value, delta):
    return _exchange(value, lambda me: me + delta if me % 32 + delta < 32 else me)


def _shfl_xor_sync(self, mask, value, lane_mask):
    return _exchange(value, lambda me: me - me % 32 + ((me % 32) ^ (lane_mask & 31)))


def install() -> None:
    if not hasattr(FakeCUDAModule, "shfl_down_sync"):
        FakeCUDAModule.shfl_down_sync = _shfl_down_sync
    if not hasattr(FakeCUDAModule, "shfl_xor_sync"):
        FakeCUDAModule.shfl_xor_sync = _shfl_xor_sync
