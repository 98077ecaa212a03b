"""Low-precision storage: bfloat16 and float16 bits, converted in float32 (``docs/algorithms.md``,
"Low-precision storage: bfloat16, float16 and stochastic rounding").

numba has no bfloat16 or float16 arithmetic on the CPU, so a kernel reads such an array through a
``uint16`` view and converts each element with integer operations on its bits, computing in
float32. These are device helpers (``inline="always"``, ``error_model="numpy"``), to be called from
jitted kernels only: float32 arithmetic throughout (no float64 promotion), no allocation.

    f32_bits(x), bits_f32(u)   float32 ↔ its uint32 bit pattern (an LLVM bitcast)
    bf16_to_f32(h)             exact: the bits h · 2¹⁶
    f32_to_bf16(x)             RNE(x) to bfloat16 (8-bit significand, float32's exponent range);
                               ±Inf kept, overflow to ±Inf, NaN → a quiet NaN with x's sign
    f16_to_f32(h)              exact, IEEE binary16 (subnormals, ±0, ±Inf, NaN)
    f32_to_f16(x)              RNE(x) to binary16: |x| ≥ 65520 → ±Inf, subnormals rounded once,
                               |x| ≤ 2⁻²⁵ → ±0; NaN → a quiet NaN with x's sign

Counter-based uniforms for stochastic rounding (all arithmetic mod 2⁶⁴):

    MIX(z)        z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
                  z ^= z >> 31                                  (the splitmix64 finalizer, ``mix64``)
    γ             0x9E3779B97F4A7C15
    key           MIX(MIX(MIX(k + γ) + step) + seed)            host: ``tensor_key``, stored as int64
    uniform(key, i) = (MIX(key + (i + 1)·γ) >> 40) · 2⁻²⁴      ∈ {0, 2⁻²⁴, …, 1 − 2⁻²⁴}

Stochastic rounding (``stochastic_bf16``, ``stochastic_f16``), for finite float32 x: d is the
format value nearest x toward zero, u⁺ the next format value of larger magnitude with x's sign
(the next bit pattern after d's magnitude; after the largest finite one it is Inf), and

    SR(x, u) = u⁺ if u < (|x| − |d|) / (|u⁺| − |d|) else d      (the fraction is 0 when u⁺ = ±Inf)

with u = uniform(key, i). The subtraction and the division by the power-of-two spacing are exact
in float32. ±Inf gives ±Inf, NaN a NaN, a representable x itself, and a finite x past the largest
finite value the largest finite value (with x's sign). d is found as the RNE result stepped back
one bit pattern when its magnitude exceeds |x|. The special cases need no branches: when u⁺ is
±Inf the fraction is 0; when x is ±Inf it is (∞ − ∞)/… = NaN, and when x is NaN, so are d and the
fraction (d is x's quiet NaN); u < NaN is false, so each keeps d (a NaN's d is the RNE result).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["GAMMA", "bf16_to_f32", "bits_f32", "f16_to_f32", "f32_bits", "f32_to_bf16", "f32_to_f16",
           "mix64", "stochastic_bf16", "stochastic_f16", "tensor_key", "uniform"]

_device = numba.njit(inline="always", error_model="numpy")

# Every integer constant is a typed global (numba freezes it as a constant of that type): a Python
# int literal would be typed int64, and uint64 op int64 promotes to float64 in numba.
_U64 = np.uint64
GAMMA = 0x9E3779B97F4A7C15
_GAMMA = _U64(GAMMA)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_S16, _S30, _S27, _S31, _S40 = _U64(16), _U64(30), _U64(27), _U64(31), _U64(40)
_S10, _S13 = _U64(10), _U64(13)
_ZERO, _ONE = _U64(0), _U64(1)
_LOW16 = _U64(0xFFFF)
_ABS32 = _U64(0x7FFFFFFF)
_INF32 = _U64(0x7F800000)
_SIGN16 = _U64(0x8000)
_ABS16 = _U64(0x7FFF)
_BF16_QUIET = _U64(0x0040)
_BF16_HALF = _U64(0x7FFF)  # 2¹⁵ − 1: with the kept bit's parity added, RNE on the dropped 16 bits
_F16_INF = _U64(0x7C00)
_F16_QUIET = _U64(0x0200)
_F16_MANT = _U64(0x3FF)
_F16_EXP = _U64(0x1F)
_F16_OVERFLOW = _U64(0x477FF000)  # 65520 = 65504 + half its spacing; a tie, which goes to even: Inf
_F16_NORMAL = _U64(0x38800000)  # 2⁻¹⁴, the smallest normal half
_F16_REBIAS = _U64(112 << 23)  # exponent bias 127 − 15, in place
_F16_HALF = _U64(0xFFF)  # 2¹² − 1: with the kept bit's parity added, RNE on the dropped 13 bits
_TWO_M24 = np.float32(2.0 ** -24)
_F32_HALF = np.float32(0.5)
_F32_HALF_BITS = _U64(0x3F000000)
_F32_ZERO = np.float32(0.0)


# ---------------------------------------------------------------------------------------------
# Bit casts
# ---------------------------------------------------------------------------------------------


def f32_bits_typer(typingctx, x):
    """The uint32 bit pattern of the float32 ``x``. (The typer and code generator, shared with the
    numba-cuda backend, which wraps it in its own ``intrinsic``.)"""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def bits_f32_typer(typingctx, u):
    """The float32 whose bit pattern is the low 32 bits of the integer ``u`` (any integer type:
    numba widens uint32 arithmetic to 64 bits). (Shared with the numba-cuda backend, as above.)"""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        value, width = args[0], u.bitwidth
        if width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(u), codegen


f32_bits = intrinsic(f32_bits_typer)
bits_f32 = intrinsic(bits_f32_typer)


# ---------------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------------


@_device
def bf16_to_f32(h):
    """bfloat16 bits ``h`` → float32, exact (the bits moved to the top half)."""
    return bits_f32(numba.uint64(h) << _S16)


@_device
def f32_to_bf16(x):
    """float32 → bfloat16 bits (uint16), round to nearest, ties to even; overflow to ±Inf, ±Inf
    kept, NaN → a quiet NaN with x's sign."""
    b = numba.uint64(f32_bits(x))
    if (b & _ABS32) > _INF32:
        return numba.uint16((b >> _S16) | _BF16_QUIET)
    return numba.uint16((b + _BF16_HALF + ((b >> _S16) & _ONE)) >> _S16)


