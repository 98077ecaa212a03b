"""Low-precision storage of the ``"cupy"`` backend: host side of ``lowp.cu``.

The functions of ``kernels/numba_cpu/mixed.py`` and ``kernels/numba_cpu/state8.py``, same
signatures and semantics, on GPU arrays (``docs/algorithms.md``, "Low-precision parameters",
"Optimizers with 8-bit state", "Low-precision storage"):

    mixed_step(op, params, grads, masters, states, avgs, *, rounding, seed, counter, indices,
               grad_mul, grad_clip, avg_weight, **hyper)
        16-bit θ (float16; bfloat16 when the arrays' dtype is recognizable as bfloat16, e.g. torch
        bfloat16 tensors or ml_dtypes arrays; CuPy itself has no bfloat16 dtype), gradients of θ's
        dtype or float32, float32 masters (or None) and states, float32 averages (or None):
            p ← m (master) or f32(θ);  g ← clamp(f32(g)·grad_mul, ±grad_clip);  p ← update(p, g, s)
            m ← p;  θ ← rn(p) or sr(p, uniform(key_t, i));  θ̂ ← θ̂ + w(p − θ̂)
        the update being optim.cu's float32 element update of the configuration (the variants and
        scalars of ``optim.py``), key_t = tensor_key(seed, counter, indices[t]) computed here.
        One launch of ``fo::mixed_update<Op, H>`` per ``_sources.list_capacity(states + 4)``
        tensors (θ, g, master, θ̂, states; plus the key per tensor).
    mixed_sumsq(grads) -> float
        Σ g² over 16-bit gradients (one dtype), in float64: per-block partials, reduce.cu's
        sum_partials, then one host read (a Python float, as the CPU backend returns; this reads
        the device, i.e. synchronizes with the launch stream).
    state8_step(op, params, grads, states, avgs, *, grad_mul, grad_clip, avg_weight, block, masters,
                rounding, seed, counter, indices, starts, state_dtype, **hyper)
        state_dtype="int8": 8-bit block-quantized states (pairs (codes uint8, absmax float32)): one
        warp per quantization block of ``block`` ≤ 256 elements, 8 a lane (``block`` > 256 raises
        ValueError here; the CPU backends take any block). float32 θ
        (``fo::state8_update<Op>``), or 16-bit θ updated as mixed_step updates it
        (``fo::state8_update_low<Op, H>``):
            p ← m or f32(θ);  g ← clamp(f32(g)·grad_mul, ±grad_clip);  s_k ← map_k[q_k]·a_k
            p, s ← update(p, g, s);  m ← p;  θ ← rn(p) or sr(p, uniform(key_t, i));  θ̂ update
            a_k, q_k ← requantize(s_k)
        key_t = piece_key(seed, counter, indices[t], starts[t]) (``starts`` None: 0, i.e.
        tensor_key), as mixed_step's.
        state_dtype="bfloat16": each used state ``states[t][slot]`` is ONE array of θ's shape (not a
        pair) holding bfloat16 values as their bits: a uint16 array (CuPy has no bfloat16 dtype; an
        array whose dtype is recognizable as bfloat16, e.g. a torch bfloat16 tensor, is taken too).
        The same float32 element update, θ, masters, θ̂ and keys as above, with
            s_k ← f32(b_k) (exact);  ...;  b_k ← rn_bf16(s_k)  (round to nearest even, NaN stays NaN)
        as ``kernels/numba_cpu/state8.py`` with state_dtype="bfloat16"; one thread per element
        (``fo::bf16_state_update<Op>``, float32 θ, or ``fo::bf16_state_update_low<Op, H>``); ``block``
        is validated but unused. Host arrays made for the reference (ml_dtypes bfloat16) go to the
        device as their ``.view(numpy.uint16)``.
    state8_supported(op, **hyper), state8_layout(op, **hyper)
        the rules of the CPU backend and the reference (copied here: backends do not import
        ``fastopt.reference``).

Scalars are computed on the host in float64 and rounded once to float32. Nothing synchronizes
except ``mixed_sumsq``'s final read.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from . import _device, _loader, _sources
from .optim import _CONFIGURE, _scalars, grad_mul_args

__all__ = ["SUPPORTED", "mixed_step", "mixed_sumsq", "piece_key", "state8_layout", "state8_step", "state8_supported",
           "tensor_key"]

_BLOCK = _sources.BLOCK
_F32 = np.dtype(np.float32)


# ---------------------------------------------------------------------------------------------
# formats and keys


def _dtype_name(array) -> str:
    """The dtype's name ("float16", "bfloat16", "float32", ...), also for a torch bfloat16 tensor
    whose dtype NumPy cannot name without ml_dtypes."""
    try:
        return _device.dtype_of(array).name
    except TypeError:
        return str(getattr(array, "dtype", "")).rsplit(".", 1)[-1]


def _low_format(array, where: str) -> str:
    name = _dtype_name(array)
    if name not in _sources.LOW_FORMATS:
        raise TypeError(f"{where}: the cupy backend stores 16-bit parameters as float16 or bfloat16, got dtype {name}")
    return name


_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    z &= _MASK
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _MASK
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def tensor_key(seed: int, step: int, k: int) -> int:
    """MIX(MIX(MIX(k + γ) + step) + seed) mod 2⁶⁴ as the int64 with the same bits (``lowbits.tensor_key``)."""
    key = _mix(_mix(_mix(int(k) + _GAMMA) + int(step)) + int(seed))
    return key - (1 << 64) if key >= 1 << 63 else key


def _pack(rows, sizes, aux, slots):
    """Yield (AuxList struct, [rows of the launch]) per launch of ≤ capacity tensors."""
    capacity = _sources.list_capacity(slots)
    dtype = _sources.aux_list_dtype(slots)
    for start in range(0, len(rows), capacity):
        chunk = rows[start:start + capacity]
        packed = np.zeros(1, dtype)
        packed["ptr"][0, :len(chunk)] = np.asarray(chunk, dtype=np.uint64)
        packed["n"][0, :len(chunk)] = np.asarray(sizes[start:start + capacity], dtype=np.int64)
        packed["aux"][0, :len(chunk)] = np.asarray(aux[start:start + capacity], dtype=np.int64)
        packed["count"] = len(chunk)
        yield packed, sizes[start:start + capacity]


def _pointer(array) -> int:
    return 0 if array is None else _device.pointer(array)


# ---------------------------------------------------------------------------------------------
# 16-bit parameters


def piece_key(seed: int, step: int, k: int, start: int = 0) -> int:
    """``tensor_key`` of a piece that begins at element ``start`` of its parameter: the key plus
    start·γ mod 2⁶⁴ (the uniform of element i adds (i + 1)·γ), as the int64 with the same bits."""
    key = (tensor_key(seed, step, k) + int(start) * _GAMMA) & _MASK
    return key - (1 << 64) if key >= 1 << 63 else key


def mixed_step(op, params, grads, masters, states, avgs, *, rounding="nearest", seed=0, counter=0, indices=None,
               starts=None, grad_mul=1.0, grad_clip=math.inf, avg_weight=0.0, **hyper) -> None:
    """``op`` ("adam_step", ...) on 16-bit parameters, in place, in ⌈tensors / capacity⌉ launches
    (see the module docstring). ``indices``: the tensors' places in their optimizer (None: 0, 1, …);
    ``starts``: where each tensor begins in its parameter, for the stochastic-rounding stream
    (``piece_key``; None: 0)."""
    if not params:
        return
    low = _low_format(params[0], "params[0]")
    grad_name = _dtype_name(grads[0])
    if grad_name not in (low, "float32"):
        raise TypeError(f"grads[0]: expected {low} or float32 gradients, got dtype {grad_name}")
    variant, values, used = _CONFIGURE[op](**hyper)
    slots = _sources.UPDATES[variant].states + 4
    stochastic = rounding == "stochastic"
    if indices is None:
        indices = range(len(params))
    rows, sizes, keys = [], [], []
    for t, (param, grad) in enumerate(zip(params, grads)):
        n = _device.size_of(param)
        if n == 0:
            continue
        rows.append([_device.pointer(param), _device.pointer(grad),
                     _pointer(None if masters is None else masters[t]),
                     _pointer(None if avgs is None else avgs[t])]
                    + [_device.pointer(states[t][i]) for i in used])
        sizes.append(n)
        keys.append(piece_key(seed, counter, indices[t], 0 if starts is None else starts[t]) if stochastic else 0)
    if not rows:
        return
    first = next(p for p in params if _device.size_of(p) > 0)
    scalars = _scalars(variant, _F32, values)
    mul_value, mul_pointer = grad_mul_args(grad_mul, _F32)
    name = _sources.mixed_kernel(variant, low)
    arrays = [*params, *grads, *(masters or ()), *(s for st in states for s in st), *(avgs or ()), grad_mul]
    with _device.place(first, *arrays) as where:
        for packed, chunk in _pack(rows, sizes, keys, slots):
            grid = _loader.grid("lowp", name, sum(chunk), _BLOCK)
            _loader.launch("lowp", name, grid, _BLOCK,
                           (scalars, packed, mul_value, mul_pointer, np.float32(grad_clip), np.float32(avg_weight),
                            np.int32(grad_name == "float32"), np.int32(stochastic)), where.stream)


def mixed_sumsq(grads) -> float:
    """Σ g² over 16-bit gradients of one dtype, accumulated in float64 (a host float: one read)."""
    grads = [g for g in grads if _device.size_of(g) > 0]
    if not grads:
        return 0.0
    low = _low_format(grads[0], "grads[0]")
    name = _sources.mixed_sumsq_kernel(low)
    rows = [[_device.pointer(g)] for g in grads]
    sizes = [_device.size_of(g) for g in grads]
    with _device.place(grads[0], *grads[1:]) as where:
        launches = [(packed, _loader.grid("lowp", name, sum(chunk), _BLOCK))
                    for packed, chunk in _pack(rows, sizes, [0] * len(rows), 1)]
        total = sum(grid for _, grid in launches)
        partials = where.scratch((total,), np.float64)
        base = _device.pointer(partials)
        offset = 0
        for packed, grid in launches:
            _loader.launch("lowp", name, grid, _BLOCK, (packed, np.uint64(base + 8 * offset)), where.stream)
            offset += grid
        out = where.output((1,), np.float64)
        _loader.launch("reduce", _sources.reduce_kernel("sum_partials"), 1, _BLOCK,
                       (np.uint64(base), np.int64(total), np.uint64(_device.pointer(out))), where.stream)
        del partials
    return float(_device.to_numpy(out).reshape(-1)[0])


# ---------------------------------------------------------------------------------------------
# 8-bit state: the rules shared by the backends (kernels/_state8_rules.py)

from .._state8_rules import SUPPORTED, state8_layout, state8_supported  # noqa: E402


def _state8_plan(op, hyper):
    """(STATE8_UPDATES variant, scalars) of a supported configuration: Adam with the reference's
    bias corrections 1 − βᵗ, the others the variants and scalars of ``optim.py``."""
    if op == "adam_step":
        step = int(hyper["step"])
        lr, beta1, beta2 = hyper["lr"], hyper["beta1"], hyper["beta2"]
        if hyper["decoupled_weight_decay"]:
            l2, decay = 0.0, lr * hyper["weight_decay"]
        else:
            l2, decay = hyper["weight_decay"], 0.0
        return "adam", (lr, 1 - beta1 ** step, 1 - beta2 ** step, beta1, 1 - beta1, beta2, 1 - beta2,
                        hyper["eps"], l2, decay)
    variant, values, _ = _CONFIGURE[op](**hyper)
    return variant, values


def _check_state8(params, grads, states, avgs, masters, indices, starts, layout, block, rounding, bf16_state):
    """The 16-bit format of ``params`` (None for float32) and the gradients' dtype name; raises
    TypeError (a dtype) or ValueError (anything else) naming the first bad argument. ``bf16_state``:
    each used state is one bfloat16 array (uint16 bits) of the parameter's shape, else a pair
    (codes, absmax)."""
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    count = len(params)
    for name, seq in (("grads", grads), ("states", states), ("avgs", avgs), ("masters", masters),
                      ("indices", indices), ("starts", starts)):
        if seq is not None and len(seq) != count:
            raise ValueError(f"{name} has {len(seq)} entries, params has {count}")
    for t, start in enumerate(() if starts is None else starts):
        try:
            if operator.index(start) < 0:
                raise TypeError
        except TypeError:
            raise ValueError(f"starts[{t}] must be an int ≥ 0 (where tensor {t} begins in its parameter), "
                             f"got {start!r}") from None
    if count == 0:
        return None, "float32"
    first = _dtype_name(params[0])
    if first != "float32" and first not in _sources.LOW_FORMATS:
        raise TypeError(f"params[0]: the cupy backend's 8-bit state takes float32, float16 or bfloat16 "
                        f"params, got dtype {first}")
    low = None if first == "float32" else first
    if low is None and masters is not None:
        raise ValueError("masters are float32 copies of 16-bit params; params[0] is float32 (pass masters=None)")
    grad_name = _dtype_name(grads[0])
    allowed = (low, "float32") if low is not None else ("float32",)
    if grad_name not in allowed:
        raise TypeError(f"grads[0]: expected {' or '.join(allowed)} gradients for {first} params, "
                        f"got dtype {grad_name}")

    def check(array, where, dtype, size):
        name = _dtype_name(array)
        if name != dtype:
            raise TypeError(f"{where}: expected dtype {dtype}, got {name}")
        if _device.size_of(array) != size:
            raise ValueError(f"{where}: expected {size} elements, got {_device.size_of(array)} "
                             f"(shape {tuple(array.shape)})")

    for t, param in enumerate(params):
        n = _device.size_of(param)
        check(param, f"params[{t}]", first, n)
        check(grads[t], f"grads[{t}]", grad_name, n)
        if masters is not None:
            check(masters[t], f"masters[{t}]", "float32", n)
        if avgs is not None:
            check(avgs[t], f"avgs[{t}]", "float32", n)
        state = states[t]
        if not isinstance(state, (tuple, list)) or len(state) <= max(slot for slot, _ in layout):
            raise ValueError(f"states[{t}] must be a tuple in the op's state order, got {state!r:.80}")
        for slot, _ in layout:
            pair = state[slot]
            if bf16_state:
                _check_bf16_state(pair, f"states[{t}][{slot}] (bfloat16 state)", param)
                continue
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"states[{t}][{slot}] must be a pair (codes, absmax), got {pair!r:.80}")
            check(pair[0], f"states[{t}][{slot}][0] (codes)", "uint8", n)
            check(pair[1], f"states[{t}][{slot}][1] (absmax)", "float32", -(-n // block))
    return low, grad_name


def _check_bf16_state(array, where, param):
    """A bfloat16 state array: uint16 (the bits; CuPy has no bfloat16 dtype) or a recognizable
    bfloat16 dtype, of ``param``'s shape."""
    if isinstance(array, (tuple, list)) or array is None or not hasattr(array, "shape"):
        raise ValueError(f"{where} must be one array of the parameter's shape holding bfloat16 bits (uint16), "
                         f"got {array!r:.80}")
    name = _dtype_name(array)
    if name not in _BF16_STATE_DTYPES:
        raise TypeError(f"{where}: expected dtype uint16 (bfloat16 bits) or bfloat16, got {name}")
    if tuple(array.shape) != tuple(param.shape):
        raise ValueError(f"{where}: expected shape {tuple(param.shape)} (the parameter's), got {tuple(array.shape)}")


