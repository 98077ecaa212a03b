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

With AVX-512 (VBMI) the decode and the requantization run as vector code built from register
permutes ("Vector block coders" below), bit for bit the scalar loops' results.

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
(a block never spans two threads), each part with a scratch buffer of 2 × block float32. Every
update's part runner (``_run8`` with the update and the variant's flags bound) is a C function
compiled once per variant (``runners.Runner``), run by ``runners.launch_parts``: the launcher every
float32 optimizer step runs, so it is compiled already, and a variant's first use compiles only its
runner. Lists of fewer than ``multi.SERIAL_BELOW`` elements run the launcher's serial twin.

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
import platform

import numba
import numpy as np
from llvmlite import binding as _llvm_binding
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .._state8_rules import SUPPORTED, state8_layout, state8_supported
from ._ir import counted_loop
from .lowbits import bits_f32, f32_bits
from .lowbits import bf16_to_f32, f32_to_bf16
from .mixed import _keys, _pointer16, coders, is_low_precision
from .optim import _l2, _transformed  # the same g + λθ and gradient extras as the float32 kernels
from .multi import (SERIAL_BELOW, array_at, data_address, larger, last_at_most, next_span, part_range, pointer,
                    smaller, tuple_at, typed_pointer)
from .quantize import MAP_AS, THRESHOLDS, ZERO
from .runners import Launched, flag, variant_runner

__all__ = ["SUPPORTED", "state8_layout", "state8_step", "state8_supported"]

# table columns of a tensor's row
_PARAM, _GRAD, _AVG, _CODES0, _ABSMAX0, _CODES1, _ABSMAX1, _SIZE, _MASTER, _KEY = range(10)
_COLUMNS = 10
# and of the table's last row: the maps' addresses (``_THRESHOLDS``, ``_VALUES``, zero codes,
# ``_LOOKUPS``: the rows of the update's two states) and the block size
_THRESHOLDS_AT, _VALUES_AT, _ZEROS_AT, _LOOKUP_AT, _BLOCK = range(5)
_F32 = np.dtype(np.float32)

_element = numba.njit(inline="always", error_model="numpy")


_bytes = typed_pointer(types.uint8)  # codes
_ints32 = typed_pointer(types.int32)  # bucket counts

_ABS_BITS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_NO_BITS = np.uint32(0)


# ---------------------------------------------------------------------------------------------
# Vector block coders (AVX-512)
#
# LLVM vectorizes neither look-up loop for this CPU (its cost model refuses the gathers, and Zen 4's
# vgatherdps was measured slower than the scalar loads anyway), so on x86 with AVX-512 these two
# intrinsics build the vector code themselves, 16 lanes at a time, from register permutes:
#
#   decode  s = m[q] · a: the 256-entry map sits in 16 zmm registers; eight vpermi2ps (each a
#           32-entry look-up by the code's low 5 bits) and a 3-level select on bits 5, 6, 7 give m[q];
#           then one multiply, the same IEEE product as the scalar loop.
#           With AVX-512 VBMI, 64 codes at a time instead: the map as 4 byte planes (16 registers of
#           64 bytes), vpermi2b looks up each plane's byte for 64 codes (two 128-entry halves,
#           selected by bit 7), and two more vpermi2b per 16 floats interleave the planes into the
#           map's float32 patterns (``_byte_planes``).
#   encode  q = #{j : s / a > t_j}: the same division, then the 8-step branch-free binary search of
#           ``quantize.py`` with each step's candidates in registers: step s (128, 64, ..., 1)
#           compares with t[q + s − 1], q a multiple of 2s, one of 256 / 2s values: a broadcast, a
#           select, vpermd (≤ 16 values), vpermi2ps (32) or two and four of them with selects (64,
#           128). Four vectors' searches are interleaved (the chain of 8 dependent steps is
#           latency-bound alone). The count is the reference's, ties included (``quantize.py``).
#           With AVX-512 VBMI, 64 values at a time instead, in two passes: (1) x̂ = s / a (kept in
#           the scratch row) and the same search on 16-bit keys, 32 lanes a register, eight chains
#           (256 values) at once: the key of x̂ is the top half of its pattern made monotone
#           (``_ukey``), and each bucket of equal keys holds at most one midpoint (``_lookup``
#           checks it), so q' = #{j : key(t_j) < key(x̂)} is exact up to that one midpoint, t[q'];
#           (2) q = q' + (x̂ > t[q']), t[q'] looked up from the midpoints' byte planes as the
#           decode looks up the map.
#
# Both are exact by construction (same map, same midpoints, same division and product), so the
# codes and states equal the scalar loops' bit for bit; the scalar loops remain for the block's
# last count mod 64 elements with VBMI, mod 16 without, and on CPUs without AVX-512
# (``_VECTOR_TAIL``: only a tensor's last block is short, so the 16-lane loops would serve at most
# 48 elements a tensor with VBMI; left out, they cost no compile time).

