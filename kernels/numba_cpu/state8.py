"""Optimizer updates with 8-bit state, ``"numba"`` backend: ``docs/algorithms.md``, "Optimizers with
8-bit state" (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022).

    state8_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf,
                avg_weight=0.0, block=256, **hyper)

``op`` is ``"adam_step"``, ``"sgd_step"``, ``"adagrad_step"`` or ``"rmsprop_step"``; ``hyper`` the
keywords of that op's host function in ``optim.py``. ``params``/``grads`` are lists of float32
C-contiguous arrays; ``states[t]`` a tuple in the op's state order (Adam (m, v, v_max), SGD
(velocity,), AdaGrad (accumulator,), RMSProp (square_avg, grad_avg, velocity)) whose used
entries (``state8_layout``) are pairs ``(codes, absmax)``: codes uint8 of the param's shape,
absmax float32 of ⌈n / block⌉ entries; the others None. ``avgs``: float32 Polyak averages or None.
Everything in place.

One pass per block of ``block`` elements, for each tensor (the block is the quantizer's, see
``quantize.py``; the map, thresholds and zero code are that module's constants):

    for i in the block:                   (θ, g, codes read; θ, θ̂ written; the new state to L1)
        s_k = m_k[q_k,i] · a_k,b          dequantize every state k (a_k,b its block's absmax)
        g ← clamp(g · grad_mul, ±grad_clip)
        θᵢ, s_k ← update(θᵢ, g, s_k)      the op's float32 update, as the reference evaluates it
        θ̂ᵢ ← θ̂ᵢ + w (θᵢ − θ̂ᵢ)              (averaged variant)
        scratch_k[i] = s_k;  A_k = max(A_k, |s_k|)
    for each state k:                     (requantize from the 256-float scratch, still in L1)
        a_k,b = A_k  (NaN if the block holds NaN or ±inf; codes = the zero code then, and if A_k = 0)
        q_k,i = #{j : s_k,i / a_k,b > t_j}     (8-step branch-free search over the 255 midpoints)

The element updates evaluate the expressions of ``fastopt/reference/optim.py`` in its order and
rounding (Adam as θ − (ε · (m / (1 − β1ᵗ))) / (δ + √(v / (1 − β2ᵗ))), unlike the float32 kernel of
``optim.py``), so θ, the codes and absmax equal the reference's (``fastopt/reference/state8.py``:
dequantize, reference update, requantize) bit for bit.

Maps: first moments and momentum (Adam m, SGD velocity, RMSProp velocity) signed; second moments
(Adam v, AdaGrad accumulator, RMSProp square_avg) unsigned. Not supported (``ValueError``, before
anything is written): Adam with amsgrad, SGD without momentum (no state), centered RMSProp (the
variance r − s ⊙ s is a difference of two quantized states and goes negative), RMSProp Nesterov
with the torch convention (undefined), and the other optimizers (``state8_supported``).

Parallelism: the tensors' blocks form one flat block index space cut into parts of whole blocks
(a block never spans two threads); ``prange`` over the parts, each with a scratch buffer of
2 × block float32. Lists of fewer than ``multi.SERIAL_BELOW`` elements run the serial twin.

Memory traffic per element, k quantized states (float32 θ, g):

    read  4 (θ) + 4 (g) + k (codes),  write 4 (θ) + k (codes),  plus 2 · 4k / block (absmax read and written)
    = 12 + 2k + 8k / block bytes;  Adam (k = 2): 16 B + 2 · 8/256;  SGD momentum, AdaGrad, RMSProp (k = 1): 14 B + 8/256

against 12 + 8k bytes with float32 state (Adam 28 B); the averaged variant adds 8 B (θ̂ read and
written).

Float32 only inside: every scalar arrives as float32 (``hyper``), comparisons are with float32
zeros, and no literal float enters the arithmetic.
"""

from __future__ import annotations

import math

import ml_dtypes
import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic
from numba.np.unsafe.ndarray import to_fixed_tuple

