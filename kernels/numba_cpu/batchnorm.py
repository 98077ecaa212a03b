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
  each task keeping per-channel partial sums in its own row of a (chunks, C) scratch buffer and
  vectorizing over channels; the partials are merged at the end. Elementwise passes run in
  parallel over rows, vectorized over channels.

Passes over x: forward reads x once for the statistics (training only) and once to normalize;
backward does one reduction pass (Σg, Σg·(x − μ)) and one elementwise pass. Scratch memory is
per-channel or per-task (chunks × C), never proportional to x. Chunk counts depend only on the
shape, not on the number of threads, so results are bitwise the same for any thread count.

Statistics: each task walks its values in blocks of about ``_BLOCK`` elements that stay in cache.
A block's mean and sum of squared deviations come from the corrected two-pass formula (pass 1:
b = Σx/n; pass 2: d = x − b, mean = b + Σd/n, M2 = Σd² − (Σd)²/n, the second pass reading the block
from cache, so x comes from memory once), and blocks, then tasks, are merged with Chan's parallel
update (n = na + nb, δ = μb − μa, μ = μa + δ·nb/n, M2 = M2a + M2b + δ²·na·nb/n). Never
E[x²] − E[x]². A constant channel gives μ equal to the constant exactly, σ² = 0 and y = β.

Reduction loops: a float sum written as a loop (s += v[i]) is one chain of dependent adds, each
waiting for the last (3–4 cycles): one element per 3–4 cycles per thread, far below what memory
delivers. Without fast-math LLVM must keep the written order, so it can neither vectorize nor
interleave such a loop; and numba runs LLVM without its SLP vectorizer, so scalar partial sums
written out by hand (s0 += v[i], s1 += v[i + 1], ...) stay scalar adds and conversions, still bound
by the add units. The sums therefore get independent vector lanes, in fixed order:

* channel-first: each contiguous row segment of a block (of a task, in backward) is summed by a
  small helper (``_sum``, ``_sum_deviations``, ``_sum_grad``, ``_sum_grad_relu``) compiled with
  ``fastmath={"reassoc"}`` and no other flag, inlined into the kernel. That licence covers only
  the helper's own loop: LLVM splits each sum into vector partial sums (with AVX-512: 4 × 8
  float64 lanes, float32 values widened per element, then a 4-lane epilogue and an in-order scalar
  tail) and adds the lanes up in a fixed tree when the loop ends. The lanes and the tree depend on
  the compiled code and the segment's length, i.e. on the shape, never on the thread count (they
  may differ between CPUs with different vector widths). The helpers' per-element arithmetic
  (x − b; x − μ, the ReLU test (x − μ)·γ·invstd + β > 0, the product g·(x − μ)) has no chain to
  reassociate; its generated IR is the same operations as without the flag. The rest of every
  kernel (block formula, Chan merges, coefficients) is compiled without fast-math.
* channels-last: the lanes are the channels. The float64 sums live in the task's scratch row, one
  per channel, and the loop over channels vectorizes with no flag at all; the statistics add two
  rows per turn, (r0 + r1), so the lanes are loaded and stored once per two rows, and blocks have
  at least ``_ROWS`` rows so the per-block merge is amortized.

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

import numpy as np
from numba import njit, prange

from ._jit import kernel

__all__ = ["batchnorm_backward", "batchnorm_forward"]

_BLOCK = 2048  # elements in one two-pass block of the statistics (stays in L1/L2)
_ROWS = 32  # fewest rows in a channels-last block (the per-block merge is amortized over them)
_GROUP = 1 << 12  # channel-first rows shorter than _BLOCK: grouped into reduction tasks of about this many values
_TASK = 1 << 15  # longest row piece of a channel-first reduction task; ~elements per channels-last task
_TILE = 1 << 13  # longest piece of a channel-first row one elementwise task handles

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
    return njit(fastmath={"reassoc"}, cache=True)(py_func)


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


@_reduction
def _sum_grad(gs, xs, mean):
    """Σg and Σg·(x − μ) (float64 sums of exact float64 products; x − μ in the dtype)."""
    sg = 0.0
    sgx = 0.0
    for i in range(xs.size):
        g = np.float64(gs[i])
        sg += g
        sgx += g * (xs[i] - mean)
    return sg, sgx


@_reduction
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


@njit(cache=True)
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


