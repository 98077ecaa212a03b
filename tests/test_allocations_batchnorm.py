"""Batch norm with ``out=`` on the numba backend allocates no array memory: no temporaries, no copies.

tracemalloc sees every NumPy allocation (data buffers are traced too). The inputs have C = 1024
channels, so the smallest array a call could need, one float64 value per channel, is 8 KiB; the
bound (4 KiB) is below it, while the small Python objects a call makes (views, tuples, keyword
dicts) pass. The kernels' per-channel and per-task scratch lives in a per-thread workspace that
grows on the first call with a new shape, so each case runs twice before it is measured.
"""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

import fastopt

C = 1024
BOUND = 4 * 1024

# (shape, channel_axis): channel-first with rows longer and shorter than a statistics block,
# channels-last, a plain (N, C) matrix, channels in the middle of five axes
SHAPES = [((4, C, 48, 48), 1), ((6, C, 7, 7), 1), ((4, 6, 6, C), -1), ((64, C), 1), ((2, 3, C, 2, 5), 2)]


def shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-axis{axis}"


def peak_allocation(fn) -> int:
    """Bytes allocated at the peak of ``fn()`` beyond what was allocated before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - before


def make(rng, shape, axis, dtype):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    params = dict(weight=rng.uniform(0.5, 1.5, c).astype(dtype), bias=rng.normal(0, 0.5, c).astype(dtype),
                  running_mean=np.zeros(c, dtype), running_var=np.ones(c, dtype))
    fwd_out = (np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype))
    bwd_out = (np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype))
    return x, dy, params, fwd_out, bwd_out


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case_shape", SHAPES, ids=shape_id)
def test_forward_and_backward_with_out_allocate_no_arrays(case_shape, dtype, training, relu, rng):
    shape, axis = case_shape
    x, dy, p, fwd_out, bwd_out = make(rng, shape, axis, dtype)

    def forward():
        fastopt.batchnorm_forward(x, p["weight"], p["bias"], p["running_mean"], p["running_var"], training=training,
                                  channel_axis=axis, relu=relu, backend="numba", out=fwd_out)

    def backward():
        fastopt.batchnorm_backward(dy, x, p["weight"], fwd_out[1], fwd_out[2], bias=p["bias"], training=training,
                                   channel_axis=axis, relu=relu, backend="numba", out=bwd_out)

    for _ in range(2):  # compile, and grow the workspace to these shapes
        forward()
        backward()
    assert peak_allocation(forward) < BOUND
    assert peak_allocation(backward) < BOUND


@pytest.mark.parametrize("channel_axis", [1, -1], ids=["nchw", "nhwc"])
def test_layer_forward_and_backward_with_out_allocate_no_arrays(channel_axis, rng):
    shape = (4, C, 8, 8) if channel_axis == 1 else (4, 8, 8, C)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    bn = fastopt.BatchNorm(C, channel_axis=channel_axis, relu=True, backend="numba")
    for _ in range(2):
        bn.forward(x, out=y)
        bn.backward(dy, out=dx)
    assert peak_allocation(lambda: bn.forward(x, out=y)) < BOUND
    assert peak_allocation(lambda: bn.backward(dy, out=dx)) < BOUND


def test_the_bound_catches_one_per_channel_temporary(rng):
    """The measurement sees the smallest array a call could allocate (so the tests above can fail)."""
    weight = rng.standard_normal(C)
    assert peak_allocation(lambda: weight * 2) >= BOUND


def test_without_out_only_the_outputs_are_allocated(rng):
    """Without ``out`` the call allocates y (x's size) and two per-channel vectors, nothing more."""
    shape, axis = (4, C, 8, 8), 1
    x, dy, p, _, _ = make(rng, shape, axis, np.float32)
    args = (x, p["weight"], p["bias"], p["running_mean"], p["running_var"])
    fastopt.batchnorm_forward(*args, channel_axis=axis, backend="numba")
    outputs = x.nbytes + 2 * C * 4
    assert peak_allocation(lambda: fastopt.batchnorm_forward(*args, channel_axis=axis, backend="numba")) \
        < outputs + BOUND


def test_threads_use_their_own_workspace(rng):
    """Calls from several Python threads at once (each with its own workspace) give the serial results."""
    cases = [make(rng, (4, C, 8, 8), 1, np.float32) for _ in range(4)]

    def run(case):
        x, dy, p, fwd_out, bwd_out = case
        for _ in range(5):
            fastopt.batchnorm_forward(x, p["weight"], p["bias"], None, None, backend="numba", out=fwd_out)
            fastopt.batchnorm_backward(dy, x, p["weight"], fwd_out[1], fwd_out[2], backend="numba", out=bwd_out)
        return [a.copy() for a in fwd_out + bwd_out]

    serial = [run(case) for case in cases]
    results = [None] * len(cases)
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, run(cases[k]))) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, serial):
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# how out= is written: large outputs go through streaming (non-temporal) stores, small ones through
# ordinary stores; both paths must write the same bits (tested here on small shapes by moving the
# size threshold)


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case_shape", [((3, 5, 7, 41), 1), ((2, 3, 333), 1), ((4, 9, 11, 13), -1),
                                        ((50, 3), 1), ((7, 40), -1)], ids=shape_id)
