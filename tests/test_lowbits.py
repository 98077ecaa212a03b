"""Low-precision storage helpers (``fastopt.kernels.numba_cpu.lowbits``) against the reference
(``fastopt.reference.lowp``), ml_dtypes and NumPy: bfloat16 / float16 decoding and round-to-nearest
encoding bit for bit, the counter-based uniforms, and stochastic rounding.

The helpers are device functions, so each check compiles a small kernel here that loops over
arrays calling them (about a second of compile time in all)."""

from __future__ import annotations

import math

import ml_dtypes
import numba
import numpy as np
import pytest

from fastopt.kernels.numba_cpu import lowbits
from fastopt.reference import lowp

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
FORMATS = {"bfloat16": BF16, "float16": F16}
INF_BITS = {"bfloat16": 0x7F80, "float16": 0x7C00}

_jit = numba.njit(error_model="numpy")


@_jit
def _decode(h, bf, f16):
    for i in range(h.size):
        bf[i] = lowbits.bf16_to_f32(h[i])
        f16[i] = lowbits.f16_to_f32(h[i])


@_jit
def _encode(x, bf, f16):
    for i in range(x.size):
        bf[i] = lowbits.f32_to_bf16(x[i])
        f16[i] = lowbits.f32_to_f16(x[i])


@_jit
def _uniform(key, index, u):
    for j in range(index.size):
        u[j] = lowbits.uniform(key, index[j])


@_jit
def _stochastic(x, key, index, bf, f16):
    for j in range(x.size):
        u = lowbits.uniform(key, index[j])
        bf[j] = lowbits.stochastic_bf16(x[j], u)
        f16[j] = lowbits.stochastic_f16(x[j], u)


@_jit
def _stochastic_with(x, u, bf, f16):
    for j in range(x.size):
        bf[j] = lowbits.stochastic_bf16(x[j], u[j])
        f16[j] = lowbits.stochastic_f16(x[j], u[j])


def encode(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = {name: np.full(x.size, 0x7E01, dtype=np.uint16) for name in FORMATS}  # poisoned
    _encode(x, out["bfloat16"], out["float16"])
    return out


def stochastic(x, key, index):
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = np.ascontiguousarray(np.broadcast_to(index, x.shape), dtype=np.int64)
    out = {name: np.full(x.size, 0x7E01, dtype=np.uint16) for name in FORMATS}
    _stochastic(x, np.int64(key), index, out["bfloat16"], out["float16"])
    return out


def as_float32(bits, name):
    return bits.view(FORMATS[name]).astype(np.float32)


def assert_bits_equal(actual_bits, x, name):
    """Bit for bit against ``x.astype(format)`` where x is not NaN; a NaN where it is."""
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(FORMATS[name]).view(np.uint16)
    nan = np.isnan(x)
    bad = np.flatnonzero((actual_bits != expected) & ~nan)
    assert bad.size == 0, (f"{name}: {bad.size} mismatches, first x={x[bad[:5]]!r} "
                           f"got {actual_bits[bad[:5]]} expected {expected[bad[:5]]}")
    assert np.isnan(as_float32(actual_bits[nan], name)).all()


# ---------------------------------------------------------------------------------------------
# Decoding and round-to-nearest encoding
# ---------------------------------------------------------------------------------------------


def test_decode_every_bit_pattern():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = {name: np.full(h.size, np.nan, dtype=np.float32) for name in FORMATS}
    _decode(h, out["bfloat16"], out["float16"])
    for name, dtype in FORMATS.items():
        expected = h.view(dtype).astype(np.float32)
        nan = np.isnan(expected)
        assert np.array_equal(out[name][~nan].view(np.uint32), expected[~nan].view(np.uint32)), name
        assert np.isnan(out[name][nan]).all(), name
        assert nan.sum() == (254 if name == "bfloat16" else 2046), name  # 2·(2^fraction bits − 1)


def _edges():
    f32 = np.float32
    ulp = lambda v: np.spacing(f32(v))  # noqa: E731
    values = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0,
              np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1e-45, 1e-40]
    # bfloat16: ties at 1 + 2⁻⁸ (to 1, even) and 1 + 3·2⁻⁸ (to 1 + 2⁻⁶, even), largest finite and
    # the tie just past it (to Inf), the smallest subnormal 2⁻¹³³ and the tie 2⁻¹³⁴ (to 0)
    bf_max = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    bf_tie = bf_max + 2.0 ** 119
    for v in (1 + 2 ** -8, 1 + 3 * 2 ** -8, bf_max, bf_tie, 2.0 ** -133, 2.0 ** -134, 3 * 2.0 ** -134,
              2.0 ** -126):
        values += [v, v + ulp(v), v - ulp(v)]
    # float16: ties at 1 + 2⁻¹¹ and 1 + 3·2⁻¹¹, 65504 and the tie 65520 (to Inf), 65536, the
    # smallest normal 2⁻¹⁴, the smallest subnormal 2⁻²⁴, the tie 2⁻²⁵ (to 0), the tie 3·2⁻²⁵ (to
    # 2⁻²³, even), a subnormal tie 5·2⁻²⁵, and the tie between the largest subnormal and 2⁻¹⁴
    for v in (1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504.0, 65520.0, 65536.0, 2.0 ** -14, 2.0 ** -24,
              2.0 ** -25, 3 * 2.0 ** -25, 5 * 2.0 ** -25, 2.0 ** -14 - 2.0 ** -25, 2.0 ** -15):
        values += [v, v + ulp(v), v - ulp(v)]
    x = np.array(values, dtype=np.float32)
    return np.concatenate([x, -x])