from .._state8_rules import SUPPORTED, state8_layout, state8_supported
from ._jit import kernel
from .lowbits import bits_f32, f32_bits
from .lowbits import bf16_to_f32, f32_to_bf16
from .mixed import _decode, _encode, _keys, _pointer16, is_low_precision
from .optim import _l2, _transformed  # the same g + λθ and gradient extras as the float32 kernels
from .multi import SERIAL_BELOW, last_at_most, next_span, part_range, parts_for, pointer
from .quantize import MAP_AS, THRESHOLDS, ZERO

__all__ = ["SUPPORTED", "state8_layout", "state8_step", "state8_supported"]

# table columns
_PARAM, _GRAD, _AVG, _CODES0, _ABSMAX0, _CODES1, _ABSMAX1, _SIZE, _MASTER = range(9)
_COLUMNS = 9
_F32 = np.dtype(np.float32)
_BF16 = np.dtype(ml_dtypes.bfloat16)

_element = numba.njit(inline="always", error_model="numpy")


@intrinsic
def _bytes(typingctx, address):
    """A uint8 pointer at the integer ``address``."""
    if not isinstance(address, types.Integer):
        return None
    signature = types.CPointer(types.uint8)(address)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


_ABS_BITS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_NO_BITS = np.uint32(0)


@_element
def _requantize(scratch, count, amax_bits, codes, i0, absmax, b, thresholds, zero, lookup):
    """absmax[b] and codes[i0 : i0 + count] of the ``count`` values ``scratch[:count]``, whose
    largest |value| has the bit pattern ``amax_bits`` (the quantizer of ``quantize.py``: NaN absmax
    and zero codes for a block holding NaN or ±inf, zero codes for an all-zero one, else the count
    of midpoints below x / a).

    As integers, the patterns of |x| order as the values do, and every NaN pattern lies above
    Inf's, so ``amax_bits`` ≥ Inf's pattern exactly when the block is not finite. The count of
    midpoints below x̂ is ``lookup`` of its bucket (``_lookup``) plus one compare with the next
    midpoint (``thresholds`` has a 256th entry, +Inf, so the compare needs no bounds test)."""
    if amax_bits >= _INF_BITS:
        absmax[b] = bits_f32(_INF_BITS) - bits_f32(_INF_BITS)  # NaN
        for j in range(count):
            codes[i0 + j] = zero
    elif amax_bits == _NO_BITS:
        absmax[b] = bits_f32(_NO_BITS)
        for j in range(count):
            codes[i0 + j] = zero
    else:
        a = bits_f32(amax_bits)
        absmax[b] = a
        for j in range(count):  # normalize (vectorized)
            scratch[j] = scratch[j] / a
        for j in range(count):  # code: a table look-up and a compare (scalar)
            x = scratch[j]
            q = lookup[f32_bits(x) >> _BUCKET_SHIFT]
            codes[i0 + j] = q + (x > thresholds[q])


