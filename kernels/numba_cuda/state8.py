"""Optimizer updates with 8-bit block-quantized state, ``"numba-cuda"`` backend: the CUDA counterpart
of ``kernels/numba_cpu/state8.py`` (``docs/algorithms.md``, "Optimizers with 8-bit state"), same
signatures, rules and results:

    state8_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf,
                avg_weight=0.0, block=256, masters=None, rounding="nearest", seed=0, counter=0,
                indices=None, **hyper)
    state8_supported(op, **hyper) -> None or the reason;  state8_layout(op, **hyper)

float32 θ, g (and θ̂) device arrays; each used state a pair (codes uint8 of θ's shape, absmax
float32 of ⌈n / block⌉ entries). One CUDA thread block per quantization block (blocks stride over
the quantization blocks of every tensor, one launch per call):

    each thread, for its elements j of the block:   s_k = map_k[q_k,j] · a_k;  g ← extras(g);
        θ_j, s_k ← update(θ_j, g, s_k);  θ̂_j ← θ̂_j + w (θ_j − θ̂_j);  scratch_k[j] = s_k
    the block:  A_k = max |s_k| as the max of the |s| bit patterns (a shared-memory tree; NaN
        patterns lie above Inf's, so A_k ≥ Inf's pattern exactly when the block is not finite)
    each thread:  a_k = A_k (NaN, codes = the zero code, if not finite; codes = zero if A_k = 0),
        q_k,j = #{i : s_k,j / a_k > t_i}     (the 8-step search over the 255 midpoints)

The maps and midpoints are those of ``kernels/numba_cpu/quantize.py`` (constant memory, copied to
shared memory once per thread block). The element updates evaluate the reference's expressions in
its order, with multiplications and additions as ``__fmul_rn`` / ``__fadd_rn`` / ``__fsub_rn``
(libdevice), which NVVM never contracts into a fused multiply-add: so θ, the codes and absmax
equal the reference's (``fastopt/reference/state8.py``) bit for bit, as on the CPU backend.

The quantization block is at most ``MAX_BLOCK`` elements (the scratch is static shared memory);
a larger ``block`` raises ``ValueError``. The tensor list goes through ``_tensors.table`` with
each tensor's size given as (its number of blocks) · ``CHUNK``, so that a table chunk is exactly
one quantization block; the real size and the block are extra table columns.

float16 θ (``docs/algorithms.md``, "Low-precision parameters"; ``masters``, ``rounding``,
``seed``, ``counter``, ``indices`` as ``lowp.mixed_step`` takes them, the semantics of the CPU
backend and of ``fastopt/reference/state8.py``): the same blocks, with θ's float32 value and the
gradient read as ``lowp.mixed_step`` reads them and θ stored rounded (``lowp``'s bit conversions,
stochastic rounding and device-side tensor keys), so that, with masters or not, rounded to nearest
or stochastically, θ, the masters, the codes and absmax equal the reference's bit for bit:

    p = m[i] (masters) or f32(θ[i]);   g = f32(g[i]) (float16 g) or g[i] (float32 g)
    s_k = map_k[q_k,j] · a_k;  g ← extras(g);  p, s_k ← update(p, g, s_k);  θ̂_j ← θ̂_j + w (p − θ̂_j)
    m[i] ← p;  θ[i] ← rn(p) or sr(p, uniform(tensor_key(seed, counter, indices[t]), i))
    then the block requantizes as above

Only float16: the CUDA array interface has no bfloat16 typestr, so a bfloat16 device array cannot
reach this backend; another 16-bit θ raises ``TypeError`` naming the backend (``lowp``'s check).
Gradients are float16 or float32 (one dtype per call), masters float32 or None (None for float32
θ, which is its own master copy: masters given with float32 θ raise ``ValueError``); ``rounding``,
``seed``, ``counter`` and ``indices`` do not apply to float32 θ. No bfloat16 state
(``state_dtype``) on this backend. Memory traffic per element of float16 θ: 2 (θ) + 2 or 4 (g) + k
(codes) read, 2 + k written (+ 8 with masters, + 8 with θ̂), plus the absmax per block.

Kernels (float32 arithmetic only): ``state8.<variant>`` (float32 θ) and ``state8.<variant>_f16``
(float16 θ; table rows carry the master copy's address and the tensor index as two more columns)
for adam, sgd_momentum, sgd_nesterov, sgd_nesterov_torch, adagrad, rmsprop, rmsprop_momentum,
rmsprop_nesterov.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from . import _tensors
from ._arrays import address, dtype_of, flat, shape_of, stream_of
from ._jit import SIMULATOR, THREADS, blocks_for, kernel
from .lowp import _check_params, _int64, _load, _store, _tensor_key, _u64, bits_f32, f32_bits, view
from .reduce import multiplier
from ..numba_cpu.quantize import MAP_AS, THRESHOLDS, ZERO
from .._state8_rules import SUPPORTED, state8_layout, state8_supported

__all__ = ["MAX_BLOCK", "STATE8", "STATE8_F16", "SUPPORTED", "state8_layout", "state8_step", "state8_supported"]

MAX_BLOCK = 2048
_CHUNK = _tensors.CHUNK
_find = _tensors.find
_F32 = np.dtype(np.float32)

# rows: signed map, unsigned map, signed midpoints + Inf, unsigned midpoints + Inf
_MAPS = np.stack([MAP_AS[(True, _F32)], MAP_AS[(False, _F32)],
                  np.append(THRESHOLDS[(True, _F32)], np.float32(np.inf)),
                  np.append(THRESHOLDS[(False, _F32)], np.float32(np.inf))]).astype(np.float32)
assert _MAPS.shape == (4, 256)
_ZERO_SIGNED = np.uint8(ZERO[True])
_ZERO_UNSIGNED = np.uint8(ZERO[False])
_ABS32 = np.uint64(0x7FFFFFFF)
_INF32 = np.uint64(0x7F800000)
_NAN32 = np.uint64(0x7FC00000)
_NO_BITS = np.uint64(0)
_F32_ZERO = np.float32(0)

if SIMULATOR:
    def _mul(a, b):
        return a * b

    def _add(a, b):
        return a + b

    def _sub(a, b):
        return a - b
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _mul(a, b):
        return libdevice.fmul_rn(a, b)

    @cuda.jit(device=True)
    def _add(a, b):
        return libdevice.fadd_rn(a, b)

    @cuda.jit(device=True)
    def _sub(a, b):
        return libdevice.fsub_rn(a, b)


# ---------------------------------------------------------------------------------------------
# element updates (dequantized float32 states in and out), the reference's expressions, no FMA


@cuda.jit(device=True)
def _l2(g, p, weight_decay):
    if weight_decay != 0:
        return _add(g, _mul(weight_decay, p))
    return g


@cuda.jit(device=True)
def _transformed(g, mul, clip):
    g = _mul(g, mul)
    if g > clip:
        return clip
    if g < -clip:
        return -clip
    return g


@cuda.jit(device=True)
def _adam8(p, g, m, v, h):
    """θ ← θ − ελθ (AdamW); g ← g + λθ (Adam); m ← β1 m + (1 − β1) g; v ← β2 v + (1 − β2) g ⊙ g;
    θ ← θ − ε (m / (1 − β1ᵗ)) / (δ + √(v / (1 − β2ᵗ)))."""
    lr, bc1, bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay = h
    if decay != 0:
        p = _sub(p, _mul(decay, p))
    g = _l2(g, p, l2)
    m = _add(_mul(beta1, m), _mul(one_minus_beta1, g))
    v = _add(_mul(beta2, v), _mul(_mul(one_minus_beta2, g), g))
    return _sub(p, _mul(lr, m / bc1) / _add(eps, math.sqrt(v / bc2))), m, v


@cuda.jit(device=True)
def _sgd_momentum8(p, g, v, unused, h):
    """g ← g + λθ; v ← αv + c g; θ ← θ + k v (textbook c = −ε, k = 1; torch c = 1, k = −ε)."""
    momentum, c, k, weight_decay = h
    g = _l2(g, p, weight_decay)
    v = _add(_mul(momentum, v), _mul(c, g))
    return _add(p, _mul(k, v)), v, unused


@cuda.jit(device=True)
def _sgd_nesterov8(p, g, v, unused, h):
    """g ← g + λθ; v ← αv − εg; θ ← θ + αv − εg (textbook)."""
    lr, momentum, weight_decay = h
    g = _l2(g, p, weight_decay)
    v = _sub(_mul(momentum, v), _mul(lr, g))
    return _sub(_add(p, _mul(momentum, v)), _mul(lr, g)), v, unused


@cuda.jit(device=True)
def _sgd_nesterov_torch8(p, g, b, unused, h):
    """g ← g + λθ; b ← αb + g; θ ← θ − ε(g + αb) (torch)."""
    lr, momentum, weight_decay = h
    g = _l2(g, p, weight_decay)
    b = _add(_mul(momentum, b), g)
    return _sub(p, _mul(lr, _add(g, _mul(momentum, b)))), b, unused


@cuda.jit(device=True)
def _adagrad8(p, g, r, unused, h):
    """g ← g + λθ; r ← r + g ⊙ g; θ ← θ − εg / (δ + √r)."""
    lr, eps, weight_decay = h
    g = _l2(g, p, weight_decay)
    r = _add(r, _mul(g, g))
    return _sub(p, _mul(lr, g) / _add(eps, math.sqrt(r))), r, unused


@cuda.jit(device=True)
def _rmsprop8(p, g, r, unused, h):
    """g ← g + λθ; r ← ρr + (1 − ρ) g ⊙ g; θ ← θ − εg / (√(δ_in + r) + δ_out)."""
    lr, rho, one_minus_rho, eps_in, eps_out, weight_decay = h
    g = _l2(g, p, weight_decay)
    r = _add(_mul(rho, r), _mul(_mul(one_minus_rho, g), g))
    return _sub(p, _mul(lr, g) / _add(math.sqrt(_add(eps_in, r)), eps_out)), r, unused


@cuda.jit(device=True)
def _rmsprop_momentum8(p, g, r, v, h):
    """r ← ρr + (1 − ρ) g ⊙ g; d = √(δ_in + r) + δ_out; v ← αv + c g / d; θ ← θ + k v."""
    rho, one_minus_rho, eps_in, eps_out, momentum, c, k, weight_decay = h
    g = _l2(g, p, weight_decay)
    r = _add(_mul(rho, r), _mul(_mul(one_minus_rho, g), g))
    d = _add(math.sqrt(_add(eps_in, r)), eps_out)
    v = _add(_mul(momentum, v), _mul(c, g) / d)
    return _add(p, _mul(k, v)), r, v


@cuda.jit(device=True)
def _rmsprop_nesterov8(p, g, r, v, h):
    """r ← ρr + (1 − ρ) g ⊙ g; u = εg / √(δ + r); v ← αv − u; θ ← θ + αv − u (textbook)."""
    lr, rho, one_minus_rho, eps, momentum, weight_decay = h
    g = _l2(g, p, weight_decay)
    r = _add(_mul(rho, r), _mul(_mul(one_minus_rho, g), g))
    u = _mul(lr, g) / math.sqrt(_add(eps, r))
    v = _sub(_mul(momentum, v), u)
    return _sub(_add(p, _mul(momentum, v)), u), r, v


# ---------------------------------------------------------------------------------------------
# the kernel: one thread block per quantization block

_N, _FIRST, _PARAM, _GRAD, _AVG, _CODES0, _ABSMAX0, _CODES1, _ABSMAX1, _SIZE, _BLOCK = range(11)


@cuda.jit(device=True)
def _code(x, maps, row):
    """#{i : x > t_i} over the 255 midpoints of ``maps[row]`` (an 8-step search; t_255 = +Inf)."""
    q = 0
    step = 128
    while step > 0:
        if x > maps[row, q + step - 1]:
            q += step
        step >>= 1
    return q


