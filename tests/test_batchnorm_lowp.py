"""Batch norm of bfloat16 and float16 x and dy (``docs/algorithms.md``, "16-bit inputs").

The ``"numba"`` backend against the reference (``"numpy"``: decode with astype(float32), the
float32 reference, round to nearest even). y and dx must be within one code of the reference
(distance of the uint16 patterns, read as ordered integers), except where the value is so close
to 0 that the float32 error of the pre-rounding value (a few float32 ulps of the terms, bounded by
``F32_TOL`` × the magnitude of the terms) spans more codes than one; there the absolute error must
be within that bound. The float32 outputs (statistics, running statistics, dweight, dbias) are
compared with a float32 tolerance. A stricter check: the numba result is bit for bit the rounding
of the numba float32 kernels run on the decoded inputs (the module only decodes and encodes).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fastopt
from fastopt.batchnorm import BatchNorm
from fastopt.kernels.numba_cpu import bn_lowp

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
FORMATS = [BF16, F16]
FORMAT_IDS = ["bf16", "f16"]
F32_TOL = 1e-5

# (shape, channel_axis): tiny, channel-first, channels-last, and one above the serial threshold
SHAPES = [((2, 3), 1), ((6, 5, 7, 3), 1), ((6, 7, 3, 5), -1), ((8, 16, 24, 24), 1)]


def shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-axis{axis}"


@pytest.fixture
def rng():
    return np.random.default_rng()


def ordered(a: np.ndarray) -> np.ndarray:
    """16-bit patterns as integers in the order of the values they encode (±0 both 0)."""
    u = a.view(np.uint16).astype(np.int64)
    return np.where(u & 0x8000, -(u & 0x7FFF), u)


def assert_codes(what, got, ref, magnitude):
    """Within one code of ``ref``, or within the float32 bound F32_TOL·magnitude near 0."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    distance = np.abs(ordered(got) - ordered(ref))
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    ok = (distance <= 1) | (err <= F32_TOL * magnitude)
    assert ok.all(), (f"{what}: {np.count_nonzero(~ok)} elements off by more than one code, e.g. "
                      f"{got[~ok][:3]} against {ref[~ok][:3]}")


def assert_f32(what, got, ref, magnitude=1.0):
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
    np.testing.assert_allclose(got, ref, rtol=F32_TOL, atol=F32_TOL * np.max(magnitude), err_msg=what)


def broadcast(v, shape, axis):
    s = [1] * len(shape)
    s[axis] = shape[axis]
    return v.reshape(s)


def make(rng, shape, axis, fmt):
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32).astype(fmt)
    dy = rng.standard_normal(shape).astype(np.float32).astype(fmt)
    weight = (rng.standard_normal(c) + 1).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    running_mean = rng.standard_normal(c).astype(np.float32)
    running_var = (rng.random(c) + 0.5).astype(np.float32)
    return x, dy, weight, bias, running_mean, running_var


def forward(backend, x, weight, bias, rm, rv, *, training, relu, axis, fmt_out=None):
    """Forward into NaN-poisoned outputs; returns (y, saved_mean, saved_invstd, rm, rv)."""
    rm, rv = rm.copy(), rv.copy()
    y = np.full(x.shape, np.nan, np.float32).astype(fmt_out or x.dtype)
    sm = np.full(x.shape[axis], np.nan, np.float32)
    si = np.full(x.shape[axis], np.nan, np.float32)
    fastopt.batchnorm_forward(x, weight, bias, rm, rv, training=training, relu=relu, channel_axis=axis,
                              backend=backend, out=(y, sm, si))
    return y, sm, si, rm, rv


def _grid():
    """Every format, mode and ReLU on the small shapes; on the shape above the serial threshold
    (the parallel conversion kernels) one combination per format, which between them cover both
    modes and both ReLU settings."""
    small = [pytest.param(case, fmt, training, relu, id=f"{shape_id(case)}-{fid}-{'train' if training else 'eval'}-"
                          f"{'relu' if relu else 'linear'}")
             for case in SHAPES[:-1] for fmt, fid in zip(FORMATS, FORMAT_IDS)
             for training in (True, False) for relu in (False, True)]
    large = [pytest.param(SHAPES[-1], fmt, training, relu, id=f"{shape_id(SHAPES[-1])}-{fid}-{name}")
             for (fmt, fid), (training, relu, name) in zip(zip(FORMATS, FORMAT_IDS),
                                                           [(True, False, "train-linear"), (False, True, "eval-relu")])]
    return small + large


