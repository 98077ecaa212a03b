"""Low-precision (float16) parameters of the ``"numba-cuda"`` backend, fused with the update.

The CUDA counterpart of ``kernels/numba_cpu/mixed.py`` (``docs/algorithms.md``, "Low-precision
parameters" and "Low-precision storage"), same signatures and semantics:

    mixed_step(op, params, grads, masters, states, avgs, *, rounding="nearest", seed=0, counter=0,
               indices=None, grad_mul=1.0, grad_clip=math.inf, avg_weight=0.0, **hyper)
    mixed_sumsq(grads) -> float

Per element i of tensor t, in float32 (``op``'s element update is the one the float32 kernels of
``optim.py`` run, device function for device function):

    p ← m[i]                  (master weights: the float32 copy)  or  p ← f32(θ[i])
    g ← f32(g[i]) · grad_mul, clamped to ±grad_clip
    p ← update(p, g, state)   (state float32)
    m[i] ← p                  (master weights)
    θ[i] ← rn(p)              (round to nearest even)  or  sr(p, uniform(key_t, i))
    θ̂[i] ← θ̂[i] + w (p − θ̂[i])

Only float16 parameters: the CUDA array interface has no bfloat16 typestr, so a bfloat16 device
array cannot reach this backend; any other parameter dtype raises ``TypeError``. Gradients are
float16 or float32 (one dtype per call), masters float32 or None, states and averages float32.

The 16-bit conversions are integer operations on the bits (a ``uint16`` view of θ and of a float16
g), the port of ``kernels/numba_cpu/lowbits.py``: ``f16_to_f32`` exact, ``f32_to_f16`` round to
nearest even (IEEE overflow to ±Inf, subnormals rounded once, NaN → a quiet NaN with x's sign,
the same bits as the CPU backend, where the hardware ``cvt`` would give a canonical NaN), and
stochastic rounding with the same counter-based ``uniform(key, i)`` and the same rule, so a
stochastic step gives the CPU backend's bits wherever the float32 values agree.

The key of tensor t is ``lowbits.tensor_key(seed, counter, indices[t])``, evaluated on the device
(``_tensor_key``: the same three splitmix64 finalizers on the same uint64 arithmetic) from the
tensor's index, which the table holds, and ``seed``/``counter``, passed as kernel scalars: so the
tensor-list table (``_tensors``) stays the same from step to step and is uploaded once (host-computed
keys in the table would make every step a new table), and nothing is uploaded per step.

Kernels (float32 only, one per variant of ``optim.py``, all taking a tensor-list table):

    lowp.<variant>       the mixed step: table row t = (n, first_chunk, θ, g, m or 0, θ̂ or 0,
                         index k, state₀, state₁, state₂ — as many as the variant uses)
    lowp.sumsq_partial   per-block Σ g² of float16 gradients in float64 (then ``reduce.sumsq_total``)

Under the simulator, where device functions run as Python on NumPy scalars, the bit casts are
NumPy ``view``s and the wrapping uint64 arithmetic is done on Python ints (NumPy warns on scalar
overflow); everything else is the same code.

``mixed_sumsq`` returns a Python float, as the CPU backend's, so it copies one float64 to the host
(on the launch stream, waiting for it); ``mixed_sumsq_device`` is the version that stays on the
device.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda, types

from . import _tensors
from ._arrays import address, dtype_of, empty, flat, shape_of, stream_of, to_numpy, workspace
from ._jit import SIMULATOR, THREADS, blocks_for, kernel
from .optim import _PLANS, _VARIANTS, _averaged, _transformed_grad
from .reduce import _sumsq_total, block_sum, multiplier

__all__ = ["MIXED", "f16_to_f32", "f32_to_f16", "mixed_step", "mixed_sumsq", "mixed_sumsq_device",
           "stochastic_f16", "uniform"]

_CHUNK = _tensors.CHUNK
_find = _tensors.find

# ---------------------------------------------------------------------------------------------
# bit casts and wrapping uint64 arithmetic

_MASK64 = (1 << 64) - 1

if SIMULATOR:
    import ctypes

    _CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
               np.dtype(np.uint16): ctypes.c_uint16, np.dtype(np.uint8): ctypes.c_uint8}

    def view(address, n, like):
        """A NumPy view of ``n`` elements of ``like``'s dtype at host ``address`` (simulator)."""
        pointer = ctypes.cast(int(address), ctypes.POINTER(_CTYPES[np.dtype(like.dtype)]))
        return np.ctypeslib.as_array(pointer, shape=(int(n),))

    def f32_bits(x):
        return np.float32(x).view(np.uint32)

    def bits_f32(u):
        return np.uint32(int(u) & 0xFFFFFFFF).view(np.float32)

    def _u64(x):
        return np.uint64(int(x) & _MASK64)

    def _add64(a, b):
        return np.uint64((int(a) + int(b)) & _MASK64)

    def _mul64(a, b):
        return np.uint64((int(a) * int(b)) & _MASK64)