@cuda.jit(device=True)
def _block_max(red, k, bits):
    """max of ``bits`` over the thread block (a power-of-two count), for every thread."""
    tid = cuda.threadIdx.x
    red[k, tid] = bits
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            other = red[k, tid + step]
            if other > red[k, tid]:
                red[k, tid] = other
        cuda.syncthreads()
        step //= 2
    return red[k, 0]


@cuda.jit(device=True)
def _requantize(scratch, k, count, amax, codes, i0, absmax, b, maps, row, zero):
    if cuda.threadIdx.x == 0:
        if amax >= _INF32:
            absmax[b] = bits_f32(_NAN32)
        else:
            absmax[b] = bits_f32(amax)
    if amax >= _INF32 or amax == _NO_BITS:
        for j in range(cuda.threadIdx.x, count, cuda.blockDim.x):
            codes[i0 + j] = zero
    else:
        a = bits_f32(amax)
        for j in range(cuda.threadIdx.x, count, cuda.blockDim.x):
            codes[i0 + j] = _code(scratch[k, j] / a, maps, row)


@cuda.jit(device=True)
def _shared_maps(maps, constants, signed0, signed1):
    """Rows 0 and 1 of the shared ``maps``: the maps of states 0 and 1 (signed or unsigned), rows
    2 and 3 their midpoints, copied from the constant table by the block's threads; then a barrier."""
    rows0 = 0 if signed0 else 1
    rows1 = 0 if signed1 else 1
    for j in range(cuda.threadIdx.x, 256, cuda.blockDim.x):
        maps[0, j] = constants[rows0, j]
        maps[1, j] = constants[rows1, j]
        maps[2, j] = constants[rows0 + 2, j]
        maps[3, j] = constants[rows1 + 2, j]
    cuda.syncthreads()