@pytest.mark.parametrize("case, fmt, training, relu", _grid())
def test_forward_matches_reference(case, fmt, training, relu, rng):
    shape, axis = case
    x, _, weight, bias, rm, rv = make(rng, shape, axis, fmt)
    got = forward("numba", x, weight, bias, rm, rv, training=training, relu=relu, axis=axis)
    ref = forward("numpy", x, weight, bias, rm, rv, training=training, relu=relu, axis=axis)
    for key, g, r in zip(["saved_mean", "saved_invstd", "running_mean", "running_var"], got[1:], ref[1:]):
        assert_f32(key, g, r, np.abs(r))
    x32 = x.astype(np.float64)
    mean, invstd = (broadcast(v.astype(np.float64), shape, axis) for v in ref[1:3])
    magnitude = np.abs(broadcast(weight, shape, axis)) * (np.abs(x32) + np.abs(mean)) * invstd \
        + np.abs(broadcast(bias, shape, axis))
    assert_codes("y", got[0], ref[0], magnitude)
    if not training:  # eval leaves the running statistics alone
        assert np.array_equal(got[3], rm) and np.array_equal(got[4], rv)


@pytest.mark.parametrize("case, fmt, training, relu", _grid())
def test_backward_matches_reference(case, fmt, training, relu, rng):
    shape, axis = case
    x, dy, weight, bias, rm, rv = make(rng, shape, axis, fmt)
    _, sm, si, _, _ = forward("numpy", x, weight, bias, rm, rv, training=training, relu=relu, axis=axis)
    results = {}
    for backend in ("numba", "numpy"):
        dx = np.full(shape, np.nan, np.float32).astype(fmt)
        dw = np.full(shape[axis], np.nan, np.float32)
        db = np.full(shape[axis], np.nan, np.float32)
        fastopt.batchnorm_backward(dy, x, weight, sm, si, bias=bias, training=training, relu=relu,
                                   channel_axis=axis, backend=backend, out=(dx, dw, db))
        results[backend] = (dx, dw, db)
    (dx, dw, db), (rdx, rdw, rdb) = results["numba"], results["numpy"]
    axes = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    g = np.abs(dy.astype(np.float64))
    x_hat = np.abs((x.astype(np.float64) - broadcast(sm, shape, axis)) * broadcast(si, shape, axis))
    assert_f32("dbias", db, rdb, g.sum(axis=axes))
    assert_f32("dweight", dw, rdw, (g * x_hat).sum(axis=axes))
    m = x.size // shape[axis]
    gain = np.abs(broadcast(weight * si, shape, axis).astype(np.float64))
    sums = broadcast(g.sum(axis=axes), shape, axis) + x_hat * broadcast((g * x_hat).sum(axis=axes), shape, axis)
    terms = g + sums / m
    assert_codes("dx", dx, rdx, gain * terms)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("case", SHAPES[1:3], ids=shape_id)