def _update8(scalars: int, states: int):
    """Turn an element update ``element(p, g, s0, s1, h) -> (θᵢ, s0, s1)`` (dequantized float32
    states in, new ones out; s1 unused when ``states`` is 1) taking ``scalars`` host scalars into
    ``run(part, parts, table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup,
    block)``, which runs one part (a range of whole blocks) of the tensor list: dequantize, update,
    requantize.

    ``offsets`` are in blocks; ``table[t]`` holds θ, g, θ̂, codes₀, absmax₀, codes₁, absmax₁
    addresses and θ's size; ``thresholds``, ``values``, ``zeros`` and ``lookup`` the midpoints
    (+Inf appended), map, zero code and bucket counts of each state's map (row k for state k).

    Each block is two loops without branches on the data, which the compiler vectorizes: the
    update (decode by table, update, new state to a scratch row, the largest |state| as the max of
    bit patterns), then the requantization from the scratch row, still in L1."""

    def wrap(element):
        update = numba.njit(inline="always", error_model="numpy")(element)

        def run(part, parts, table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup, block, low, master,
                keys, grad16, half, bf16state):
            h = to_fixed_tuple(hyper, scalars)
            grad_mul = hyper[scalars]
            grad_clip = hyper[scalars + 1]
            zero_f = np.float32(0)
            scratch0 = np.empty(block, np.float32)
            scratch1 = np.empty(block, np.float32)
            values0 = values[0]  # the rows as views once per part: a view made per block costs
            values1 = values[1]  # reference counting that showed in the step's time
            thresholds0 = thresholds[0]
            thresholds1 = thresholds[1]
            lookup0 = lookup[0]
            lookup1 = lookup[1]
            zero0 = zeros[0]
            zero1 = zeros[1]
            lo, hi = part_range(part, parts, offsets[offsets.shape[0] - 1])
            t = last_at_most(offsets, lo)
            while lo < hi:
                b0, b1, lo = next_span(offsets, t, lo, hi)
                n = table[t, _SIZE]
                param = pointer(table[t, _PARAM], grad_mul)
                grad = pointer(table[t, _GRAD], grad_mul)
                param16 = _pointer16(table[t, _PARAM])  # (16-bit parameters and gradients)
                grad16_at = _pointer16(table[t, _GRAD])
                copy = pointer(table[t, _MASTER], grad_mul)
                codes0 = _bytes(table[t, _CODES0])
                state16_0 = _pointer16(table[t, _CODES0])  # (bfloat16 state)
                state16_1 = _pointer16(table[t, _CODES1])
                absmax0 = pointer(table[t, _ABSMAX0], grad_mul)
                codes1 = _bytes(table[t, _CODES1])
                absmax1 = pointer(table[t, _ABSMAX1], grad_mul)
                avg = pointer(table[t, _AVG], grad_mul)  # null unless averaged
                for b in range(b0, b1):
                    i0 = b * block
                    count = min(block, n - i0)
                    if bf16state is None:
                        a0 = absmax0[b]
                        a1 = absmax1[b] if states > 1 else zero_f
                        for j in range(count):  # decode: a table look-up per state (scalar)
                            scratch0[j] = values0[codes0[i0 + j]] * a0
                            if states > 1:
                                scratch1[j] = values1[codes1[i0 + j]] * a1
                    else:
                        for j in range(count):  # bfloat16 state: decode exactly
                            scratch0[j] = bf16_to_f32(state16_0[i0 + j])
                            if states > 1:
                                scratch1[j] = bf16_to_f32(state16_1[i0 + j])
                    bits0 = _NO_BITS
                    bits1 = _NO_BITS
                    for j in range(count):  # update: no look-ups, vectorized
                        i = i0 + j
                        if grad16 is None:
                            g = grad[i]
                        else:
                            g = _decode(grad16_at[i], half)
                        g = _transformed(g, grad_mul, grad_clip)
                        if low is None:
                            p = param[i]
                        elif master is None:
                            p = _decode(param16[i], half)
                        else:
                            p = copy[i]
                        p, s0, s1 = update(p, g, scratch0[j], scratch1[j] if states > 1 else zero_f, h)
                        if low is None:
                            param[i] = p
                        else:
                            if master is not None:
                                copy[i] = p
                            param16[i] = _encode(p, half, keys, t, i)
                        if avg_weight is not None:
                            a = avg[i]
                            avg[i] = a + avg_weight * (p - a)
                        scratch0[j] = s0
                        bits0 = max(bits0, f32_bits(s0) & _ABS_BITS)
                        if states > 1:
                            scratch1[j] = s1
                            bits1 = max(bits1, f32_bits(s1) & _ABS_BITS)
                    if bf16state is None:
                        _requantize(scratch0, count, bits0, codes0, i0, absmax0, b, thresholds0, zero0, lookup0)
                        if states > 1:
                            _requantize(scratch1, count, bits1, codes1, i0, absmax1, b, thresholds1, zero1, lookup1)
                    else:
                        for j in range(count):  # bfloat16 state: round to nearest even
                            state16_0[i0 + j] = f32_to_bf16(scratch0[j])
                            if states > 1:
                                state16_1[i0 + j] = f32_to_bf16(scratch1[j])
                t += 1

        run.__name__ = run.__qualname__ = f"{element.__name__}_run"  # see optim._update
        run = numba.njit(error_model="numpy")(run)
        run.element = update
        run.scalars = scalars
        run.states = states
        run.__doc__ = element.__doc__
        return run

    return wrap