@cuda.jit(device=True)
def _quantized(table, t, n, blocks, two, like8, like32):
    """Tensor t's codes (n) and absmax (blocks) of state 0, and of state 1 when ``two`` (else empty
    views)."""
    codes0 = view(table[t, _CODES0], n, like8)
    absmax0 = view(table[t, _ABSMAX0], blocks, like32)
    codes1 = view(table[t, _CODES1] if two else table[t, _CODES0], n if two else 0, like8)
    absmax1 = view(table[t, _ABSMAX1] if two else table[t, _ABSMAX0], blocks if two else 0, like32)
    return codes0, absmax0, codes1, absmax1


@cuda.jit(device=True)
def _keep(p, s0, s1, i, j, avg, has_avg, avg_weight, scratch, bits0, bits1, two):
    """After element i's update (p, new states s0, s1): θ̂[i] ← θ̂[i] + w (p − θ̂[i]) (unfused), the
    states to the scratch rows at j, and the running largest |s| bit patterns, returned."""
    if has_avg:
        a = avg[i]
        avg[i] = _add(a, _mul(avg_weight, _sub(p, a)))
    scratch[0, j] = s0
    bits0 = max(bits0, _u64(f32_bits(s0)) & _ABS32)
    if two:
        scratch[1, j] = s1
        bits1 = max(bits1, _u64(f32_bits(s1)) & _ABS32)
    return bits0, bits1