def test_encode_edge_cases():
    x = _edges()
    out = encode(x)
    for name in FORMATS:
        assert_bits_equal(out[name], x, name)
    # spelled out, so the expectations do not rest on astype alone
    f = lambda v: encode(np.array([v], dtype=np.float32))  # noqa: E731
    assert f(1 + 2 ** -8)["bfloat16"][0] == 0x3F80 and f(1 + 3 * 2 ** -8)["bfloat16"][0] == 0x3F82
    assert f(65519.99)["float16"][0] == 0x7BFF and f(65520.0)["float16"][0] == 0x7C00
    assert f(2.0 ** -25)["float16"][0] == 0 and f(3 * 2.0 ** -25)["float16"][0] == 2
    assert f(-0.0)["bfloat16"][0] == 0x8000 and f(-0.0)["float16"][0] == 0x8000
    assert f(-np.inf)["bfloat16"][0] == 0xFF80 and f(-np.inf)["float16"][0] == 0xFC00
    assert f(np.finfo(np.float32).max)["bfloat16"][0] == 0x7F80
    nan = f(-np.nan)
    assert nan["bfloat16"][0] & 0x8000 and np.isnan(as_float32(nan["bfloat16"], "bfloat16")[0])
    assert nan["float16"][0] & 0x8000 and np.isnan(as_float32(nan["float16"], "float16")[0])


def test_encode_random_bit_patterns(rng):
    bits = rng.integers(0, 1 << 32, size=1_000_000, dtype=np.uint64).astype(np.uint32)
    # half of them in float16's range, where its rounding is not trivial
    bits[::2] = rng.integers(0x33000000 - 4, 0x47800000 + 4, size=bits[::2].size, dtype=np.uint32)
    bits[::2] |= rng.integers(0, 2, size=bits[::2].size, dtype=np.uint32) << 31
    x = bits.view(np.float32)
    out = encode(x)
    for name in FORMATS:
        assert_bits_equal(out[name], x, name)


# ---------------------------------------------------------------------------------------------
# Counter-based uniforms
# ---------------------------------------------------------------------------------------------

M64 = (1 << 64) - 1


def _mix_independent(z):
    """splitmix64's finalizer, written again from its definition with Python ints."""
    z &= M64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & M64
    return z ^ (z >> 31)


