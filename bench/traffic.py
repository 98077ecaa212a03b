"""Bytes each fused update moves, and the in-place bandwidth they are measured against.

An optimizer step over n elements reads the parameter, the gradient and its k state arrays and
writes the parameter and the state back:

    bytes per element = (2 + k) reads + (1 + k) writes = (3 + 2k) × itemsize

| configuration | k (state arrays) | float32 B/elem | float64 B/elem |
|---|---|---|---|
| SGD (no momentum) | 0 | 12 | 24 |
| SGD momentum / Nesterov, AdaGrad, RMSProp | 1 | 20 | 40 |
| RMSProp centered or with momentum, AdaDelta, Adam/AdamW, delta-bar-delta | 2 | 28 | 56 |
| RMSProp centered with momentum, Adam/AdamW with amsgrad | 3 | 36 | 72 |

The reference bandwidth is an in-place scale ``a[i] = s·a[i]`` (read and write every element: 2 ×
itemsize per element) run by a parallel numba loop, measured in the same process as the kernels.
It has the same read-modify-write access pattern as an optimizer step, so "% of in-place
bandwidth" says how close a step comes to the memory system's limit for that pattern.
"""

from __future__ import annotations

import time

import numba
import numpy as np

from fastopt import functional


def state_arrays(name: str, hyper: dict) -> tuple[str, ...]:
    spec = functional.SPECS[name]
    return spec.uses(spec.check(**hyper))


def bytes_per_element(name: str, hyper: dict, itemsize: int) -> int:
    return (3 + 2 * len(state_arrays(name, hyper))) * itemsize


@numba.njit(parallel=True, cache=True)
def _scale_in_place(a, s):
    for i in numba.prange(a.size):
        a[i] = a[i] * s


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def in_place_bandwidth(n: int, dtype, repeats: int) -> float:
    """GB/s of ``a[i] = s·a[i]`` over n elements of dtype (2 × itemsize bytes per element)."""
    a = np.ones(n, dtype)
    s = np.dtype(dtype).type(1.0)
    seconds = median_seconds(lambda: _scale_in_place(a, s), repeats)
    return 2 * a.nbytes / seconds / 1e9
