"""``step()`` on the numba backend allocates no array memory: no temporaries, no copies.

tracemalloc sees every NumPy allocation; the bound (64 KiB) is far below one array of the test
(4 MiB), so a single temporary the size of a parameter fails the test, while the small Python
objects a step makes (lists, dicts of keywords) pass.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import fastopt

SIZE = 2**20  # 4 MiB per float32 array
BOUND = 64 * 1024

CONFIGS = [
    ("Adam", dict(lr=1e-3), {}),
    ("AdamW", dict(lr=1e-3), dict(clip_grad_norm=1.0, polyak=0.999, nonfinite="skip")),
    ("SGD", dict(lr=0.1, momentum=0.9), dict(clip_grad_value=0.5, polyak="mean")),
    ("RMSProp", dict(lr=0.01, centered=True), dict(nonfinite="raise")),
]


@pytest.mark.parametrize("name, hyper, options", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_step_allocates_no_arrays(name, hyper, options, rng):
    params = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(3)]
    grads = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(3)]
    opt = getattr(fastopt, name)([{"params": params[:1]}, {"params": params[1:]}], **hyper,
                                 backend="numba", **options)
    opt.step(grads)  # the first step allocates the state and compiles
    opt.step(grads, grad_scale=2.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        opt.step(grads)
        opt.step(grads, grad_scale=4.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - before < BOUND, f"step() allocated {peak - before} bytes at its peak"


def test_the_bound_catches_one_temporary(rng):
    """The measurement sees a parameter-sized temporary (so the test above can fail)."""
    a = rng.standard_normal(SIZE).astype(np.float32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _ = a * 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - before >= BOUND
