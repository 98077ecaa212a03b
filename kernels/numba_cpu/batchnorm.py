"""Batch normalization of the ``"numba"`` backend: parallel CPU kernels.

The equations are those of ``docs/algorithms.md`` (x the input, μ and σ² the per-channel mean and
biased variance, invstd = 1/√(σ² + δ), x̂ = (x − μ)·invstd, γ ``weight``, β ``bias``, m the number
of values per channel, g the incoming gradient after the optional ReLU mask):

    forward   y = γx̂ + β  (then max(y, 0) with relu)
    backward  dβ = Σg,  dγ = Σg·x̂,  dx = γ·invstd·(g − dβ/m − x̂·dγ/m)   (training)
                                     dx = γ·invstd·g                      (statistics constant)

Arguments follow the backend contract in ``fastopt.batchnorm`` (validated, non-negative
``channel_axis``, outputs preallocated). Any layout is viewed without copying as a 3-D array
(outer, C, inner): outer is the product of the axes before the channel axis, inner of those after.
Two kernel families cover the layouts:

* channel-first (inner > 1, e.g. NCHW): reductions run in parallel over (chunk, channel) tasks,
  numbered in memory order (row group, channel, piece), so a thread's next task reads the memory
  right after its last one (measured: about twice the read bandwidth of walking one channel's rows
  across n). A chunk is a contiguous range of a channel's m values in (outer, inner) order: one
  row when rows hold at least ``_BLOCK`` values, split into pieces of at most ``_TASK`` values when
  longer (so the parallelism does not depend on N·C), and a group of consecutive rows of about
  ``_GROUP`` values when rows are shorter (see ``_chunk_values``).
  Elementwise passes run in parallel over tiles of at most ``_TILE`` elements of one (outer,
  channel) row.
* channels-last (inner = 1, e.g. NHWC or (N, C)): reductions run in parallel over chunks of rows,
  each task walking blocks of rows that stay in L1 and keeping per-channel partial sums in its own
  row of a (chunks, C) scratch buffer; the partials are merged at the end. Elementwise passes run
  in parallel over tasks of about ``_TILE`` elements (whole rows), vectorized over channels.

Passes over x: forward reads x once for the statistics (training only) and once to normalize;
backward does one reduction pass (Σg, Σg·(x − μ)) and one elementwise pass. Chunk counts depend
only on the shape, not on the number of threads, so results are bitwise the same for any thread
count.

Structure: each parallel kernel is a task kernel (``tasks.py``): its loop body, a serial kernel
over a range of tasks (``_X_tasks``), compiled once per dtype, and a small parallel shell (``_X``)
that cuts the tasks into at most ``tasks.PARTS`` ranges and calls the body by address, so the body
is not compiled again for the parallel kernel and its serial twin.

Threads: an input of fewer than ``_SERIAL_BELOW`` = 65,536 elements runs the serial twins of the
parallel shells (``_jit``): the same tasks in the same order on the calling thread, so the
results are bitwise those of the parallel kernels. Measured on the 2-core machine with other jobs
running (float32, medians of 200 calls, NUMBA_NUM_THREADS=2): at 1,024 elements a forward took
30 µs serial, and one parallel forward took 16 ms waiting for a busy core; at 65,536 elements
(1024 × 64) serial and parallel were equal (51 and 50 µs forward, 56 and 54 µs backward); at
131,072 (16 × 32 × 16 × 16) the parallel kernels gained (forward 53 against 70 µs).

Memory: the per-channel and per-task arrays of a call (statistics, coefficient tables, partial
sums: chunks × C float64 values, the channels-last chunk count capped so this stays near
``_SCRATCH_VALUES`` for many channels) are views into a per-thread workspace that grows to the
largest shape seen and is then reused, so a call with every output given (``out=``) allocates no
array memory, and concurrent calls from several threads do not share scratch.

Statistics: each task walks its values in blocks of about ``_BLOCK`` elements that stay in cache.
float64 input: a block's mean and sum of squared deviations come from the corrected two-pass
formula (pass 1: b = Σx/n; pass 2: d = x − b, mean = b + Σd/n, M2 = Σd² − (Σd)²/n, the second pass
reading the block from cache, so x comes from memory once). float32 input: one pass, with the
block's first value as the shift b (d = x − b is exact in float64); since b is one of the block's
values, n(μ − b)² ≤ n·M2 and the cancellation in Σd² − (Σd)²/n costs at most log10(n) ≈ 3.3 of
float64's 16 digits, far below float32's precision. Blocks, then tasks, are merged with Chan's
parallel update (n = na + nb, δ = μb − μa, μ = μa + δ·nb/n, M2 = M2a + M2b + δ²·na·nb/n). Never
E[x²] − E[x]². A constant channel gives μ equal to the constant exactly, σ² = 0 and y = β.

Reduction loops: a float sum written as a loop (s += v[i]) is one chain of dependent adds, each
waiting for the last (3–4 cycles): one element per 3–4 cycles per thread, far below what memory
delivers. Without fast-math LLVM must keep the written order, so it can neither vectorize nor
interleave such a loop; and numba runs LLVM without its SLP vectorizer, so scalar partial sums
written out by hand (s0 += v[i], s1 += v[i + 1], ...) stay scalar adds and conversions, still bound
by the add units. The sums therefore get independent vector lanes, in fixed order:

* channel-first: each contiguous row segment of a block (of a task, in backward) is summed by a
  small helper (``_sum``, ``_sum_deviations``, ``_sum_shifted``, ``_sum_grad``,
  ``_sum_grad_relu``) compiled with ``fastmath={"reassoc"}`` and no other flag, inlined into the
  kernel. That licence covers only the helper's own loop: LLVM splits each sum into vector partial
  sums (with AVX-512: 4 × 8 float64 lanes, float32 values widened per element, then a 4-lane
  epilogue and an in-order scalar tail) and adds the lanes up in a fixed tree when the loop ends.
  The lanes and the tree depend on the compiled code and the segment's length, i.e. on the shape,
  never on the thread count (they may differ between CPUs with different vector widths). The
  helpers' per-element arithmetic (x − b; x − μ, the ReLU test (x − μ)·γ·invstd + β > 0, the
  product g·(x − μ)) has no chain to reassociate; its generated IR is the same operations as
  without the flag. The rest of every kernel (block formula, Chan merges, coefficients) is
  compiled without fast-math.
* channels-last: the lanes are the channels. The float32 statistics and the backward reduction
  walk each block's rows for 32 (then 8) channels at a time with intrinsics that keep those
  channels' float64 sums in vector registers (``_shifted_sums_*``, ``_grad_sums_*``): each sum is
  the plain row-order sum of one channel, added to the scratch once per block; the last C mod 8
  channels use plain loops. The float64 statistics keep numba loops over channels, four rows per
  turn, ((r0 + r1) + (r2 + r3)).

Streaming stores: an ordinary store to a line that is not in cache first reads that line
(write-allocate), so writing y or dx out of place would move one more itemsize per element than
the pass needs. Outputs of at least ``_STREAM_BYTES`` (larger than the caches of the cores that
write them, where a reader would not find them in cache anyway) are written with 64-byte
non-temporal stores (``_stream_*`` intrinsics) on their whole lines, and ordinary stores at the
ends of each tile; the arithmetic is the same IEEE operations in the same order, so the results are
bitwise those of the ordinary loops (tested). Each tile ends with a store fence.

Precision: the statistics accumulators (block sums, Σg, Σg·(x − μ)) and the per-channel scalars
derived from them (μ, σ², invstd, the running-statistics update, the coefficients of the elementwise
passes) are float64, deliberately, also for float32 input; each value is widened to float64 as it
is added. The elementwise passes compute in the arrays' dtype. μ reaches the float32 normalize pass
split in two float32 parts, μ = hi + lo, and the pass computes ((x − hi) − lo), so a float32 channel
with a large mean (1e4, std 1) loses no accuracy to the rounding of μ. ``saved_mean`` holds μ
rounded to the dtype, as torch's does. Backward recomputes x̂ and the ReLU mask from x and the saved
(rounded) statistics: the reduction pass forms x − μ in the dtype, as the elementwise pass does,
sums g and g·(x − μ) in float64 (the product of two widened float32 values is exact), and
dγ = invstd·Σg·(x − μ). For a pre-activation within rounding of 0 the mask may differ from
forward's sign, and either is a valid subgradient of the ReLU.
"""

from __future__ import annotations

import math
import platform
import threading

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core.extending import intrinsic

from ._cache import njit
from ._ir import counted_loop
from ._jit import kernel
from .multi import part_range
from .tasks import PARTS, call_tasks, task_kernel