else:
    from numba.cuda.extending import intrinsic

    from ..numba_cpu.lowbits import bits_f32_typer, f32_bits_typer

    view = _tensors.view

    f32_bits = intrinsic(f32_bits_typer)  # the CPU backend's typers, for the CUDA target
    bits_f32 = intrinsic(bits_f32_typer)

    @cuda.jit(device=True)
    def _u64(x):
        return numba.uint64(x)

    @cuda.jit(device=True)
    def _add64(a, b):
        return a + b

    @cuda.jit(device=True)
    def _mul64(a, b):
        return a * b


# Integer constants are typed globals (a Python int literal is int64, and uint64 op int64 promotes
# to float64 in numba), as in lowbits.py.
_U64 = np.uint64
_GAMMA = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_S10, _S13, _S16, _S23 = _U64(10), _U64(13), _U64(16), _U64(23)
_S27, _S30, _S31, _S40 = _U64(27), _U64(30), _U64(31), _U64(40)
_ZERO, _ONE = _U64(0), _U64(1)
_ABS32 = _U64(0x7FFFFFFF)
_INF32 = _U64(0x7F800000)
_SIGN16 = _U64(0x8000)
_ABS16 = _U64(0x7FFF)
_F16_INF = _U64(0x7C00)
_F16_QUIET = _U64(0x0200)
_F16_MANT = _U64(0x3FF)
_F16_EXP = _U64(0x1F)
_F16_OVERFLOW = _U64(0x477FF000)  # 65520: a tie, which goes to even: Inf
_F16_NORMAL = _U64(0x38800000)  # 2⁻¹⁴
_F16_ZERO = _U64(0x33000000)  # 2⁻²⁵: a tie, which goes to even: 0
_F16_REBIAS = _U64(112 << 23)
_F16_HALF = _U64(0xFFF)
_F32_HIDDEN = _U64(0x800000)
_F32_MANT = _U64(0x7FFFFF)
_E126 = _U64(126)
_TWO_M24 = np.float32(2.0 ** -24)


# ---------------------------------------------------------------------------------------------
# float16 bits (ports of lowbits.py)


@cuda.jit(device=True)
def f16_to_f32(h):
    """float16 bits ``h`` → float32, exact: subnormals, ±0, ±Inf and NaN (payload kept)."""
    h = _u64(h)
    sign = (h & _SIGN16) << _S16
    e = (h >> _S10) & _F16_EXP
    m = h & _F16_MANT
    if e == _F16_EXP:
        return bits_f32(sign | _INF32 | (m << _S13))
    if e == _ZERO:  # ±0 and subnormals: m · 2⁻²⁴, exact in float32
        return bits_f32(_u64(f32_bits(numba.float32(m) * _TWO_M24)) | sign)
    return bits_f32(sign | ((((e << _S10) | m) << _S13) + _F16_REBIAS))


@cuda.jit(device=True)
def f32_to_f16(x):
    """float32 → float16 bits (uint16), round to nearest, ties to even: |x| ≥ 65520 → ±Inf,
    subnormal results rounded once, |x| ≤ 2⁻²⁵ → ±0; NaN → a quiet NaN with x's sign."""
    b = _u64(f32_bits(x))
    sign = (b >> _S16) & _SIGN16
    a = b & _ABS32
    if a > _INF32:
        return numba.uint16(sign | _F16_INF | _F16_QUIET)
    if a >= _F16_OVERFLOW:
        return numba.uint16(sign | _F16_INF)
    if a >= _F16_NORMAL:
        return numba.uint16(sign | ((a - _F16_REBIAS + _F16_HALF + ((a >> _S13) & _ONE)) >> _S13))
    if a <= _F16_ZERO:
        return numba.uint16(sign)
    shift = _E126 - (a >> _S23)  # 14 … 24
    m = (a & _F32_MANT) | _F32_HIDDEN
    q = m >> shift
    rest = m - (q << shift)
    half = _ONE << (shift - _ONE)
    if rest > half or (rest == half and (q & _ONE) == _ONE):
        q += _ONE
    return numba.uint16(sign | q)