# ---------------------------------------------------------------------------------------------
# float16 (IEEE binary16)
# ---------------------------------------------------------------------------------------------


@_device
def f16_to_f32(h):
    """float16 bits ``h`` → float32, exact: subnormals, ±0, ±Inf and NaN (payload kept)."""
    h = numba.uint64(h)
    sign = (h & _SIGN16) << _S16
    e = (h >> _S10) & _F16_EXP
    m = h & _F16_MANT
    # every case computed, then selected: no branch, so loops over arrays vectorize
    r = sign | ((((e << _S10) | m) << _S13) + _F16_REBIAS)  # normal
    special = sign | _INF32 | (m << _S13)  # ±Inf, NaN (payload kept)
    small = numba.uint64(f32_bits(numba.float32(m) * _TWO_M24)) | sign  # ±0 and subnormals: m · 2⁻²⁴, exact
    r = special if e == _F16_EXP else r
    r = small if e == _ZERO else r
    return bits_f32(r)


@_device
def f32_to_f16(x):
    """float32 → float16 bits (uint16), round to nearest, ties to even, as IEEE: |x| ≥ 65520 →
    ±Inf, subnormal results rounded once, |x| ≤ 2⁻²⁵ → ±0; NaN → a quiet NaN with x's sign."""
    b = numba.uint64(f32_bits(x))
    sign = (b >> _S16) & _SIGN16
    a = b & _ABS32
    # every case computed, then selected (no branch, so loops over arrays vectorize); a case's
    # value is only used in its own range of |x|
    # normal half: the carry of the rounding may run into the exponent: still correct
    r = sign | ((a - _F16_REBIAS + _F16_HALF + ((a >> _S13) & _ONE)) >> _S13)
    # subnormal half (|x| < 2⁻¹⁴, zero included): |x| + 1/2 lies in [1/2, 1), where float32's
    # spacing is 2⁻²⁴, the unit of float16's subnormals, so the float32 addition rounds |x| to
    # that unit, ties to even, and its bits above 1/2's are the half's (0x400: rounded up to 2⁻¹⁴)
    small = numba.uint64(f32_bits(bits_f32(a) + _F32_HALF)) - _F32_HALF_BITS
    r = (sign | small) if a < _F16_NORMAL else r
    r = (sign | _F16_INF) if a >= _F16_OVERFLOW else r
    r = (sign | _F16_INF | _F16_QUIET) if a > _INF32 else r
    return numba.uint16(r)