class _Kernel8:
    """A state8 kernel in its two variants, each compiled on first use: ``plain`` (avg_weight
    typed None) and ``averaged``; float32 only, each with its serial twin."""

    def __init__(self, shell, update):
        self.__name__ = shell.__name__
        self.__doc__ = update.__doc__
        self.update = update
        self.scalars = update.scalars
        self.states = update.states
        self._shell = shell
        self._variants: dict[tuple, object] = {}
        self.plain = self.variant(False)
        self.averaged = self.variant(True)

    def variant(self, averaged: bool, low: bool = False, master: bool = False, stochastic: bool = False,
                grad16: bool = False, half: bool = False, bf16state: bool = False):
        """The kernel for float32 parameters (``low`` False), or for 16-bit ones (bfloat16, or
        float16 with ``half``) with or without a float32 master copy, rounded to nearest or
        stochastically, with 16-bit gradients (``grad16``) or float32 ones; with 8-bit state, or
        bfloat16 state (``bf16state``); compiled on first use."""
        key = (averaged, low, master, stochastic, grad16, half, bf16state)
        found = self._variants.get(key)
        if found is None:
            f32, flag = types.float32, types.boolean
            signature = types.void(
                types.int64[:, ::1], types.int64[::1], f32[::1], f32 if averaged else types.none, f32[:, ::1],
                f32[:, ::1], types.uint8[::1], types.int32[:, ::1], types.int64, flag if low else types.none,
                flag if master else types.none, types.int64[::1] if stochastic else types.none,
                flag if grad16 else types.none, flag if half else types.none, flag if bf16state else types.none)
            found = self._variants[key] = kernel([signature])(self._shell)
        return found

    @property
    def variants(self):
        return (self.plain, self.averaged)


def _kernel8(update):
    def wrap(shell):
        return _Kernel8(shell, update)

    return wrap


# ---------------------------------------------------------------------------------------------
# Element updates (dequantized float32 states in and out), in the reference's expression order
# ---------------------------------------------------------------------------------------------


@_update8(10, 2)
def _adam8_update(p, g, m, v, h):
    """Adam (λ = weight_decay, L2) and AdamW (decay = ελ, decoupled); the host zeroes the other:

    θ ← θ − ελθ                 (AdamW, when ελ ≠ 0)
    g ← g + λθ                  (Adam, when λ ≠ 0)
    m ← β1 m + (1 − β1) g       (m signed 8-bit)
    v ← β2 v + (1 − β2) g ⊙ g   (v unsigned 8-bit)
    θ ← θ − ε (m / (1 − β1ᵗ)) / (δ + √(v / (1 − β2ᵗ)))
    """
    lr, bc1, bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay = h
    if decay != 0:
        p = p - decay * p
    g = _l2(g, p, l2)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    return p - lr * (m / bc1) / (eps + math.sqrt(v / bc2)), m, v


@_kernel8(_adam8_update)
def _adam8(table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup, block, low, master, keys, grad16, half, bf16state):
    parts = parts_for(offsets[offsets.shape[0] - 1] * block)
    parts = min(parts, offsets[offsets.shape[0] - 1])
    for part in prange(parts):
        _adam8_update(part, parts, table, offsets, hyper, avg_weight, thresholds, values, zeros,
                      lookup, block, low, master, keys, grad16, half, bf16state)


@_update8(4, 1)
def _sgd_momentum8_update(p, g, v, unused, h):
    """SGD with momentum, both conventions through c and k (velocity signed 8-bit):

    g ← g + λθ   (when λ ≠ 0)
    v ← αv + c g;   θ ← θ + k v
    textbook (c = −ε, k = 1): v ← αv − εg; θ ← θ + v     torch (c = 1, k = −ε): b ← αb + g; θ ← θ − εb
    """
    momentum, c, k, weight_decay = h
    g = _l2(g, p, weight_decay)
    v = momentum * v + c * g
    return p + k * v, v, unused


@_kernel8(_sgd_momentum8_update)
def _sgd_momentum8(table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup, block, low, master, keys, grad16, half, bf16state):
    parts = parts_for(offsets[offsets.shape[0] - 1] * block)
    parts = min(parts, offsets[offsets.shape[0] - 1])
    for part in prange(parts):
        _sgd_momentum8_update(part, parts, table, offsets, hyper, avg_weight, thresholds, values,
                              zeros, lookup, block, low, master, keys, grad16, half, bf16state)


