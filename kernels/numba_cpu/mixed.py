"""Low-precision parameters of the ``"numba"`` backend: bfloat16 and float16 θ, fused with the update.

``mixed_step`` runs any optimizer update of ``optim.py`` on parameters stored in bfloat16
(``ml_dtypes.bfloat16``) or float16, with gradients in the parameters' dtype or in float32, in
one pass over the arrays. The arithmetic is float32: each element is decoded from its 16 bits
(``lowbits.py``), updated by the optimizer's own element update (the same inlined function the
float32 kernels run, so the update is the float32 update code for code), and encoded again:

    p ← m[i]                  (master weights: the float32 copy)  or  p ← f32(θ[i])
    g ← f32(g[i]) · grad_mul, clamped to ±grad_clip
    p ← update(p, g, state)   (state float32, as ``optim.py``)
    m[i] ← p                  (master weights)
    θ[i] ← rn(p)              (round to nearest even)  or  sr(p, uniform(key_t, i))
    θ̂[i] ← θ̂[i] + w (p − θ̂[i])   (Polyak average, float32, of the float32 value p)

``sr`` is stochastic rounding with the counter-based uniform number of element i of tensor t
(``lowbits.uniform``; ``key_t`` = ``lowbits.tensor_key(seed, step, k)`` for the tensor's index k
in its optimizer, computed once per tensor on the host), so runs repeat and resume bit for bit.

Memory traffic per element (b = 2 bytes for θ, b_g = 2 or 4 for g, s float32 state arrays):
with master weights θ is only written: b_g + 4 + 4s read, 2 + 4 + 4s written, so bfloat16 Adam
with master weights and bfloat16 gradients moves 2 + 4 + 8 read + 2 + 4 + 8 written = 28 B,
the same as float32 Adam (the master copy replaces θ's four bytes; the low-precision copy and
gradient are what the model's forward and backward passes read at half the width); without
master weights 2 + b_g + 4s read, 2 + 4s written (bfloat16 Adam: 22 B). The Polyak average adds 8.

Variants are compiled per combination of (master weights, stochastic rounding, float32
gradients, float16 rather than bfloat16, Polyak average) on first use: each is a set of
compile-time constants (``None`` for off) bound into the update's part runner, and numba prunes
the branches a variant does not take, so every inner loop is straight-line code for its
combination. Each variant is a part runner (``runners.Runner``, a C function compiled once) run by
``runners.launch_parts``, the launcher the float32 optimizers run (over ``prange``, or on the
calling thread: its serial twin), so a variant's first use compiles its loop and nothing else.
"""

from __future__ import annotations

import math
import sys
import types as pytypes

import numba
import numpy as np
from numba import types

from . import optim as _optim
from .lowbits import (GAMMA, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, stochastic_bf16, stochastic_f16,
                      tensor_key, uniform)
from .multi import (AVG, GRAD, PARAM, SERIAL_BELOW, STATE, array_at, data_address, float64_at, last_at_most,
                    next_span, part_range, pointer, tuple_at, typed_pointer)
from .reduce import sum_of_parts
from .runners import Launched, Runner, flag, variant_runner

__all__ = ["bfloat16_if_imported", "mixed_step", "mixed_sumsq", "is_low_precision"]

MASTER = 6  # the table's extra columns: the float32 master copy (0 when none)
KEY = 7  # and the tensor's stochastic rounding key
COLUMNS = 8


def bfloat16_if_imported() -> np.dtype | None:
    """ml_dtypes' bfloat16, or None while ml_dtypes is not imported: no array can have the dtype
    then. Importing ml_dtypes costs about 0.6 s, which a float32 program never pays."""
    module = sys.modules.get("ml_dtypes")
    return None if module is None else np.dtype(module.bfloat16)


def is_low_precision(dtype) -> bool:
    """Whether ``dtype`` is one of the 16-bit float formats this module stores (bfloat16, float16)."""
    dtype = np.dtype(dtype)
    bfloat16 = bfloat16_if_imported()
    return dtype == np.float16 or (bfloat16 is not None and dtype == bfloat16)


_pointer16 = typed_pointer(types.uint16)  # bfloat16 and float16 bit patterns


_inline = numba.njit(inline="always", error_model="numpy")


@_inline
def _nearest_bf16(x, key, i):
    return f32_to_bf16(x)


@_inline
def _nearest_f16(x, key, i):
    return f32_to_f16(x)


@_inline
def _stochastic_bf16(x, key, i):
    return stochastic_bf16(x, uniform(key, i))


@_inline
def _stochastic_f16(x, key, i):
    return stochastic_f16(x, uniform(key, i))


def coders(half: bool, stochastic: bool) -> dict:
    """The 16-bit decode (bits → float32) and encode (float32 → bits; element ``i`` of a tensor
    whose stochastic rounding key is ``key``) a variant runs, by name (``_DECODE``, ``_ENCODE``), to
    bind as compile-time constants. numba inlines a helper's IR before typing, so one encode that
    chose by its arguments was inlined with all four roundings and their helpers at every call
    (about 0.5 s of a runner's compile)."""
    encode = {(False, False): _nearest_bf16, (True, False): _nearest_f16,
              (False, True): _stochastic_bf16, (True, True): _stochastic_f16}[(half, stochastic)]
    return {"_DECODE": f16_to_f32 if half else bf16_to_f32, "_ENCODE": encode}


