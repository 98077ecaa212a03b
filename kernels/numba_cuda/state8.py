"""Optimizer updates with 8-bit block-quantized state (or bfloat16 state), ``"numba-cuda"`` backend:
the CUDA counterpart of ``kernels/numba_cpu/state8.py`` (``docs/algorithms.md``, "Optimizers with
8-bit state"), same signatures, rules and results:

    state8_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf,
                avg_weight=0.0, block=256, masters=None, rounding="nearest", seed=0, counter=0,
                indices=None, starts=None, state_dtype="int8", **hyper)
    state8_supported(op, **hyper) -> None or the reason;  state8_layout(op, **hyper)

float32 θ, g (and θ̂) device arrays; with ``state_dtype="int8"`` each used state a pair (codes
uint8 of θ's shape, absmax float32 of ⌈n / block⌉ entries; bfloat16 state: below). One launch
per call strides over the quantization blocks of every tensor, one warp per quantization block:

    lane l, for its elements j = l, l + 32, … of the block:   s_k = map_k[q_k,j] · a_k;
        g ← extras(g);  θ_j, s_k ← update(θ_j, g, s_k);  θ̂_j ← θ̂_j + w (θ_j − θ̂_j);
        held_k[r] = s_k (the lane's r-th element, thread-local memory)
    the warp:  A_k = max |s_k| as the max of the |s| bit patterns (xor shuffles; NaN patterns lie
        above Inf's, so A_k ≥ Inf's pattern exactly when the block is not finite)
    each lane:  a_k = A_k (NaN, codes = the zero code, if not finite; codes = zero if A_k = 0),
        q_k,j = #{i : s_k,j / a_k > t_i}     (a bucket table and one compare: kernels/_code_search.py)

No barrier inside the loop. On an H200 (``bench/RESULTS.md``, "Second lease"), 8-bit Adam over
2^28 elements took 14.5 ms with a thread block per quantization block and a shared-memory tree
(nine barriers a state), 6.2 ms with this layout, 5.8 ms with an 8-step binary search's table in
breadth-first order, 3.9 ms with the bucket table in place of the search.

The maps and midpoints are those of ``kernels/numba_cpu/quantize.py``, the bucket tables those of
``kernels/_code_search.py`` (constant memory, copied to shared memory once per thread block). The
element updates evaluate the reference's expressions in its order, with multiplications and
additions as ``__fmul_rn`` / ``__fadd_rn`` / ``__fsub_rn`` (libdevice), which NVVM never
contracts into a fused multiply-add: so θ, the codes and absmax equal the reference's
(``fastopt/reference/state8.py``) bit for bit, as on the CPU backend.

The quantization block is at most ``MAX_BLOCK`` elements (a lane holds its ``MAX_BLOCK`` / 32 new
states); a larger ``block`` raises ``ValueError``. The tensor list goes through
``_tensors.table`` with each tensor's size given as (its number of blocks) · ``CHUNK``, so that a
table chunk is exactly one quantization block; the real size and the block are extra table
columns.

float16 θ (``docs/algorithms.md``, "Low-precision parameters"; ``masters``, ``rounding``,
``seed``, ``counter``, ``indices``, ``starts`` as ``lowp.mixed_step`` takes them, the semantics of
the CPU backend and of ``fastopt/reference/state8.py``): the same blocks, with θ's float32 value
and the gradient read as ``lowp.mixed_step`` reads them and θ stored rounded (``lowp``'s bit
conversions, stochastic rounding and device-side tensor keys), so that, with masters or not,
rounded to nearest or stochastically, θ, the masters, the codes and absmax equal the reference's
bit for bit:

    p = m[i] (masters) or f32(θ[i]);   g = f32(g[i]) (float16 g) or g[i] (float32 g)
    s_k = map_k[q_k,j] · a_k;  g ← extras(g);  p, s_k ← update(p, g, s_k);  θ̂_j ← θ̂_j + w (p − θ̂_j)
    m[i] ← p;  θ[i] ← rn(p) or sr(p, uniform(key_t, i)),  key_t = tensor_key(seed, counter, indices[t])
                                                                    + starts[t] · γ  (mod 2⁶⁴)
    then the block requantizes as above

``starts`` (None: all 0): tensor t is the piece of a parameter that begins at element starts[t],
and uniform(key_t, i) = uniform(tensor_key(seed, counter, indices[t]), starts[t] + i), so the
pieces of a parameter stepped as separate tensors with its index draw the parameter's own values
and round as one step of the whole would (with 8-bit state, when the pieces begin on block
boundaries, as the blocks are each tensor's own). The key is evaluated on the device from the
table's index and start columns (``_piece_key``).

Only float16: the CUDA array interface has no bfloat16 typestr, so a bfloat16 device array cannot
reach this backend; another 16-bit θ raises ``TypeError`` naming the backend (``lowp``'s check).
Gradients are float16 or float32 (one dtype per call), masters float32 or None (None for float32
θ, which is its own master copy: masters given with float32 θ raise ``ValueError``); ``rounding``,
``seed``, ``counter``, ``indices`` and ``starts`` do not apply to float32 θ. Memory traffic per
element of float16 θ: 2 (θ) + 2 or 4 (g) + k (codes) read, 2 + k written (+ 8 with masters, + 8
with θ̂), plus the absmax per block.

bfloat16 state (``state_dtype="bfloat16"``; ``docs/algorithms.md``, "Optimizers with 8-bit
state", bfloat16 state, as the CPU backend and the reference have it): each used state ``states[t][slot]`` is one uint16 device array of
θ's shape holding the bfloat16 bits (not a (codes, absmax) pair; the CUDA array interface has no
bfloat16 typestr). The same slots and configurations (``state8_layout``), the same float32 element
updates, θ read and stored as above (float32 θ; float16 θ with masters, rounding and ``starts``),
element by element, without quantization blocks (``block`` is checked, not used): a grid-stride
loop over chunks of ``CHUNK`` elements as ``lowp.mixed_step``'s, each element

    s_k = f32(state_k[i]) = bits << 16 (exact);  p, g as above;  p, s_k ← update(p, g, s_k)
    θ[i] ← p (float32 θ) or m[i] ← p, θ[i] ← rn(p) or sr(p, …);  θ̂[i] ← θ̂[i] + w (p − θ̂[i])
    state_k[i] ← rn_bf16(s_k)    (round to nearest even, overflow to ±Inf, NaN a quiet NaN)

so θ, the masters and the states equal the reference's (``lowp.round_nearest(s, bfloat16)``) bit
for bit, as on the CPU backend. Memory traffic per element, k states: 2 bytes per state read and
2 written (2k and 2k), against 1 and 1 with 8-bit codes (plus their absmax per block) and 4 and 4
with float32 state: float32 θ, g: read 4 + 4 + 2k, written 4 + 2k = 12 + 4k bytes (Adam 20 B, SGD
momentum, AdaGrad, RMSProp 16 B); float16 θ: 2 + (2 or 4) + 2k read, 2 + 2k written; + 8 with
masters, + 8 with θ̂.

Kernels (float32 arithmetic only), for each of adam, sgd_momentum, sgd_nesterov,
sgd_nesterov_torch, adagrad, rmsprop, rmsprop_momentum, rmsprop_nesterov:

    state8.<variant>                  8-bit state, float32 θ
    state8.<variant>_f16              8-bit state, float16 θ (table rows carry the master copy's
                                      address, the tensor index and the start as three more columns)
    state8.<variant>_bf16state        bfloat16 state, float32 θ
    state8.<variant>_f16_bf16state    bfloat16 state, float16 θ

(``STATE8``, ``STATE8_F16``, ``STATE8_BF16``, ``STATE8_F16_BF16``, by variant.)
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda, types

from . import _tensors
from ._arrays import address, dtype_of, flat, shape_of, stream_of, workspace
from ._jit import SIMULATOR, THREADS, blocks_for, kernel
from .lowp import (_GAMMA, _add64, _check_params, _int64, _load, _mul64, _store, _tensor_key, _u64, bits_f32,
                   f32_bits, view)
from .reduce import multiplier
from ..numba_cpu.quantize import MAP_AS, THRESHOLDS, ZERO
from .. import _code_search
from .._state8_rules import SUPPORTED, state8_layout, state8_supported

__all__ = ["MAX_BLOCK", "STATE8", "STATE8_BF16", "STATE8_F16", "STATE8_F16_BF16", "STATE_DTYPES", "SUPPORTED",
           "state8_layout", "state8_step", "state8_supported"]

MAX_BLOCK = 2048
_LANE_MAX = MAX_BLOCK // 32  # a quantization block's elements per lane, at most
_WARPS = THREADS // 32
_FULL_MASK = 0xFFFFFFFF
_CHUNK = _tensors.CHUNK
_find = _tensors.find
_F32 = np.dtype(np.float32)

# rows: signed map, unsigned map, signed midpoints + Inf, unsigned midpoints + Inf
_MAPS = np.stack([MAP_AS[(True, _F32)], MAP_AS[(False, _F32)],
                  np.append(THRESHOLDS[(True, _F32)], np.float32(np.inf)),
                  np.append(THRESHOLDS[(False, _F32)], np.float32(np.inf))]).astype(np.float32)
assert _MAPS.shape == (4, 256)
# the encode's bucket tables (kernels/_code_search.py): signed, unsigned (as the maps' rows)
_LUTS = np.stack([_code_search.table(THRESHOLDS[(True, _F32)]), _code_search.table(THRESHOLDS[(False, _F32)])])
_LUT_SIZE = _LUTS.shape[1]
_LUT_LOW = np.uint64(_code_search.LOW)
_LUT_HIGH = np.uint64(_code_search.HIGH)
_LUT_RANGE = np.uint64(_code_search.RANGE)
_S31 = np.uint64(31)
_ZERO_SIGNED = np.uint8(ZERO[True])
_ZERO_UNSIGNED = np.uint8(ZERO[False])
_ABS32 = np.uint64(0x7FFFFFFF)
_INF32 = np.uint64(0x7F800000)
_NAN32 = np.uint64(0x7FC00000)
_NO_BITS = np.uint64(0)
_F32_ZERO = np.float32(0)
_S16 = np.uint64(16)
_ONE = np.uint64(1)
_BF16_HALF = np.uint64(0x7FFF)
_BF16_QUIET = np.uint64(0x40)
STATE_DTYPES = ("int8", "bfloat16")

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
# the kernel: one warp per quantization block

_N, _FIRST, _PARAM, _GRAD, _AVG, _CODES0, _ABSMAX0, _CODES1, _ABSMAX1, _SIZE, _BLOCK = range(11)


@cuda.jit(device=True)
def _code(x, maps, row, luts, k):
    """#{i : x > t_i} over the 255 midpoints of ``maps[row]`` (|x| ≤ 1): q' of x's bucket from the
    bucket table ``luts[k]``, then one compare with t_{q'} (kernels/_code_search.py)."""
    bits = _u64(f32_bits(x))
    top = min(max((bits & _ABS32) >> _S16, _LUT_LOW), _LUT_HIGH)
    q = luts[k, (bits >> _S31) * _LUT_RANGE + top - _LUT_LOW]
    return q + 1 if x > maps[row, q] else q


@cuda.jit(device=True)
def _requantize(held, k, lane, count, amax, codes, i0, absmax, b, maps, luts, row, zero):
    """The lane's elements j = lane, lane + 32, … < count of quantization block b: codes from the
    lane's new states ``held[k]`` and the block's largest |s| bit pattern ``amax`` (absmax written
    by lane 0): NaN and the zero code when the block is not finite, 0 and the zero code when
    amax = 0."""
    if lane == 0:
        if amax >= _INF32:
            absmax[b] = bits_f32(_NAN32)
        else:
            absmax[b] = bits_f32(amax)
    if amax >= _INF32 or amax == _NO_BITS:
        for j in range(lane, count, 32):
            codes[i0 + j] = zero
    else:
        a = bits_f32(amax)
        r = 0
        for j in range(lane, count, 32):
            codes[i0 + j] = _code(held[k, r] / a, maps, row, luts, k)
            r += 1


@cuda.jit(device=True)
def _shared_maps(maps, constants, luts, lut_constants, signed0, signed1):
    """Rows 0 and 1 of the shared ``maps``: the maps of states 0 and 1 (signed or unsigned), rows
    2 and 3 their midpoints, and rows 0 and 1 of ``luts`` the bucket tables of states 0 and 1,
    copied from the constant tables by the block's threads; then a barrier."""
    rows0 = 0 if signed0 else 1
    rows1 = 0 if signed1 else 1
    for j in range(cuda.threadIdx.x, 256, cuda.blockDim.x):
        maps[0, j] = constants[rows0, j]
        maps[1, j] = constants[rows1, j]
        maps[2, j] = constants[rows0 + 2, j]
        maps[3, j] = constants[rows1 + 2, j]
    for j in range(cuda.threadIdx.x, _LUT_SIZE, cuda.blockDim.x):
        luts[0, j] = lut_constants[rows0, j]
        luts[1, j] = lut_constants[rows1, j]
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
def _average(p, i, avg, has_avg, avg_weight):
    """θ̂[i] ← θ̂[i] + w (p − θ̂[i]), unfused, as the reference (nothing without an average)."""
    if has_avg:
        a = avg[i]
        avg[i] = _add(a, _mul(avg_weight, _sub(p, a)))


@cuda.jit(device=True)
def _keep(p, s0, s1, i, r, avg, has_avg, avg_weight, held, bits0, bits1, two):
    """After element i's update (p, new states s0, s1): θ̂[i] ← θ̂[i] + w (p − θ̂[i]) (unfused), the
    states to the lane's ``held[:, r]``, and the running largest |s| bit patterns, returned."""
    _average(p, i, avg, has_avg, avg_weight)
    held[0, r] = s0
    bits0 = max(bits0, _u64(f32_bits(s0)) & _ABS32)
    if two:
        held[1, r] = s1
        bits1 = max(bits1, _u64(f32_bits(s1)) & _ABS32)
    return bits0, bits1


@cuda.jit(device=True)
def _warp_max(bits):
    """The largest of the warp's 32 ``bits`` (|s| patterns, < 2³¹), for every lane: xor shuffles."""
    v = np.int32(bits)
    offset = 16
    while offset > 0:
        v = max(v, cuda.shfl_xor_sync(_FULL_MASK, v, offset))
        offset //= 2
    return _u64(v)


def _state8_kernel(update, states):
    def state8(table, like32, like8, mul_array, use_mul_array, mul, clip, avg_weight, chunks,
               signed0, signed1, hyper):
        m = mul_array[0] if use_mul_array else mul
        maps = cuda.shared.array((4, 256), types.float32)
        luts = cuda.shared.array((2, _LUT_SIZE), types.uint8)
        held = cuda.local.array((2, _LANE_MAX), types.float32)
        lane = cuda.threadIdx.x % 32
        _shared_maps(maps, cuda.const.array_like(_MAPS), luts, cuda.const.array_like(_LUTS), signed0, signed1)
        zero0 = _ZERO_SIGNED if signed0 else _ZERO_UNSIGNED
        zero1 = _ZERO_SIGNED if signed1 else _ZERO_UNSIGNED
        warps = cuda.gridDim.x * cuda.blockDim.x // 32
        for q in range(cuda.grid(1) // 32, chunks, warps):  # q is the warp's: its shuffles see all 32 lanes
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
            r = 0
            for j in range(lane, count, 32):
                i = i0 + j
                s0 = maps[0, codes0[i]] * a0
                s1 = maps[1, codes1[i]] * a1 if two else _F32_ZERO
                g = _transformed(grad[i], m, clip)
                p, s0, s1 = update(param[i], g, s0, s1, hyper)
                param[i] = p
                bits0, bits1 = _keep(p, s0, s1, i, r, avg, has_avg, avg_weight, held, bits0, bits1, two)
                r += 1
            _requantize(held, 0, lane, count, _warp_max(bits0), codes0, i0, absmax0, b, maps, luts, 2, zero0)
            if two:
                _requantize(held, 1, lane, count, _warp_max(bits1), codes1, i0, absmax1, b, maps, luts, 3, zero1)

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

_MASTER, _INDEX, _START = 11, 12, 13  # the float16 kernel's three more table columns


@cuda.jit(device=True)
def _piece_key(seed, counter, index, start):
    """tensor_key(seed, counter, index) + start·γ (mod 2⁶⁴): with it, element i of a tensor that is
    the piece of a parameter beginning at element ``start`` draws uniform(tensor_key(…), start + i),
    the parameter's own stream (``lowp.mixed_step``'s ``starts``)."""
    return _add64(_tensor_key(seed, counter, index), _mul64(_u64(start), _GAMMA))


def _state8_f16_kernel(update, states):
    """The float32 kernel's blocks with float16 θ: p = m[i] or f32(θ[i]), g = f32(g[i]) (or g[i]
    float32), the same update and requantization, then m[i] ← p and θ[i] ← rn(p) or
    sr(p, uniform(key_t, i)) (``lowp``: the bit conversions, stochastic rounding and tensor keys of
    ``mixed_step``)."""

    def state8_f16(table, like16, like32, like8, mul_array, use_mul_array, mul, clip, avg_weight,
                   chunks, signed0, signed1, has_master, stochastic, grad_is32, seed, counter, hyper):
        m = mul_array[0] if use_mul_array else mul
        maps = cuda.shared.array((4, 256), types.float32)
        luts = cuda.shared.array((2, _LUT_SIZE), types.uint8)
        held = cuda.local.array((2, _LANE_MAX), types.float32)
        lane = cuda.threadIdx.x % 32
        _shared_maps(maps, cuda.const.array_like(_MAPS), luts, cuda.const.array_like(_LUTS), signed0, signed1)
        zero0 = _ZERO_SIGNED if signed0 else _ZERO_UNSIGNED
        zero1 = _ZERO_SIGNED if signed1 else _ZERO_UNSIGNED
        warps = cuda.gridDim.x * cuda.blockDim.x // 32
        for q in range(cuda.grid(1) // 32, chunks, warps):  # q is the warp's: its shuffles see all 32 lanes
            t = _find(table, q)
            b = q - table[t, _FIRST]
            n = table[t, _SIZE]
            block = table[t, _BLOCK]
            blocks = table[t, _N] // _CHUNK
            i0 = b * block
            count = min(block, n - i0)
            key = _piece_key(seed, counter, table[t, _INDEX], table[t, _START])
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
            r = 0
            for j in range(lane, count, 32):
                i = i0 + j
                s0 = maps[0, codes0[i]] * a0
                s1 = maps[1, codes1[i]] * a1 if two else _F32_ZERO
                p, g = _load(param, grad16, grad32, master, i, grad_is32, has_master, m, clip)  # as mixed_step
                p, s0, s1 = update(p, g, s0, s1, hyper)
                # m[i] and θ[i] as mixed_step stores them; the average (unfused, as the reference) in _keep
                _store(p, param, master, avg, i, has_master, stochastic, key, False, avg_weight)
                bits0, bits1 = _keep(p, s0, s1, i, r, avg, has_avg, avg_weight, held, bits0, bits1, two)
                r += 1
            _requantize(held, 0, lane, count, _warp_max(bits0), codes0, i0, absmax0, b, maps, luts, 2, zero0)
            if two:
                _requantize(held, 1, lane, count, _warp_max(bits1), codes1, i0, absmax1, b, maps, luts, 3, zero1)

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
# bfloat16 state: element by element (no quantization blocks), θ float32 or float16

# table columns of the bfloat16-state kernels: (n, first_chunk, θ, g, θ̂ or 0, state₀, state₁ or 0,
# m or 0, tensor index, start), the last three 0 for float32 θ
_STATE0, _STATE1, _BF_MASTER, _BF_INDEX, _BF_START = 5, 6, 7, 8, 9


@cuda.jit(device=True)
def _bf16_to_f32(h):
    """bfloat16 bits ``h`` → float32, exact (the bits moved to the top half)."""
    return bits_f32(_u64(h) << _S16)


@cuda.jit(device=True)
def _f32_to_bf16(x):
    """float32 → bfloat16 bits (uint16), round to nearest, ties to even; overflow to ±Inf, ±Inf
    kept, NaN → a quiet NaN with x's sign (``numba_cpu.lowbits.f32_to_bf16``)."""
    b = _u64(f32_bits(x))
    if (b & _ABS32) > _INF32:
        return numba.uint16((b >> _S16) | _BF16_QUIET)
    return numba.uint16((b + _BF16_HALF + ((b >> _S16) & _ONE)) >> _S16)


def _state8_bf16_kernel(update, states, low):
    """The element update of the int8 kernels on bfloat16 state: s_k = f32(state_k[i]) exactly,
    p, s_k ← update(p, g, s_k), state_k[i] ← rn_bf16(s_k). θ float32 (``low`` False: p = θ[i],
    θ[i] ← p), or float16 read and stored as the float16 int8 kernel does (``lowp``'s ``_load`` /
    ``_store``, the key of a piece); a grid-stride loop over chunks of ``CHUNK`` elements, as
    ``lowp.mixed_step``."""

    def state8_bf16(table, like16, like32, mul_array, use_mul_array, mul, clip, avg_weight, chunks,
                    has_master, stochastic, grad_is32, seed, counter, hyper):
        m = mul_array[0] if use_mul_array else mul
        two = states > 1
        for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
            t = _find(table, q)
            n = table[t, _N]
            start = (q - table[t, _FIRST]) * _CHUNK
            stop = min(start + _CHUNK, n)
            state0 = view(table[t, _STATE0], n, like16)
            state1 = view(table[t, _STATE1] if two else table[t, _STATE0], n if two else 0, like16)
            has_avg = table[t, _AVG] != 0
            avg = view(table[t, _AVG] if has_avg else table[t, _PARAM], n if has_avg else 0, like32)
            # θ and g as float32 (low False) or as mixed_step reads them; the views not used are empty
            param16 = view(table[t, _PARAM], n if low else 0, like16)
            param32 = view(table[t, _PARAM], 0 if low else n, like32)
            grad16 = view(table[t, _GRAD], 0 if grad_is32 else n, like16)
            grad32 = view(table[t, _GRAD], n if grad_is32 else 0, like32)
            master = view(table[t, _BF_MASTER] if has_master else table[t, _PARAM], n if has_master else 0,
                          like32)
            key = _piece_key(seed, counter, table[t, _BF_INDEX], table[t, _BF_START])
            for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                s0 = _bf16_to_f32(state0[i])
                s1 = _bf16_to_f32(state1[i]) if two else _F32_ZERO
                if low:
                    p, g = _load(param16, grad16, grad32, master, i, grad_is32, has_master, m, clip)
                else:
                    p = param32[i]
                    g = _transformed(grad32[i], m, clip)
                p, s0, s1 = update(p, g, s0, s1, hyper)
                if low:  # m[i] and θ[i] as mixed_step stores them
                    _store(p, param16, master, avg, i, has_master, stochastic, key, False, avg_weight)
                else:
                    param32[i] = p
                _average(p, i, avg, has_avg, avg_weight)
                state0[i] = _f32_to_bf16(s0)
                if two:
                    state1[i] = _f32_to_bf16(s1)

    return state8_bf16


def _bf16_signature(scalars):
    def signature(dt):
        f32, flag = types.float32, types.boolean
        return types.void(types.int64[:, ::1], types.uint16[::1], f32[::1], f32[::1], flag, f32, f32, f32,
                          types.int64, flag, flag, flag, types.int64, types.int64, types.UniTuple(f32, scalars))
    return signature


STATE8_BF16 = {}  # float32 θ
STATE8_F16_BF16 = {}  # float16 θ
for _name, (_update, _states, _scalars) in _VARIANTS.items():
    STATE8_BF16[_name] = kernel(_bf16_signature(_scalars), name=f"state8.{_name}_bf16state",
                                dtypes=(types.float32,))(_state8_bf16_kernel(_update, _states, False))
    STATE8_F16_BF16[_name] = kernel(_bf16_signature(_scalars), name=f"state8.{_name}_f16_bf16state",
                                    dtypes=(types.float32,))(_state8_bf16_kernel(_update, _states, True))
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


def _state_words(states, t, slots, shape):
    """The addresses of tensor t's used bfloat16 states (``state_dtype="bfloat16"``: each one uint16
    device array of θ's shape holding the bfloat16 bits), checked; two, 0 unused."""
    addresses = []
    for slot, _ in slots:
        state = states[t]
        if not isinstance(state, (tuple, list)) or len(state) <= slot:
            raise ValueError(f"states[{t}] must be a tuple in the op's state order, got {state!r:.80}")
        array = state[slot]
        if array is None or isinstance(array, (tuple, list)):
            raise ValueError(f"states[{t}][{slot}] must be one uint16 device array of θ's shape holding "
                             f"bfloat16 bits (state_dtype='bfloat16'), got {array!r:.80}")
        _check(array, f"states[{t}][{slot}] (bfloat16 bits)", np.uint16, shape)
        addresses.append(address(array))
    if len(addresses) == 1:
        addresses.append(0)
    return addresses


def _entry(seq, name, t) -> int:
    """``seq[t]`` (``indices``, ``starts``) as an int, else ``TypeError`` naming it."""
    value = seq[t]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}[{t}] must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _piece(indices, starts, t):
    """(index, start) of tensor t: its key's tensor index and the element of its parameter it begins at."""
    index = _entry(indices, "indices", t)
    if starts is None:
        return index, 0
    start = _entry(starts, "starts", t)
    if not 0 <= start < 1 << 63:
        raise ValueError(f"starts[{t}] must be in [0, 2⁶³), got {start}")
    return index, start


def _first_live(params) -> int:
    """The first tensor with elements: its arrays type the kernel's ``like`` views (an empty array
    need not be typed C-contiguous)."""
    return next(t for t, param in enumerate(params) if math.prod(shape_of(param)) > 0)


def _is_16bit(dtype) -> bool:
    return np.dtype(dtype).itemsize == 2


def state8_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf,
                avg_weight=0.0, block=256, masters=None, rounding="nearest", seed=0, counter=0,
                indices=None, starts=None, state_dtype="int8", **hyper) -> None:
    """``op`` with 8-bit block-wise quantized state (``state_dtype="int8"``) or bfloat16 state
    (``"bfloat16"``) on every tensor of the lists, in one launch (module docstring); raises
    ValueError (TypeError for a dtype), before writing anything, for an unsupported configuration
    or a bad argument.

    ``params`` float32, or float16 (one dtype per call; bfloat16 cannot reach this backend and
    raises ``TypeError``), updated as ``lowp.mixed_step`` updates them: ``grads`` float16 or
    float32 (one dtype), ``masters`` float32 copies or None, θ stored rounded to nearest or
    stochastically (``rounding``) with the keys ``tensor_key(seed, counter, indices[t])``
    (``indices`` defaults to 0, 1, …); with ``starts``, tensor t is the piece of a parameter that
    begins at element ``starts[t]``, and its element i draws ``uniform(key_t, starts[t] + i)``.
    float32 ``params`` are not rounded, so ``rounding``, ``seed``, ``counter``, ``indices`` and
    ``starts`` do not apply to them, and ``masters`` must be None.

    ``state_dtype="int8"``: each used state a pair (codes uint8 of θ's shape, absmax float32 of
    ⌈n / block⌉ entries). ``"bfloat16"``: each used state one uint16 device array of θ's shape
    holding bfloat16 bits (the CUDA array interface has no bfloat16), decoded exactly and stored
    rounded to nearest even; ``block`` is then checked but not used."""
    reason = state8_supported(op, **hyper)
    if reason is not None:
        raise ValueError(reason)
    if not isinstance(block, int) or not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be an int in [1, {MAX_BLOCK}] on numba-cuda, got {block!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be 'int8' or 'bfloat16', got {state_dtype!r}")
    if len(params) == 0:
        return
    _check_lengths(params, grads=grads, states=states, avgs=avgs, masters=masters, indices=indices, starts=starts)
    variant, slots, scalars = _plan(op, hyper)
    low = _is_16bit(dtype_of(params[0]))
    if not low and masters is not None:
        raise ValueError("masters: float32 params are their own master copy; expected None, got a list "
                         f"of {len(masters)}")
    if state_dtype == "bfloat16":
        _state8_bf16_step(variant, slots, scalars, params, grads, states, avgs, masters, grad_mul, grad_clip,
                          avg_weight, low, low and rounding == "stochastic", seed, counter, indices, starts)
        return
    if low:
        _state8_f16_step(variant, slots, scalars, params, grads, states, avgs, masters, grad_mul, grad_clip,
                         avg_weight, block, rounding == "stochastic", seed, counter, indices, starts)
        return
    rows = []
    for t, param in enumerate(params):
        shape, n, avg = _check_tensor(t, params, grads, None, avgs, np.float32, np.float32)
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
    f = _first_live(params)
    like32 = flat(params[f])
    like8 = flat(states[f][slots[0][0]][0])
    mul_array, use_mul_array, mul = multiplier(grad_mul, _F32, stream, like32)
    f32 = np.float32
    signed = [s for _, s in slots] + [slots[0][1]]
    STATE8[variant][np.float32][blocks_for(-(-chunks // _WARPS), threads=1), THREADS, stream](
        table, like32, like8, mul_array, use_mul_array, f32(mul), f32(grad_clip), f32(avg_weight),
        np.int64(chunks), signed[0], signed[1], tuple(f32(s) for s in scalars))


def _check_tensor(t, params, grads, masters, avgs, grad_dtype, param_dtype=None):
    """(shape, size, average or None) of tensor t, after checking its parameter (``param_dtype``;
    None: checked by the caller), gradient, master copy and average."""
    shape = tuple(shape_of(params[t]))
    if param_dtype is not None:
        _check(params[t], f"params[{t}]", param_dtype, shape)
    _check(grads[t], f"grads[{t}]", grad_dtype, shape)
    if masters is not None:
        _check(masters[t], f"masters[{t}]", np.float32, shape)
    avg = None if avgs is None else avgs[t]
    if avg is not None:
        _check(avg, f"avgs[{t}]", np.float32, shape)
    return shape, math.prod(shape), avg


def _state8_f16_step(variant, slots, scalars, params, grads, states, avgs, masters, grad_mul, grad_clip,
                     avg_weight, block, stochastic, seed, counter, indices, starts):
    """``state8_step`` on float16 ``params``: checks everything, then one launch of
    ``STATE8_F16[variant]``."""
    grad_is32 = _check_params(params, grads)
    gdt = np.float32 if grad_is32 else np.float16
    if indices is None:
        indices = range(len(params))
    rows = []
    for t, param in enumerate(params):
        shape, n, avg = _check_tensor(t, params, grads, masters, avgs, gdt)
        index, start = _piece(indices, starts, t)
        pairs = _state_pairs(states, t, slots, shape, n, block)
        if n == 0:
            continue
        rows.append((-(-n // block) * _CHUNK, address(param), address(grads[t]),
                     0 if avg is None else address(avg), *pairs[0], *pairs[1], n, block,
                     0 if masters is None else address(masters[t]), index, start))
    if not rows:
        return
    arrays = [*params, *grads, *(masters or ()), *(a for a in (avgs or ()) if a is not None),
              *(states[t][slot][j] for t in range(len(params)) for slot, _ in slots for j in (0, 1)),
              grad_mul]
    stream = stream_of(*arrays)
    table, chunks = _tensors.table(rows, stream)
    f = _first_live(params)
    like16 = flat(params[f]).view(np.uint16)
    like32 = flat(states[f][slots[0][0]][1])  # absmax: float32 in every configuration
    like8 = flat(states[f][slots[0][0]][0])
    mul_array, use_mul_array, mul = multiplier(grad_mul, _F32, stream, like32)
    f32 = np.float32
    signed = [s for _, s in slots] + [slots[0][1]]
    STATE8_F16[variant][np.float32][blocks_for(-(-chunks // _WARPS), threads=1), THREADS, stream](
        table, like16, like32, like8, mul_array, use_mul_array, f32(mul), f32(grad_clip), f32(avg_weight),
        np.int64(chunks), signed[0], signed[1], masters is not None, stochastic, grad_is32, _int64(seed),
        _int64(counter), tuple(f32(s) for s in scalars))


def _state8_bf16_step(variant, slots, scalars, params, grads, states, avgs, masters, grad_mul, grad_clip,
                      avg_weight, low, stochastic, seed, counter, indices, starts):
    """``state8_step`` with ``state_dtype="bfloat16"``: checks everything, then one launch of
    ``STATE8_BF16[variant]`` (float32 θ) or ``STATE8_F16_BF16[variant]`` (float16 θ)."""
    grad_is32 = _check_params(params, grads) if low else True
    gdt = np.float32 if grad_is32 else np.float16
    if indices is None:
        indices = range(len(params))
    rows = []
    for t, param in enumerate(params):
        shape, n, avg = _check_tensor(t, params, grads, masters, avgs, gdt, None if low else np.float32)
        index, start = _piece(indices, starts, t) if low else (0, 0)
        words = _state_words(states, t, slots, shape)
        if n == 0:
            continue
        rows.append((n, address(param), address(grads[t]), 0 if avg is None else address(avg), *words,
                     0 if masters is None else address(masters[t]), index, start))
    if not rows:
        return
    used = [states[t][slot] for t in range(len(params)) for slot, _ in slots]
    stream = stream_of(*params, *grads, *(masters or ()), *(a for a in (avgs or ()) if a is not None), *used,
                       grad_mul)
    table, chunks = _tensors.table(rows, stream)
    f = _first_live(params)
    like16 = flat(states[f][slots[0][0]])
    # any float32 array types the float32 views (its contents are not read); a scratch one if none
    float32 = [a[f] for a in (masters, avgs, None if low else params, grads if grad_is32 else None)
               if a is not None and a[f] is not None]
    like32 = flat(float32[0]) if float32 else workspace("state8.like32", (1,), np.float32, stream)
    mul_array, use_mul_array, mul = multiplier(grad_mul, _F32, stream, like32)
    f32 = np.float32
    kernels = STATE8_F16_BF16 if low else STATE8_BF16
    kernels[variant][np.float32][blocks_for(chunks, threads=1), THREADS, stream](
        table, like16, like32, mul_array, use_mul_array, f32(mul), f32(grad_clip), f32(avg_weight),
        np.int64(chunks), masters is not None, stochastic, grad_is32, _int64(seed), _int64(counter),
        tuple(f32(s) for s in scalars))