# ---------------------------------------------------------------------------------------------
# Counter-based uniforms
# ---------------------------------------------------------------------------------------------


def _mix_host(z: int) -> int:
    mask = (1 << 64) - 1
    z &= mask
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & mask
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def tensor_key(seed: int, step: int, k: int) -> int:
    """The stochastic-rounding key of tensor ``k`` at ``step`` (host, plain ints):
    MIX(MIX(MIX(k + γ) + step) + seed) mod 2⁶⁴, returned as the signed int64 with the same bits."""
    key = _mix_host(_mix_host(_mix_host(int(k) + GAMMA) + int(step)) + int(seed))
    return key - (1 << 64) if key >= 1 << 63 else key


@_device
def mix64(z):
    """The splitmix64 finalizer MIX(z) on uint64 (mod 2⁶⁴)."""
    z = numba.uint64(z)
    z ^= z >> _S30
    z *= _MIX1
    z ^= z >> _S27
    z *= _MIX2
    z ^= z >> _S31
    return z


@_device
def uniform(key, i):
    """u = (MIX(key + (i + 1)·γ) >> 40) · 2⁻²⁴, a float32 in [0, 1) with 24 random bits; ``key`` an
    int64 holding the 64 key bits (``tensor_key``), ``i`` the element index."""
    z = mix64(numba.uint64(key) + (numba.uint64(i) + _ONE) * _GAMMA)
    return numba.float32(z >> _S40) * _TWO_M24


# ---------------------------------------------------------------------------------------------
# Stochastic rounding
# ---------------------------------------------------------------------------------------------


@_device
def stochastic_bf16(x, u):
    """float32 → bfloat16 bits, rounded stochastically with the uniform ``u`` ∈ [0, 1): away from
    zero when u < (|x| − |d|)/(|u⁺| − |d|), else toward zero (d, u⁺ as in the module docstring)."""
    r = numba.uint64(f32_to_bf16(x))
    sign = r & _SIGN16
    d = r & _ABS16
    ax = abs(x)
    if bf16_to_f32(d) > ax:  # RNE went up (Inf included): step back to the truncation
        d -= _ONE
    low = bf16_to_f32(d)
    if u < (ax - low) / (bf16_to_f32(d + _ONE) - low):  # (false for NaN, ±Inf and u⁺ = ±Inf: no tests)
        d += _ONE
    return numba.uint16(sign | d)


@_device
def stochastic_f16(x, u):
    """float32 → float16 bits, rounded stochastically with the uniform ``u`` ∈ [0, 1): away from
    zero when u < (|x| − |d|)/(|u⁺| − |d|), else toward zero (d, u⁺ as in the module docstring)."""
    r = numba.uint64(f32_to_f16(x))
    sign = r & _SIGN16
    d = r & _ABS16
    ax = abs(x)
    if f16_to_f32(d) > ax:  # RNE went up (Inf included): step back to the truncation
        d -= _ONE
    low = f16_to_f32(d)
    if u < (ax - low) / (f16_to_f32(d + _ONE) - low):  # (false for NaN, ±Inf and u⁺ = ±Inf: no tests)
        d += _ONE
    return numba.uint16(sign | d)