@_update8(3, 1)
def _sgd_nesterov8_update(p, g, v, unused, h):
    """SGD with Nesterov momentum, textbook (velocity signed 8-bit):

    g ← g + λθ   (when λ ≠ 0)
    v ← αv − εg;   θ ← θ + αv − εg    (v the new velocity)
    """
    lr, momentum, weight_decay = h
    g = _l2(g, p, weight_decay)
    v = momentum * v - lr * g
    return p + momentum * v - lr * g, v, unused


@_kernel8(_sgd_nesterov8_update)
def _sgd_nesterov8(table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup, block, low, master, keys, grad16, half, bf16state):
    parts = parts_for(offsets[offsets.shape[0] - 1] * block)
    parts = min(parts, offsets[offsets.shape[0] - 1])
    for part in prange(parts):
        _sgd_nesterov8_update(part, parts, table, offsets, hyper, avg_weight, thresholds, values,
                              zeros, lookup, block, low, master, keys, grad16, half, bf16state)


@_update8(3, 1)
def _sgd_nesterov_torch8_update(p, g, b, unused, h):
    """SGD with Nesterov momentum, torch (buffer b signed 8-bit):

    g ← g + λθ   (when λ ≠ 0)
    b ← αb + g;   θ ← θ − ε(g + αb)   (b the new buffer)
    """
    lr, momentum, weight_decay = h
    g = _l2(g, p, weight_decay)
    b = momentum * b + g
    return p - lr * (g + momentum * b), b, unused


@_kernel8(_sgd_nesterov_torch8_update)
def _sgd_nesterov_torch8(table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup, block, low, master, keys, grad16, half, bf16state):
    parts = parts_for(offsets[offsets.shape[0] - 1] * block)
    parts = min(parts, offsets[offsets.shape[0] - 1])
    for part in prange(parts):
        _sgd_nesterov_torch8_update(part, parts, table, offsets, hyper, avg_weight, thresholds,
                                    values, zeros, lookup, block, low, master, keys, grad16, half, bf16state)


@_update8(3, 1)
def _adagrad8_update(p, g, r, unused, h):
    """AdaGrad (accumulator unsigned 8-bit):

    g ← g + λθ   (when λ ≠ 0)
    r ← r + g ⊙ g;   θ ← θ − εg / (δ + √r)
    """
    lr, eps, weight_decay = h
    g = _l2(g, p, weight_decay)
    r = r + g * g
    return p - lr * g / (eps + math.sqrt(r)), r, unused


@_kernel8(_adagrad8_update)
def _adagrad8(table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup, block, low, master, keys, grad16, half, bf16state):
    parts = parts_for(offsets[offsets.shape[0] - 1] * block)
    parts = min(parts, offsets[offsets.shape[0] - 1])
    for part in prange(parts):
        _adagrad8_update(part, parts, table, offsets, hyper, avg_weight, thresholds, values,
                         zeros, lookup, block, low, master, keys, grad16, half, bf16state)


@_update8(6, 1)
def _rmsprop8_update(p, g, r, unused, h):
    """RMSProp without momentum, both conventions (square_avg unsigned 8-bit):

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    d = √(δ_in + r) + δ_out     (textbook √(δ + r), torch √r + δ; adding the zero is exact)
    θ ← θ − εg / d
    """
    lr, rho, one_minus_rho, eps_in, eps_out, weight_decay = h
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    return p - lr * g / (math.sqrt(eps_in + r) + eps_out), r, unused


@_kernel8(_rmsprop8_update)
def _rmsprop8(table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup, block, low, master, keys, grad16, half, bf16state):
    parts = parts_for(offsets[offsets.shape[0] - 1] * block)
    parts = min(parts, offsets[offsets.shape[0] - 1])
    for part in prange(parts):
        _rmsprop8_update(part, parts, table, offsets, hyper, avg_weight, thresholds, values,
                         zeros, lookup, block, low, master, keys, grad16, half, bf16state)