@cuda.jit(device=True)
def _mix64(z):
    """The splitmix64 finalizer on uint64 (mod 2⁶⁴)."""
    z = z ^ (z >> _S30)
    z = _mul64(z, _MIX1)
    z = z ^ (z >> _S27)
    z = _mul64(z, _MIX2)
    return z ^ (z >> _S31)


@cuda.jit(device=True)
def _tensor_key(seed, counter, k):
    """lowbits.tensor_key(seed, counter, k) = MIX(MIX(MIX(k + γ) + counter) + seed), as uint64."""
    z = _mix64(_add64(_u64(k), _GAMMA))
    z = _mix64(_add64(z, _u64(counter)))
    return _mix64(_add64(z, _u64(seed)))


@cuda.jit(device=True)
def uniform(key, i):
    """u = (MIX(key + (i + 1)·γ) >> 40) · 2⁻²⁴ (``key`` uint64, ``i`` the element index)."""
    z = _mix64(_add64(key, _mul64(_add64(_u64(i), _ONE), _GAMMA)))
    return numba.float32(z >> _S40) * _TWO_M24


@cuda.jit(device=True)
def stochastic_f16(x, u):
    """float32 → float16 bits rounded stochastically with ``u`` ∈ [0, 1): away from zero when
    u < (|x| − |d|)/(|u⁺| − |d|), else toward zero (lowbits.stochastic_f16)."""
    r = _u64(f32_to_f16(x))
    if x != x:
        return numba.uint16(r)
    sign = r & _SIGN16
    d = r & _ABS16
    ax = abs(x)
    if f16_to_f32(d) > ax:  # RNE went up (Inf included): step back to the truncation
        d -= _ONE
    up = d + _ONE
    if d == _F16_INF or up == _F16_INF:
        return numba.uint16(sign | d)
    low = f16_to_f32(d)
    if u < (ax - low) / (f16_to_f32(up) - low):
        return numba.uint16(sign | up)
    return numba.uint16(sign | d)


# ---------------------------------------------------------------------------------------------
# the mixed step: load, update, store

_N, _FIRST, _PARAM, _GRAD, _MASTER, _AVG, _INDEX, _START, _STATE = range(9)  # table columns


@cuda.jit(device=True)
def _load(param, grad16, grad32, master, i, grad_is32, has_master, mul, clip):
    """(p, g): θ's float32 value (the master copy, or θ decoded) and the transformed gradient."""
    if grad_is32:
        g = grad32[i]
    else:
        g = f16_to_f32(grad16[i])
    g = _transformed_grad(g, mul, clip)
    if has_master:
        p = master[i]
    else:
        p = f16_to_f32(param[i])
    return p, g


@cuda.jit(device=True)
def _store(p, param, master, avg, i, has_master, stochastic, key, has_avg, avg_weight):
    """m[i] ← p; θ[i] ← rn(p) or sr(p, uniform(key, i)); θ̂[i] ← θ̂[i] + w (p − θ̂[i])."""
    if has_master:
        master[i] = p
    if stochastic:
        param[i] = stochastic_f16(p, uniform(key, i))
    else:
        param[i] = f32_to_f16(p)
    if has_avg:
        avg[i] = _averaged(avg[i], p, avg_weight)


@cuda.jit(device=True)
def _views(table, t, like16, like32, grad_is32, has_master):
    """θ (uint16), g as uint16 and as float32 (the unused one empty), m, θ̂ of table row t."""
    n = table[t, _N]
    param = view(table[t, _PARAM], n, like16)
    grad16 = view(table[t, _GRAD], 0 if grad_is32 else n, like16)
    grad32 = view(table[t, _GRAD], n if grad_is32 else 0, like32)
    master = view(table[t, _MASTER] if has_master else table[t, _PARAM], n if has_master else 0,
                  like32)
    has_avg = table[t, _AVG] != 0
    avg = view(table[t, _AVG] if has_avg else table[t, _PARAM], n if has_avg else 0, like32)
    return param, grad16, grad32, master, avg, has_avg