def test_streaming_and_ordinary_stores_write_the_same_bits(case_shape, dtype, relu, rng, monkeypatch):
    import fastopt.kernels.numba_cpu.batchnorm as kernels

    shape, axis = case_shape
    x, dy, p, _, _ = make(rng, shape, axis, dtype)
    results = {}
    for threshold in (1 << 62, 0):  # never stream, always stream
        monkeypatch.setattr(kernels, "_STREAM_BYTES", threshold)
        monkeypatch.setattr(kernels, "_STREAM_INNER", 1 if threshold == 0 else kernels._STREAM_INNER)
        got = []
        for training in (True, False):
            rm, rv = p["running_mean"].copy(), p["running_var"].copy()
            y, mean, invstd = fastopt.batchnorm_forward(x, p["weight"], p["bias"], rm, rv, training=training,
                                                        channel_axis=axis, relu=relu, backend="numba")
            got += [y, mean, invstd, *fastopt.batchnorm_backward(dy, x, p["weight"], mean, invstd, bias=p["bias"],
                                                                 training=training, channel_axis=axis, relu=relu,
                                                                 backend="numba")]
        results[threshold] = got
    for a, b in zip(results[1 << 62], results[0]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shift", [0, 1, 3, 7])
@pytest.mark.parametrize("case_shape", [((3, 5, 7, 41), 1), ((4, 9, 11, 13), -1)], ids=shape_id)
def test_streaming_stores_into_outputs_at_any_address(case_shape, shift, rng, monkeypatch):
    """Outputs that start ``shift`` elements past a 64-byte line: the lines are found from the
    address (a wrong line would fault or leave elements unwritten)."""
    import fastopt.kernels.numba_cpu.batchnorm as kernels

    shape, axis = case_shape
    x, dy, p, _, _ = make(rng, shape, axis, np.float32)
    expected = fastopt.batchnorm_forward(x, p["weight"], p["bias"], None, None, channel_axis=axis, backend="numba")
    expected_grads = fastopt.batchnorm_backward(dy, x, p["weight"], expected[1], expected[2], channel_axis=axis,
                                                backend="numba")
    monkeypatch.setattr(kernels, "_STREAM_BYTES", 0)
    monkeypatch.setattr(kernels, "_STREAM_INNER", 1)
    c = shape[axis]

    def at_shift():
        buffer = np.full(x.size + 32, np.nan, np.float32)
        start = (-buffer.ctypes.data % 64) // 4 + shift
        return buffer[start:start + x.size].reshape(shape)

    y = at_shift()
    fastopt.batchnorm_forward(x, p["weight"], p["bias"], None, None, channel_axis=axis, backend="numba",
                              out=(y, np.empty(c, np.float32), np.empty(c, np.float32)))
    dx = at_shift()
    fastopt.batchnorm_backward(dy, x, p["weight"], expected[1], expected[2], channel_axis=axis, backend="numba",
                               out=(dx, None, None))
    np.testing.assert_array_equal(y, expected[0])
    np.testing.assert_array_equal(dx, expected_grads[0])