@cuda.jit(device=True)
def _requantize_block(red, scratch, count, bits0, bits1, codes0, codes1, i0, absmax0, absmax1, b, maps, zero0,
                      zero1, two):
    """The block's new absmax of each state (the largest |s| pattern over the threads' ``bits``),
    then its codes from the scratch rows; a barrier after, as scratch and red serve the next block."""
    amax0 = _block_max(red, 0, bits0)
    _requantize(scratch, 0, count, amax0, codes0, i0, absmax0, b, maps, 2, zero0)
    if two:
        amax1 = _block_max(red, 1, bits1)
        _requantize(scratch, 1, count, amax1, codes1, i0, absmax1, b, maps, 3, zero1)
    cuda.syncthreads()


def _state8_kernel(update, states):
    def state8(table, like32, like8, mul_array, use_mul_array, mul, clip, avg_weight, chunks,
               signed0, signed1, hyper):
        m = mul_array[0] if use_mul_array else mul
        maps = cuda.shared.array((4, 256), types.float32)
        scratch = cuda.shared.array((2, MAX_BLOCK), types.float32)
        red = cuda.shared.array((2, THREADS), types.uint64)
        _shared_maps(maps, cuda.const.array_like(_MAPS), signed0, signed1)
        zero0 = _ZERO_SIGNED if signed0 else _ZERO_UNSIGNED
        zero1 = _ZERO_SIGNED if signed1 else _ZERO_UNSIGNED
        for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
            t = _find(table, q)
            b = q - table[t, _FIRST]
            n = table[t, _SIZE]
            block = table[t, _BLOCK]
            blocks = table[t, _N] // _CHUNK
            i0 = b * block
            count = min(block, n - i0)
            param = view(table[t, _PARAM], n, like32)
            grad = view(table[t, _GRAD], n, like32)
            has_avg = table[t, _AVG] != 0
            avg = view(table[t, _AVG] if has_avg else table[t, _PARAM], n if has_avg else 0, like32)
            two = states > 1
            codes0, absmax0, codes1, absmax1 = _quantized(table, t, n, blocks, two, like8, like32)
            a0 = absmax0[b]
            a1 = absmax1[b] if two else _F32_ZERO
            bits0 = _NO_BITS
            bits1 = _NO_BITS
            for j in range(cuda.threadIdx.x, count, cuda.blockDim.x):
                i = i0 + j
                s0 = maps[0, codes0[i]] * a0
                s1 = maps[1, codes1[i]] * a1 if two else _F32_ZERO
                g = _transformed(grad[i], m, clip)
                p, s0, s1 = update(param[i], g, s0, s1, hyper)
                param[i] = p
                bits0, bits1 = _keep(p, s0, s1, i, j, avg, has_avg, avg_weight, scratch, bits0, bits1, two)
            _requantize_block(red, scratch, count, bits0, bits1, codes0, codes1, i0, absmax0, absmax1, b, maps,
                              zero0, zero1, two)

    return state8


