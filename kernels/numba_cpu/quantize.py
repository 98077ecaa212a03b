"""Block-wise dynamic quantization of the ``"numba"`` backend (``docs/algorithms.md``, "Block-wise
dynamic quantization"):

    quantize_blockwise(x, codes, absmax, *, signed, block)     a_b = fl32(max|x_i|), q_i = nearest m_j to x_i / a_b
    dequantize_blockwise(codes, absmax, out, *, signed, block) y_i = m_{q_i} · a_b

Each kernel runs over blocks in parallel (parts of the element range, ``runners.launch_parts``):
a block's absmax is found first, in a register (the block's 256 values stay in L1 for the second
loop, which divides and writes the codes), so memory sees one read of x and one write of codes and
absmax. Inputs below ``SERIAL_BELOW`` elements run on the calling thread (the launcher's serial
twin): same code, same results.

The map is a constant of this module, built here from its definition (and checked bit for bit
against the reference's in the tests). The nearest code is a count: q = #{j : x̂ > t_j} over the
255 thresholds t_j, the midpoints (m_j + m_{j+1})/2, found by an 8-step branch-free binary
search. For float64 the midpoints are exact float64 numbers; for float32 each is rounded down to
float32, which gives the same count for every float32 x̂ (no float32 lies in (t↓, t) when t is
not one, and x̂ = t is a tie, which this count sends to the smaller code). So the kernels match
the reference's argmin code for code, ties included, in both dtypes.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from .multi import COLUMNS, array_at, data_address, part_range, pointer, smaller, typed_pointer
from .runners import Launched, Runner

__all__ = ["dequantize_blockwise", "quantize_blockwise"]

SERIAL_BELOW = 1 << 15  # elements; as the optimizer updates (multi.SERIAL_BELOW), not measured separately


def _map(signed: bool) -> np.ndarray:
    """The dynamic map: 0, 1 and ±10^(e−6)·(2n + 18k + 9)/(20n), k < n, n = 2^e (signed) or 2^(e+1)."""
    values = [0.0, 1.0]
    for e in range(7):
        n = 2 ** e if signed else 2 ** (e + 1)
        for k in range(n):
            v = (2 * n + 18 * k + 9) / (20 * n * 10 ** (6 - e))  # one rounding to float64 of an exact ratio
            values += [v, -v] if signed else [v]
    return np.array(sorted(values), dtype=np.float32)


def _thresholds(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 255 midpoints, exact in float64 (sums of two nearby float32 values), and rounded down to float32."""
    lo, hi = m[:-1].astype(np.float64), m[1:].astype(np.float64)
    mid = (lo + hi) / 2
    assert (mid - lo == hi - mid).all()
    down = mid.astype(np.float32)
    above = down.astype(np.float64) > mid
    down[above] = np.nextafter(down[above], np.float32(-np.inf))
    return down, mid


MAP = {signed: _map(signed) for signed in (True, False)}
ZERO = {signed: int(np.flatnonzero(MAP[signed] == 0)[0]) for signed in (True, False)}
THRESHOLDS = {(signed, np.dtype(dtype)): t for signed in (True, False)
              for dtype, t in zip((np.float32, np.float64), _thresholds(MAP[signed]))}
MAP_AS = {(signed, np.dtype(dtype)): MAP[signed].astype(dtype) for signed in (True, False)
          for dtype in (np.float32, np.float64)}


# The kernels are part runners (``runners.py``: each loop compiled once per dtype, as a C function)
# run by the optimizers' launcher over one tensor of n elements, whose table row holds
_X, _CODES, _ABSMAX, _BLOCK, _ZERO = range(5)  # x's (or out's) address, the codes', absmax's, block, zero
# (columns of ``multi.COLUMNS``). Part ``part`` runs the blocks that start in its element range
# (``multi.part_range``), so every block runs once, whole, in one part.
_codes_at = typed_pointer(types.uint8)
_absmax_at = typed_pointer(types.float32)


@intrinsic
def _search_step(typingctx, s, t, q, step):
    """q + step when s > t, else q: a select marked unpredictable. Written as an ``if``, LLVM's
    x86 cmov converter turned the selects of the loop (unrolled by 2) into branches, which random
    data mispredicts: 5× slower, measured on float32 at 2**24."""
    if not isinstance(s, types.Float) or s != t or not isinstance(q, types.Integer) or q != step:
        return None
    signature = q(s, t, q, step)

    def codegen(context, builder, sig, args):
        above = builder.fcmp_ordered(">", args[0], args[1])
        value = builder.select(above, builder.add(args[2], args[3]), args[2])
        value.set_metadata("unpredictable", builder.module.add_metadata([]))
        return value

    return signature, codegen