@kernel(_sigs("void({t}[:, :, ::1], int64, int64, float64[:, ::1], float64[:, ::1])"))
def _stats_channel_first(x, groups, pieces, part_mean, part_m2):
    """Per (chunk, channel) task: mean and M2 = Σ(x − mean)² of the chunk's values of channel c (float64).

    Tasks run in memory order (row group, channel, piece). Blocks are runs of _BLOCK values (which may
    span rows of a group); within a block the corrected two-pass formula, blocks merged with Chan's update.
    """
    outer, channels, inner = x.shape
    for task in prange(groups * channels * pieces):
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
            while e < b1:  # second pass over the same block, now in cache
                n = e // inner
                i = e - n * inner
                stop = min(inner, i + (b1 - e))
                e += stop - i
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


@kernel(_sigs("void({t}[:, ::1], int64, float64[:, ::1], float64[:, ::1], float64[:, :, ::1])"))
def _stats_channels_last(x, chunks, part_mean, part_m2, scratch):
    """Per chunk of rows: per-channel mean and M2 of x[n0:n1, :] (float64), vectorized over C.

    Blocks are R rows × all channels, R = max(_BLOCK // C, min(_ROWS, _TASK // C), 1) (at most
    max(_BLOCK, _TASK) elements, in L2); ``scratch[k]`` holds task k's block
    sums (b, Σd, Σd²), one float64 lane per channel. Within a block, the corrected two-pass formula;
    blocks merged with Chan's update. The sums take two rows per turn, (r0 + r1), so each pass
    loads and stores the lanes once per two rows.
    """
    rows, channels = x.shape
    rows_per_block = max(_BLOCK // max(channels, 1), min(_ROWS, _TASK // max(channels, 1)), 1)
    for k in prange(chunks):
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
            for c in range(channels):
                base[c] = 0.0
                sd[c] = 0.0
                sq[c] = 0.0
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
            n = r0
            while n + 2 <= r1:
                x0 = x[n]
                x1 = x[n + 1]
                for c in range(channels):
                    d0 = x0[c] - base[c]
                    d1 = x1[c] - base[c]
                    sd[c] += d0 + d1
                    sq[c] += d0 * d0 + d1 * d1
                n += 2
            if n < r1:
                x0 = x[n]
                for c in range(channels):
                    d0 = x0[c] - base[c]
                    sd[c] += d0
                    sq[c] += d0 * d0
            total = count + nb
            for c in range(channels):
                block_mean = base[c] + sd[c] / nb
                block_m2 = max(sq[c] - sd[c] * sd[c] / nb, 0.0)
                delta = block_mean - mean[c]
                mean[c] += delta * (nb / total)
                m2[c] += block_m2 + delta * delta * (count * nb / total)
            count = total


@kernel(_sigs("void(float64[:, ::1], float64[:, ::1], int64, int64, int64, int64, float64, float64, "
              "{t}[::1], {t}[::1], boolean, float64[:, ::1])"))
def _merge_statistics(part_mean, part_m2, groups, pieces, outer, inner, eps, momentum, running_mean, running_var,
                      update_running, stats):
    """Merge the task partials per channel (Chan), update the running statistics, write
    ``stats[0] = μ`` and ``stats[1] = invstd = 1/√(σ² + δ)`` in float64.

    running_mean ← (1 − α)·running_mean + α·μ;  running_var ← (1 − α)·running_var + α·M2/(m − 1).
    Chunk k held the values ``_chunk_values(k, groups, pieces, outer, inner)`` of each channel
    (channels-last: rows k·outer//chunks to (k + 1)·outer//chunks, i.e. pieces = inner = 1).
    """
    chunks, channels = part_mean.shape
    for c in prange(channels):
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for k in range(chunks):
            e0, e1 = _chunk_values(k, groups, pieces, outer, inner)
            nb = float(e1 - e0)  # the task's share of the m values
            if nb == 0.0:
                continue
            total = count + nb
            delta = part_mean[k, c] - mean
            mean += delta * (nb / total)
            m2 += part_m2[k, c] + delta * delta * (count * nb / total)
            count = total
        var = m2 / count
        stats[0, c] = mean
        stats[1, c] = 1.0 / math.sqrt(var + eps)
        if update_running:
            running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean
            running_var[c] = (1.0 - momentum) * running_var[c] + momentum * (m2 / (count - 1.0))


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
    ``coef[0] = hi``, ``coef[1] = lo`` (μ = hi + lo), ``coef[2] = γ·invstd``, ``coef[3] = β``."""
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


@kernel(_sigs("void({t}[:, :, ::1], {t}[:, ::1], boolean, {t}[:, :, ::1])"))
def _normalize_channel_first(x, coef, relu, y):
    """y = ((x − hi) − lo)·(γ·invstd) + β, then max(y, 0) with relu (NaN stays NaN); one task per
    tile of at most _TILE elements of an (n, c) row."""
    outer, channels, inner = x.shape
    zero = x.dtype.type(0)
    tiles = (inner + _TILE - 1) // _TILE
    for task in prange(outer * channels * tiles):
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
        if relu:
            for i in range(i1 - i0):
                v = ((src[i] - hi) - lo) * scale + shift
                dst[i] = zero if v < zero else v
        else:
            for i in range(i1 - i0):
                dst[i] = ((src[i] - hi) - lo) * scale + shift


@kernel(_sigs("void({t}[:, ::1], {t}[:, ::1], boolean, {t}[:, ::1])"))
def _normalize_channels_last(x, coef, relu, y):
    """y = ((x − hi) − lo)·(γ·invstd) + β, then max(y, 0) with relu; vectorized over channels."""
    rows, channels = x.shape
    zero = x.dtype.type(0)
    hi = coef[0]
    lo = coef[1]
    scale = coef[2]
    shift = coef[3]
    for n in prange(rows):
        src = x[n]
        dst = y[n]
        if relu:
            for c in range(channels):
                v = ((src[c] - hi[c]) - lo[c]) * scale[c] + shift[c]
                dst[c] = zero if v < zero else v
        else:
            for c in range(channels):
                dst[c] = ((src[c] - hi[c]) - lo[c]) * scale[c] + shift[c]


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


@kernel(_sigs("void({t}[:, :, ::1], {t}[:, :, ::1], {t}[:, ::1], boolean, int64, int64, "
              "float64[:, ::1], float64[:, ::1])"))
def _reduce_channel_first(dy, x, coef, relu, groups, pieces, part_g, part_gx):
    """Per (chunk, channel) task: Σg and Σg·(x − μ) over the chunk's values of channel c (float64).

    Tasks run in memory order (row group, channel, piece), as in _stats_channel_first.
    """
    outer, channels, inner = x.shape
    for task in prange(groups * channels * pieces):
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


@kernel(_sigs("void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1], boolean, int64, "
              "float64[:, ::1], float64[:, ::1])"))
def _reduce_channels_last(dy, x, coef, relu, chunks, part_g, part_gx):
    """Per chunk of rows: per-channel Σg and Σg·(x − μ), one float64 lane per channel, vectorized over C."""
    rows, channels = x.shape
    zero = x.dtype.type(0)
    mean = coef[0]
    scale = coef[2]
    shift = coef[3]
    for k in prange(chunks):
        n0 = k * rows // chunks
        n1 = (k + 1) * rows // chunks
        acc_g = part_g[k]
        acc_gx = part_gx[k]
        for c in range(channels):
            acc_g[c] = 0.0
            acc_gx[c] = 0.0
        for n in range(n0, n1):
            xs = x[n]
            gs = dy[n]
            if relu:  # g = dy where (x − μ)·γ·invstd + β > 0, else 0 (a select, not a branch)
                for c in range(channels):
                    xc = xs[c] - mean[c]
                    g = gs[c]  # loaded first: the mask is a select, not a branch
                    g = np.float64(g if xc * scale[c] + shift[c] > zero else zero)
                    acc_g[c] += g
                    acc_gx[c] += g * xc
            else:
                for c in range(channels):
                    g = np.float64(gs[c])
                    acc_g[c] += g
                    acc_gx[c] += g * (xs[c] - mean[c])


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


@kernel(_sigs("void({t}[:, :, ::1], {t}[:, :, ::1], {t}[:, ::1], {t}[:, ::1], boolean, {t}[:, :, ::1])"))
def _input_grad_channel_first(dy, x, mask_coef, coef, relu, dx):
    """dx = k1·g + k2·(x − μ) + k3, g = dy masked by (x − μ)·γ·invstd + β > 0 with relu; one task per
    tile of at most _TILE elements of an (n, c) row."""
    outer, channels, inner = x.shape
    zero = x.dtype.type(0)
    tiles = (inner + _TILE - 1) // _TILE
    for task in prange(outer * channels * tiles):
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
        if relu:
            for i in range(i1 - i0):
                xc = xs[i] - mean
                g = gs[i]
                g = g if xc * scale + shift > zero else zero
                out[i] = k1 * g + k2 * xc + k3
        else:
            for i in range(i1 - i0):
                out[i] = k1 * gs[i] + k2 * (xs[i] - mean) + k3


@kernel(_sigs("void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], boolean, {t}[:, ::1])"))
def _input_grad_channels_last(dy, x, mask_coef, coef, relu, dx):
    """dx = k1·g + k2·(x − μ) + k3 per row, vectorized over channels (g masked with relu)."""
    rows, channels = x.shape
    zero = x.dtype.type(0)
    mean = mask_coef[0]
    scale = mask_coef[2]
    shift = mask_coef[3]
    k1 = coef[0]
    k2 = coef[1]
    k3 = coef[2]
    for n in prange(rows):
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


# ---------------------------------------------------------------------------------------------
# host side: views, scratch, launches


_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def _view3(x, channel_axis):
    """x as (outer, C, inner) without copying (x is C-contiguous)."""
    outer = math.prod(x.shape[:channel_axis])
    inner = math.prod(x.shape[channel_axis + 1:])
    return x.reshape(outer, x.shape[channel_axis], inner)


def _chunks(rows, channels):
    """How many channels-last tasks split ``rows`` rows of ``channels`` elements: about _TASK
    elements each, at least one row each. Shape only."""
    if rows == 0:
        return 0
    return max(1, min(rows, -(-rows * channels // _TASK)))


def _channel_first_chunks(outer, inner):
    """(groups, pieces) of the channel-first reductions (see _chunk_values), from the shape only.

    Rows of at least _BLOCK values are one chunk each, split into pieces of at most _TASK values;
    shorter rows are grouped into chunks of about _GROUP values. Tasks then walk x in memory order
    (a thread's next task reads the next row), which the hardware prefetchers stream best.
    """
    if inner >= _BLOCK:
        return outer, -(-inner // _TASK)
    return max(1, min(outer, -(-outer * inner // _GROUP))), 1


def _or_empty(array, dtype):
    return _EMPTY[dtype] if array is None else array


def batchnorm_forward(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                      training, momentum, eps, channel_axis, relu):
    """Batch normalization forward (see the module docstring and ``fastopt.batchnorm``)."""
    dtype = x.dtype
    x3 = _view3(x, channel_axis)
    outer, channels, inner = x3.shape
    if channels == 0:
        return
    stats = np.empty((2, channels))
    if training:
        if outer * inner == 0:  # an empty batch: nothing to normalize, statistics undefined
            saved_mean.fill(np.nan)
            saved_invstd.fill(np.nan)
            return
        if inner == 1:
            chunks = _chunks(outer, channels)
            part_mean = np.empty((chunks, channels))
            part_m2 = np.empty((chunks, channels))
            _stats_channels_last(x.reshape(outer, channels), chunks, part_mean, part_m2,
                                 np.empty((chunks, 3, channels)))
            groups, pieces, span = chunks, 1, 1
        else:
            groups, pieces = _channel_first_chunks(outer, inner)
            span = inner
            part_mean = np.empty((groups * pieces, channels))
            part_m2 = np.empty((groups * pieces, channels))
            _stats_channel_first(x3, groups, pieces, part_mean, part_m2)
        update = running_mean is not None
        _merge_statistics(part_mean, part_m2, groups, pieces, outer, span, float(eps), float(momentum),
                          _or_empty(running_mean, dtype), _or_empty(running_var, dtype), update, stats)
    else:
        _running_statistics(running_mean, running_var, float(eps), stats)
    coef = np.empty((4, channels), dtype)
    _forward_coefficients(stats, _or_empty(weight, dtype), _or_empty(bias, dtype), weight is not None,
                          bias is not None, saved_mean, saved_invstd, coef)
    if outer * inner == 0:
        return
    if inner == 1:
        _normalize_channels_last(x.reshape(outer, channels), coef, bool(relu), y.reshape(outer, channels))
    else:
        _normalize_channel_first(x3, coef, bool(relu), _view3(y, channel_axis))


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
    mask_coef = np.empty((4, channels), dtype)
    _mask_coefficients(saved_mean, saved_invstd, _or_empty(weight, dtype), _or_empty(bias, dtype),
                       weight is not None, bias is not None, mask_coef)
    relu = bool(relu)
    if inner == 1:
        x2 = x.reshape(outer, channels)
        dy2 = dy.reshape(outer, channels)
        chunks = _chunks(outer, channels)
        part_g = np.empty((chunks, channels))
        part_gx = np.empty((chunks, channels))
        _reduce_channels_last(dy2, x2, mask_coef, relu, chunks, part_g, part_gx)
    else:
        dy3 = _view3(dy, channel_axis)
        groups, pieces = _channel_first_chunks(outer, inner)
        part_g = np.empty((groups * pieces, channels))
        part_gx = np.empty((groups * pieces, channels))
        _reduce_channel_first(dy3, x3, mask_coef, relu, groups, pieces, part_g, part_gx)
    coef = np.empty((3, channels), dtype)
    _backward_coefficients(part_g, part_gx, outer * inner, bool(training), mask_coef, dweight, dbias, coef)
    if inner == 1:
        _input_grad_channels_last(dy2, x2, mask_coef, coef, relu, dx.reshape(outer, channels))
    else:
        _input_grad_channel_first(dy3, x3, mask_coef, coef, relu, _view3(dx, channel_axis))
