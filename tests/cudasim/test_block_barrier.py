"""The suite's event-driven ``syncthreads`` (``block_barrier.py``) keeps the simulator's meaning."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda
from numba.cuda.simulator import kernel as simulator

from . import block_barrier

THREADS = 64


def test_the_suite_runs_on_the_event_driven_barrier():
    assert simulator.BlockManager.run is block_barrier._run_block
    assert simulator.BlockThread.syncthreads is block_barrier._syncthreads


@cuda.jit
def _rotate(out, rounds):
    """Each round every thread takes its right neighbour's value: correct only with a real barrier."""
    shared = cuda.shared.array(THREADS, np.int64)
    i = cuda.threadIdx.x
    value = i + 1000 * cuda.blockIdx.x
    for _ in range(rounds):
        shared[i] = value
        cuda.syncthreads()
        value = shared[(i + 1) % THREADS]
        cuda.syncthreads()
    out[cuda.blockIdx.x, i] = value


def test_every_thread_waits_for_the_block_at_each_syncthreads():
    out = np.zeros((3, THREADS), np.int64)
    _rotate[3, THREADS](out, 5)
    expected = (np.arange(THREADS) + 5) % THREADS + 1000 * np.arange(3)[:, None]
    np.testing.assert_array_equal(out, expected)


@cuda.jit
def _early_return(out):
    """The upper half returns at once; the lower half still meets at the barrier twice."""
    shared = cuda.shared.array(THREADS, np.int64)
    i = cuda.threadIdx.x
    if i >= THREADS // 2:
        return
    shared[i] = i
    cuda.syncthreads()
    value = shared[THREADS // 2 - 1 - i]
    cuda.syncthreads()
    out[i] = value + cuda.syncthreads_count(i % 4 == 0)


def test_threads_that_return_no_longer_count_at_the_barrier():
    out = np.full(THREADS, -1, np.int64)
    _early_return[1, THREADS](out)
    half = THREADS // 2
    np.testing.assert_array_equal(out[:half], half - 1 - np.arange(half) + half // 4)
    np.testing.assert_array_equal(out[half:], -1)


@cuda.jit
def _one_thread_fails(out):
    i = cuda.threadIdx.x
    if i == 7:
        out[THREADS + 5] = 1.0  # out of bounds: raises in the simulator
    cuda.syncthreads()
    out[i] = 2.0


def test_a_failing_thread_aborts_the_block_and_the_launch_raises_its_error():
    out = np.zeros(THREADS, np.float64)
    with pytest.raises(IndexError, match=r"tid=\[7, 0, 0\]"):
        _one_thread_fails[1, THREADS](out)