@numba.njit(inline="always")
def _operands(part, parts, table_at, offsets_at, count, like):
    """The tensor's arrays (x or out as ``like``'s type, codes, absmax), its element count n, the
    block size and the zero code, and the blocks [b0, b1) of part ``part``: those starting in its
    element range."""
    row = array_at(table_at, COLUMNS)
    n = array_at(offsets_at, count)[1]
    block = row[_BLOCK]
    first, end = part_range(part, parts, n)
    return (pointer(row[_X], like), _codes_at(row[_CODES]), _absmax_at(row[_ABSMAX]), n, block, row[_ZERO],
            (first + block - 1) // block, (end + block - 1) // block)


def _quantize_run(part, parts, table_at, rows, offsets_at, count, thresholds_at):
    """a_b = fl32(max_{i∈b}|x_i|); q_i = #{j : x_i / a_b > t_j}; a non-finite block: a_b = NaN,
    q_i = zero; a_b = 0: q_i = zero. ``thresholds``: the 255 midpoints in x's dtype."""
    thresholds = array_at(thresholds_at, 255)
    x, codes, absmax, n, block, zero, b0, b1 = _operands(part, parts, table_at, offsets_at, count, thresholds[0])
    for b in range(b0, b1):
        lo = b * block
        hi = smaller(lo + block, n)
        amax = abs(x[lo])
        check = x[lo] - x[lo]  # NaN exactly when some x_i is NaN or ±inf (inf − inf, NaN − NaN)
        for i in range(lo + 1, hi):
            v = x[i]
            av = abs(v)
            if av > amax:
                amax = av
            check += v - v
        a = np.float32(amax)
        if check != check or np.isinf(a):
            absmax[b] = np.float32(np.nan)
            for i in range(lo, hi):
                codes[i] = zero
        elif a == np.float32(0):
            absmax[b] = a
            for i in range(lo, hi):
                codes[i] = zero
        else:
            absmax[b] = a
            for i in range(lo, hi):
                s = x[i] / a
                q = 0
                step = 128
                while step > 0:
                    q = _search_step(s, thresholds[q + step - 1], q, step)
                    step >>= 1
                codes[i] = q


def _dequantize_run(part, parts, table_at, rows, offsets_at, count, values_at):
    """y_i = m_{q_i} · a_b in out's dtype; ``values``: the map in out's dtype."""
    values = array_at(values_at, 256)
    out, codes, absmax, n, block, _, b0, b1 = _operands(part, parts, table_at, offsets_at, count, values[0])
    for b in range(b0, b1):
        lo = b * block
        hi = smaller(lo + block, n)
        a = absmax[b]
        for i in range(lo, hi):
            out[i] = values[codes[i]] * a


_quantize = Launched(Runner(_quantize_run, "quantize_run", {}))
_dequantize = Launched(Runner(_dequantize_run, "dequantize_run", {}))


def _launch(kernel, data, codes, absmax, block, zero, hyper) -> None:
    """``kernel`` over the n elements of ``data`` (x or out, flat), or its serial twin below ``SERIAL_BELOW``."""
    n = data.size
    table = np.array([[data_address(data), data_address(codes), data_address(absmax), block, zero, 0]], np.int64)
    (kernel.serial if n < SERIAL_BELOW else kernel)(table, np.array([0, n], np.int64), hyper)


def quantize_blockwise(x, codes, absmax, *, signed, block) -> None:
    """codes ← the map's codes of x, absmax ← one float32 per block (validated arguments)."""
    if x.size == 0:
        return
    _launch(_quantize, x, codes, absmax, block, ZERO[bool(signed)], THRESHOLDS[(bool(signed), x.dtype)])


def dequantize_blockwise(codes, absmax, out, *, signed, block) -> None:
    """out ← m[codes] · absmax of each element's block (validated arguments)."""
    if out.size == 0:
        return
    _launch(_dequantize, out, codes, absmax, block, 0, MAP_AS[(bool(signed), out.dtype)])