# Bound per update and variant by ``_MixedKernel.variant`` (compile-time constants of each runner;
# the flags are None or True, so the branches on them are pruned before typing; the coders are
# ``coders``'s):
_UPDATE = _SCALARS = _AVERAGED = _MASTER = _GRAD32 = _DECODE = _ENCODE = None


def _run(part, parts, table_at, rows, offsets_at, count, hyper_at):
    """Part ``part`` of ``parts`` of the tensor list: the low-precision counterpart of
    ``optim._run_part``, around the same element update (``_UPDATE``, taking ``_SCALARS`` host
    scalars); the template of every update's part runner (``_MixedKernel``; C signature:
    ``runners.runner_signature``). ``hyper``: the scalars, grad_mul, grad_clip, the average's
    weight."""
    table = array_at(table_at, (rows, COLUMNS))
    offsets = array_at(offsets_at, count)
    hyper = array_at(hyper_at, _SCALARS + 3)
    h = tuple_at(hyper_at, _SCALARS)
    grad_mul = hyper[_SCALARS]
    grad_clip = hyper[_SCALARS + 1]
    avg_weight = hyper[_SCALARS + 2]
    lo, hi = part_range(part, parts, offsets[count - 1])
    t = last_at_most(offsets, lo)
    while lo < hi:
        i0, i1, lo = next_span(offsets, t, lo, hi)
        low = _pointer16(table[t, PARAM])
        key = table[t, KEY]  # (read by the stochastic encodes only)
        grad16 = _pointer16(table[t, GRAD])
        grad = pointer(table[t, GRAD], grad_mul)
        copy = pointer(table[t, MASTER], grad_mul)
        avg = pointer(table[t, AVG], grad_mul)
        state = (pointer(table[t, STATE], grad_mul), pointer(table[t, STATE + 1], grad_mul),
                 pointer(table[t, STATE + 2], grad_mul))
        for i in range(i0, i1):
            if _GRAD32 is None:
                g = _DECODE(grad16[i])
            else:
                g = grad[i]
            g = _optim._transformed(g, grad_mul, grad_clip)
            if _MASTER is None:
                p = _DECODE(low[i])
            else:
                p = copy[i]
            p = _UPDATE(p, g, state, i, h)
            if _MASTER is not None:
                copy[i] = p
            low[i] = _ENCODE(p, key, i)
            if _AVERAGED:
                a = avg[i]
                avg[i] = a + avg_weight * (p - a)
        t += 1


def _copy(func, name: str, **names):
    """A copy of ``func`` under the name and qualified name ``name`` (numba names a function's
    disk-cache files after its qualified name, so each copy caches on its own), with ``names``
    added to its globals."""
    copy = pytypes.FunctionType(func.__code__, {**func.__globals__, **names}, name)
    copy.__qualname__ = name
    copy.__module__ = func.__module__
    return copy


class _MixedKernel:
    """One optimizer kernel of ``optim.py`` for low-precision parameters, in variants compiled on
    first use: the update's part runner (``_run`` with the update and the variant's flags bound,
    named ``_mixed<kernel>_run_<flags>`` so its disk cache is its own; ``runners.Runner``) run by
    the float32 optimizers' launcher (``runners.Launched``), with its serial twin."""

    def __init__(self, update_kernel):
        name = f"_mixed{update_kernel.__name__}"
        self.__name__ = name
        self.__doc__ = update_kernel.__doc__
        self._update = update_kernel
        self._variants: dict[tuple, Launched] = {}

    def variant(self, averaged: bool, master: bool, stochastic: bool, grad32: bool, half: bool) -> Launched:
        key = (averaged, master, stochastic, grad32, half)
        found = self._variants.get(key)
        if found is None:
            constants = dict(_UPDATE=self._update.element, _SCALARS=self._update.scalars, _AVERAGED=averaged,
                             _MASTER=flag(master), _GRAD32=flag(grad32),
                             **coders(half, stochastic))
            found = self._variants[key] = variant_runner(_run, self.__name__, key, constants, self.__doc__)
        return found

    def variants(self):
        """Every variant (32 combinations; stochastic rounding never with master weights)."""
        return [self.variant(*key) for key in np.ndindex(2, 2, 2, 2, 2) if not (key[1] and key[2])]


_KERNELS: dict[int, _MixedKernel] = {}


def mixed_kernel(update_kernel) -> _MixedKernel:
    """The low-precision counterpart of an ``optim.py`` kernel (made once per process)."""
    found = _KERNELS.get(id(update_kernel))
    if found is None:
        found = _KERNELS[id(update_kernel)] = _MixedKernel(update_kernel)
    return found