__all__ = ["batchnorm_backward", "batchnorm_forward"]

_BLOCK = 2048  # elements in one two-pass block of the statistics (stays in L1/L2)
_ROWS = 32  # fewest rows in a channels-last block (the per-block merge is amortized over them)
_GROUP = 1 << 12  # channel-first rows shorter than _BLOCK: grouped into reduction tasks of about this many values
_TASK = 1 << 15  # longest row piece of a channel-first reduction task; ~elements per channels-last task
_TILE = 1 << 13  # longest piece of a channel-first row one elementwise task handles
_VECTOR = 64  # bytes per streaming store: one cache line
_STREAM_BYTES = 1 << 21  # outputs at least this large are written with streaming stores
_STREAM_INNER = 64  # ... in channel-first layouts only when rows hold at least this many values

_DTYPES = ("float32", "float64")


def _sigs(template: str) -> list[str]:
    """The float32 and float64 signatures of one kernel; ``{t}`` is the array dtype."""
    return [template.format(t=t) for t in _DTYPES]


def _reduction(py_func):
    """A sum over one contiguous row piece, called from the channel-first kernels (a plain numba
    function, typed and compiled with its caller and inlined into it; it holds nothing but the loop).

    ``fastmath={"reassoc"}`` on this function alone lets LLVM split its float64 sums into vector
    partial sums (VF × unroll lanes, combined by a fixed tree when the loop ends). Without it LLVM
    must keep the written order, and each sum is one serial chain of adds; numba also leaves LLVM's
    SLP vectorizer off, so scalar accumulators written out by hand (s0, s1, ...) stay scalar.
    The lanes and their final tree are fixed by the compiled code and the piece's length, which
    depends on the shape only: results do not depend on the thread count (they may differ between
    CPUs with different vector widths). No other fast-math flag: no FMA contraction, NaN and inf
    propagate as usual, and the caller's arithmetic is untouched (fast-math flags stay on the
    helper's instructions when LLVM inlines it). Compiled lazily with its caller, so importing
    fastopt still compiles nothing.
    """
    return njit(fastmath={"reassoc"})(py_func)


@_reduction
def _sum(v):
    """Σv (float64)."""
    s = 0.0
    for i in range(v.size):
        s += v[i]
    return s


@_reduction
def _sum_deviations(v, base):
    """Σd and Σd², d = v − base (float64, base float64)."""
    sd = 0.0
    sq = 0.0
    for i in range(v.size):
        d = v[i] - base
        sd += d
        sq += d * d
    return sd, sq


@njit(fastmath={"reassoc", "contract"})
def _sum_shifted(v, shift):
    """Σd and Σd², d = v − shift, each value widened to float64 (shift float64): one pass."""
    sd = 0.0
    sq = 0.0
    for i in range(v.size):
        d = np.float64(v[i]) - shift
        sd += d
        sq += d * d
    return sd, sq


@njit(fastmath={"reassoc", "contract"})
def _sum_grad(gs, xs, mean):
    """Σg and Σg·(x − μ) (float64 sums of exact float64 products; x − μ in the dtype)."""
    sg = 0.0
    sgx = 0.0
    for i in range(xs.size):
        g = np.float64(gs[i])
        sg += g
        sgx += g * (xs[i] - mean)
    return sg, sgx


@njit(fastmath={"reassoc", "contract"})
def _sum_grad_relu(gs, xs, mean, scale, shift):
    """As _sum_grad with g = dy where (x − μ)·γ·invstd + β > 0, else 0 (a select, not a branch)."""
    zero = xs.dtype.type(0)
    sg = 0.0
    sgx = 0.0
    for i in range(xs.size):
        xc = xs[i] - mean
        g = gs[i]  # loaded first, so the mask below is a select: a conditional load would be a branch
        g = np.float64(g if xc * scale + shift > zero else zero)
        sg += g
        sgx += g * xc
    return sg, sgx