_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _cpu_has(feature: str) -> bool:
    """``feature`` ("+avx512f", ...) on the x86 CPU numba compiles for: its configured features
    (``NUMBA_CPU_FEATURES``) when set, none for another configured CPU name, else the host's."""
    if not _X86:
        return False
    try:
        features = numba.config.CPU_FEATURES if numba.config.CPU_FEATURES else \
            (None if numba.config.CPU_NAME not in (None, "host") else _llvm_binding.get_host_cpu_features().flatten())
    except Exception:  # noqa: BLE001 - no feature string: stay scalar
        return False
    return bool(features) and feature in features.split(",")


_AVX512 = _cpu_has("+avx512f")
_VBMI = _AVX512 and _cpu_has("+avx512vbmi") and _cpu_has("+avx512bw")
_LANES = 16
_I8, _I32, _I64, _FLOAT = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vec(t):
    return ir.VectorType(t, _LANES)


_VF, _VI = _vec(_FLOAT), _vec(_I32)
_STEPS = (128, 64, 32, 16, 8, 4, 2, 1)
_UNROLL = 4  # vectors per iteration of the encode loop


def _search_tables(thresholds: np.ndarray) -> np.ndarray:
    """The 8-step search's candidates, step by step: for step s the 256 / 2s values t[2s·i + s − 1]
    (``thresholds``: the 255 midpoints and +Inf), each step's row padded with +Inf to a multiple of
    16 (a whole register); the offsets are ``_SEARCH_AT``."""
    rows = []
    for s in _STEPS:
        row = [thresholds[2 * s * i + s - 1] for i in range(256 // (2 * s))]
        rows += row + [np.float32(np.inf)] * (-len(row) % _LANES)
    return np.array(rows, np.float32)


_SEARCH_AT, _at = {}, 256  # the search tables follow the 256 thresholds in each row of ``thresholds``
for _s in _STEPS:
    _SEARCH_AT[_s] = _at
    _at += max(_LANES, 256 // (2 * _s))
_SEARCH_END = _at
del _s, _at
_WORD_AT, _at = {}, 0  # in 16-bit words from _WORDS_AT
for _s in _STEPS:
    _WORD_AT[_s] = _at
    _at += max(32, 256 // (2 * _s))
_WORDS_AT = _SEARCH_END  # (in float32 slots)
_TPLANES_AT = _WORDS_AT + _at // 2
_ROW_END = _TPLANES_AT + 256
del _s, _at


def _ukeys(x: np.ndarray) -> np.ndarray:
    """The monotone unsigned keys of float32 values (``_ukey``)."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def _word_tables(thresholds: np.ndarray) -> np.ndarray:
    """The 16-bit search's candidates (the top halves of the midpoints' keys), step by step as
    ``_search_tables``, each step's row padded to a multiple of 32 words, viewed as float32. No
    two midpoints share a top half (``_lookup`` checks the buckets; the keys group them alike)."""
    tops = (_ukeys(thresholds) >> np.uint32(16)).astype(np.uint16)
    assert (np.diff(tops[:255].astype(np.int64)) > 0).all()
    rows = []
    for s in _STEPS:
        row = [tops[2 * s * i + s - 1] for i in range(256 // (2 * s))]
        rows += row + [0xFFFF] * (max(32, len(row)) - len(row))
    return np.array(rows, np.uint16).view(np.float32)


def _x86_function(builder, name, ret, args):
    module = builder.module
    found = module.globals.get(name)
    return found if found is not None else ir.Function(module, ir.FunctionType(ret, args), name)


def _permute2(builder, low, index, high):
    """The 32-entry look-up low ‖ high by index's low 5 bits (vpermi2ps)."""
    fn = _x86_function(builder, "llvm.x86.avx512.vpermi2var.ps.512", _VF, [_VF, _VI, _VF])
    return builder.call(fn, [low, index, high])


def _permute1(builder, table, index):
    """The 16-entry look-up by index's low 4 bits (vpermps)."""
    fn = _x86_function(builder, "llvm.x86.avx512.permvar.sf.512", _VF, [_VF, _VI])
    return builder.call(fn, [table, index])


def _ints(value):
    return ir.Constant(_VI, [value] * _LANES)


def _lookup_regs(builder, regs, index):
    """regs[index] for the table of 16·len(regs) floats held in ``regs`` (1, or an even number of
    registers): index's low 5 bits pick within a pair of registers, its higher bits the pair."""
    if len(regs) == 1:
        return _permute1(builder, regs[0], index)
    found = [_permute2(builder, regs[2 * k], index, regs[2 * k + 1]) for k in range(len(regs) // 2)]
    bit = 32
    while len(found) > 1:
        up = builder.icmp_unsigned("!=", builder.and_(index, _ints(bit)), _ints(0))
        found = [builder.select(up, found[2 * k + 1], found[2 * k]) for k in range(len(found) // 2)]
        bit *= 2
    return found[0]


def _vector_at(builder, base, index, vector_type):
    return builder.bitcast(builder.gep(base, [index]), vector_type.as_pointer())


def _splat32(builder, value, vector_type):
    undef = ir.Constant(vector_type, ir.Undefined)
    first = builder.insert_element(undef, value, _I32(0))
    return builder.shuffle_vector(first, undef, ir.Constant(_VI, [0] * _LANES))


def _ir_loop(builder, start, stop, step, body):
    """``for j in range(start, stop, step): body(j)`` as an IR loop (step > 0)."""
    counted_loop(builder, start, stop, step, lambda j, carried: body(j) or ())


_V8 = ir.VectorType(_I8, 64)
_PLANES_AT = 256  # the byte planes follow the 256 map values in each row of ``values``


def _byte_planes(values: np.ndarray) -> np.ndarray:
    """The 256 float32 of the map as 4 planes of 256 bytes (plane p: byte p, little-endian, of
    every value), viewed as 256 float32 to sit in a row of ``values`` after the map."""
    planes = values.astype(np.float32).view(np.uint8).reshape(256, 4).T
    return np.ascontiguousarray(planes).reshape(-1).view(np.float32)


def _permute_bytes(builder, low, index, high):
    """The 128-entry byte look-up low ‖ high by index's low 7 bits (vpermi2b), 64 bytes at once."""
    fn = _x86_function(builder, "llvm.x86.avx512.vpermi2var.qi.512", _V8, [_V8, _V8, _V8])
    return builder.call(fn, [low, index, high])


# out vector k (floats 16k..16k+15), byte 4l + p = plane p's byte of code 16k + l: planes 0 and 1
# from one two-source permute, planes 2 and 3 from another, merged by byte position
_WEAVE_01 = [[16 * k + l + 64 * (p == 1) for l in range(16) for p in range(4)] for k in range(4)]
_WEAVE_23 = [[16 * k + l + 64 * (p == 3) for l in range(16) for p in range(4)] for k in range(4)]
_UPPER_PAIR = [p >= 2 for l in range(16) for p in range(4)]


def _plane_regs(builder, table_data, at):
    """The 16 registers of the byte planes at float32 offset ``at`` of a table row."""
    planes = builder.bitcast(builder.gep(table_data, [_I64(at)]), _I8.as_pointer())
    return [[builder.load(_vector_at(builder, planes, _I64(256 * p + 64 * k), _V8), align=1) for k in range(4)]
            for p in range(4)]


def _lookup_bytes(builder, regs, q):
    """The 4 vectors of 16 float32 table[q] for the 64 bytes q, the table in byte planes ``regs``."""
    high = builder.icmp_signed("<", q, ir.Constant(_V8, [0] * 64))  # entries 128..255
    plane = [builder.select(high, _permute_bytes(builder, regs[p][2], q, regs[p][3]),
                            _permute_bytes(builder, regs[p][0], q, regs[p][1])) for p in range(4)]
    upper = ir.Constant(ir.VectorType(ir.IntType(1), 64), _UPPER_PAIR)
    found = []
    for k in range(4):
        pair01 = _permute_bytes(builder, plane[0], ir.Constant(_V8, _WEAVE_01[k]), plane[1])
        pair23 = _permute_bytes(builder, plane[2], ir.Constant(_V8, _WEAVE_23[k]), plane[3])
        found.append(builder.bitcast(builder.select(upper, pair23, pair01), _VF))
    return found


def _decode_bytes(context, builder, table_data, base, scale_v, out_data, start, stop):
    """The decode of codes start..stop (a multiple of 64 apart) by byte planes (AVX-512 VBMI)."""
    regs = _plane_regs(builder, table_data, _PLANES_AT)

    def body(j):
        q = builder.load(_vector_at(builder, base, j, _V8), align=1)
        for k, m in enumerate(_lookup_bytes(builder, regs, q)):
            at = builder.add(j, _I64(_LANES * k))
            builder.store(builder.fmul(m, scale_v), _vector_at(builder, out_data, at, _VF), align=4)

    _ir_loop(builder, start, stop, _I64(64), body)


@intrinsic
def _decode_avx512(typingctx, codes, i0, count, values, a, out):
    """out[j] = values[codes[i0 + j]] · a for j < count (a multiple of 64 with VBMI, else of 16;
    ``values`` a row of ``_VALUES``: the 256-entry map, then its byte planes; ``codes`` a uint8
    pointer)."""
    sig = types.void(codes, i0, count, values, a, out)

    def codegen(context, builder, signature, args):
        codes_at, start, n, table, scale, scratch = args
        table_data = context.make_array(signature.args[3])(context, builder, table).data
        out_data = context.make_array(signature.args[5])(context, builder, scratch).data
        scale_v = _splat32(builder, scale, _VF)
        base = builder.gep(codes_at, [start])
        if _VBMI:  # n is a multiple of 64 (``_VECTOR_TAIL``)
            _decode_bytes(context, builder, table_data, base, scale_v, out_data, _I64(0), n)
            return context.get_dummy_value()
        regs = [builder.load(_vector_at(builder, table_data, _I64(_LANES * k), _VF), align=4)
                for k in range(256 // _LANES)]

        def body(j):
            q = builder.zext(builder.load(_vector_at(builder, base, j, _vec(_I8)), align=1), _VI)
            s = builder.fmul(_lookup_regs(builder, regs, q), scale_v)
            builder.store(s, _vector_at(builder, out_data, j, _VF), align=4)

        _ir_loop(builder, _I64(0), n, _I64(_LANES), body)
        return context.get_dummy_value()

    return sig, codegen


def _search(builder, tables, xs):
    """The 8-step search's counts for the vectors ``xs``, their steps interleaved."""
    qs = [_ints(0)] * len(xs)
    for s in _STEPS:
        regs = tables[s]
        for u, x in enumerate(xs):
            if s == 128:
                candidate = builder.shuffle_vector(regs[0], regs[0], ir.Constant(_VI, [0] * _LANES))
            else:
                index = builder.lshr(qs[u], _ints((2 * s).bit_length() - 1))
                candidate = _lookup_regs(builder, regs, index)
            above = builder.fcmp_ordered(">", x, candidate)
            qs[u] = builder.or_(qs[u], builder.select(above, _ints(s), _ints(0)))
    return qs


_I16 = ir.IntType(16)
_VW = ir.VectorType(_I16, 32)
_CHAINS = 8  # 16-bit searches interleaved in the first pass (256 values)


def _words(value):
    return ir.Constant(_VW, [value] * 32)


def _ukey(builder, x):
    """The float32 vector x's patterns made monotone as unsigned integers: sign bit set for x ≥ +0,
    all bits flipped for x ≤ −0."""
    bits = builder.bitcast(x, _VI)
    flip = builder.or_(builder.ashr(bits, _ints(31)), _ints(-0x80000000))
    return builder.xor(bits, flip)


# the top halves of two vectors' 32-bit keys, in order (little-endian: word 2i + 1 of key i)
_TOP_HALVES = ir.Constant(ir.VectorType(_I32, 32), [2 * i + 1 for i in range(16)] + [33 + 2 * i for i in range(16)])


def _word_search(builder, tables, keys):
    """q' = #{j : key(t_j) < key} for each vector of 32 16-bit ``keys``, by the 8-step search on the
    midpoints' keys (``_word_tables``), the vectors' steps interleaved."""
    qs = [_words(0)] * len(keys)
    for s in _STEPS:
        regs = tables[s]
        for c, key in enumerate(keys):
            if s == 128:
                candidate = builder.shuffle_vector(regs[0], regs[0], ir.Constant(ir.VectorType(_I32, 32), [0] * 32))
            else:
                index = builder.lshr(qs[c], _words((2 * s).bit_length() - 1))
                if len(regs) == 1:  # ≤ 32 entries: vpermw
                    fn = _x86_function(builder, "llvm.x86.avx512.permvar.hi.512", _VW, [_VW, _VW])
                    candidate = builder.call(fn, [regs[0], index])
                else:  # 64 entries: vpermi2w; 128: two and a select on bit 6
                    fn = _x86_function(builder, "llvm.x86.avx512.vpermi2var.hi.512", _VW, [_VW, _VW, _VW])
                    found = [builder.call(fn, [regs[2 * k], index, regs[2 * k + 1]]) for k in range(len(regs) // 2)]
                    candidate = found[0]
                    if len(found) == 2:
                        up = builder.icmp_unsigned("!=", builder.and_(index, _words(64)), _words(0))
                        candidate = builder.select(up, found[1], found[0])
            above = builder.icmp_unsigned(">", key, candidate)
            qs[c] = builder.or_(qs[c], builder.select(above, _words(s), _words(0)))
    return qs


def _encode_words(context, builder, data, table_data, scale_v, base, stop):
    """Codes 0..stop (a multiple of 64) by 16-bit keys (AVX-512 VBMI), in two passes (see above)."""
    tables = {s: [builder.load(_vector_at(builder, table_data, _I64(_WORDS_AT + (_WORD_AT[s] + 32 * k) // 2), _VW),
                               align=2)
                  for k in range(max(1, 256 // (2 * s) // 32))]
              for s in _STEPS}

    def first(j, chains):  # x̂ to the scratch row, q' to the codes
        keys = []
        for c in range(chains):
            pair = []
            for h in range(2):
                at = builder.add(j, _I64(32 * c + _LANES * h))
                x = builder.fdiv(builder.load(_vector_at(builder, data, at, _VF), align=4), scale_v)
                builder.store(x, _vector_at(builder, data, at, _VF), align=4)
                pair.append(builder.bitcast(_ukey(builder, x), _VW))
            keys.append(builder.shuffle_vector(pair[0], pair[1], _TOP_HALVES))
        for c, q in enumerate(_word_search(builder, tables, keys)):
            at = builder.add(j, _I64(32 * c))
            builder.store(builder.trunc(q, ir.VectorType(_I8, 32)),
                          _vector_at(builder, base, at, ir.VectorType(_I8, 32)), align=1)

    wide = builder.sub(stop, builder.and_(stop, _I64(32 * _CHAINS - 1)))
    _ir_loop(builder, _I64(0), wide, _I64(32 * _CHAINS), lambda j: first(j, _CHAINS))
    _ir_loop(builder, wide, stop, _I64(64), lambda j: first(j, 2))
    regs = _plane_regs(builder, table_data, _TPLANES_AT)

    def second(j):  # q = q' + (x̂ > t[q'])
        q = builder.load(_vector_at(builder, base, j, _V8), align=1)
        above = []
        for k, t in enumerate(_lookup_bytes(builder, regs, q)):
            at = builder.add(j, _I64(_LANES * k))
            above.append(builder.fcmp_ordered(">", builder.load(_vector_at(builder, data, at, _VF), align=4), t))
        pairs = ir.Constant(ir.VectorType(_I32, 32), list(range(32)))
        halves = [builder.shuffle_vector(above[2 * h], above[2 * h + 1], pairs) for h in range(2)]
        above = builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, 64), list(range(64))))
        builder.store(builder.add(q, builder.zext(above, _V8)), _vector_at(builder, base, j, _V8), align=1)

    _ir_loop(builder, _I64(0), stop, _I64(64), second)


@intrinsic
def _encode_avx512(typingctx, scratch, count, a, thresholds, codes, i0):
    """codes[i0 + j] = #{k : scratch[j] / a > t_k} for j < count (a multiple of 64 with VBMI, else
    of 16; ``thresholds`` a row of ``_THRESHOLDS``: the midpoints, +Inf, then the search tables)."""
    sig = types.void(scratch, count, a, thresholds, codes, i0)

    def codegen(context, builder, signature, args):
        values, n, scale, table, codes_at, start = args
        data = context.make_array(signature.args[0])(context, builder, values).data
        table_data = context.make_array(signature.args[3])(context, builder, table).data
        scale_v = _splat32(builder, scale, _VF)
        base = builder.gep(codes_at, [start])
        if _VBMI:  # n is a multiple of 64 (``_VECTOR_TAIL``)
            _encode_words(context, builder, data, table_data, scale_v, base, n)
            return context.get_dummy_value()
        tables = {s: [builder.load(_vector_at(builder, table_data, _I64(_SEARCH_AT[s] + _LANES * k), _VF),
                                   align=4)
                      for k in range(max(1, 256 // (2 * s) // _LANES))]
                  for s in _STEPS}

        def body(j, vectors):
            at = [builder.add(j, _I64(_LANES * u)) for u in range(vectors)]
            xs = [builder.fdiv(builder.load(_vector_at(builder, data, k, _VF), align=4), scale_v) for k in at]
            for k, q in zip(at, _search(builder, tables, xs)):
                builder.store(builder.trunc(q, _vec(_I8)), _vector_at(builder, base, k, _vec(_I8)), align=1)

        whole = builder.sub(n, builder.and_(n, _I64(_LANES * _UNROLL - 1)))
        _ir_loop(builder, _I64(0), whole, _I64(_LANES * _UNROLL), lambda j: body(j, _UNROLL))
        _ir_loop(builder, whole, n, _I64(_LANES), lambda j: body(j, 1))
        return context.get_dummy_value()

    return sig, codegen


@_element
def _decode_none(codes, i0, count, values, a, out):
    """Without AVX-512 (count is 0 then): nothing, the scalar loop decodes every element."""


@_element
def _encode_none(scratch, count, a, thresholds, codes, i0):
    """Without AVX-512 (count is 0 then): nothing, the scalar loop codes every element."""


_decode_vectors = _decode_avx512 if _AVX512 else _decode_none
_encode_vectors = _encode_avx512 if _AVX512 else _encode_none


# count − (count & _VECTOR_TAIL) elements go through the vector coders: whole vectors, or none
_VECTOR_TAIL = np.int64(63 if _VBMI else _LANES - 1) if _AVX512 else np.int64(-1)


@_element
def _requantize(scratch, count, amax_bits, codes, i0, absmax, b, thresholds, zero, lookup):
    """absmax[b] and codes[i0 : i0 + count] of the ``count`` values ``scratch[:count]``, whose
    largest |value| has the bit pattern ``amax_bits`` (the quantizer of ``quantize.py``: NaN absmax
    and zero codes for a block holding NaN or ±inf, zero codes for an all-zero one, else the count
    of midpoints below x / a).

    As integers, the patterns of |x| order as the values do, and every NaN pattern lies above
    Inf's, so ``amax_bits`` ≥ Inf's pattern exactly when the block is not finite. Whole vectors go
    through ``_encode_vectors``; the rest: the count of midpoints below x̂ is ``lookup`` of its
    bucket (``_lookup``) plus one compare with the next midpoint (``thresholds`` has a 256th entry,
    +Inf, so the compare needs no bounds test)."""
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
        full = count - (count & _VECTOR_TAIL)
        _encode_vectors(scratch, full, a, thresholds, codes, i0)
        for j in range(full, count):  # code: a table look-up and a compare (scalar)
            x = scratch[j] / a
            q = lookup[f32_bits(x) >> _BUCKET_SHIFT]
            codes[i0 + j] = q + (x > thresholds[q])


def _update8(scalars: int, states: int):
    """Declare an element update ``element(p, g, s0, s1, h) -> (θᵢ, s0, s1)`` (dequantized float32
    states in, new ones out; s1 unused when ``states`` is 1) taking ``scalars`` host scalars, for
    a ``_Kernel8`` whose variants run it over the tensor list (``_run8``): dequantize, update,
    requantize, block by block."""

    def wrap(element):
        return _Update8(element, scalars, states)

    return wrap


class _Update8:
    """An element update (inlined wherever it runs) and its counts."""

    def __init__(self, element, scalars: int, states: int):
        self.element = numba.njit(inline="always", error_model="numpy")(element)
        self.scalars = scalars
        self.states = states
        self.__doc__ = element.__doc__


@intrinsic
def _scratch(typingctx, count):
    """A heap buffer for ``count`` float32 at a 64-byte boundary (``NRT_Allocate``; ``_floats_at``
    finds the boundary, ``_release`` frees it): what ``np.empty`` gives without its implementation,
    which numba compiles anew in every process that compiles a kernel using it (0.1-0.2 s of an
    8-bit update's first use). The boundary keeps the vector coders' 64-byte loads and stores of a
    scratch row inside one cache line each (``NRT_Allocate`` itself aligns to 16 bytes)."""
    if not isinstance(count, types.Integer):
        return None
    signature = types.CPointer(types.uint8)(count)

    def codegen(context, builder, sig, args):
        size = builder.add(builder.mul(args[0], ir.Constant(args[0].type, 4)), ir.Constant(args[0].type, 64))
        return context.nrt.allocate(builder, size)

    return signature, codegen


@intrinsic
def _floats_at(typingctx, buffer, at):
    """A float32 pointer to float ``at`` of a ``_scratch`` buffer, counted from its 64-byte boundary."""
    if not isinstance(buffer, types.CPointer) or not isinstance(at, types.Integer):
        return None
    signature = types.CPointer(types.float32)(buffer, at)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        start = builder.and_(builder.add(builder.ptrtoint(args[0], i64), i64(63)), i64(~63))
        address = builder.add(start, builder.mul(context.cast(builder, args[1], sig.args[1], types.int64), i64(4)))
        return builder.inttoptr(address, context.get_value_type(sig.return_type))

    return signature, codegen


@intrinsic
def _release(typingctx, buffer):
    """Free a ``_scratch`` buffer."""
    if not isinstance(buffer, types.CPointer):
        return None

    def codegen(context, builder, sig, args):
        context.nrt.free(builder, builder.bitcast(args[0], ir.IntType(8).as_pointer()))
        return context.get_dummy_value()

    return types.void(buffer), codegen


# Bound per update and variant by ``_Kernel8.variant`` (compile-time constants; the flags are None
# or True, so the branches on them are pruned before typing; the 16-bit coders are those of
# ``mixed.coders``):
_ELEMENT8 = _SCALARS8 = _STATES8 = _AVERAGED8 = None
_LOW8 = _MASTER8 = _GRAD16_8 = _BF16STATE8 = _DECODE8 = _ENCODE8 = None


def _run8(part, parts, table_at, rows, offsets_at, entries, hyper_at):
    """Part ``part`` of ``parts`` (a range of whole blocks) of the tensor list: the template of
    every 8-bit update's part runner (C signature: ``runners.runner_signature``).

    ``table`` holds rows − 1 tensor rows (θ, g, θ̂, codes₀, absmax₀, codes₁, absmax₁ addresses,
    θ's size, the master copy's address, the stochastic rounding key), then a row of the maps'
    addresses (midpoints with +Inf appended, then the vector coders' tables; map values, then
    their byte planes; zero codes; bucket counts: row k of each for state k) and the block size.
    ``offsets`` are the tensors' block offsets, then the total element count (which sizes the
    launcher's parts). ``hyper``: the ``_SCALARS8`` scalars, grad_mul, grad_clip, the average's
    weight.

    Each block is: the decode into scratch rows (``_decode_vectors``, then scalar look-ups for the
    last count mod 64 or 16: ``_VECTOR_TAIL``); the update, a loop without branches on the data
    that the compiler vectorizes (new state to the scratch row, the largest |state| as the max of bit patterns);
    then the requantization from the scratch row, still in L1 (``_requantize``)."""
    table = array_at(table_at, (rows, _COLUMNS))
    offsets = array_at(offsets_at, entries - 1)  # the block offsets
    hyper = array_at(hyper_at, _SCALARS8 + 3)
    maps = table[rows - 1]
    block = maps[_BLOCK]
    lo, hi = part_range(part, parts, offsets[entries - 2])
    if lo >= hi:  # (the launcher cuts parts by elements: more parts than blocks leaves some empty)
        return
    h = tuple_at(hyper_at, _SCALARS8)
    grad_mul = hyper[_SCALARS8]
    grad_clip = hyper[_SCALARS8 + 1]
    avg_weight = hyper[_SCALARS8 + 2]
    zero_f = np.float32(0)
    thresholds = array_at(pointer(maps[_THRESHOLDS_AT], grad_mul), (2, _ROW_END))
    values = array_at(pointer(maps[_VALUES_AT], grad_mul), (2, _VALUES_END))
    zeros = array_at(_bytes(maps[_ZEROS_AT]), 2)
    lookup = array_at(_ints32(maps[_LOOKUP_AT]), (2, _BUCKETS))
    stride = block + 15 - (block + 15) % 16  # each scratch row at a 64-byte boundary
    buffer = _scratch(2 * stride)
    scratch0 = array_at(_floats_at(buffer, 0), block)
    scratch1 = array_at(_floats_at(buffer, stride), block)
    values0 = values[0]  # the rows as views once per part: a view made per block costs
    values1 = values[1]  # reference counting that showed in the step's time
    thresholds0 = thresholds[0]
    thresholds1 = thresholds[1]
    lookup0 = lookup[0]
    lookup1 = lookup[1]
    zero0 = zeros[0]
    zero1 = zeros[1]
    t = last_at_most(offsets, lo)
    while lo < hi:
        b0, b1, lo = next_span(offsets, t, lo, hi)
        n = table[t, _SIZE]
        key = table[t, _KEY]  # (read by the stochastic encodes only)
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
            count = smaller(block, n - i0)
            if _BF16STATE8 is None:
                a0 = absmax0[b]
                a1 = absmax1[b] if _STATES8 > 1 else zero_f
                full = count - (count & _VECTOR_TAIL)  # whole vectors: ``_decode_vectors``
                _decode_vectors(codes0, i0, full, values0, a0, scratch0)
                if _STATES8 > 1:
                    _decode_vectors(codes1, i0, full, values1, a1, scratch1)
                for j in range(full, count):  # decode: a table look-up per state (scalar)
                    scratch0[j] = values0[codes0[i0 + j]] * a0
                    if _STATES8 > 1:
                        scratch1[j] = values1[codes1[i0 + j]] * a1
            else:
                for j in range(count):  # bfloat16 state: decode exactly
                    scratch0[j] = bf16_to_f32(state16_0[i0 + j])
                    if _STATES8 > 1:
                        scratch1[j] = bf16_to_f32(state16_1[i0 + j])
            bits0 = _NO_BITS
            bits1 = _NO_BITS
            for j in range(count):  # update: no look-ups, vectorized
                i = i0 + j
                if _GRAD16_8 is None:
                    g = grad[i]
                else:
                    g = _DECODE8(grad16_at[i])
                g = _transformed(g, grad_mul, grad_clip)
                if _LOW8 is None:
                    p = param[i]
                elif _MASTER8 is None:
                    p = _DECODE8(param16[i])
                else:
                    p = copy[i]
                p, s0, s1 = _ELEMENT8(p, g, scratch0[j], scratch1[j] if _STATES8 > 1 else zero_f, h)
                if _LOW8 is None:
                    param[i] = p
                else:
                    if _MASTER8 is not None:
                        copy[i] = p
                    param16[i] = _ENCODE8(p, key, i)
                if _AVERAGED8:
                    a = avg[i]
                    avg[i] = a + avg_weight * (p - a)
                scratch0[j] = s0
                bits0 = larger(bits0, f32_bits(s0) & _ABS_BITS)
                if _STATES8 > 1:
                    scratch1[j] = s1
                    bits1 = larger(bits1, f32_bits(s1) & _ABS_BITS)
            if _BF16STATE8 is None:
                _requantize(scratch0, count, bits0, codes0, i0, absmax0, b, thresholds0, zero0, lookup0)
                if _STATES8 > 1:
                    _requantize(scratch1, count, bits1, codes1, i0, absmax1, b, thresholds1, zero1, lookup1)
            else:
                for j in range(count):  # bfloat16 state: round to nearest even
                    state16_0[i0 + j] = f32_to_bf16(scratch0[j])
                    if _STATES8 > 1:
                        state16_1[i0 + j] = f32_to_bf16(scratch1[j])
        t += 1
    _release(buffer)


class _Kernel8:
    """A state8 update in its variants, each the update's part runner (``_run8`` with the element,
    its counts and the variant's flags bound as compile-time constants, under the name
    ``<kernel>_run_<flags>``: ``runners.Runner``) compiled at its first use and run by the
    launcher every float32 optimizer step runs (``runners.Launched``); ``plain`` and ``averaged``
    are the variants for float32 parameters and 8-bit state. The runners are made at first use,
    after this module's constants exist (a runner binds the module's globals as they are then)."""

    def __init__(self, update: _Update8, name: str):
        self.__name__ = name
        self.__doc__ = update.__doc__
        self.update = update
        self.scalars = update.scalars
        self.states = update.states
        self._variants: dict[tuple, Launched] = {}

    @property
    def plain(self) -> Launched:
        return self.variant(False)

    @property
    def averaged(self) -> Launched:
        return self.variant(True)

    def variant(self, averaged: bool, low: bool = False, master: bool = False, stochastic: bool = False,
                grad16: bool = False, half: bool = False, bf16state: bool = False) -> Launched:
        """The kernel for float32 parameters (``low`` False), or for 16-bit ones (bfloat16, or
        float16 with ``half``) with or without a float32 master copy, rounded to nearest or
        stochastically, with 16-bit gradients (``grad16``) or float32 ones; with 8-bit state, or
        bfloat16 state (``bf16state``); compiled on first use."""
        key = (averaged, low, master, stochastic, grad16, half, bf16state)
        found = self._variants.get(key)
        if found is None:
            constants = dict(_ELEMENT8=self.update.element, _SCALARS8=self.scalars, _STATES8=self.states,
                             _AVERAGED8=averaged, _LOW8=flag(low), _MASTER8=flag(master),
                             _GRAD16_8=flag(grad16), _BF16STATE8=flag(bf16state),
                             **{f"{name}8": coder for name, coder in coders(half, stochastic).items()})
            found = self._variants[key] = variant_runner(_run8, self.__name__, key, constants, self.__doc__)
        return found

    @property
    def variants(self):
        return (self.plain, self.averaged)


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


_adam8 = _Kernel8(_adam8_update, "_adam8")


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


_sgd_momentum8 = _Kernel8(_sgd_momentum8_update, "_sgd_momentum8")


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


_sgd_nesterov8 = _Kernel8(_sgd_nesterov8_update, "_sgd_nesterov8")


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


_sgd_nesterov_torch8 = _Kernel8(_sgd_nesterov_torch8_update, "_sgd_nesterov_torch8")


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


_adagrad8 = _Kernel8(_adagrad8_update, "_adagrad8")


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


_rmsprop8 = _Kernel8(_rmsprop8_update, "_rmsprop8")


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


_rmsprop_momentum8 = _Kernel8(_rmsprop_momentum8_update, "_rmsprop_momentum8")


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


_rmsprop_nesterov8 = _Kernel8(_rmsprop_nesterov8_update, "_rmsprop_nesterov8")


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


def _table(params, grads, states, avgs, slots, block, masters=None, bf16_state=False):
    """The kernel's table and block offsets; raises ValueError naming the first bad argument."""
    count = len(params)
    for name, seq in (("grads", grads), ("states", states), ("avgs", avgs)):
        if seq is not None and len(seq) != count:
            raise ValueError(f"{name} has {len(seq)} entries, params has {count}")
    table = np.zeros((count + 1, _COLUMNS), np.int64)  # the last row: the maps (``state8_step``)
    offsets = np.zeros(count + 2, np.int64)  # the last entry: the element count (``_run8``)
    if bf16_state:  # asked for by name: ml_dtypes (not imported by this module, ~0.6 s) is needed now
        import ml_dtypes

        bfloat16 = np.dtype(ml_dtypes.bfloat16)

    def check(array, where, dtype, shape, written):
        if not isinstance(array, np.ndarray) or array.dtype != dtype:
            raise ValueError(f"{where} must be a numpy.ndarray of dtype {np.dtype(dtype)}, got "
                             f"{type(array).__name__} of dtype {getattr(array, 'dtype', None)}")
        if array.shape != shape:
            raise ValueError(f"{where} must have shape {shape}, got {array.shape}")
        if not array.flags.c_contiguous or (written and not array.flags.writeable):
            raise ValueError(f"{where} must be C-contiguous" + (" and writeable" if written else ""))
        return data_address(array)

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
                                                        bfloat16, shape, True)
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
        offsets[count + 1] += n
    return table, offsets


_BUCKET_SHIFT = np.uint32(16)  # a bucket: the float32 values sharing sign, exponent and 7 mantissa bits
_BUCKETS = 1 << (32 - int(_BUCKET_SHIFT))


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
# then the 8-step search's tables of ``_encode_vectors``, its 16-bit ones and the midpoints' byte planes
_THRESHOLDS = {(a, b): np.stack([np.concatenate([t, _search_tables(t), _word_tables(t), _byte_planes(t)])
                                 for t in (np.append(_MAPS[m][0], np.float32(np.inf)) for m in (a, b))])
               for a in (True, False) for b in (True, False)}
assert all(t.shape == (2, _ROW_END) for t in _THRESHOLDS.values())
# the 256 map values, then their byte planes (``_decode_vectors``)
_VALUES = {(a, b): np.stack([np.concatenate([_MAPS[m][1], _byte_planes(_MAPS[m][1])]) for m in (a, b)])
           for a in (True, False) for b in (True, False)}
_VALUES_END = _VALUES[True, True].shape[1]
_ZEROS = {(a, b): np.array([ZERO[a], ZERO[b]], np.uint8) for a in (True, False) for b in (True, False)}


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
    maps = tuple(slots[min(k, len(slots) - 1)][1] for k in range(2))  # row 1 repeats row 0 when unused
    thresholds, values, zeros, lookup = _THRESHOLDS[maps], _VALUES[maps], _ZEROS[maps], _LOOKUPS[maps]
    table[-1, :_BLOCK + 1] = (data_address(thresholds), data_address(values), data_address(zeros), data_address(lookup),
                              block)
    hyper_array = np.array((*scalars, grad_mul, grad_clip, avg_weight if avgs is not None else 0.0), np.float32)
    low = is_low_precision(params[0].dtype)
    stochastic = low and rounding == "stochastic"
    grad16 = low and grads[0].dtype != _F32
    half = low and params[0].dtype == np.float16
    variant = update.variant(avgs is not None, low, low and masters is not None, stochastic, grad16, half, bf16_state)
    if offsets[-1] < SERIAL_BELOW:
        variant = variant.serial
    if stochastic:
        table[:-1, _KEY] = _keys(seed, counter, range(len(params)) if indices is None else indices, starts)
    variant(table, offsets, hyper_array)