def _table(params, grads, masters, states, avgs, slots):
    n = len(params)
    table = np.zeros((n, COLUMNS), np.int64)
    offsets = np.zeros(n + 1, np.int64)
    for t in range(n):
        table[t, PARAM] = data_address(params[t])
        table[t, GRAD] = data_address(grads[t])
        if masters is not None:
            table[t, MASTER] = data_address(masters[t])
        if avgs is not None:
            table[t, AVG] = data_address(avgs[t])
        for j, slot in enumerate(slots):
            table[t, STATE + j] = data_address(states[t][slot])
        offsets[t + 1] = offsets[t] + params[t].size
    return table, offsets


def _keys(seed, counter, indices, starts) -> np.ndarray:
    """key_t = tensor_key(seed, counter, indices[t]) + starts[t]·γ mod 2⁶⁴, as int64 bits."""
    keys = np.array([tensor_key(seed, counter, k) for k in indices], np.int64)
    if starts is not None:
        with np.errstate(over="ignore"):
            keys = (keys.view(np.uint64) + np.asarray(starts, np.uint64) * np.uint64(GAMMA)).view(np.int64)
    return keys


def mixed_step(op, params, grads, masters, states, avgs, *, rounding="nearest", seed=0, counter=0, indices=None,
               starts=None, grad_mul=1.0, grad_clip=math.inf, avg_weight=0.0, **hyper):
    """``op`` (``"adam_step"``, ...) on low-precision parameters, in place, in one kernel call.

    ``params``: C-contiguous arrays of one 16-bit float dtype (bfloat16 or float16), writeable;
    ``grads``: arrays of that dtype or float32 (one dtype for the list), each the size of its
    parameter; ``masters``: a list of float32 master copies, or None to update θ itself;
    ``states``: per tensor the op's state tuple (float32 arrays, as ``optim.multi_step``);
    ``avgs``: float32 Polyak averages or None. ``rounding``: ``"nearest"`` or ``"stochastic"``
    (only without master weights); stochastic rounding draws element i of tensor t from
    ``lowbits.tensor_key(seed, counter, indices[t])`` (``counter`` the step's number, ``indices``
    the tensors' places in their optimizer). ``starts``: None, or where each tensor begins in its
    parameter (a piece of a larger parameter, as the data-parallel step updates): element i then
    draws what element starts[t] + i of the whole parameter draws, through the key
    key_t + starts[t]·γ (``lowbits.uniform`` adds (i + 1)·γ to it).
    The arrays are checked by the caller (``fastopt.precision``)."""
    if not params:
        return
    update, slots, scalars = _optim._PLANS[op](**hyper)
    half = params[0].dtype == np.float16
    grad32 = grads[0].dtype == np.float32
    stochastic = rounding == "stochastic"
    table, offsets = _table(params, grads, masters, states, avgs, slots)
    if stochastic:
        table[:, KEY] = _keys(seed, counter, indices, starts)
    variant = mixed_kernel(update).variant(avgs is not None, masters is not None, stochastic, grad32, half)
    if offsets[-1] < SERIAL_BELOW:
        variant = variant.serial
    variant(table, offsets, np.array((*scalars, grad_mul, grad_clip, avg_weight if avgs is not None else 0.0),
                                     np.float32))


# ---------------------------------------------------------------------------------------------
# Sum of squares of low-precision gradients (the global norm for clip_grad_norm and the
# non-finite check), in float64 per part, the parts added in order as reduce.py does
# ---------------------------------------------------------------------------------------------


def _sumsq_run(part, parts, table_at, rows, offsets_at, count, sums_at):
    """Σ g² over part ``part`` of ``parts`` of the table's GRAD column (16-bit gradients: float16
    decoded by the bound ``_DECODE``), in float64, into slot ``part`` of the ``parts`` float64 slots
    at ``sums_at`` (a part runner with float32 scalars; ``reduce.sum_of_parts``)."""
    table = array_at(table_at, (rows, COLUMNS))
    offsets = array_at(offsets_at, count)
    lo, hi = part_range(part, parts, offsets[count - 1])
    t = last_at_most(offsets, lo)
    total = 0.0
    while lo < hi:
        i0, i1, lo = next_span(offsets, t, lo, hi)
        grad = _pointer16(table[t, GRAD])
        for i in range(i0, i1):
            g = np.float64(_DECODE(grad[i]))
            total += g * g
        t += 1
    array_at(float64_at(sums_at), parts)[part] = total


_SUMSQ = {half: Launched(Runner(_sumsq_run, "_mixed_sumsq_run_f16" if half else "_mixed_sumsq_run_bf16",
                                coders(half, False), dtypes=("float32",)))
          for half in (False, True)}


def mixed_sumsq(grads) -> float:
    """Σ g² over a list of bfloat16 or float16 arrays (one dtype), accumulated in float64."""
    if not grads:
        return 0.0
    half = grads[0].dtype == np.float16
    n = len(grads)
    table = np.zeros((n, COLUMNS), np.int64)
    offsets = np.zeros(n + 1, np.int64)
    for t, g in enumerate(grads):
        table[t, GRAD] = data_address(g)
        offsets[t + 1] = offsets[t] + g.size
    return sum_of_parts(_SUMSQ[half], table, offsets, np.float32)