def _signature(scalars):
    def signature(dt):
        f32 = types.float32
        return types.void(types.int64[:, ::1], f32[::1], types.uint8[::1], f32[::1], types.boolean,
                          f32, f32, f32, types.int64, types.boolean, types.boolean,
                          types.UniTuple(f32, scalars))
    return signature


# variant -> (element update, quantized states, scalars)
_VARIANTS = {
    "adam": (_adam8, 2, 10),
    "sgd_momentum": (_sgd_momentum8, 1, 4),
    "sgd_nesterov": (_sgd_nesterov8, 1, 3),
    "sgd_nesterov_torch": (_sgd_nesterov_torch8, 1, 3),
    "adagrad": (_adagrad8, 1, 3),
    "rmsprop": (_rmsprop8, 1, 6),
    "rmsprop_momentum": (_rmsprop_momentum8, 2, 8),
    "rmsprop_nesterov": (_rmsprop_nesterov8, 2, 6),
}

STATE8 = {}
for _name, (_update, _states, _scalars) in _VARIANTS.items():
    STATE8[_name] = kernel(_signature(_scalars), name=f"state8.{_name}", dtypes=(types.float32,))(
        _state8_kernel(_update, _states))
del _name, _update, _states, _scalars


# ---------------------------------------------------------------------------------------------
# the float16 kernel: the same blocks, θ float16 (a uint16 view), g float16 or float32, masters

_MASTER, _INDEX = 11, 12  # the float16 kernel's two more table columns