# ---------------------------------------------------------------------------------------------
# streaming stores
#
# An ordinary store to a line that is not in cache first reads the line (write-allocate), so an
# output written out of place moves one more itemsize per element than the kernel asks for. A
# non-temporal ("streaming") store of a whole 64-byte line skips that read and the cache. numba
# cannot express one: its loop vectorizer refuses non-temporal scalar stores, so these intrinsics
# build the vector code themselves, one cache line per call: load the inputs (unaligned), compute
# with the same IEEE operations, in the same order, as the scalar code beside them (no fast-math
# flag, no FMA), and store the line with ``!nontemporal`` at a 64-byte aligned address. Results are
# bitwise those of the ordinary loops. Each elementwise task ends with a store fence, so its lines
# are visible before the task counts as done.

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _lanes(context, dtype):
    element = context.get_value_type(dtype)
    size = context.get_abi_sizeof(element)
    return ir.VectorType(element, _VECTOR // size), size


def _address(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


def _splat(builder, value, vector_type):
    undef = ir.Constant(vector_type, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(first, undef, zeros)


def _vector_load(context, builder, array_type, array, index, vector_type, size):
    pointer = builder.bitcast(_address(context, builder, array_type, array, index), vector_type.as_pointer())
    return builder.load(pointer, align=size)


def _operand(context, builder, value_type, value, channel, vector_type, size):
    """A coefficient as a vector: one value splat (channel-first) or the line of a per-channel
    table starting at ``channel`` (channels-last)."""
    if isinstance(value_type, types.Array):
        return _vector_load(context, builder, value_type, value, channel, vector_type, size)
    return _splat(builder, value, vector_type)


def _streaming_store(context, builder, array_type, array, index, value, vector_type):
    pointer = builder.bitcast(_address(context, builder, array_type, array, index), vector_type.as_pointer())
    store = builder.store(value, pointer, align=_VECTOR)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


def _check_operands(dst, operands):
    for t in operands:
        element = t.dtype if isinstance(t, types.Array) else t
        if element != dst.dtype:
            raise TypeError(f"streaming kernels compute in the output's dtype {dst.dtype}, got {t}")


def _coefficient_vectors(context, builder, types_, values, vt, size):
    """``at(j)``: the coefficient vectors of a line. Scalars are splat once, before the loop
    (channel-first); per-channel tables are read at the line's first channel j (channels-last)."""
    splats = [None if isinstance(t, types.Array) else _splat(builder, v, vt) for t, v in zip(types_, values)]

    def at(j):
        return [splat if splat is not None else _vector_load(context, builder, t, v, j, vt, size)
                for t, v, splat in zip(types_, values, splats)]

    return at


def _next_channel(builder, j, step, channels):
    """The first channel of the next line: j + (L mod C), wrapped once (the step is below C)."""
    nxt = builder.add(j, step)
    return builder.select(builder.icmp_signed(">=", nxt, channels), builder.sub(nxt, channels), nxt)


def _stream_normalize_lines(relu):
    @intrinsic
    def lines(typingctx, dst, start, stop, src, hi, lo, scale, shift, channel, step, channels):
        """dst[i:i+L] = ((src[i:i+L] − hi) − lo)·scale + shift (then max(·, 0) if relu; NaN stays NaN)
        for the lines i = start, start + L, ... < stop, each one streaming store (dst[start] 64-byte
        aligned, stop − start a multiple of L = 64 / itemsize). The coefficients are scalars, or
        per-channel tables (extended, ``_extend``) read from the line's first channel, which starts
        at ``channel`` and advances by ``step`` = L mod C per line. One IR loop: the pointers and the
        splat coefficients stay in registers."""
        _check_operands(dst, (src, hi, lo, scale, shift))
        sig = types.void(dst, start, stop, src, hi, lo, scale, shift, channel, step, channels)

        def codegen(context, builder, signature, args):
            tys = signature.args
            vt, size = _lanes(context, tys[0].dtype)
            intp = context.get_value_type(types.intp)
            table = isinstance(tys[4], types.Array)
            coefficients = _coefficient_vectors(context, builder, tys[4:8], args[4:8], vt, size)
            zero = ir.Constant(vt, [0.0] * vt.count)

            def body(i, carried):
                (j,) = carried
                hi_v, lo_v, scale_v, shift_v = coefficients(j)
                v = _vector_load(context, builder, tys[3], args[3], i, vt, size)
                v = builder.fadd(builder.fmul(builder.fsub(builder.fsub(v, hi_v), lo_v), scale_v), shift_v)
                if relu:
                    v = builder.select(builder.fcmp_ordered("<", v, zero), zero, v)
                _streaming_store(context, builder, tys[0], args[0], i, v, vt)
                return [_next_channel(builder, j, args[9], args[10]) if table else j]

            counted_loop(builder, args[1], args[2], intp(vt.count), body, [args[8]])
            return context.get_dummy_value()

        return sig, codegen

    return lines


def _stream_input_grad_lines(relu):
    @intrinsic
    def lines(typingctx, dst, start, stop, gs, xs, mean, scale, shift, k1, k2, k3, channel, step, channels):
        """dst[i:i+L] = k1·g + k2·(x − μ) + k3 for the lines of ``_stream_normalize_lines``, g = dy
        (masked by (x − μ)·scale + shift > 0 if relu)."""
        _check_operands(dst, (gs, xs, mean, scale, shift, k1, k2, k3))
        sig = types.void(dst, start, stop, gs, xs, mean, scale, shift, k1, k2, k3, channel, step, channels)

        def codegen(context, builder, signature, args):
            tys = signature.args
            vt, size = _lanes(context, tys[0].dtype)
            intp = context.get_value_type(types.intp)
            table = isinstance(tys[5], types.Array)
            used = (5, 6, 7, 8, 9, 10) if relu else (5, 8, 9, 10)
            coefficients = _coefficient_vectors(context, builder, [tys[k] for k in used], [args[k] for k in used],
                                                vt, size)
            zero = ir.Constant(vt, [0.0] * vt.count)

            def body(i, carried):
                (j,) = carried
                c = dict(zip(used, coefficients(j)))
                g = _vector_load(context, builder, tys[3], args[3], i, vt, size)
                xc = builder.fsub(_vector_load(context, builder, tys[4], args[4], i, vt, size), c[5])
                if relu:
                    pre = builder.fadd(builder.fmul(xc, c[6]), c[7])
                    g = builder.select(builder.fcmp_ordered(">", pre, zero), g, zero)
                out = builder.fadd(builder.fadd(builder.fmul(c[8], g), builder.fmul(c[9], xc)), c[10])
                _streaming_store(context, builder, tys[0], args[0], i, out, vt)
                return [_next_channel(builder, j, args[12], args[13]) if table else j]

            counted_loop(builder, args[1], args[2], intp(vt.count), body, [args[11]])
            return context.get_dummy_value()

        return sig, codegen

    return lines


_stream_normalize = _stream_normalize_lines(False)
_stream_normalize_relu = _stream_normalize_lines(True)
_stream_input_grad = _stream_input_grad_lines(False)
_stream_input_grad_relu = _stream_input_grad_lines(True)


@intrinsic
def _store_fence(typingctx):
    """Order the streaming stores before everything after (x86: sfence)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            name = "llvm.x86.sse.sfence"
            fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                                 name)
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# channels-last reductions with the partial sums in registers
#
# A channels-last reduction sums down the columns of a (rows, C) block. Written as numba loops it
# walks each row's C channels, loading and storing every channel's partial sums once per row (or
# per few rows), and LLVM re-checks the arrays for aliasing at every short channel loop. These
# intrinsics walk a block's rows instead, for W = 8·groups channels at a time, and keep the W
# float64 partial sums in vector registers, one chain per vector, one add per row: the sums are
# the plain row-order sums of each channel, added to the task's scratch once per block. Float32
# values are widened to float64 as they are loaded, as in the numba loops.

_F64_LANES = 8  # float64 lanes per 64-byte vector of partial sums


def _row_block_vectors(context, builder, array_type, array, n, c, vt_in, size):
    data = context.make_array(array_type)(context, builder, array)
    columns = builder.extract_value(data.shape, 1)
    pointer = builder.gep(data.data, [builder.add(builder.mul(n, columns), c)])
    return builder.load(builder.bitcast(pointer, vt_in.as_pointer()), align=size)


def _channel_vector(context, builder, array_type, array, c, vector_type, size):
    data = context.make_array(array_type)(context, builder, array)
    pointer = builder.bitcast(builder.gep(data.data, [c]), vector_type.as_pointer())
    return pointer, builder.load(pointer, align=size)


def _widen(builder, value, vector_type):
    return value if value.type == vector_type else builder.fpext(value, vector_type)


def _fma(builder, vt):
    """llvm.fma on <8 x double>: a·b + c rounded once (the sums of squares and products)."""
    return builder.module.globals.get("llvm.fma.v8f64") or ir.Function(
        builder.module, ir.FunctionType(vt, [vt, vt, vt]), "llvm.fma.v8f64")


def _add_into(builder, pointer, value):
    builder.store(builder.fadd(builder.load(pointer, align=8), value), pointer, align=8)


def _shifted_sums(groups):
    @intrinsic
    def accumulate(typingctx, x, n0, n1, c0, base, sd, sq):
        """sd[c] += Σ (x[n, c] − base[c]), sq[c] += Σ (x[n, c] − base[c])² over rows n0 ≤ n < n1, for
        the channels c0 ≤ c < c0 + W (W = 8·groups); float64 sums in registers, in row order."""
        sig = types.void(x, n0, n1, c0, base, sd, sq)

        def codegen(context, builder, signature, args):
            x_t, _, _, _, base_t, sd_t, sq_t = signature.args
            xv, n0v, n1v, c0v, basev, sdv, sqv = args
            intp = context.get_value_type(types.intp)
            element = context.get_value_type(x_t.dtype)
            size = context.get_abi_sizeof(element)
            vt_in = ir.VectorType(element, _F64_LANES)
            vt = ir.VectorType(ir.DoubleType(), _F64_LANES)
            cs = [builder.add(c0v, intp(_F64_LANES * g)) for g in range(groups)]
            bases = [_channel_vector(context, builder, base_t, basev, c, vt, 8)[1] for c in cs]
            zero = ir.Constant(vt, [0.0] * _F64_LANES)
            fma = _fma(builder, vt)

            def body(n, acc):
                out = []
                for g in range(groups):
                    v = _widen(builder, _row_block_vectors(context, builder, x_t, xv, n, cs[g], vt_in, size), vt)
                    d = builder.fsub(v, bases[g])
                    out += [builder.fadd(acc[2 * g], d), builder.call(fma, [d, d, acc[2 * g + 1]])]
                return out

            acc = counted_loop(builder, n0v, n1v, n0v.type(1), body, [zero] * (2 * groups))
            for g in range(groups):
                _add_into(builder, _channel_vector(context, builder, sd_t, sdv, cs[g], vt, 8)[0], acc[2 * g])
                _add_into(builder, _channel_vector(context, builder, sq_t, sqv, cs[g], vt, 8)[0], acc[2 * g + 1])
            return context.get_dummy_value()

        return sig, codegen

    return accumulate


def _grad_sums(groups, relu):
    @intrinsic
    def accumulate(typingctx, dy, x, n0, n1, c0, mean, scale, shift, acc_g, acc_gx):
        """acc_g[c] += Σ g, acc_gx[c] += Σ g·(x − μ) over rows n0 ≤ n < n1 for the channels c0 ≤ c < c0 + W,
        g = dy (masked by (x − μ)·scale + shift > 0 if relu), x − μ and the mask in the dtype, the
        sums in float64 registers, in row order."""
        sig = types.void(dy, x, n0, n1, c0, mean, scale, shift, acc_g, acc_gx)

        def codegen(context, builder, signature, args):
            dy_t, x_t, _, _, _, mean_t, scale_t, shift_t, g_t, gx_t = signature.args
            dyv, xv, n0v, n1v, c0v, meanv, scalev, shiftv, gv, gxv = args
            intp = context.get_value_type(types.intp)
            element = context.get_value_type(x_t.dtype)
            size = context.get_abi_sizeof(element)
            vt_in = ir.VectorType(element, _F64_LANES)
            vt = ir.VectorType(ir.DoubleType(), _F64_LANES)
            cs = [builder.add(c0v, intp(_F64_LANES * g)) for g in range(groups)]
            means = [_channel_vector(context, builder, mean_t, meanv, c, vt_in, size)[1] for c in cs]
            if relu:
                scales = [_channel_vector(context, builder, scale_t, scalev, c, vt_in, size)[1] for c in cs]
                shifts = [_channel_vector(context, builder, shift_t, shiftv, c, vt_in, size)[1] for c in cs]
            zero_in = ir.Constant(vt_in, [0.0] * _F64_LANES)
            zero = ir.Constant(vt, [0.0] * _F64_LANES)
            fma = _fma(builder, vt)

            def body(n, acc):
                out = []
                for g in range(groups):
                    xc = builder.fsub(_row_block_vectors(context, builder, x_t, xv, n, cs[g], vt_in, size), means[g])
                    grad = _row_block_vectors(context, builder, dy_t, dyv, n, cs[g], vt_in, size)
                    if relu:
                        pre = builder.fadd(builder.fmul(xc, scales[g]), shifts[g])
                        grad = builder.select(builder.fcmp_ordered(">", pre, zero_in), grad, zero_in)
                    grad = _widen(builder, grad, vt)
                    out += [builder.fadd(acc[2 * g], grad),
                            builder.call(fma, [grad, _widen(builder, xc, vt), acc[2 * g + 1]])]
                return out

            acc = counted_loop(builder, n0v, n1v, n0v.type(1), body, [zero] * (2 * groups))
            for g in range(groups):
                _add_into(builder, _channel_vector(context, builder, g_t, gv, cs[g], vt, 8)[0], acc[2 * g])
                _add_into(builder, _channel_vector(context, builder, gx_t, gxv, cs[g], vt, 8)[0], acc[2 * g + 1])
            return context.get_dummy_value()

        return sig, codegen

    return accumulate


_shifted_sums_64 = _shifted_sums(8)
_shifted_sums_32 = _shifted_sums(4)
_shifted_sums_8 = _shifted_sums(1)
_grad_sums_64 = _grad_sums(8, False)
_grad_sums_32 = _grad_sums(4, False)
_grad_sums_8 = _grad_sums(1, False)
_grad_sums_relu_32 = _grad_sums(4, True)
_grad_sums_relu_8 = _grad_sums(1, True)


@njit()
def _chunk_values(k, groups, pieces, outer, inner):
    """Values e0..e1 of a channel (value e is x[e // inner, c, e % inner]) in channel-first chunk k.

    Chunk k = j·pieces + q is piece q of row group j: rows j·outer//groups to (j + 1)·outer//groups,
    positions q·inner//pieces to (q + 1)·inner//pieces. A group has one row whenever pieces > 1, so
    the values of a chunk are contiguous in e, and the chunks, in order of k, cover 0..m.
    """
    j = k // pieces
    q = k - j * pieces
    n0 = j * outer // groups
    n1 = (j + 1) * outer // groups
    return n0 * inner + q * inner // pieces, (n1 - 1) * inner + (q + 1) * inner // pieces


# ---------------------------------------------------------------------------------------------
# statistics (training forward)


@kernel(_sigs("void(int64, int64, {t}[:, :, ::1], int64, int64, boolean, float64[:, ::1], float64[:, ::1])"),
        parallel=False, error_model="numpy")
def _stats_channel_first_tasks(task0, task1, x, groups, pieces, shifted, part_mean, part_m2):
    """Per (chunk, channel) task: mean and M2 = Σ(x − mean)² of the chunk's values of channel c (float64).

    Tasks run in memory order (row group, channel, piece). Blocks are runs of _BLOCK values (which may
    span rows of a group); within a block the corrected two-pass formula, or with ``shifted`` (float32)
    one pass of sums shifted by the block's first value; blocks merged with Chan's update.
    """
    outer, channels, inner = x.shape
    for task in range(task0, task1):
        j = task // (channels * pieces)
        rest = task - j * (channels * pieces)
        c = rest // pieces
        k = j * pieces + rest - c * pieces
        e0, e1 = _chunk_values(k, groups, pieces, outer, inner)
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for b0 in range(e0, e1, _BLOCK):
            b1 = min(b0 + _BLOCK, e1)
            nb = float(b1 - b0)
            if shifted:  # one pass: the block's first value is the shift
                n = b0 // inner
                base = np.float64(x[n, c, b0 - n * inner])
            else:
                s = 0.0
                e = b0
                while e < b1:  # one row segment per turn
                    n = e // inner
                    i = e - n * inner
                    stop = min(inner, i + (b1 - e))
                    e += stop - i
                    s += _sum(x[n, c, i:stop])
                base = s / nb
            sd = 0.0
            sq = 0.0
            e = b0
            while e < b1:  # deviations from base (the second pass reads the block from cache)
                n = e // inner
                i = e - n * inner
                stop = min(inner, i + (b1 - e))
                e += stop - i
                if shifted:
                    seg_d, seg_q = _sum_shifted(x[n, c, i:stop], base)
                else:
                    seg_d, seg_q = _sum_deviations(x[n, c, i:stop], base)
                sd += seg_d
                sq += seg_q
            block_mean = base + sd / nb
            block_m2 = max(sq - sd * sd / nb, 0.0)
            total = count + nb
            delta = block_mean - mean
            mean += delta * (nb / total)
            m2 += block_m2 + delta * delta * (count * nb / total)
            count = total
        part_mean[k, c] = mean
        part_m2[k, c] = m2


@task_kernel(_stats_channel_first_tasks)
@kernel(_sigs("void(int64, {t}[:, :, ::1], int64, int64, boolean, float64[:, ::1], float64[:, ::1])"))
def _stats_channel_first(body, x, groups, pieces, shifted, part_mean, part_m2):
    tasks = groups * x.shape[1] * pieces
    parts = min(tasks, PARTS)
    for part in prange(parts):
        lo, hi = part_range(part, parts, tasks)
        call_tasks(body, lo, hi, (x, groups, pieces, shifted, part_mean, part_m2))


@kernel(_sigs("void(int64, int64, {t}[:, ::1], int64, boolean, float64[:, ::1], float64[:, ::1], float64[:, :, ::1])"),
        parallel=False, error_model="numpy")
def _stats_channels_last_tasks(task0, task1, x, chunks, shifted, part_mean, part_m2, scratch):
    """Per chunk of rows: per-channel mean and M2 of x[n0:n1, :] (float64), vectorized over C.

    Blocks are R rows × all channels, R = max(_BLOCK // C, min(_ROWS, _TASK // C), 1) (at most
    max(_BLOCK, _TASK) elements, in L2); ``scratch[k]`` holds task k's block sums (base, Σd, Σd²), one
    float64 lane per channel. Within a block the corrected two-pass formula (base = the block mean,
    numba loops over channels, four rows per turn), or with ``shifted`` (float32) one pass with base
    = the block's first row, walked by ``_shifted_sums_*`` for 64, 32 or 8 channels at a time with
    the sums in registers; blocks merged with Chan's update.
    """
    rows, channels = x.shape
    rows_per_block = max(_BLOCK // max(channels, 1), min(_ROWS, _TASK // max(channels, 1)), 1)
    for k in range(task0, task1):
        n0 = k * rows // chunks
        n1 = (k + 1) * rows // chunks
        mean = part_mean[k]
        m2 = part_m2[k]
        base = scratch[k, 0]
        sd = scratch[k, 1]
        sq = scratch[k, 2]
        for c in range(channels):
            mean[c] = 0.0
            m2[c] = 0.0
        count = 0.0
        for r0 in range(n0, n1, rows_per_block):
            r1 = min(r0 + rows_per_block, n1)
            nb = float(r1 - r0)
            if shifted:  # one pass, base = the block's first row, sums in registers
                x0 = x[r0]
                for c in range(channels):
                    base[c] = x0[c]
                    sd[c] = 0.0
                    sq[c] = 0.0
                c = 0
                while c + 8 * _F64_LANES <= channels:
                    _shifted_sums_64(x, r0, r1, c, base, sd, sq)
                    c += 8 * _F64_LANES
                while c + 4 * _F64_LANES <= channels:
                    _shifted_sums_32(x, r0, r1, c, base, sd, sq)
                    c += 4 * _F64_LANES
                while c + _F64_LANES <= channels:
                    _shifted_sums_8(x, r0, r1, c, base, sd, sq)
                    c += _F64_LANES
                if c < channels:  # the last C mod 8 channels
                    for n in range(r0, r1):
                        x0 = x[n]
                        for j in range(c, channels):
                            d0 = x0[j] - base[j]
                            sd[j] += d0
                            sq[j] += d0 * d0
            else:
                for c in range(channels):
                    base[c] = 0.0
                n = r0
                while n + 2 <= r1:
                    x0 = x[n]
                    x1 = x[n + 1]
                    for c in range(channels):
                        base[c] += np.float64(x0[c]) + x1[c]
                    n += 2
                if n < r1:
                    x0 = x[n]
                    for c in range(channels):
                        base[c] += x0[c]
                for c in range(channels):
                    base[c] /= nb
                for c in range(channels):
                    sd[c] = 0.0
                    sq[c] = 0.0
                n = r0
                while n + 4 <= r1:
                    x0 = x[n]
                    x1 = x[n + 1]
                    x2 = x[n + 2]
                    x3 = x[n + 3]
                    for c in range(channels):
                        b = base[c]
                        d0 = x0[c] - b
                        d1 = x1[c] - b
                        d2 = x2[c] - b
                        d3 = x3[c] - b
                        sd[c] += (d0 + d1) + (d2 + d3)
                        sq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                    n += 4
                while n < r1:
                    x0 = x[n]
                    for c in range(channels):
                        d0 = x0[c] - base[c]
                        sd[c] += d0
                        sq[c] += d0 * d0
                    n += 1
            total = count + nb
            for c in range(channels):
                block_mean = base[c] + sd[c] / nb
                block_m2 = max(sq[c] - sd[c] * sd[c] / nb, 0.0)
                delta = block_mean - mean[c]
                mean[c] += delta * (nb / total)
                m2[c] += block_m2 + delta * delta * (count * nb / total)
            count = total


@task_kernel(_stats_channels_last_tasks)
@kernel(_sigs("void(int64, {t}[:, ::1], int64, boolean, float64[:, ::1], float64[:, ::1], float64[:, :, ::1])"))
def _stats_channels_last(body, x, chunks, shifted, part_mean, part_m2, scratch):
    parts = min(chunks, PARTS)
    for part in prange(parts):
        lo, hi = part_range(part, parts, chunks)
        call_tasks(body, lo, hi, (x, chunks, shifted, part_mean, part_m2, scratch))


@njit()
def _merge_chunks(part_mean, part_m2, groups, pieces, outer, inner, mean, m2):
    """Merge the chunks' (μ_k, M2_k) per channel with Chan's update, in chunk order, into ``mean``
    and ``m2`` (float64, overwritten); returns m, the values per channel. Chunk k held the values
    ``_chunk_values(k, groups, pieces, outer, inner)`` of each channel (channels-last: rows
    k·outer//chunks to (k + 1)·outer//chunks, i.e. pieces = inner = 1); chunks with none are
    skipped. A chunk's weights n_b/n and n_a·n_b/n are the same for every channel: they are
    computed once per chunk, and the channels (contiguous in the partials) are the inner loop,
    each one's chain of updates in chunk order."""
    chunks, channels = part_mean.shape
    for c in range(channels):
        mean[c] = 0.0
        m2[c] = 0.0
    count = 0.0
    for k in range(chunks):
        e0, e1 = _chunk_values(k, groups, pieces, outer, inner)
        nb = float(e1 - e0)  # the task's share of the m values
        if nb == 0.0:
            continue
        total = count + nb
        weight = nb / total
        cross = count * nb / total
        chunk_mean = part_mean[k]
        chunk_m2 = part_m2[k]
        for c in range(channels):
            delta = chunk_mean[c] - mean[c]
            mean[c] += delta * weight
            m2[c] += chunk_m2[c] + delta * delta * cross
        count = total
    return count


@kernel(_sigs("void(float64[:, ::1], float64[:, ::1], int64, int64, int64, int64, float64, float64, "
              "{t}[::1], {t}[::1], boolean, float64[:, ::1])"), parallel=False)
def _merge_statistics(part_mean, part_m2, groups, pieces, outer, inner, eps, momentum, running_mean, running_var,
                      update_running, stats):
    """Merge the task partials per channel (Chan), update the running statistics, write
    ``stats[0] = μ`` and ``stats[1] = invstd = 1/√(σ² + δ)`` in float64.

    running_mean ← (1 − α)·running_mean + α·μ;  running_var ← (1 − α)·running_var + α·M2/(m − 1).
    The merge is ``_merge_chunks``. Serial: it is tiny next to a pass.
    """
    mean = stats[0]
    m2 = stats[1]  # M2 until the last loop turns it into invstd
    count = _merge_chunks(part_mean, part_m2, groups, pieces, outer, inner, mean, m2)
    for c in range(part_mean.shape[1]):
        if update_running:
            running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]
            running_var[c] = (1.0 - momentum) * running_var[c] + momentum * (m2[c] / (count - 1.0))
        m2[c] = 1.0 / math.sqrt(m2[c] / count + eps)


@kernel(_sigs("void({t}[::1], {t}[::1], float64, float64[:, ::1])"), parallel=False)
def _running_statistics(running_mean, running_var, eps, stats):
    """Eval mode: ``stats[0] = μ = running_mean``, ``stats[1] = 1/√(running_var + δ)`` (float64)."""
    for c in range(running_mean.shape[0]):
        stats[0, c] = running_mean[c]
        stats[1, c] = 1.0 / math.sqrt(running_var[c] + eps)


@kernel(_sigs("void(float64[:, ::1], {t}[::1], {t}[::1], boolean, boolean, {t}[::1], {t}[::1], {t}[:, ::1])"),
        parallel=False)
def _forward_coefficients(stats, weight, bias, has_weight, has_bias, saved_mean, saved_invstd, coef):
    """Per channel: saved μ and invstd, and the normalize pass's coefficients in the dtype:
    ``coef[0] = hi``, ``coef[1] = lo`` (μ = hi + lo), ``coef[2] = γ·invstd``, ``coef[3] = β``
    (columns past C repeat the channels, see ``_extend``)."""
    for c in range(stats.shape[1]):
        mean = stats[0, c]
        invstd = stats[1, c]
        gamma = weight[c] if has_weight else 1.0
        saved_mean[c] = mean
        saved_invstd[c] = invstd
        coef[0, c] = mean
        coef[1, c] = mean - coef[0, c]  # what rounding μ to the dtype lost
        coef[2, c] = gamma * float(saved_invstd[c])  # as backward's mask will compute it
        coef[3, c] = bias[c] if has_bias else 0.0
    _extend(coef, stats.shape[1])


@njit()
def _extend(coef, channels):
    """Columns c ≥ C of a coefficient table repeat channel c mod C, so the L values a streaming
    line of a channels-last row needs, from any channel j on, are the contiguous coef[:, j:j + L]."""
    for r in range(coef.shape[0]):
        for k in range(channels, coef.shape[1]):
            coef[r, k] = coef[r, k % channels]


@kernel(_sigs("void(int64, int64, {t}[:, :, ::1], {t}[:, ::1], boolean, boolean, int64, {t}[:, :, ::1])"),
        parallel=False, error_model="numpy")
def _normalize_channel_first_tasks(task0, task1, x, coef, relu, stream, offset, y):
    """y = ((x − hi) − lo)·(γ·invstd) + β, then max(y, 0) with relu (NaN stays NaN); one task per
    tile of at most _TILE elements of an (n, c) row. With ``stream``, the whole lines of the tile
    are written with streaming stores (``_stream_normalize``) and the ends as usual; y's element e
    starts a line when (offset + e) % L == 0 (``_line_offset``)."""
    outer, channels, inner = x.shape
    zero = x.dtype.type(0)
    lanes = _VECTOR // x.itemsize
    tiles = (inner + _TILE - 1) // _TILE
    for task in range(task0, task1):
        row = task // tiles
        i0 = (task - row * tiles) * _TILE
        i1 = min(i0 + _TILE, inner)
        n = row // channels
        c = row - n * channels
        hi = coef[0, c]
        lo = coef[1, c]
        scale = coef[2, c]
        shift = coef[3, c]
        src = x[n, c, i0:i1]  # views indexed from 0: no negative-index checks
        dst = y[n, c, i0:i1]
        m = i1 - i0
        if stream:
            head = min(m, (lanes - (offset + row * inner + i0) % lanes) % lanes)
            body = head + (m - head) // lanes * lanes
            for i in range(head):
                v = ((src[i] - hi) - lo) * scale + shift
                dst[i] = zero if relu and v < zero else v
            if relu:
                _stream_normalize_relu(dst, head, body, src, hi, lo, scale, shift, 0, 0, 1)
            else:
                _stream_normalize(dst, head, body, src, hi, lo, scale, shift, 0, 0, 1)
            for i in range(body, m):
                v = ((src[i] - hi) - lo) * scale + shift
                dst[i] = zero if relu and v < zero else v
            _store_fence()
        elif relu:
            for i in range(m):
                v = ((src[i] - hi) - lo) * scale + shift
                dst[i] = zero if v < zero else v
        else:
            for i in range(m):
                dst[i] = ((src[i] - hi) - lo) * scale + shift


@task_kernel(_normalize_channel_first_tasks)
@kernel(_sigs("void(int64, {t}[:, :, ::1], {t}[:, ::1], boolean, boolean, int64, {t}[:, :, ::1])"))
def _normalize_channel_first(body, x, coef, relu, stream, offset, y):
    outer, channels, inner = x.shape
    tasks = outer * channels * ((inner + _TILE - 1) // _TILE)
    parts = min(tasks, PARTS)
    for part in prange(parts):
        lo, hi = part_range(part, parts, tasks)
        call_tasks(body, lo, hi, (x, coef, relu, stream, offset, y))


@kernel(_sigs("void(int64, int64, {t}[:, ::1], {t}[:, ::1], boolean, boolean, int64, {t}[:, ::1])"),
        parallel=False, error_model="numpy")
def _normalize_channels_last_tasks(task0, task1, x, coef, relu, stream, offset, y):
    """y = ((x − hi) − lo)·(γ·invstd) + β, then max(y, 0) with relu; tasks of about _TILE elements
    (whole rows), vectorized over channels. With ``stream``, a task's rows are one flat range whose
    aligned lines are written with streaming stores, the coefficients read from the extended tables
    at the line's first channel."""
    rows, channels = x.shape
    zero = x.dtype.type(0)
    lanes = _VECTOR // x.itemsize
    hi = coef[0]
    lo = coef[1]
    scale = coef[2]
    shift = coef[3]
    per_task = max(1, _TILE // max(channels, 1))
    for task in range(task0, task1):
        n0 = task * per_task
        n1 = min(n0 + per_task, rows)
        if stream:
            src = x[n0:n1].reshape(-1)
            dst = y[n0:n1].reshape(-1)
            m = dst.size
            head = min(m, (lanes - (offset + n0 * channels) % lanes) % lanes)
            body = head + (m - head) // lanes * lanes
            j = 0
            for i in range(head):
                v = ((src[i] - hi[j]) - lo[j]) * scale[j] + shift[j]
                dst[i] = zero if relu and v < zero else v
                j += 1
                if j == channels:
                    j = 0
            if relu:
                _stream_normalize_relu(dst, head, body, src, hi, lo, scale, shift, j, lanes % channels, channels)
            else:
                _stream_normalize(dst, head, body, src, hi, lo, scale, shift, j, lanes % channels, channels)
            j = body % channels  # the task starts a row, so element i is channel i mod C
            for i in range(body, m):
                v = ((src[i] - hi[j]) - lo[j]) * scale[j] + shift[j]
                dst[i] = zero if relu and v < zero else v
                j += 1
                if j == channels:
                    j = 0
            _store_fence()
            continue
        for n in range(n0, n1):
            src = x[n]
            dst = y[n]
            if relu:
                for c in range(channels):
                    v = ((src[c] - hi[c]) - lo[c]) * scale[c] + shift[c]
                    dst[c] = zero if v < zero else v
            else:
                for c in range(channels):
                    dst[c] = ((src[c] - hi[c]) - lo[c]) * scale[c] + shift[c]


@task_kernel(_normalize_channels_last_tasks)
@kernel(_sigs("void(int64, {t}[:, ::1], {t}[:, ::1], boolean, boolean, int64, {t}[:, ::1])"))
def _normalize_channels_last(body, x, coef, relu, stream, offset, y):
    rows, channels = x.shape
    per_task = max(1, _TILE // max(channels, 1))
    tasks = (rows + per_task - 1) // per_task
    parts = min(tasks, PARTS)
    for part in prange(parts):
        lo, hi = part_range(part, parts, tasks)
        call_tasks(body, lo, hi, (x, coef, relu, stream, offset, y))


# ---------------------------------------------------------------------------------------------
# backward


@kernel(_sigs("void({t}[::1], {t}[::1], {t}[::1], {t}[::1], boolean, boolean, {t}[:, ::1])"), parallel=False)
def _mask_coefficients(saved_mean, saved_invstd, weight, bias, has_weight, has_bias, coef):
    """Per channel, in the dtype: ``coef[0] = μ``, ``coef[1] = invstd``, ``coef[2] = γ·invstd``,
    ``coef[3] = β``, so x̂ = (x − μ)·invstd and the ReLU pre-activation is (x − μ)·γ·invstd + β."""
    for c in range(saved_mean.shape[0]):
        invstd = saved_invstd[c]
        coef[0, c] = saved_mean[c]
        coef[1, c] = invstd
        coef[2, c] = (weight[c] if has_weight else 1.0) * float(invstd)
        coef[3, c] = bias[c] if has_bias else 0.0
    _extend(coef, saved_mean.shape[0])


@kernel(_sigs("void(int64, int64, {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, ::1], boolean, int64, int64, "
              "float64[:, ::1], float64[:, ::1])"),
        parallel=False, error_model="numpy")
def _reduce_channel_first_tasks(task0, task1, dy, x, coef, relu, groups, pieces, part_g, part_gx):
    """Per (chunk, channel) task: Σg and Σg·(x − μ) over the chunk's values of channel c (float64).

    Tasks run in memory order (row group, channel, piece), as in _stats_channel_first.
    """
    outer, channels, inner = x.shape
    for task in range(task0, task1):
        j = task // (channels * pieces)
        rest = task - j * (channels * pieces)
        c = rest // pieces
        k = j * pieces + rest - c * pieces
        e0, e1 = _chunk_values(k, groups, pieces, outer, inner)
        mean = coef[0, c]
        scale = coef[2, c]
        shift = coef[3, c]
        sg = 0.0
        sgx = 0.0
        e = e0
        while e < e1:  # one row segment per turn
            n = e // inner
            i = e - n * inner
            stop = min(inner, i + (e1 - e))
            e += stop - i
            if relu:
                seg_g, seg_gx = _sum_grad_relu(dy[n, c, i:stop], x[n, c, i:stop], mean, scale, shift)
            else:
                seg_g, seg_gx = _sum_grad(dy[n, c, i:stop], x[n, c, i:stop], mean)
            sg += seg_g
            sgx += seg_gx
        part_g[k, c] = sg
        part_gx[k, c] = sgx


@task_kernel(_reduce_channel_first_tasks)
@kernel(_sigs("void(int64, {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, ::1], boolean, int64, int64, "
              "float64[:, ::1], float64[:, ::1])"))
def _reduce_channel_first(body, dy, x, coef, relu, groups, pieces, part_g, part_gx):
    tasks = groups * x.shape[1] * pieces
    parts = min(tasks, PARTS)
    for part in prange(parts):
        lo, hi = part_range(part, parts, tasks)
        call_tasks(body, lo, hi, (dy, x, coef, relu, groups, pieces, part_g, part_gx))


@kernel(_sigs("void(int64, int64, {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], boolean, int64, "
              "float64[:, ::1], float64[:, ::1])"),
        parallel=False, error_model="numpy")
def _reduce_channels_last_tasks(task0, task1, dy, x, coef, relu, chunks, part_g, part_gx):
    """Per chunk of rows: per-channel Σg and Σg·(x − μ) in float64; blocks of rows as in
    _stats_channels_last, each walked by ``_grad_sums_*`` for 32 or 8 channels at a time."""
    rows, channels = x.shape
    zero = x.dtype.type(0)
    rows_per_block = max(_BLOCK // max(channels, 1), min(_ROWS, _TASK // max(channels, 1)), 1)
    mean = coef[0]
    scale = coef[2]
    shift = coef[3]
    for k in range(task0, task1):
        n0 = k * rows // chunks
        n1 = (k + 1) * rows // chunks
        acc_g = part_g[k]
        acc_gx = part_gx[k]
        for c in range(channels):
            acc_g[c] = 0.0
            acc_gx[c] = 0.0
        for r0 in range(n0, n1, rows_per_block):  # blocks that stay in L1 while each group of channels walks them
            r1 = min(r0 + rows_per_block, n1)
            c = 0
            while not relu and c + 8 * _F64_LANES <= channels:
                _grad_sums_64(dy, x, r0, r1, c, mean, scale, shift, acc_g, acc_gx)
                c += 8 * _F64_LANES
            while c + 4 * _F64_LANES <= channels:
                if relu:
                    _grad_sums_relu_32(dy, x, r0, r1, c, mean, scale, shift, acc_g, acc_gx)
                else:
                    _grad_sums_32(dy, x, r0, r1, c, mean, scale, shift, acc_g, acc_gx)
                c += 4 * _F64_LANES
            while c + _F64_LANES <= channels:
                if relu:
                    _grad_sums_relu_8(dy, x, r0, r1, c, mean, scale, shift, acc_g, acc_gx)
                else:
                    _grad_sums_8(dy, x, r0, r1, c, mean, scale, shift, acc_g, acc_gx)
                c += _F64_LANES
            if c < channels:  # the last C mod 8 channels
                for n in range(r0, r1):
                    xs = x[n]
                    gs = dy[n]
                    for j in range(c, channels):
                        xc = xs[j] - mean[j]
                        g = gs[j]  # loaded first: the mask is a select, not a branch
                        g = np.float64(g if not relu or xc * scale[j] + shift[j] > zero else zero)
                        acc_g[j] += g
                        acc_gx[j] += g * xc


@task_kernel(_reduce_channels_last_tasks)
@kernel(_sigs("void(int64, {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], boolean, int64, "
              "float64[:, ::1], float64[:, ::1])"))
def _reduce_channels_last(body, dy, x, coef, relu, chunks, part_g, part_gx):
    tasks = chunks
    parts = min(tasks, PARTS)
    for part in prange(parts):
        lo, hi = part_range(part, parts, tasks)
        call_tasks(body, lo, hi, (dy, x, coef, relu, chunks, part_g, part_gx))


@kernel(_sigs("void(float64[:, ::1], float64[:, ::1], int64, boolean, {t}[:, ::1], {t}[::1], {t}[::1], "
              "{t}[:, ::1])"), parallel=False)
def _backward_coefficients(part_g, part_gx, m, training, mask_coef, dweight, dbias, coef):
    """Per channel: dβ = Σg, dγ = Σg·x̂ = invstd·Σg·(x − μ), and dx = k1·g + k2·(x − μ) + k3 in
    the dtype, with k1 = γ·invstd and, in training, k2 = −γ·invstd²·dγ/m, k3 = −γ·invstd·dβ/m
    (else 0)."""
    chunks, channels = part_g.shape
    for c in range(channels):
        sum_g = 0.0
        sum_gx = 0.0
        for k in range(chunks):
            sum_g += part_g[k, c]
            sum_gx += part_gx[k, c]
        invstd = float(mask_coef[1, c])
        sum_g_xhat = invstd * sum_gx
        dbias[c] = sum_g
        dweight[c] = sum_g_xhat
        k1 = float(mask_coef[2, c])  # γ·invstd
        coef[0, c] = k1
        if training and m > 0:
            coef[1, c] = -k1 * invstd * sum_g_xhat / m
            coef[2, c] = -k1 * sum_g / m
        else:
            coef[1, c] = 0.0
            coef[2, c] = 0.0
    _extend(coef, channels)


@kernel(_sigs("void(int64, int64, {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, ::1], {t}[:, ::1], boolean, boolean, int64, "
              "{t}[:, :, ::1])"),
        parallel=False, error_model="numpy")
def _input_grad_channel_first_tasks(task0, task1, dy, x, mask_coef, coef, relu, stream, offset, dx):
    """dx = k1·g + k2·(x − μ) + k3, g = dy masked by (x − μ)·γ·invstd + β > 0 with relu; one task per
    tile of at most _TILE elements of an (n, c) row; with ``stream`` the aligned lines are written
    with streaming stores (``_stream_input_grad``)."""
    outer, channels, inner = x.shape
    zero = x.dtype.type(0)
    lanes = _VECTOR // x.itemsize
    tiles = (inner + _TILE - 1) // _TILE
    for task in range(task0, task1):
        row = task // tiles
        i0 = (task - row * tiles) * _TILE
        i1 = min(i0 + _TILE, inner)
        n = row // channels
        c = row - n * channels
        mean = mask_coef[0, c]
        scale = mask_coef[2, c]
        shift = mask_coef[3, c]
        k1 = coef[0, c]
        k2 = coef[1, c]
        k3 = coef[2, c]
        xs = x[n, c, i0:i1]  # views indexed from 0: no negative-index checks
        gs = dy[n, c, i0:i1]
        out = dx[n, c, i0:i1]
        m = i1 - i0
        if stream:  # (as in _normalize_channel_first)
            head = min(m, (lanes - (offset + row * inner + i0) % lanes) % lanes)
            body = head + (m - head) // lanes * lanes
            for i in range(head):
                xc = xs[i] - mean
                g = gs[i]
                g = g if not relu or xc * scale + shift > zero else zero
                out[i] = k1 * g + k2 * xc + k3
            if relu:
                _stream_input_grad_relu(out, head, body, gs, xs, mean, scale, shift, k1, k2, k3, 0, 0, 1)
            else:
                _stream_input_grad(out, head, body, gs, xs, mean, scale, shift, k1, k2, k3, 0, 0, 1)
            for i in range(body, m):
                xc = xs[i] - mean
                g = gs[i]
                g = g if not relu or xc * scale + shift > zero else zero
                out[i] = k1 * g + k2 * xc + k3
            _store_fence()
        elif relu:
            for i in range(m):
                xc = xs[i] - mean
                g = gs[i]
                g = g if xc * scale + shift > zero else zero
                out[i] = k1 * g + k2 * xc + k3
        else:
            for i in range(m):
                out[i] = k1 * gs[i] + k2 * (xs[i] - mean) + k3


@task_kernel(_input_grad_channel_first_tasks)
@kernel(_sigs("void(int64, {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, ::1], {t}[:, ::1], boolean, boolean, int64, "
              "{t}[:, :, ::1])"))
def _input_grad_channel_first(body, dy, x, mask_coef, coef, relu, stream, offset, dx):
    outer, channels, inner = x.shape
    tasks = outer * channels * ((inner + _TILE - 1) // _TILE)
    parts = min(tasks, PARTS)
    for part in prange(parts):
        lo, hi = part_range(part, parts, tasks)
        call_tasks(body, lo, hi, (dy, x, mask_coef, coef, relu, stream, offset, dx))


@kernel(_sigs("void(int64, int64, {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], boolean, boolean, int64, {t}[:, ::1])"),
        parallel=False, error_model="numpy")
def _input_grad_channels_last_tasks(task0, task1, dy, x, mask_coef, coef, relu, stream, offset, dx):
    """dx = k1·g + k2·(x − μ) + k3 per row, vectorized over channels (g masked with relu); tasks of
    about _TILE elements; with ``stream`` as in ``_normalize_channels_last``."""
    rows, channels = x.shape
    zero = x.dtype.type(0)
    lanes = _VECTOR // x.itemsize
    mean = mask_coef[0]
    scale = mask_coef[2]
    shift = mask_coef[3]
    k1 = coef[0]
    k2 = coef[1]
    k3 = coef[2]
    per_task = max(1, _TILE // max(channels, 1))
    for task in range(task0, task1):
        n0 = task * per_task
        n1 = min(n0 + per_task, rows)
        if stream:
            xs = x[n0:n1].reshape(-1)
            gs = dy[n0:n1].reshape(-1)
            out = dx[n0:n1].reshape(-1)
            m = out.size
            head = min(m, (lanes - (offset + n0 * channels) % lanes) % lanes)
            body = head + (m - head) // lanes * lanes
            j = 0
            for i in range(head):
                xc = xs[i] - mean[j]
                g = gs[i]
                g = g if not relu or xc * scale[j] + shift[j] > zero else zero
                out[i] = k1[j] * g + k2[j] * xc + k3[j]
                j += 1
                if j == channels:
                    j = 0
            if relu:
                _stream_input_grad_relu(out, head, body, gs, xs, mean, scale, shift, k1, k2, k3, j,
                                        lanes % channels, channels)
            else:
                _stream_input_grad(out, head, body, gs, xs, mean, scale, shift, k1, k2, k3, j, lanes % channels,
                                   channels)
            j = body % channels  # the task starts a row, so element i is channel i mod C
            for i in range(body, m):
                xc = xs[i] - mean[j]
                g = gs[i]
                g = g if not relu or xc * scale[j] + shift[j] > zero else zero
                out[i] = k1[j] * g + k2[j] * xc + k3[j]
                j += 1
                if j == channels:
                    j = 0
            _store_fence()
            continue
        for n in range(n0, n1):
            xs = x[n]
            gs = dy[n]
            out = dx[n]
            if relu:
                for c in range(channels):
                    xc = xs[c] - mean[c]
                    g = gs[c]
                    g = g if xc * scale[c] + shift[c] > zero else zero
                    out[c] = k1[c] * g + k2[c] * xc + k3[c]
            else:
                for c in range(channels):
                    out[c] = k1[c] * gs[c] + k2[c] * (xs[c] - mean[c]) + k3[c]


@task_kernel(_input_grad_channels_last_tasks)
@kernel(_sigs("void(int64, {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], boolean, boolean, int64, {t}[:, ::1])"))
def _input_grad_channels_last(body, dy, x, mask_coef, coef, relu, stream, offset, dx):
    rows, channels = x.shape
    per_task = max(1, _TILE // max(channels, 1))
    tasks = (rows + per_task - 1) // per_task
    parts = min(tasks, PARTS)
    for part in prange(parts):
        lo, hi = part_range(part, parts, tasks)
        call_tasks(body, lo, hi, (dy, x, mask_coef, coef, relu, stream, offset, dx))


# ---------------------------------------------------------------------------------------------
# host side: views, scratch, launches


_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}
_SCRATCH_VALUES = 1 << 17  # channels-last reduction tasks × channels at most (when C is large)
_SERIAL_BELOW = 1 << 16  # inputs with fewer elements run the serial twins (module docstring, Threads)


class _Workspace(threading.local):
    """Each thread's scratch buffer: the per-channel and per-task arrays of a call are views into it,
    so a call with ``out=`` allocates no array memory once the buffer has grown to the largest
    shape seen. Its size depends on the channels and the task count only, never on x's size."""

    def __init__(self):
        self.buffer = np.empty(0, np.uint8)
        self.views: dict = {}  # specs -> the views into ``buffer`` (cleared when it grows)


_workspace = _Workspace()
_VIEWS_KEPT = 64  # distinct spec lists whose views a thread keeps (a few per layer shape)


def _scratch(*specs):
    """Arrays of the given (shape, dtype), 64-byte aligned, in this thread's workspace; their
    contents are undefined. The views are valid until this thread's next call. Building five views
    takes about 15 µs, several times a small call's kernels, so the views of each spec list are
    kept until the buffer grows."""
    views = _workspace.views.get(specs)
    if views is None:
        views = _new_views(specs)
        if len(_workspace.views) >= _VIEWS_KEPT:
            _workspace.views.clear()
        _workspace.views[specs] = views
    return views


def _new_views(specs):
    offsets = []
    total = 0
    for shape, dtype in specs:
        offsets.append(total)
        total += -(-math.prod(shape) * np.dtype(dtype).itemsize // _VECTOR) * _VECTOR
    buffer = _workspace.buffer
    if buffer.size < total + _VECTOR:
        buffer = _workspace.buffer = np.empty(max(total + _VECTOR, 2 * buffer.size), np.uint8)
        _workspace.views.clear()  # views into the old buffer
    start = -buffer.ctypes.data % _VECTOR
    views = []
    for (shape, dtype), offset in zip(specs, offsets):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        views.append(buffer[start + offset:start + offset + nbytes].view(dtype).reshape(shape))
    return views


def _view3(x, channel_axis):
    """x as (outer, C, inner) without copying (x is C-contiguous)."""
    outer = math.prod(x.shape[:channel_axis])
    inner = math.prod(x.shape[channel_axis + 1:])
    return x.reshape(outer, x.shape[channel_axis], inner)


def _chunks(rows, channels):
    """How many channels-last tasks split ``rows`` rows of ``channels`` elements: about _TASK
    elements each, at least one row each, and (for many channels) at most about _SCRATCH_VALUES / C
    tasks, so the per-task partial sums stay small next to x. Shape only."""
    if rows == 0:
        return 0
    return max(1, min(rows, -(-rows * channels // _TASK), max(64, _SCRATCH_VALUES // max(channels, 1))))


def _channel_first_chunks(outer, inner):
    """(groups, pieces) of the channel-first reductions (see _chunk_values), from the shape only.

    Rows of at least _BLOCK values are one chunk each, split into pieces of at most _TASK values;
    shorter rows are grouped into chunks of about _GROUP values. Tasks then walk x in memory order
    (a thread's next task reads the next row), which the hardware prefetchers stream best.
    """
    if inner >= _BLOCK:
        return outer, -(-inner // _TASK)
    return max(1, min(outer, -(-outer * inner // _GROUP))), 1


def _sized(kernel, x):
    """``kernel``, or its serial twin (``_jit``) when x has fewer than ``_SERIAL_BELOW`` elements:
    below that a parallel region costs more than it saves (see the module docstring, Threads)."""
    return kernel.serial if x.size < _SERIAL_BELOW else kernel


def _or_empty(array, dtype):
    return _EMPTY[dtype] if array is None else array


def _table_width(channels, dtype):
    """Columns of a coefficient table: the channels, then one streaming line's worth repeated,
    rounded up to whole lines (so every row of the table starts on a line)."""
    lanes = _VECTOR // dtype.itemsize
    return -(-(channels + lanes) // lanes) * lanes


def _streams(out, inner):
    """Write ``out`` with streaming stores: it is larger than the caches, and its rows are long
    enough for whole lines (channels-last rows are joined into flat ranges). Size only."""
    return out.nbytes >= _STREAM_BYTES and (inner == 1 or inner >= _STREAM_INNER)


def _line_offset(out):
    """How many elements ``out``'s first element lies past the start of its 64-byte line, so that
    element e starts a line when (offset + e) % L == 0. The kernels take it as a number: the same
    arithmetic on the output's address inside a kernel (ptrtoint) keeps LLVM from vectorizing its
    ordinary loops."""
    return (out.ctypes.data % _VECTOR) // out.itemsize


def batchnorm_forward(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                      training, momentum, eps, channel_axis, relu):
    """Batch normalization forward (see the module docstring and ``fastopt.batchnorm``)."""
    dtype = x.dtype
    x3 = _view3(x, channel_axis)
    outer, channels, inner = x3.shape
    if channels == 0:
        return
    width = _table_width(channels, dtype)
    if training:
        if outer * inner == 0:  # an empty batch: nothing to normalize, statistics undefined
            saved_mean.fill(np.nan)
            saved_invstd.fill(np.nan)
            return
        shifted = dtype == np.float32  # one-pass blocks (see the module docstring, Statistics)
        if inner == 1:
            chunks = _chunks(outer, channels)
            stats, coef, part_mean, part_m2, sums = _scratch(
                ((2, channels), np.float64), ((4, width), dtype), ((chunks, channels), np.float64),
                ((chunks, channels), np.float64), ((chunks, 3, channels), np.float64))
            _sized(_stats_channels_last, x)(x.reshape(outer, channels), chunks, shifted, part_mean, part_m2, sums)
            groups, pieces, span = chunks, 1, 1
        else:
            groups, pieces = _channel_first_chunks(outer, inner)
            span = inner
            stats, coef, part_mean, part_m2 = _scratch(
                ((2, channels), np.float64), ((4, width), dtype), ((groups * pieces, channels), np.float64),
                ((groups * pieces, channels), np.float64))
            _sized(_stats_channel_first, x)(x3, groups, pieces, shifted, part_mean, part_m2)
        update = running_mean is not None
        _merge_statistics(part_mean, part_m2, groups, pieces, outer, span, float(eps), float(momentum),
                          _or_empty(running_mean, dtype), _or_empty(running_var, dtype), update, stats)
    else:
        stats, coef = _scratch(((2, channels), np.float64), ((4, width), dtype))
        _running_statistics(running_mean, running_var, float(eps), stats)
    _forward_coefficients(stats, _or_empty(weight, dtype), _or_empty(bias, dtype), weight is not None,
                          bias is not None, saved_mean, saved_invstd, coef)
    if outer * inner == 0:
        return
    stream = _streams(y, inner)
    if inner == 1:
        _sized(_normalize_channels_last, x)(x.reshape(outer, channels), coef, bool(relu), stream, _line_offset(y),
                                            y.reshape(outer, channels))
    else:
        _sized(_normalize_channel_first, x)(x3, coef, bool(relu), stream, _line_offset(y), _view3(y, channel_axis))


def batchnorm_backward(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                       training, channel_axis, relu):
    """Batch normalization backward (see the module docstring and ``fastopt.batchnorm``)."""
    dtype = x.dtype
    x3 = _view3(x, channel_axis)
    outer, channels, inner = x3.shape
    if channels == 0:
        return
    if outer * inner == 0:
        dweight.fill(0)
        dbias.fill(0)
        return
    width = _table_width(channels, dtype)
    if inner == 1:
        chunks = _chunks(outer, channels)
    else:
        groups, pieces = _channel_first_chunks(outer, inner)
        chunks = groups * pieces
    mask_coef, coef, part_g, part_gx = _scratch(((4, width), dtype), ((3, width), dtype),
                                                ((chunks, channels), np.float64), ((chunks, channels), np.float64))
    _mask_coefficients(saved_mean, saved_invstd, _or_empty(weight, dtype), _or_empty(bias, dtype),
                       weight is not None, bias is not None, mask_coef)
    relu = bool(relu)
    if inner == 1:
        x2 = x.reshape(outer, channels)
        dy2 = dy.reshape(outer, channels)
        _sized(_reduce_channels_last, x)(dy2, x2, mask_coef, relu, chunks, part_g, part_gx)
    else:
        dy3 = _view3(dy, channel_axis)
        _sized(_reduce_channel_first, x)(dy3, x3, mask_coef, relu, groups, pieces, part_g, part_gx)
    _backward_coefficients(part_g, part_gx, outer * inner, bool(training), mask_coef, dweight, dbias, coef)
    stream = _streams(dx, inner)
    if inner == 1:
        _sized(_input_grad_channels_last, x)(dy2, x2, mask_coef, coef, relu, stream, _line_offset(dx),
                                             dx.reshape(outer, channels))
    else:
        _sized(_input_grad_channel_first, x)(dy3, x3, mask_coef, coef, relu, stream, _line_offset(dx),
                                             _view3(dx, channel_axis))