def _mixed_kernel(update, states):
    """The tensor-list kernel of the mixed step around ``update`` with ``states`` state arrays."""

    def mixed(table, like16, like32, mul_array, use_mul_array, mul, clip, avg_weight, chunks,
              has_master, stochastic, grad_is32, seed, counter, hyper):
        m = mul_array[0] if use_mul_array else mul
        for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
            t = _find(table, q)
            n = table[t, _N]
            start = (q - table[t, _FIRST]) * _CHUNK
            stop = min(start + _CHUNK, n)
            # a piece starting at element s of its parameter draws that parameter's stream from s
            key = _add64(_tensor_key(seed, counter, table[t, _INDEX]), _mul64(_u64(table[t, _START]), _GAMMA))
            param, grad16, grad32, master, avg, has_avg = _views(table, t, like16, like32, grad_is32,
                                                                 has_master)
            if states == 0:
                for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                    p, g = _load(param, grad16, grad32, master, i, grad_is32, has_master, m, clip)
                    p = update(p, g, *hyper)
                    _store(p, param, master, avg, i, has_master, stochastic, key, has_avg, avg_weight)
            elif states == 1:
                s0 = view(table[t, _STATE], n, like32)
                for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                    p, g = _load(param, grad16, grad32, master, i, grad_is32, has_master, m, clip)
                    p, a = update(p, g, s0[i], *hyper)
                    s0[i] = a
                    _store(p, param, master, avg, i, has_master, stochastic, key, has_avg, avg_weight)
            elif states == 2:
                s0 = view(table[t, _STATE], n, like32)
                s1 = view(table[t, _STATE + 1], n, like32)
                for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                    p, g = _load(param, grad16, grad32, master, i, grad_is32, has_master, m, clip)
                    p, a, b = update(p, g, s0[i], s1[i], *hyper)
                    s0[i] = a
                    s1[i] = b
                    _store(p, param, master, avg, i, has_master, stochastic, key, has_avg, avg_weight)
            else:
                s0 = view(table[t, _STATE], n, like32)
                s1 = view(table[t, _STATE + 1], n, like32)
                s2 = view(table[t, _STATE + 2], n, like32)
                for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                    p, g = _load(param, grad16, grad32, master, i, grad_is32, has_master, m, clip)
                    p, a, b, c = update(p, g, s0[i], s1[i], s2[i], *hyper)
                    s0[i] = a
                    s1[i] = b
                    s2[i] = c
                    _store(p, param, master, avg, i, has_master, stochastic, key, has_avg, avg_weight)

    return mixed


def _mixed_signature(scalars):
    def signature(dt):
        f32 = types.float32
        return types.void(types.int64[:, ::1], types.uint16[::1], f32[::1], f32[::1], types.boolean,
                          f32, f32, f32, types.int64, types.boolean, types.boolean, types.boolean,
                          types.int64, types.int64, types.UniTuple(f32, scalars))
    return signature


MIXED = {}
for _name, (_update, _states, _scalars) in _VARIANTS.items():
    MIXED[_name] = kernel(_mixed_signature(_scalars), name=f"lowp.{_name}", dtypes=(types.float32,))(
        _mixed_kernel(_update, _states))
del _name, _update, _states, _scalars


def _int64(value) -> np.int64:
    """An integer taken mod 2⁶⁴, as the int64 with the same bits."""
    value = int(value) & _MASK64
    return np.int64(value - (1 << 64) if value >= 1 << 63 else value)


def _check_params(params, grads):
    for t, param in enumerate(params):
        if dtype_of(param) != np.float16:
            raise TypeError(f"params[{t}]: the numba-cuda backend stores 16-bit parameters as float16 "
                            f"only (the CUDA array interface has no bfloat16), got {dtype_of(param)}")
    gdt = dtype_of(grads[0])
    if gdt not in (np.float16, np.float32):
        raise TypeError(f"grads[0]: expected float16 or float32, got {gdt}")
    for t, grad in enumerate(grads):
        if dtype_of(grad) != gdt:
            raise TypeError(f"grads[{t}]: one gradient dtype per call ({gdt}), got {dtype_of(grad)}")
    return gdt == np.float32