def test_mix_known_answer():
    # splitmix64 seeded with 0: its outputs are MIX(n·γ); the first is 0xE220A8397B1DCDAF
    assert _mix_independent(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("seed, step, k", [(0, 0, 0), (1, 2, 3), (12345, 10 ** 6, 17), (2 ** 63 + 5, 2 ** 40, 0)])
def test_tensor_key_known_answer(seed, step, k):
    g = 0x9E3779B97F4A7C15
    key = _mix_independent(_mix_independent(_mix_independent(k + g) + step) + seed)
    signed = key - (1 << 64) if key >> 63 else key
    assert lowbits.tensor_key(seed, step, k) == signed
    assert lowp.tensor_key(seed, step, k) == signed
    assert np.int64(signed) == signed  # storable in an int64 array


def test_uniform_against_reference_and_known_answer(rng):
    g = 0x9E3779B97F4A7C15
    for key in [0, -1, lowbits.tensor_key(7, 3, 1), int(rng.integers(-2 ** 63, 2 ** 63 - 1))]:
        index = np.concatenate([np.arange(1000), rng.integers(0, 2 ** 62, size=20_000), [2 ** 63 - 1]])
        index = index.astype(np.int64)
        u = np.full(index.size, np.nan, dtype=np.float32)
        _uniform(np.int64(key), index, u)
        assert np.array_equal(u.view(np.uint32), lowp.uniform(key, index).view(np.uint32))
        assert (u >= 0).all() and (u < 1).all()
        for i in (0, 1, 999):  # known answers from plain ints
            z = _mix_independent((key & M64) + (i + 1) * g)
            assert u[i] == np.float32((z >> 40) / 2 ** 24)
    # 24 random bits: uniform over [0, 1) in the mean, every value a multiple of 2⁻²⁴
    u = np.empty(200_000, dtype=np.float32)
    _uniform(np.int64(lowbits.tensor_key(1, 1, 1)), np.arange(u.size, dtype=np.int64), u)
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    assert np.array_equal(u * np.float32(2 ** 24), np.floor(u * np.float32(2 ** 24)))


# ---------------------------------------------------------------------------------------------
# Stochastic rounding
# ---------------------------------------------------------------------------------------------


def _random_float32(rng, n):
    x = (rng.standard_normal(n) * np.exp2(rng.uniform(-40, 40, n))).astype(np.float32)
    x[: n // 8] = rng.integers(0, 1 << 32, size=n // 8, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return x


def test_stochastic_against_reference(rng):
    x = np.concatenate([_random_float32(rng, 200_000), _edges()])
    key = lowbits.tensor_key(int(rng.integers(2 ** 32)), 5, 2)
    index = rng.permutation(x.size).astype(np.int64)
    out = stochastic(x, key, index)
    for name, dtype in FORMATS.items():
        expected = lowp.round_stochastic(x, dtype, key, index).view(np.uint16)
        nan = np.isnan(x)
        bad = np.flatnonzero((out[name] != expected) & ~nan)
        assert bad.size == 0, f"{name}: x={x[bad[:5]]!r} got {out[name][bad[:5]]} expected {expected[bad[:5]]}"
        assert np.isnan(as_float32(out[name][nan], name)).all()
        # a neighbour of x: the sign of the nearest value, its bit pattern or an adjacent one
        nearest = lowp.round_nearest(x[~nan], dtype).view(np.uint16).astype(np.int64)
        got = out[name][~nan].astype(np.int64)
        assert np.array_equal(got >> 15, nearest >> 15)
        assert (np.abs((got & 0x7FFF) - (nearest & 0x7FFF)) <= 1).all()


@pytest.mark.parametrize("name", FORMATS)
def test_stochastic_representable_and_special(name, rng):
    dtype = FORMATS[name]
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = h.view(dtype).astype(np.float32)
    out = stochastic(x, lowbits.tensor_key(3, 4, 5), np.arange(x.size))[name]
    finite_or_inf = ~np.isnan(x)
    assert np.array_equal(out[finite_or_inf], h[finite_or_inf])  # ±0, ±Inf and every value: itself
    assert np.isnan(as_float32(out[~finite_or_inf], name)).all()
    # past the largest finite value (still finite float32): the largest finite value, either sign
    largest = float(ml_dtypes.finfo(dtype).max)
    past = np.array([largest * (1 + 2 ** -10), np.finfo(np.float32).max, 70000.0, 1e30], dtype=np.float32)
    past = past[past > largest]
    out = stochastic(np.concatenate([past, -past]), 99, np.arange(2 * past.size))[name]
    assert (out == np.concatenate([np.full(past.size, INF_BITS[name] - 1),
                                   np.full(past.size, 0x8000 | (INF_BITS[name] - 1))])).all()


@pytest.mark.parametrize("name", FORMATS)
def test_stochastic_threshold(name):
    """Away from zero exactly when u < (|x| − |d|)/(|u⁺| − |d|), at the fraction's edges."""
    t = 7 if name == "bfloat16" else 10
    base = 0x3F80 if name == "bfloat16" else 0x3C00  # 1.0
    cases = []  # (x, u, expected bits)
    for sign in (1, -1):
        for f in (0.0, 2.0 ** (-23 + t), 0.25, 0.5, 0.75, 1 - 2.0 ** (-23 + t)):
            x = sign * (1 + f * 2.0 ** -t)
            for u in (0.0, f - 2.0 ** -24, f, f + 2.0 ** -24, 1 - 2.0 ** -24):
                if 0 <= u < 1:
                    bits = base + 1 if u < f else base
                    cases.append((x, u, bits | (0x8000 if sign < 0 else 0)))
    # past the largest finite value, u = 0: the largest finite value; the largest finite value and
    # ±Inf, u = 0: themselves (the kernels test none of these apart: their fractions are 0 or NaN)
    finite_max = float(ml_dtypes.finfo(FORMATS[name]).max)
    largest = finite_max * (1 + 2.0 ** -12)
    cases += [(largest, 0.0, INF_BITS[name] - 1), (-largest, 0.0, 0x8000 | (INF_BITS[name] - 1)),
              (finite_max, 0.0, INF_BITS[name] - 1), (-finite_max, 0.0, 0x8000 | (INF_BITS[name] - 1)),
              (math.inf, 0.0, INF_BITS[name]), (-math.inf, 0.0, 0x8000 | INF_BITS[name])]
    x, u, expected = (np.array(c, dtype=d) for c, d in zip(zip(*cases), (np.float32, np.float32, np.uint16)))
    assert np.array_equal(x.astype(np.float64), [c[0] for c in cases])  # every x exact in float32
    out = {n: np.full(x.size, 0x7E01, dtype=np.uint16) for n in FORMATS}
    _stochastic_with(x, u, out["bfloat16"], out["float16"])
    assert np.array_equal(out[name], expected), np.flatnonzero(out[name] != expected)
    # NaN, u = 0: a NaN of x's sign
    nan = np.array([np.nan, -np.nan], np.float32)
    out = {n: np.zeros(2, dtype=np.uint16) for n in FORMATS}
    _stochastic_with(nan, np.zeros(2, np.float32), out["bfloat16"], out["float16"])
    assert np.isnan(as_float32(out[name], name)).all() and list(out[name] >> 15) == [0, 1]


@pytest.mark.parametrize("name, value", [("bfloat16", 1.0 + 0.3 * 2 ** -7), ("bfloat16", -3.1e-39),
                                         ("float16", 1000.3), ("float16", -3.3e-6)])
def test_stochastic_unbiased(name, value):
    n = 200_000
    x = np.full(n, value, dtype=np.float32)
    out = stochastic(x, lowbits.tensor_key(11, 0, 1), np.arange(n))[name]
    r = as_float32(out, name).astype(np.float64)
    low, high = np.min(np.abs(r)), np.max(np.abs(r))
    assert len(np.unique(r)) == 2  # both neighbours occur
    spacing = high - low
    p = (abs(float(x[0])) - low) / spacing
    se = spacing * np.sqrt(p * (1 - p) / n)
    assert abs(r.mean() - float(x[0])) < 5 * se


def test_stochastic_deterministic_per_key(rng):
    x = _random_float32(rng, 50_000)
    x = x[np.isfinite(x)]
    index = np.arange(x.size)
    a = stochastic(x, lowbits.tensor_key(1, 7, 0), index)
    b = stochastic(x, lowbits.tensor_key(1, 7, 0), index)
    c = stochastic(x, lowbits.tensor_key(2, 7, 0), index)
    for name in FORMATS:
        assert np.array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
        assert (a[name] != c[name]).mean() > 0.1


# ---------------------------------------------------------------------------------------------
# float32 only
# ---------------------------------------------------------------------------------------------


def test_no_float64_in_generated_code():
    # every kernel has been compiled by the tests above, or is compiled here
    encode(np.zeros(1, dtype=np.float32))
    stochastic(np.zeros(1, dtype=np.float32), 0, np.zeros(1))
    _uniform(np.int64(0), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float32))
    h = np.zeros(1, dtype=np.uint16)
    _decode(h, np.zeros(1, dtype=np.float32), np.zeros(1, dtype=np.float32))
    _stochastic_with(np.zeros(1, dtype=np.float32), np.zeros(1, dtype=np.float32), h, h.copy())
    for kernel in (_encode, _decode, _uniform, _stochastic, _stochastic_with):
        for signature, llvm in kernel.inspect_llvm().items():
            assert "double" not in llvm, f"{kernel.__name__}{signature}: float64 in the LLVM IR"

    # the check can see a promotion: a float32 times a Python float is a double multiply
    @_jit
    def promoted(x):
        return x * 0.5

    promoted(np.float32(1))
    assert any("double" in llvm for llvm in promoted.inspect_llvm().values())