def _state8_f16_kernel(update, states):
    """The float32 kernel's blocks with float16 θ: p = m[i] or f32(θ[i]), g = f32(g[i]) (or g[i]
    float32), the same update and requantization, then m[i] ← p and θ[i] ← rn(p) or
    sr(p, uniform(key_t, i)) (``lowp``: the bit conversions, stochastic rounding and tensor keys of
    ``mixed_step``)."""

    def state8_f16(table, like16, like32, like8, mul_array, use_mul_array, mul, clip, avg_weight,
                   chunks, signed0, signed1, has_master, stochastic, grad_is32, seed, counter, hyper):
        m = mul_array[0] if use_mul_array else mul
        maps = cuda.shared.array((4, 256), types.float32)
        scratch = cuda.shared.array((2, MAX_BLOCK), types.float32)
        red = cuda.shared.array((2, THREADS), types.uint64)
        _shared_maps(maps, cuda.const.array_like(_MAPS), signed0, signed1)
        zero0 = _ZERO_SIGNED if signed0 else _ZERO_UNSIGNED
        zero1 = _ZERO_SIGNED if signed1 else _ZERO_UNSIGNED
        for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
            t = _find(table, q)
            b = q - table[t, _FIRST]
            n = table[t, _SIZE]
            block = table[t, _BLOCK]
            blocks = table[t, _N] // _CHUNK
            i0 = b * block
            count = min(block, n - i0)
            key = _tensor_key(seed, counter, table[t, _INDEX])
            param = view(table[t, _PARAM], n, like16)
            grad16 = view(table[t, _GRAD], 0 if grad_is32 else n, like16)
            grad32 = view(table[t, _GRAD], n if grad_is32 else 0, like32)
            master = view(table[t, _MASTER] if has_master else table[t, _PARAM], n if has_master else 0,
                          like32)
            has_avg = table[t, _AVG] != 0
            avg = view(table[t, _AVG] if has_avg else table[t, _PARAM], n if has_avg else 0, like32)
            two = states > 1
            codes0, absmax0, codes1, absmax1 = _quantized(table, t, n, blocks, two, like8, like32)
            a0 = absmax0[b]
            a1 = absmax1[b] if two else _F32_ZERO
            bits0 = _NO_BITS
            bits1 = _NO_BITS
            for j in range(cuda.threadIdx.x, count, cuda.blockDim.x):
                i = i0 + j
                s0 = maps[0, codes0[i]] * a0
                s1 = maps[1, codes1[i]] * a1 if two else _F32_ZERO
                p, g = _load(param, grad16, grad32, master, i, grad_is32, has_master, m, clip)  # as mixed_step
                p, s0, s1 = update(p, g, s0, s1, hyper)
                # m[i] and θ[i] as mixed_step stores them; the average (unfused, as the reference) in _keep
                _store(p, param, master, avg, i, has_master, stochastic, key, False, avg_weight)
                bits0, bits1 = _keep(p, s0, s1, i, j, avg, has_avg, avg_weight, scratch, bits0, bits1, two)
            _requantize_block(red, scratch, count, bits0, bits1, codes0, codes1, i0, absmax0, absmax1, b, maps,
                              zero0, zero1, two)

    return state8_f16


def _f16_signature(scalars):
    def signature(dt):
        f32, flag = types.float32, types.boolean
        return types.void(types.int64[:, ::1], types.uint16[::1], f32[::1], types.uint8[::1], f32[::1],
                          flag, f32, f32, f32, types.int64, flag, flag, flag, flag, flag, types.int64,
                          types.int64, types.UniTuple(f32, scalars))
    return signature


STATE8_F16 = {}
for _name, (_update, _states, _scalars) in _VARIANTS.items():
    STATE8_F16[_name] = kernel(_f16_signature(_scalars), name=f"state8.{_name}_f16",
                               dtypes=(types.float32,))(_state8_f16_kernel(_update, _states))
del _name, _update, _states, _scalars


# ---------------------------------------------------------------------------------------------
# plans: the CPU backend's (same scalars, same slots), by variant name


def _plan(op, hyper):
    """(variant, ((slot, signed), ...), scalars) of a supported configuration."""
    if op == "adam_step":
        step, lr, beta1, beta2 = int(hyper["step"]), hyper["lr"], hyper["beta1"], hyper["beta2"]
        wd = hyper["weight_decay"]
        l2, decay = (0.0, lr * wd) if hyper["decoupled_weight_decay"] else (wd, 0.0)
        return "adam", ((0, True), (1, False)), (lr, 1 - beta1 ** step, 1 - beta2 ** step, beta1,
                                                 1 - beta1, beta2, 1 - beta2, hyper["eps"], l2, decay)
    if op == "sgd_step":
        lr, momentum, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        if hyper["nesterov"]:
            variant = "sgd_nesterov" if hyper["convention"] == "textbook" else "sgd_nesterov_torch"
            return variant, ((0, True),), (lr, momentum, wd)
        c, k = (-lr, 1.0) if hyper["convention"] == "textbook" else (1.0, -lr)
        return "sgd_momentum", ((0, True),), (momentum, c, k, wd)
    if op == "adagrad_step":
        return "adagrad", ((0, False),), (hyper["lr"], hyper["eps"], hyper["weight_decay"])
    lr, rho, eps, momentum, wd = (hyper["lr"], hyper["rho"], hyper["eps"], hyper["momentum"],
                                  hyper["weight_decay"])
    eps_in, eps_out = (eps, 0.0) if hyper["convention"] == "textbook" else (0.0, eps)
    if momentum == 0:
        return "rmsprop", ((0, False),), (lr, rho, 1 - rho, eps_in, eps_out, wd)
    slots = ((0, False), (2, True))
    if hyper["nesterov"]:
        return "rmsprop_nesterov", slots, (lr, rho, 1 - rho, eps, momentum, wd)
    c, k = (-lr, 1.0) if hyper["convention"] == "textbook" else (1.0, -lr)
    return "rmsprop_momentum", slots, (rho, 1 - rho, eps_in, eps_out, momentum, c, k, wd)


