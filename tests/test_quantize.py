"""Block-wise dynamic quantization (``fastopt.quantize``; ``docs/algorithms.md``, "Block-wise
dynamic quantization"): the map, the numba kernels against the NumPy reference code for code
(ties included), the round-trip error bound, zeros, NaN and ±inf, and bad input.

Small sizes only, and one large size (float32), so that a cold numba cache compiles the serial
twins in both dtypes and the parallel kernels in float32 only.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastopt
from fastopt import dispatch
from fastopt.kernels.numba_cpu import quantize as numba_quantize
from fastopt.reference import quantize as reference
from test_kernel_float32 import is_float32, native_ir

DTYPES = [np.float32, np.float64]
SIGNED = [True, False]
BACKENDS = ["numpy", "numba"]
SIZES = [0, 1, 255, 256, 257, 3000]
LARGE = (1 << 17) + 5  # above numba_quantize.SERIAL_BELOW: the parallel kernels
EPS = {np.dtype(np.float32): 2.0 ** -24, np.dtype(np.float64): 2.0 ** -53}  # unit roundoff
HALF_GAP = {True: 0.0140625 / 2, False: 0.00703125 / 2}  # half the largest gap of the map (in exact values)


def sample(rng, n, dtype, signed):
    """Values over 12 decades, some exact zeros, an all-zero block, a block whose absmax is negative."""
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-9, 3, n)
    x[rng.random(n) < 0.05] = 0
    if n > 600:
        x[256:512] = 0
        x[512 + 7] = -2 * np.abs(x[512:768]).max()
    x = x if signed else np.abs(x)
    return x.astype(dtype)


def quantize(x, signed, backend, block=256, poison=0):
    codes = np.full(x.shape, poison, np.uint8)
    absmax = np.full(-(-x.size // block), np.nan, np.float32)
    result = fastopt.quantize_blockwise(x, signed=signed, block=block, out=(codes, absmax), backend=backend)
    assert result[0] is codes and result[1] is absmax
    return codes, absmax


def dequantize(codes, absmax, signed, backend, dtype=np.float32, block=256):
    out = np.full(codes.shape, np.nan, dtype)
    assert fastopt.dequantize_blockwise(codes, absmax, signed=signed, block=block, out=out, backend=backend) is out
    return out


def assert_same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    a, b = np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)  # bits: NaN == NaN
    assert np.array_equal(a, b), f"{what}: bytes {np.flatnonzero(a != b)[:10]} differ"


# ---------------------------------------------------------------------------------------------
# the map


@pytest.mark.parametrize("signed", SIGNED)
def test_the_map_is_256_sorted_float32_values_with_0_and_1(signed):
    m = fastopt.quantize.dynamic_map(signed)
    assert m.dtype == np.float32 and m.shape == (256,)
    assert (np.diff(m) > 0).all()
    assert 0 in m and m[-1] == 1
    if signed:  # bitsandbytes' layout: 127 negative, zero, 127 positive and 1; no −1
        assert m[0] == np.float32(-0.99296875) and (m < 0).sum() == 127 and m[127] == 0
        assert np.array_equal(-m[:127][::-1], m[128:255])
        assert m[128] == np.float32(5.5e-7)
    else:
        assert m[0] == 0 and m[1] == np.float32(3.25e-7)
    assert np.diff(m).max() == pytest.approx(2 * HALF_GAP[signed], rel=1e-5)
    # the kernels build their own copy: bit for bit the reference's
    assert_same(numba_quantize.MAP[signed], reference.dynamic_map(signed), "kernel map")
    assert numba_quantize.MAP[signed][numba_quantize.ZERO[signed]] == 0


@pytest.mark.parametrize("signed", SIGNED)
def test_the_map_values_per_decade(signed):
    """n_e values in (10^(e−7), 10^(e−6)] for e = 0…6, n_e = 2^e signed, 2^(e+1) unsigned."""
    m = fastopt.quantize.dynamic_map(signed).astype(np.float64)
    for e in range(7):
        inside = ((m > 10.0 ** (e - 7)) & (m < 10.0 ** (e - 6))).sum()
        assert inside == (2 ** e if signed else 2 ** (e + 1)), e


# ---------------------------------------------------------------------------------------------
# numba against the reference


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("signed", SIGNED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_matches_the_reference_code_for_code(rng, dtype, signed, n):
    x = sample(rng, n, dtype, signed).reshape((-1, 3) if n % 3 == 0 and n else (n,))
    before = x.copy()
    codes, absmax = quantize(x, signed, "numpy")
    assert codes.shape == x.shape and absmax.shape == (-(-n // 256),)
    for poison in (0, 255):  # an unwritten code shows as one poison or the other
        got = quantize(x, signed, "numba", poison=poison)
        assert_same(got[0], codes, "codes")
        assert_same(got[1], absmax, "absmax")
    assert_same(x, before, "x")
    for out_dtype in DTYPES:
        y = dequantize(codes, absmax, signed, "numpy", out_dtype)
        assert_same(dequantize(codes, absmax, signed, "numba", out_dtype), y, "dequantized")


@pytest.mark.parametrize("signed", SIGNED)
def test_numba_matches_the_reference_large(rng, signed):
    x = sample(rng, LARGE, np.float32, signed)
    assert LARGE >= numba_quantize.SERIAL_BELOW
    codes, absmax = quantize(x, signed, "numpy")
    got = quantize(x, signed, "numba", poison=255)
    assert_same(got[0], codes, "codes")
    assert_same(got[1], absmax, "absmax")
    assert_same(dequantize(codes, absmax, signed, "numba"), dequantize(codes, absmax, signed, "numpy"), "y")


@pytest.mark.parametrize("block", [1, 7, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_block_sizes(rng, backend, block):
    x = sample(rng, 2500, np.float32, True)
    codes, absmax = quantize(x, True, backend, block=block)
    assert absmax.shape == (-(-2500 // block),)
    expected = np.abs(x[: (len(absmax) - 1) * block]).reshape(-1, block).max(axis=1)
    assert_same(absmax[:-1], expected, "absmax")
    assert absmax[-1] == np.abs(x[(len(absmax) - 1) * block:]).max()
    if backend == "numba":
        ref = quantize(x, True, "numpy", block=block)
        assert_same(codes, ref[0], "codes")


def test_default_backend_is_numba_and_defaults_allocate(rng):
    x = sample(rng, 300, np.float32, True)
    codes, absmax = fastopt.quantize_blockwise(x, signed=True)
    assert codes.dtype == np.uint8 and absmax.dtype == np.float32 and absmax.shape == (2,)
    y = fastopt.dequantize_blockwise(codes, absmax, signed=True)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert_same(y, dequantize(*quantize(x, True, "numpy"), True, "numpy"), "y")


# ---------------------------------------------------------------------------------------------
# ties: every midpoint of the map, and its neighbours


def midpoints(signed, dtype):
    """(exact midpoints that are values of ``dtype``, their indices j; the dtype's values just
    below and just above each midpoint)."""
    m = reference.dynamic_map(signed).astype(np.float64)
    mid = (m[:-1] + m[1:]) / 2  # exact: two nearby float32 values
    as_dtype = mid.astype(dtype)
    exact = as_dtype.astype(np.float64) == mid
    below = np.where(as_dtype.astype(np.float64) < mid, as_dtype, np.nextafter(as_dtype, dtype(-np.inf)))
    above = np.where(as_dtype.astype(np.float64) > mid, as_dtype, np.nextafter(as_dtype, dtype(np.inf)))
    return as_dtype[exact], np.flatnonzero(exact), below, above


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed", SIGNED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_tie_goes_to_the_smaller_code_and_neighbours_to_the_nearest(backend, signed, dtype):
    """Each value sits in a block with absmax 1 (the block holds 1), so x̂ = x exactly."""
    exact, at, below, above = midpoints(signed, dtype)
    if dtype == np.float32:
        assert 0 < len(exact) < 255  # some midpoints are float32 values (ties), some are not
    j = np.arange(255)
    for values, expected in ((exact, at), (below, j), (above, j + 1)):
        x = np.concatenate([[dtype(1)], values]).astype(dtype)
        codes, absmax = quantize(x, signed, backend, block=len(x))
        assert absmax[0] == 1
        assert_same(codes[1:], expected.astype(np.uint8), "codes")


# ---------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed", SIGNED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_within_the_documented_bound(rng, backend, signed, dtype):
    """|x − y| ≤ a·(m_{j+1} − m_j)/2 + u·(|x| + a) for m_j ≤ x/a ≤ m_{j+1} (below the signed map's
    end: a·(m_0 − x/a) + …), and ≤ a·(Δ/2 + 2^−24 + 2u) over all (docs/algorithms.md)."""
    x = sample(rng, 3000, dtype, signed)
    x[:256] = rng.uniform(-1 if signed else 0, 1, 256)  # one block dense in [−1, 1]: the largest gap is hit
    x[3] = 1
    codes, absmax = quantize(x, signed, backend)
    y = dequantize(codes, absmax, signed, backend, dtype)
    a = np.repeat(absmax.astype(np.float64), 256)[: x.size]
    m = reference.dynamic_map(signed).astype(np.float64)
    scaled = np.divide(x, a, out=np.zeros(x.size), where=a > 0)
    j = np.clip(np.searchsorted(m, scaled) - 1, 0, 254)
    gap = np.where(scaled < m[0], m[0] - scaled, m[j + 1] - m[j])  # below the signed map's end: all of it
    u = EPS[np.dtype(dtype)]
    error = np.abs(x.astype(np.float64) - y)
    local = a * np.where(scaled < m[0], gap, gap / 2) + u * (np.abs(x) + a)
    assert (error <= local).all(), np.flatnonzero(error > local)[:5]
    # Δ/2 of the float32 map (1 − |m_0| for the signed map's end is the same); float64: a = fl32(max|x|)
    # may fall below max|x|, so |x̂| ≤ 1 + 2^−24
    half = max(np.diff(m).max() / 2, 1 + m[0] if signed else 0)
    assert half == pytest.approx(HALF_GAP[signed], rel=1e-5)
    bad = np.flatnonzero(error > a * (half + 2.0 ** -24 + 2 * u))
    assert bad.size == 0, (bad[:5], x[bad[:5]], y[bad[:5]], a[bad[:5]], scaled[bad[:5]])
    assert error[:256].max() > 0.5 * HALF_GAP[signed]  # the bound is not loose by much


def test_the_signed_map_has_no_minus_one():
    """A block whose absmax comes from a negative value decodes it to −0.99296875·a: half the
    largest gap of the map, inside the bound."""
    x = np.array([-2, 1, 0.5], np.float32)
    for backend in BACKENDS:
        codes, absmax = quantize(x, True, backend)
        y = dequantize(codes, absmax, True, backend)
        assert absmax[0] == 2 and codes[0] == 0 and y[0] == np.float32(-0.99296875) * 2


# ---------------------------------------------------------------------------------------------
# zeros and non-finite values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed", SIGNED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_non_finite_blocks(backend, signed, dtype):
    blocks = [np.zeros(256), np.full(256, 0.5), np.full(256, 0.5), np.full(256, 0.5), np.full(10, 0.25)]
    blocks[1][9] = np.nan
    blocks[2][0] = np.inf
    blocks[3][255] = -np.inf
    x = np.concatenate(blocks).astype(dtype)
    codes, absmax = quantize(x, signed, backend, poison=77)
    zero = numba_quantize.ZERO[signed]
    assert absmax[0] == 0 and np.isnan(absmax[1:4]).all() and absmax[4] == 0.25
    assert (codes[:1024] == zero).all() and (codes[1024:] == 255).all()
    y = dequantize(codes, absmax, signed, backend, dtype)
    assert (y[:256] == 0).all() and not np.signbit(y[:256]).any()
    assert np.isnan(y[256:1024]).all()
    assert (y[1024:] == 0.25).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_beyond_float32_range(backend):
    """absmax is float32: a block whose absmax overflows it is non-finite; one that underflows to 0 is zero."""
    x = np.concatenate([np.full(256, 1e39), np.full(256, 1e-50), [3.0]])
    codes, absmax = quantize(x, True, backend)
    assert np.isnan(absmax[0]) and absmax[1] == 0 and absmax[2] == 3
    assert (codes[:512] == 127).all() and codes[512] == 255


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsigned_map_gives_negative_values_the_zero_code(backend):
    codes, absmax = quantize(np.array([-1, 3, -2, 0.5], np.float32), False, backend)
    assert list(codes[[0, 2]]) == [0, 0] and codes[1] == 255 and absmax[0] == 3


# ---------------------------------------------------------------------------------------------
# the kernels compute float32 in float32


@pytest.mark.parametrize("kernel", [numba_quantize._quantize.runner, numba_quantize._dequantize.runner],
                         ids=lambda k: k.__name__)
def test_float32_kernels_have_no_float64_arithmetic(kernel):
    signature = [s for s in kernel.signatures if is_float32(s) and "float64" not in str(s)][0]
    for f in native_ir(kernel, signature):
        head = f.splitlines()[0][:100]
        assert "fpext" not in f, f"{kernel.__name__}: float32 promoted to float64 ({head})"
        assert "double" not in f, f"{kernel.__name__}: float64 values in the float32 kernel ({head})"


def test_the_search_steps_are_selects_marked_unpredictable():
    """The codes of random data are random: each of the search's 8 steps must stay a select (cmov),
    never become a branch, which mispredicts half the time (LLVM's x86 cmov converter turns an
    unrolled loop's selects into branches unless they are marked unpredictable)."""
    runner = numba_quantize._quantize.runner
    for signature in runner.signatures:
        ir = numba.cfunc(signature, error_model="numpy")(runner.py_func).inspect_llvm()
        selects = [line for line in ir.splitlines() if " = select " in line and "!unpredictable" in line]
        assert len(selects) >= 8, signature


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, and nothing written


X = np.linspace(-1, 1, 300, dtype=np.float32)
READONLY = np.zeros(300, np.uint8)
READONLY.flags.writeable = False


def _strided():
    return np.zeros(600, np.float32)[::2]


QUANTIZE_BAD = [
    (dict(x=X.tolist()), TypeError, "x must be a numpy.ndarray, got builtins.list"),
    (dict(x=X.astype(np.float16)), TypeError, "x must have dtype float32 or float64, got float16"),
    (dict(x=np.arange(300)), TypeError, "x must have dtype float32 or float64, got int64"),
    (dict(x=_strided()), ValueError, "x must be C-contiguous"),
    (dict(signed="yes"), TypeError, "signed"),
    (dict(block=0), ValueError, "block must be >= 1, got 0"),
    (dict(block=2.0), TypeError, "block must be an int, got float"),
    (dict(block=True), TypeError, "block must be an int, got bool"),
    (dict(codes=np.zeros(300, np.int8)), TypeError, r"out\[0\] \(codes\) must have dtype uint8, got int8"),
    (dict(codes=np.zeros(301, np.uint8)), ValueError, r"out\[0\] \(codes\) must have the shape of x"),
    (dict(codes=READONLY), ValueError, r"out\[0\] \(codes\) must be writeable"),
    (dict(absmax=np.zeros(2, np.float64)), TypeError, r"out\[1\] \(absmax\) must have dtype float32"),
    (dict(absmax=np.zeros(1, np.float32)), ValueError, r"out\[1\] \(absmax\) must have shape \(2,\)"),
    (dict(codes=X.view(np.uint8)[:300]), ValueError, "must not share memory"),
    (dict(out=[None]), TypeError, r"out must be None or a tuple \(codes, absmax\)"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
    (dict(backend="cupy"), dispatch.BackendUnavailableError, "'cupy' does not implement block-wise quantization yet"),
    (dict(backend="numba-cuda"), dispatch.BackendUnavailableError, "'numba-cuda' does not implement"),
]


@pytest.mark.parametrize("bad, error, match", QUANTIZE_BAD, ids=[m[:40] for _, _, m in QUANTIZE_BAD])
def test_bad_quantize_arguments_raise_and_write_nothing(bad, error, match):
    args = dict(x=X, signed=True, block=256, codes=np.full(300, 9, np.uint8), absmax=np.full(2, 7, np.float32),
                backend="numba")
    args.update(bad)
    out = bad.get("out", (args["codes"], args["absmax"]))
    before = [None if a is None else a.copy() for a in out] if isinstance(out, tuple) else None
    x_before = np.array(args["x"], copy=True) if isinstance(args["x"], np.ndarray) else None
    with pytest.raises(error, match=match):
        fastopt.quantize_blockwise(args["x"], signed=args["signed"], block=args["block"], out=out,
                                   backend=args["backend"])
    if before is not None:
        for a, b in zip(out, before):
            assert_same(a, b, "an output written before the error")
    if x_before is not None:
        assert_same(args["x"], x_before, "x")


CODES = np.zeros(300, np.uint8)
ABSMAX = np.ones(2, np.float32)
DEQUANTIZE_BAD = [
    (dict(codes=CODES.astype(np.int8)), TypeError, "codes must have dtype uint8, got int8"),
    (dict(codes=None), TypeError, "codes must be a numpy.ndarray, got None"),
    (dict(absmax=ABSMAX.astype(np.float64)), TypeError, "absmax must have dtype float32, got float64"),
    (dict(absmax=np.ones(3, np.float32)), ValueError, r"absmax must have shape \(2,\)"),
    (dict(block=512), ValueError, r"absmax must have shape \(1,\)"),
    (dict(signed=None), TypeError, "signed"),
    (dict(out=np.zeros(300, np.int32)), TypeError, "out must have dtype float32 or float64, got int32"),
    (dict(out=np.zeros((300, 1), np.float32)), ValueError, "out must have the shape of codes"),
    (dict(backend="cupy"), dispatch.BackendUnavailableError, "not implement block-wise quantization yet"),
]


@pytest.mark.parametrize("bad, error, match", DEQUANTIZE_BAD, ids=[m[:40] for _, _, m in DEQUANTIZE_BAD])
def test_bad_dequantize_arguments_raise_and_write_nothing(bad, error, match):
    args = dict(codes=CODES, absmax=ABSMAX, signed=True, block=256, out=np.full(300, 5, np.float32), backend="numba")
    args.update(bad)
    before = args["out"].copy()
    with pytest.raises(error, match=match):
        fastopt.dequantize_blockwise(args["codes"], args["absmax"], signed=args["signed"], block=args["block"],
                                     out=args["out"], backend=args["backend"])
    assert_same(args["out"], before, "out")


def test_dequantize_into_memory_it_reads_raises():
    codes = np.zeros(8, np.uint8)
    out = codes.view(np.float32)  # 2 float32 over the codes' 8 bytes
    with pytest.raises(ValueError, match="must not share memory"):
        fastopt.dequantize_blockwise(codes[:2], np.ones(1, np.float32), signed=True, out=out, backend="numba")
    assert (codes == 0).all()


class _DeviceArray:
    """Looks like a CUDA device array to the argument checks (``__cuda_array_interface__``)."""

    __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_device_arrays_are_not_supported_yet():
    with pytest.raises(TypeError, match="not implemented yet for CUDA device arrays"):
        fastopt.quantize_blockwise(_DeviceArray(), signed=True)
    with pytest.raises(TypeError, match="not implemented yet for CUDA device arrays"):
        fastopt.dequantize_blockwise(_DeviceArray(), np.ones(1, np.float32), signed=True)