_BF16_STATE_DTYPES = ("uint16", "bfloat16")
_STATE_DTYPES = ("int8", "bfloat16")


def _pack_keyed(rows, sizes, firsts, keys):
    """The KeyedList<STATE8_LOW_SLOTS> struct of one launch (≤ capacity tensors)."""
    packed = np.zeros(1, _sources.keyed_list_dtype(_sources.STATE8_LOW_SLOTS))
    count = len(rows)
    packed["ptr"][0, :count] = np.asarray(rows, dtype=np.uint64)
    packed["n"][0, :count] = np.asarray(sizes, dtype=np.int64)
    packed["aux"][0, :count] = np.asarray(firsts, dtype=np.int64)
    packed["key"][0, :count] = np.asarray(keys, dtype=np.int64)
    packed["count"] = count
    return packed


def state8_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf, avg_weight=0.0, block=256,
                masters=None, rounding="nearest", seed=0, counter=0, indices=None, starts=None, state_dtype="int8",
                **hyper) -> None:
    """``op`` with 8-bit block-wise quantized state (or bfloat16 state) on every tensor of the
    lists (θ, g, θ̂; states[t][slot] for the slots of ``state8_layout``), in place; raises
    ValueError (TypeError for a dtype) before launching anything for an unsupported configuration,
    block, state_dtype or argument.

    ``state_dtype="int8"``: states[t][slot] = (codes, absmax). float32 θ: g float32, one launch of
    ``state8_update<Op>`` per ``list_capacity(7)`` tensors. 16-bit θ (float16 or bfloat16, one
    format for the list), as ``kernels/numba_cpu/state8.py`` updates it: g of θ's format or
    float32, ``masters`` float32 copies or None, θ rounded to nearest or stochastically
    (``rounding``; key_t = piece_key(seed, counter, indices[t], starts[t]), ``indices`` None:
    0, 1, …, ``starts`` None: 0), one launch of ``state8_update_low<Op, H>`` per
    ``keyed_list_capacity(8)`` tensors.

    ``state_dtype="bfloat16"``: states[t][slot] is one array of θ's shape holding bfloat16 values
    as their bits (uint16; an array of a recognizable bfloat16 dtype is taken too), decoded exactly
    and stored rounded to nearest even; the same updates, θ and keys as above, ``block`` validated
    but unused; one launch of ``bf16_state_update<Op>`` (float32 θ) or
    ``bf16_state_update_low<Op, H>`` (16-bit θ) per ``list_capacity(6)`` tensors."""
    layout = state8_layout(op, **hyper)
    if state_dtype not in _STATE_DTYPES:
        raise ValueError(f"state_dtype must be 'int8' or 'bfloat16', got {state_dtype!r}")
    if not isinstance(block, int) or not 1 <= block <= _sources.STATE8_MAX_BLOCK:
        raise ValueError(f"block must be an int in [1, {_sources.STATE8_MAX_BLOCK}] on the cupy backend (one warp "
                         f"per quantization block, {_sources.STATE8_MAX_BLOCK // 32} elements a lane), got {block!r}")
    bf16_state = state_dtype == "bfloat16"
    low, grad_name = _check_state8(params, grads, states, avgs, masters, indices, starts, layout, block, rounding,
                                   bf16_state)
    variant, values = _state8_plan(op, hyper)
    stochastic = low is not None and rounding == "stochastic"
    if indices is None:
        indices = range(len(params))
    rows, sizes, blocks, keys = [], [], [], []
    for t, (param, grad) in enumerate(zip(params, grads)):
        n = _device.size_of(param)
        if n == 0:
            continue
        used = [states[t][slot] for slot, _ in layout]
        row = [_device.pointer(param), _device.pointer(grad), _pointer(None if avgs is None else avgs[t])]
        if bf16_state:
            row += [_pointer(used[k] if k < len(used) else None) for k in range(2)]
            row.append(_pointer(None if masters is None else masters[t]))
        else:
            for k in range(2):
                codes, absmax = used[k] if k < len(used) else (None, None)
                row += [_pointer(codes), _pointer(absmax)]
            if low is not None:
                row.append(_pointer(None if masters is None else masters[t]))
        keys.append(piece_key(seed, counter, indices[t], 0 if starts is None else starts[t]) if stochastic else 0)
        rows.append(row)
        sizes.append(n)
        blocks.append(-(-n // block))
    if not rows:
        return
    scalars = np.empty(1, _sources.state8_scalars_dtype(variant))
    scalars[0] = tuple(float(v) for v in values)
    mul_value, mul_pointer = grad_mul_args(grad_mul, _F32)
    first = next(p for p in params if _device.size_of(p) > 0)
    used = [states[t][slot] for t in range(len(params)) for slot, _ in layout]
    arrays = [*params, *grads, *(used if bf16_state else (a for pair in used for a in pair)), *(avgs or ()),
              *(masters or ()), grad_mul]
    tail = () if low is None else (np.int32(grad_name == "float32"), np.int32(stochastic))
    if bf16_state:
        name = _sources.bf16_state_kernel(variant, low)
        with _device.place(first, *arrays) as where:
            for packed, chunk in _pack(rows, sizes, keys, _sources.BF16_STATE_SLOTS):
                grid = _loader.grid("lowp", name, sum(chunk), _BLOCK)
                _loader.launch("lowp", name, grid, _BLOCK,
                               (scalars, packed, mul_value, mul_pointer, np.float32(grad_clip),
                                np.float32(avg_weight), *tail), where.stream)
        return
    signed = [int(s) for _, s in layout] + [int(layout[0][1])] * (2 - len(layout))
    name = _sources.state8_kernel(variant, low)
    with _device.place(first, *arrays) as where:
        capacity = (_sources.list_capacity(_sources.STATE8_SLOTS) if low is None
                    else _sources.keyed_list_capacity(_sources.STATE8_LOW_SLOTS))
        for start in range(0, len(rows), capacity):
            counts = blocks[start:start + capacity]
            firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            total = int(sum(counts))
            if low is None:
                (packed, _), = _pack(rows[start:start + capacity], sizes[start:start + capacity], firsts,
                                     _sources.STATE8_SLOTS)
            else:
                packed = _pack_keyed(rows[start:start + capacity], sizes[start:start + capacity], firsts,
                                     keys[start:start + capacity])
            grid = min(-(-total // (_BLOCK // 32)), _loader.resident("lowp", name, _BLOCK))  # a warp a block
            _loader.launch("lowp", name, grid, _BLOCK,
                           (scalars, packed, np.int64(total), np.int32(block), mul_value, mul_pointer,
                            np.float32(grad_clip), np.float32(avg_weight), np.int32(signed[0]), np.int32(signed[1]),
                            *tail),
                           where.stream)