def mixed_step(op, params, grads, masters, states, avgs, *, rounding="nearest", seed=0, counter=0,
               indices=None, starts=None, grad_mul=1.0, grad_clip=math.inf, avg_weight=0.0, **hyper) -> None:
    """``op`` (``"adam_step"``, ...) on float16 parameters, in place, in one kernel launch.

    ``params``: C-contiguous float16 device arrays; ``grads``: float16 or float32 (one dtype);
    ``masters``: float32 master copies or None; ``states``: per tensor the op's state tuple
    (float32); ``avgs``: float32 Polyak averages or None. ``rounding``: ``"nearest"`` or
    ``"stochastic"``, element i of tensor t drawing ``uniform(tensor_key(seed, counter,
    indices[t]), i)`` (``indices`` defaults to 0, 1, …), or with ``starts`` ``uniform(…, starts[t] + i)``:
    tensor t is then the piece of a parameter that begins at element starts[t]."""
    variant, used, scalars = _PLANS[op](**hyper)
    if not params:
        return
    grad_is32 = _check_params(params, grads)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    stochastic = rounding == "stochastic"
    if indices is None:
        indices = range(len(params))
    stream = stream_of(*params, *grads, *(masters or ()), *(states[k][j] for k in range(len(params))
                                                           for j in used),
                       *(a for a in (avgs or ()) if a is not None), grad_mul)
    rows = []
    for k, param in enumerate(params):
        n = math.prod(shape_of(param))
        if n == 0:
            continue
        avg = None if avgs is None else avgs[k]
        rows.append((n, address(param), address(grads[k]),
                     0 if masters is None else address(masters[k]),
                     0 if avg is None else address(avg), int(indices[k]), 0 if starts is None else int(starts[k]),
                     *(address(states[k][j]) for j in used)))
    table, chunks = _tensors.table(rows, stream)
    if chunks == 0:
        return
    like16 = flat(params[0]).view(np.uint16)
    float32 = [*(masters or ()), *(a for a in (avgs or ()) if a is not None),
               *(states[k][j] for k in range(len(params)) for j in used)]
    if grad_is32:
        float32.append(grads[0])
    # any float32 array types the float32 views (its contents are not read); a scratch one if none
    like32 = flat(float32[0]) if float32 else workspace("lowp.like32", (1,), np.float32, stream)
    mul_array, use_mul_array, mul = multiplier(grad_mul, np.dtype(np.float32), stream, like32)
    f32 = np.float32
    MIXED[variant][np.float32][blocks_for(chunks, threads=1), THREADS, stream](
        table, like16, like32, mul_array, use_mul_array, f32(mul), f32(grad_clip), f32(avg_weight),
        np.int64(chunks), masters is not None, stochastic, grad_is32, _int64(seed), _int64(counter),
        tuple(f32(s) for s in scalars))


# ---------------------------------------------------------------------------------------------
# Σ g² of float16 gradients


@kernel(lambda dt: types.void(types.int64[:, ::1], types.uint16[::1], types.int64, types.float64[::1],
                              types.int64),
        name="lowp.sumsq_partial", dtypes=(types.float32,),
        float64="the sum of squares is accumulated in float64 by contract")
def _sumsq_partial(table, like16, chunks, partial, offset):
    """partial[offset + block] = Σ g² (float64) over the chunks of float16 g this block visits."""
    acc = 0.0
    for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
        t = _find(table, q)
        n = table[t, 0]
        start = (q - table[t, 1]) * _CHUNK
        stop = min(start + _CHUNK, n)
        grad = view(table[t, 2], n, like16)
        for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
            g = numba.float64(f16_to_f32(grad[i]))
            acc += g * g
    acc = block_sum(acc)
    if cuda.threadIdx.x == 0:
        partial[offset + cuda.blockIdx.x] = acc


def mixed_sumsq_device(grads):
    """Σ g² over float16 device arrays, as a float64 device array of shape (1,) (no host sync)."""
    for t, g in enumerate(grads):
        if dtype_of(g) != np.float16:
            raise TypeError(f"grads[{t}]: expected float16, got {dtype_of(g)}")
    like = grads[0] if grads else None
    out = empty((1,), np.float64, like) if like is not None else cuda.device_array(1, np.float64)
    stream = stream_of(out, *grads)
    members = [(g, math.prod(shape_of(g))) for g in grads]
    members = [(g, n) for g, n in members if n]
    table, chunks = _tensors.table([(n, address(g)) for g, n in members], stream)
    count = blocks_for(chunks, threads=1) if chunks else 0
    partial = workspace("lowp.sumsq", (max(1, count),), np.float64, stream)
    if chunks:
        _sumsq_partial[np.float32][count, THREADS, stream](
            table, flat(members[0][0]).view(np.uint16), np.int64(chunks), partial, np.int64(0))
    _sumsq_total[np.float64][1, THREADS, stream](partial, np.int64(count), flat(out))
    return out


def mixed_sumsq(grads) -> float:
    """Σ g² over float16 device arrays, accumulated in float64, as a Python float (copies one
    float64 to the host, as the CPU backend's ``mixed_sumsq`` returns a float)."""
    if not grads:
        return 0.0
    return float(to_numpy(mixed_sumsq_device(grads))[0])