def test_numba_is_the_rounding_of_the_float32_kernels(case, fmt, rng):
    """bit for bit: decode, the float32 kernels, encode."""
    shape, axis = case
    x, dy, weight, bias, rm, rv = make(rng, shape, axis, fmt)
    y, sm, si, rm16, rv16 = forward("numba", x, weight, bias, rm, rv, training=True, relu=True, axis=axis)
    y32, sm32, si32, rm32, rv32 = forward("numba", x.astype(np.float32), weight, bias, rm, rv, training=True,
                                          relu=True, axis=axis)
    assert np.array_equal(y.view(np.uint16), y32.astype(fmt).view(np.uint16))
    for a, b in ((sm, sm32), (si, si32), (rm16, rm32), (rv16, rv32)):
        assert np.array_equal(a, b)
    dx, dw, db = fastopt.batchnorm_backward(dy, x, weight, sm, si, bias=bias, relu=True, channel_axis=axis)
    dx32, dw32, db32 = fastopt.batchnorm_backward(dy.astype(np.float32), x.astype(np.float32), weight, sm, si,
                                                  bias=bias, relu=True, channel_axis=axis)
    assert dx.dtype == fmt and dw.dtype == db.dtype == np.float32
    assert np.array_equal(dx.view(np.uint16), dx32.astype(fmt).view(np.uint16))
    assert np.array_equal(dw, dw32) and np.array_equal(db, db32)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_conversion_kernels_are_exact_and_round_to_nearest_even(fmt, rng):
    """Every 16-bit pattern decodes to astype(float32); float32 values (ties, overflow, subnormals,
    random bits) encode as astype(fmt) does; NaN stays NaN."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    decoded = np.empty(bits.size, np.float32)
    (bn_lowp._decode_f16 if fmt == F16 else bn_lowp._decode_bf16)(bits, decoded)
    expected = bits.view(fmt).astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(decoded), nan)
    assert np.array_equal(decoded[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    with np.errstate(over="ignore", invalid="ignore"):
        midpoints = (decoded[:-1] + decoded[1:]) / 2  # of neighbouring values: ties
    values = np.concatenate([rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32),
                             decoded, midpoints,
                             np.float32([65504, 65519.99, 65520, 1e38, 3.4e38, 2 ** -25, 2 ** -24, 3e-8, -0.0])])
    values = values[np.isfinite(values) | np.isnan(values)]
    encoded = np.empty(values.size, np.uint16)
    (bn_lowp._encode_f16 if fmt == F16 else bn_lowp._encode_bf16)(values, encoded)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(fmt)
    nan = np.isnan(values)
    assert np.isnan(encoded.view(fmt).astype(np.float32)[nan]).all()
    assert np.array_equal(encoded[~nan], expected[~nan].view(np.uint16))


def test_dtypes_of_allocated_results_and_empty_batch():
    x = np.ones((3, 4, 2), BF16)
    y, sm, si = fastopt.batchnorm_forward(x, None, None, None, None)
    assert y.dtype == BF16 and sm.dtype == si.dtype == np.float32
    assert np.array_equal(y.astype(np.float32), np.zeros(x.shape, np.float32))  # constant channel: y = β
    dx, dw, db = fastopt.batchnorm_backward(np.ones_like(x), x, None, sm, si)
    assert dx.dtype == BF16 and dw.dtype == db.dtype == np.float32
    empty = np.empty((0, 4), F16)
    y, sm, si = fastopt.batchnorm_forward(empty, None, None, None, None)
    assert y.shape == (0, 4) and y.dtype == F16 and np.isnan(sm).all() and np.isnan(si).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_layer_with_16bit_input(fmt, rng):
    shape, axis = (4, 6, 5, 5), 1
    x, dy, *_ = make(rng, shape, axis, fmt)
    layer = BatchNorm(6)
    layer.weight[:] = rng.standard_normal(6)
    layer.bias[:] = rng.standard_normal(6)
    w, b = layer.weight.copy(), layer.bias.copy()
    y = layer(x)
    dx = layer.backward(dy)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    ry, sm, si = fastopt.batchnorm_forward(x, w, b, rm, rv)
    rdx, rdw, rdb = fastopt.batchnorm_backward(dy, x, w, sm, si)
    assert y.dtype == dx.dtype == fmt
    assert np.array_equal(y.view(np.uint16), ry.view(np.uint16))
    assert np.array_equal(dx.view(np.uint16), rdx.view(np.uint16))
    assert np.array_equal(layer.grad_weight, rdw) and np.array_equal(layer.grad_bias, rdb)
    assert np.array_equal(layer.running_mean, rm) and np.array_equal(layer.running_var, rv)
    assert layer.num_batches_tracked == 1
    layer.eval()
    assert layer(x).dtype == fmt
    with pytest.raises(TypeError, match="dy must have the dtype of x"):  # float32 dy after 16-bit x
        layer.backward(dy.astype(np.float32))
    with pytest.raises(TypeError, match="needs a layer of dtype float32"):
        BatchNorm(6, dtype=np.float64)(x)


def _bad_cases(fmt, rng):
    """(description, call, expected exception, message) for mixed dtypes, each on fresh arrays."""
    shape, axis = (4, 3, 5), 1
    x, dy, weight, bias, rm, rv = make(rng, shape, axis, fmt)
    sm, si = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = np.zeros(shape, fmt)
    other = BF16 if fmt == F16 else F16
    f = fastopt.batchnorm_forward
    b = fastopt.batchnorm_backward
    return [
        ("dy float32", lambda: b(dy.astype(np.float32), x, weight, sm, si, out=(y, sm, si)), TypeError,
         "dy must have the dtype of x"),
        ("dy other format", lambda: b(dy.astype(other), x, weight, sm, si, out=(y, sm, si)), TypeError,
         "dy must have the dtype of x"),
        ("weight 16-bit", lambda: f(x, weight.astype(fmt), bias, rm, rv, out=(y, sm, si)), TypeError,
         "weight must have dtype float32"),
        ("bias float64", lambda: f(x, weight, bias.astype(np.float64), rm, rv, out=(y, sm, si)), TypeError,
         "bias must have dtype float32"),
        ("running_var 16-bit", lambda: f(x, weight, bias, rm, rv.astype(fmt), out=(y, sm, si)), TypeError,
         "running_var must have dtype float32"),
        ("out y float32", lambda: f(x, weight, bias, rm, rv, out=(np.zeros(shape, np.float32), sm, si)), TypeError,
         r"out\[0\] \(y\) must have the dtype of x"),
        ("out y other format", lambda: f(x, weight, bias, rm, rv, out=(np.zeros(shape, other), sm, si)), TypeError,
         r"out\[0\] \(y\) must have the dtype of x"),
        ("out saved_mean 16-bit", lambda: f(x, weight, bias, rm, rv, out=(y, sm.astype(fmt), si)), TypeError,
         r"out\[1\] \(saved_mean\) must have dtype float32"),
        ("out dx float32", lambda: b(dy, x, weight, sm, si, out=(np.zeros(shape, np.float32), rm, rv)), TypeError,
         r"out\[0\] \(dx\) must have the dtype of x"),
        ("out dweight 16-bit", lambda: b(dy, x, weight, sm, si, out=(y, rm.astype(fmt), rv)), TypeError,
         r"out\[1\] \(dweight\) must have dtype float32"),
        ("backend cupy", lambda: f(x, weight, bias, rm, rv, out=(y, sm, si), backend="cupy"), TypeError,
         "backend 'cupy' does not take"),
        ("backend numba-cuda", lambda: b(dy, x, weight, sm, si, out=(y, rm, rv), backend="numba-cuda"), TypeError,
         "backend 'numba-cuda' does not take"),
    ], (x, dy, weight, bias, rm, rv, sm, si, y)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_mixed_dtypes_raise_before_anything_changes(fmt, rng):
    cases, arrays = _bad_cases(fmt, rng)
    for what, call, exc, message in cases:
        before = [a.copy() for a in arrays]
        with pytest.raises(exc, match=message):
            call()
        for a, c in zip(arrays, before):
            assert np.array_equal(a.view(np.uint8), c.view(np.uint8)), what


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_out_calls_allocate_no_array_memory_once_warm(fmt, rng):
    """The float32 scratch is a per-thread workspace: with every output given, a repeated call
    allocates nothing the size of an array (tracemalloc traces NumPy's buffers): with C = 2048 the
    smallest array a call could need, one float32 value per channel, is 8 KiB; the bound (4 KiB)
    lets the small Python objects of a call (views, tuples, keyword dicts) pass."""
    import tracemalloc

    shape, axis = (2, 2048, 4, 4), 1
    x, dy, weight, bias, rm, rv = make(rng, shape, axis, fmt)
    y, dx = np.empty_like(x), np.empty_like(x)
    sm, si, dw, db = (np.empty(2048, np.float32) for _ in range(4))

    def step():
        fastopt.batchnorm_forward(x, weight, bias, rm, rv, out=(y, sm, si))
        fastopt.batchnorm_backward(dy, x, weight, sm, si, out=(dx, dw, db))

    step()
    step()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        step()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 4096, f"{peak} bytes allocated (x is {x.nbytes} bytes, one channel vector 8192)"
