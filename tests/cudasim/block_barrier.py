"""An event-driven ``syncthreads`` for numba-cuda's CUDA simulator (test harness only).

The simulator runs each CUDA thread of a block as a Python thread. Its ``BlockManager.run`` finds
out that every live thread has reached ``syncthreads()`` by polling: it loops over the threads
holding the GIL, reading flags and calling ``is_alive()``. Profiled on this suite, that loop was
about 70% of a kernel launch's time. ``install()`` replaces it with a counting barrier on a
condition variable, with the simulator's meaning unchanged:

- a ``syncthreads()`` releases once every thread of the block that has not yet returned waits in
  one (a thread that returns early no longer counts, as in the polling loop);
- a thread that raises aborts the block: threads waiting in, or later reaching, a
  ``syncthreads()`` raise too, the warp barriers of ``kernels/numba_cuda/_simulator.py`` are
  broken, and the launch re-raises the first exception with its traceback.

The kernels and the simulator's per-thread API (``threadIdx``, ``syncthreads_count``, the fake
``cuda`` module) are numba's own; only the block's scheduling is replaced.
``tests/cudasim/test_block_barrier.py`` checks the semantics the kernels rely on.
"""

from __future__ import annotations

import threading

import numpy as np
from numba.cuda.simulator import kernel as simulator

__all__ = ["install"]


class _BlockBarrier:
    """The barrier of one block launch, counting the threads still running."""

    def __init__(self, threads: int):
        self.cond = threading.Condition()
        self.live = threads
        self.waiting = 0
        self.generation = 0
        self.failure = None  # (exception, traceback) of the first thread that raised

    def wait(self) -> None:
        with self.cond:
            if self.failure is not None:
                raise RuntimeError("abort flag set on syncthreads call")
            self.waiting += 1
            if self.waiting == self.live:
                self._release()
                return
            generation = self.generation
            while generation == self.generation and self.failure is None:
                self.cond.wait()
            if generation == self.generation:
                raise RuntimeError("abort flag set on syncthreads clear")

    def leave(self, failure, manager) -> None:
        """A thread returned; ``failure`` is its (exception, traceback) or None."""
        with self.cond:
            self.live -= 1
            if failure is not None and self.failure is None:
                self.failure = failure
                self.cond.notify_all()
                for _slots, warp in getattr(manager, "_fastopt_warps", {}).values():
                    warp.abort()
            elif self.waiting and self.waiting == self.live:
                self._release()

    def _release(self) -> None:
        self.waiting = 0
        self.generation += 1
        self.cond.notify_all()


def _syncthreads(self) -> None:
    self._manager._block_barrier.wait()


_thread_run = simulator.BlockThread.run


def _run_thread(self) -> None:
    try:
        _thread_run(self)  # numba's: runs the kernel, keeps an exception in self.exception
    finally:
        self._manager._block_barrier.leave(self.exception, self._manager)


def _run_block(self, grid_point, *args) -> None:
    def target():
        self._f(*args)

    threads = [simulator.BlockThread(target, self, grid_point, point, self._debug)
               for point in np.ndindex(*self._block_dim)]
    barrier = self._block_barrier = _BlockBarrier(len(threads))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if barrier.failure is not None:
        error, traceback = barrier.failure
        raise error.with_traceback(traceback)


def install() -> None:
    simulator.BlockThread.syncthreads = _syncthreads
    simulator.BlockThread.run = _run_thread
    simulator.BlockManager.run = _run_block