@_update8(8, 2)
def _rmsprop_momentum8_update(p, g, r, v, h):
    """RMSProp with momentum, both conventions through δ_in, δ_out, c and k (square_avg unsigned,
    velocity signed 8-bit):

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    d = √(δ_in + r) + δ_out
    v ← αv + c g / d;   θ ← θ + k v
    textbook (c = −ε, k = 1): v ← αv − εg/d; θ ← θ + v    torch (c = 1, k = −ε): b ← αb + g/d; θ ← θ − εb
    """
    rho, one_minus_rho, eps_in, eps_out, momentum, c, k, weight_decay = h
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    d = math.sqrt(eps_in + r) + eps_out
    v = momentum * v + c * g / d
    return p + k * v, r, v


@_kernel8(_rmsprop_momentum8_update)
def _rmsprop_momentum8(table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup, block, low, master, keys, grad16, half, bf16state):
    parts = parts_for(offsets[offsets.shape[0] - 1] * block)
    parts = min(parts, offsets[offsets.shape[0] - 1])
    for part in prange(parts):
        _rmsprop_momentum8_update(part, parts, table, offsets, hyper, avg_weight, thresholds,
                                  values, zeros, lookup, block, low, master, keys, grad16, half, bf16state)


@_update8(6, 2)
def _rmsprop_nesterov8_update(p, g, r, v, h):
    """RMSProp with Nesterov momentum, textbook (square_avg unsigned, velocity signed 8-bit):

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    u = εg / √(δ + r);   v ← αv − u;   θ ← θ + αv − u    (v the new velocity)
    """
    lr, rho, one_minus_rho, eps, momentum, weight_decay = h
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    u = lr * g / math.sqrt(eps + r)
    v = momentum * v - u
    return p + momentum * v - u, r, v


@_kernel8(_rmsprop_nesterov8_update)
def _rmsprop_nesterov8(table, offsets, hyper, avg_weight, thresholds, values, zeros, lookup, block, low, master, keys, grad16, half, bf16state):
    parts = parts_for(offsets[offsets.shape[0] - 1] * block)
    parts = min(parts, offsets[offsets.shape[0] - 1])
    for part in prange(parts):
        _rmsprop_nesterov8_update(part, parts, table, offsets, hyper, avg_weight, thresholds,
                                  values, zeros, lookup, block, low, master, keys, grad16, half, bf16state)


# ---------------------------------------------------------------------------------------------
# Plans: op, hyperparameters -> kernel, (state slot, signed) pairs in the kernel's order, scalars
# ---------------------------------------------------------------------------------------------


def _adam8_plan(*, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad):
    bc1 = 1 - beta1 ** int(step)  # as the reference: Python floats, rounded once to float32
    bc2 = 1 - beta2 ** int(step)
    if decoupled_weight_decay:
        l2, decay = 0.0, lr * weight_decay
    else:
        l2, decay = weight_decay, 0.0
    return _adam8, ((0, True), (1, False)), (lr, bc1, bc2, beta1, 1 - beta1, beta2, 1 - beta2,
                                              eps, l2, decay)


def _sgd8_plan(*, lr, momentum, nesterov, weight_decay, convention):
    if nesterov:
        nesterov_kernel = _sgd_nesterov8 if convention == "textbook" else _sgd_nesterov_torch8
        return nesterov_kernel, ((0, True),), (lr, momentum, weight_decay)
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    return _sgd_momentum8, ((0, True),), (momentum, c, k, weight_decay)


def _adagrad8_plan(*, lr, eps, weight_decay):
    return _adagrad8, ((0, False),), (lr, eps, weight_decay)


def _rmsprop8_plan(*, lr, rho, eps, momentum, nesterov, centered, weight_decay, convention):
    one_minus_rho = 1 - rho
    eps_in, eps_out = (eps, 0.0) if convention == "textbook" else (0.0, eps)
    if momentum == 0:
        return _rmsprop8, ((0, False),), (lr, rho, one_minus_rho, eps_in, eps_out, weight_decay)
    slots = ((0, False), (2, True))
    if nesterov:
        return _rmsprop_nesterov8, slots, (lr, rho, one_minus_rho, eps, momentum, weight_decay)
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    return _rmsprop_momentum8, slots, (rho, one_minus_rho, eps_in, eps_out, momentum, c, k,
                                       weight_decay)