def _check(array, where, dtype, shape):
    if dtype_of(array) != dtype or tuple(shape_of(array)) != tuple(shape):
        raise ValueError(f"{where} must be a device array of dtype {np.dtype(dtype)} and shape {shape}, "
                         f"got {dtype_of(array)} {tuple(shape_of(array))}")


def _check_lengths(params, **lists):
    for name, seq in lists.items():
        if seq is not None and len(seq) != len(params):
            raise ValueError(f"{name} has {len(seq)} entries, params has {len(params)}")


def _state_pairs(states, t, slots, shape, n, block):
    """The (codes, absmax) addresses of tensor t's used states, checked; two pairs, (0, 0) unused."""
    pairs = []
    for slot, _ in slots:
        state = states[t]
        if not isinstance(state, (tuple, list)) or len(state) <= slot:
            raise ValueError(f"states[{t}] must be a tuple in the op's state order, got {state!r:.80}")
        pair = state[slot]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"states[{t}][{slot}] must be a pair (codes, absmax), got {pair!r:.80}")
        _check(pair[0], f"states[{t}][{slot}][0] (codes)", np.uint8, shape)
        _check(pair[1], f"states[{t}][{slot}][1] (absmax)", np.float32, (-(-n // block),))
        pairs.append((address(pair[0]), address(pair[1])))
    if len(pairs) == 1:
        pairs.append((0, 0))
    return pairs


def _is_16bit(dtype) -> bool:
    return np.dtype(dtype).itemsize == 2


def state8_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf,
                avg_weight=0.0, block=256, masters=None, rounding="nearest", seed=0, counter=0,
                indices=None, **hyper) -> None:
    """``op`` with 8-bit block-wise quantized state on every tensor of the lists, in one launch
    (module docstring); raises ValueError (TypeError for a dtype), before writing anything, for an
    unsupported configuration or a bad argument.

    ``params`` float32, or float16 (one dtype per call; bfloat16 cannot reach this backend and
    raises ``TypeError``), updated as ``lowp.mixed_step`` updates them: ``grads`` float16 or
    float32 (one dtype), ``masters`` float32 copies or None, θ stored rounded to nearest or
    stochastically (``rounding``) with the keys ``tensor_key(seed, counter, indices[t])``
    (``indices`` defaults to 0, 1, …). float32 ``params`` are not rounded, so ``rounding``,
    ``seed``, ``counter`` and ``indices`` do not apply to them, and ``masters`` must be None."""
    reason = state8_supported(op, **hyper)
    if reason is not None:
        raise ValueError(reason)
    if not isinstance(block, int) or not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be an int in [1, {MAX_BLOCK}] on numba-cuda, got {block!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    if len(params) == 0:
        return
    _check_lengths(params, grads=grads, states=states, avgs=avgs, masters=masters, indices=indices)
    variant, slots, scalars = _plan(op, hyper)
    if _is_16bit(dtype_of(params[0])):
        _state8_f16_step(variant, slots, scalars, params, grads, states, avgs, masters, grad_mul, grad_clip,
                         avg_weight, block, rounding == "stochastic", seed, counter, indices)
        return
    if masters is not None:
        raise ValueError("masters: float32 params are their own master copy; expected None, got a list "
                         f"of {len(masters)}")
    rows = []
    for t, param in enumerate(params):
        shape = tuple(shape_of(param))
        n = math.prod(shape)
        _check(param, f"params[{t}]", np.float32, shape)
        _check(grads[t], f"grads[{t}]", np.float32, shape)
        avg = None if avgs is None else avgs[t]
        if avg is not None:
            _check(avg, f"avgs[{t}]", np.float32, shape)
        pairs = _state_pairs(states, t, slots, shape, n, block)
        if n == 0:
            continue
        rows.append((-(-n // block) * _CHUNK, address(param), address(grads[t]),
                     0 if avg is None else address(avg), *pairs[0], *pairs[1], n, block))
    if not rows:
        return
    arrays = [*params, *grads, *(a for a in (avgs or ()) if a is not None),
              *(states[t][slot][j] for t in range(len(params)) for slot, _ in slots for j in (0, 1)),
              grad_mul]
    stream = stream_of(*arrays)
    table, chunks = _tensors.table(rows, stream)
    like32 = flat(params[0])
    like8 = flat(states[0][slots[0][0]][0])
    mul_array, use_mul_array, mul = multiplier(grad_mul, _F32, stream, like32)
    f32 = np.float32
    signed = [s for _, s in slots] + [slots[0][1]]
    STATE8[variant][np.float32][blocks_for(chunks, threads=1), THREADS, stream](
        table, like32, like8, mul_array, use_mul_array, f32(mul), f32(grad_clip), f32(avg_weight),
        np.int64(chunks), signed[0], signed[1], tuple(f32(s) for s in scalars))


def _state8_f16_step(variant, slots, scalars, params, grads, states, avgs, masters, grad_mul, grad_clip,
                     avg_weight, block, stochastic, seed, counter, indices):
    """``state8_step`` on float16 ``params``: checks everything, then one launch of
    ``STATE8_F16[variant]``."""
    grad_is32 = _check_params(params, grads)
    gdt = np.float32 if grad_is32 else np.float16
    if indices is None:
        indices = range(len(params))
    rows = []
    for t, param in enumerate(params):
        shape = tuple(shape_of(param))
        n = math.prod(shape)
        _check(grads[t], f"grads[{t}]", gdt, shape)
        if masters is not None:
            _check(masters[t], f"masters[{t}]", np.float32, shape)
        avg = None if avgs is None else avgs[t]
        if avg is not None:
            _check(avg, f"avgs[{t}]", np.float32, shape)
        index = indices[t]
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"indices[{t}] must be an int, got {type(index).__name__} {index!r}")
        pairs = _state_pairs(states, t, slots, shape, n, block)
        if n == 0:
            continue
        rows.append((-(-n // block) * _CHUNK, address(param), address(grads[t]),
                     0 if avg is None else address(avg), *pairs[0], *pairs[1], n, block,
                     0 if masters is None else address(masters[t]), int(index)))
    if not rows:
        return
    arrays = [*params, *grads, *(masters or ()), *(a for a in (avgs or ()) if a is not None),
              *(states[t][slot][j] for t in range(len(params)) for slot, _ in slots for j in (0, 1)),
              grad_mul]
    stream = stream_of(*arrays)
    table, chunks = _tensors.table(rows, stream)
    like16 = flat(params[0]).view(np.uint16)
    like32 = flat(states[0][slots[0][0]][1])  # absmax: float32 in every configuration
    like8 = flat(states[0][slots[0][0]][0])
    mul_array, use_mul_array, mul = multiplier(grad_mul, _F32, stream, like32)
    f32 = np.float32
    signed = [s for _, s in slots] + [slots[0][1]]
    STATE8_F16[variant][np.float32][blocks_for(chunks, threads=1), THREADS, stream](
        table, like16, like32, like8, mul_array, use_mul_array, f32(mul), f32(grad_clip), f32(avg_weight),
        np.int64(chunks), signed[0], signed[1], masters is not None, stochastic, grad_is32, _int64(seed),
        _int64(counter), tuple(f32(s) for s in scalars))