_PLANS = {
    "adam_step": _adam8_plan,
    "sgd_step": _sgd8_plan,
    "adagrad_step": _adagrad8_plan,
    "rmsprop_step": _rmsprop8_plan,
}
def _address(array) -> int:
    return array.__array_interface__["data"][0]


def _table(params, grads, states, avgs, slots, block, masters=None, bf16_state=False):
    """The kernel's table and block offsets; raises ValueError naming the first bad argument."""
    count = len(params)
    for name, seq in (("grads", grads), ("states", states), ("avgs", avgs)):
        if seq is not None and len(seq) != count:
            raise ValueError(f"{name} has {len(seq)} entries, params has {count}")
    table = np.zeros((count, _COLUMNS), np.int64)
    offsets = np.zeros(count + 1, np.int64)

    def check(array, where, dtype, shape, written):
        if not isinstance(array, np.ndarray) or array.dtype != dtype:
            raise ValueError(f"{where} must be a numpy.ndarray of dtype {np.dtype(dtype)}, got "
                             f"{type(array).__name__} of dtype {getattr(array, 'dtype', None)}")
        if array.shape != shape:
            raise ValueError(f"{where} must have shape {shape}, got {array.shape}")
        if not array.flags.c_contiguous or (written and not array.flags.writeable):
            raise ValueError(f"{where} must be C-contiguous" + (" and writeable" if written else ""))
        return _address(array)

    low = getattr(params[0], "dtype", None) if count else None
    low = low if low is not None and is_low_precision(low) else None
    grad_dtype = getattr(grads[0], "dtype", None) if count else None
    if low is not None and grad_dtype not in (low, _F32):
        raise ValueError(f"grads[0] must have dtype {low} or float32, got {grad_dtype}")
    for t in range(count):
        param = params[t]
        shape = getattr(param, "shape", None)
        table[t, _PARAM] = check(param, f"params[{t}]", low or _F32, shape, True)
        n = param.size
        table[t, _GRAD] = check(grads[t], f"grads[{t}]", grad_dtype if low is not None else _F32, shape, False)
        if masters is not None:
            table[t, _MASTER] = check(masters[t], f"masters[{t}]", _F32, shape, True)
        if avgs is not None:
            table[t, _AVG] = check(avgs[t], f"avgs[{t}]", _F32, shape, True)
        state = states[t]
        if not isinstance(state, (tuple, list)) or len(state) < max(s for s, _ in slots) + 1:
            raise ValueError(f"states[{t}] must be a tuple in the op's state order, got {state!r:.80}")
        for k, (slot, _) in enumerate(slots):
            if bf16_state:
                table[t, (_CODES0, _CODES1)[k]] = check(state[slot], f"states[{t}][{slot}] (bfloat16 state)",
                                                        _BF16, shape, True)
                continue
            pair = state[slot]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"states[{t}][{slot}] must be a pair (codes, absmax), got {pair!r:.80}")
            table[t, (_CODES0, _CODES1)[k]] = check(pair[0], f"states[{t}][{slot}][0] (codes)",
                                                    np.uint8, shape, True)
            table[t, (_ABSMAX0, _ABSMAX1)[k]] = check(pair[1], f"states[{t}][{slot}][1] (absmax)",
                                                      _F32, (-(-n // block),), True)
        table[t, _SIZE] = n
        offsets[t + 1] = offsets[t] + -(-n // block)
    return table, offsets


_BUCKET_SHIFT = np.uint32(16)  # a bucket: the float32 values sharing sign, exponent and 7 mantissa bits


def _lookup(thresholds: np.ndarray) -> np.ndarray:
    """For each bucket of float32 values (the top 16 bits of the pattern: sign, exponent and 7
    mantissa bits), the number of midpoints below the bucket's smallest value, as int32 (the
    vectorized gather loads 32-bit words). Where the map is densest its values are 1.4% apart
    (relative), and a bucket spans at most 2^-7 = 0.8%, so a bucket holds at most one midpoint
    (checked here): q = lookup + (x̂ > t[lookup]) is the count of midpoints below x̂ that the 8-step
    search of ``quantize.py`` finds, with one compare."""
    shift = int(_BUCKET_SHIFT)
    first = np.arange(1 << (32 - shift), dtype=np.uint32) << np.uint32(shift)
    ends = np.stack([first.view(np.float32), (first | np.uint32((1 << shift) - 1)).view(np.float32)])
    finite = np.isfinite(ends).all(axis=0)  # the NaN buckets hold no x̂ (a NaN block is coded apart)
    low, high = np.where(finite, ends.min(axis=0), 0), np.where(finite, ends.max(axis=0), 0)
    below = np.where(finite, np.searchsorted(thresholds, low, side="left"), 0)
    upto = np.where(finite, np.searchsorted(thresholds, high, side="right"), 0)
    if (upto - below).max() > 1:
        raise AssertionError("a bucket of the 8-bit lookup holds two midpoints")
    return below.astype(np.int32)


_MAPS = {signed: (THRESHOLDS[(signed, _F32)], MAP_AS[(signed, _F32)], ZERO[signed],
                  _lookup(THRESHOLDS[(signed, _F32)]))
         for signed in (True, False)}


_LOOKUPS = {(a, b): np.stack([_MAPS[a][3], _MAPS[b][3]]) for a in (True, False) for b in (True, False)}
# the 255 midpoints of each row's map and +Inf: the compare after the look-up needs no bounds test
_THRESHOLDS = {(a, b): np.stack([np.append(_MAPS[m][0], np.float32(np.inf)) for m in (a, b)])
               for a in (True, False) for b in (True, False)}


def state8_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf,
                avg_weight=0.0, block=256, masters=None, rounding="nearest", seed=0, counter=0, indices=None,
                starts=None, state_dtype="int8", **hyper) -> None:
    """``op`` with 8-bit block-wise quantized state on every tensor of the lists, in one kernel
    call (see the module docstring); raises ValueError, before writing anything, for an
    unsupported configuration or a bad argument.

    ``params`` may be bfloat16 or float16 (one format for the list), updated as ``mixed.py``
    updates them: grads of that format or float32, ``masters`` float32 copies or None, and
    ``rounding``, ``seed``, ``counter``, ``indices``, ``starts`` as there. ``state_dtype="bfloat16"``: the
    state entries are bfloat16 arrays instead of (codes, absmax) pairs, decoded exactly and stored
    rounded to nearest even, with the same optimizers and configurations."""
    reason = state8_supported(op, **hyper)
    if reason is not None:
        raise ValueError(reason)
    if not isinstance(block, int) or not 1 <= block:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if len(params) == 0:
        return
    update, slots, scalars = _PLANS[op](**hyper)
    if state_dtype not in ("int8", "bfloat16"):
        raise ValueError(f"state_dtype must be 'int8' or 'bfloat16', got {state_dtype!r}")
    bf16_state = state_dtype == "bfloat16"
    table, offsets = _table(params, grads, states, avgs, slots, block, masters, bf16_state)
    if offsets[-1] == 0:
        return
    rows = [slots[min(k, len(slots) - 1)][1] for k in range(2)]  # row 1 repeats row 0 when unused
    thresholds = _THRESHOLDS[tuple(rows)]
    values = np.stack([_MAPS[s][1] for s in rows])
    zeros = np.array([_MAPS[s][2] for s in rows], np.uint8)
    lookup = _LOOKUPS[tuple(rows)]
    hyper_array = np.array((*scalars, grad_mul, grad_clip), np.float32)
    low = is_low_precision(params[0].dtype)
    stochastic = low and rounding == "stochastic"
    grad16 = low and grads[0].dtype != _F32
    half = low and params[0].dtype == np.float16
    variant = update.variant(avgs is not None, low, low and masters is not None, stochastic, grad16, half, bf16_state)
    total = sum(int(p.size) for p in params)
    if total < SERIAL_BELOW:
        variant = variant.serial
    keys = None
    if stochastic:
        keys = _keys(seed, counter, range(len(params)) if indices is None else indices, starts)
    variant(table, offsets, hyper_array, None if avgs is None else np.float32(avg_weight),
            thresholds, values, zeros, lookup, block, True if low else None,
            True if low and masters is not None else None, keys, True if grad16 else None, True if half else None,
            True if bf16_state else None)
