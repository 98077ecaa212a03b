"""Batch normalization of the ``"numba-cuda"`` backend: CUDA kernels.

The equations are those of ``docs/algorithms.md`` (x the input, μ and σ² the per-channel mean and
biased variance, invstd = 1/√(σ² + δ), x̂ = (x − μ)·invstd, γ ``weight``, β ``bias``, m the number
of values per channel, g the incoming gradient after the optional ReLU mask):

    forward   y = γx̂ + β  (then max(y, 0) with relu)
    backward  dβ = Σg,  dγ = Σg·x̂,  dx = γ·invstd·(g − dβ/m − x̂·dγ/m)   (training)
                                     dx = γ·invstd·g                      (statistics constant)

Arguments follow the backend contract in ``fastopt.batchnorm`` (validated, non-negative
``channel_axis``, outputs preallocated). Any layout is viewed without copying as (outer, C, inner):
outer is the product of the axes before the channel axis, inner of those after; the value e of
channel c (0 ≤ e < m = outer·inner, e = o·inner + i) sits at flat position (o·C + c)·inner + i.

Kernels, in launch order:

    training forward  batchnorm.stats_partial → batchnorm.stats_finalize → batchnorm.normalize
    eval forward      batchnorm.eval_coefficients → batchnorm.normalize
    backward          batchnorm.grad_partial → batchnorm.grad_finalize → batchnorm.input_grad

Reductions (``*_partial``): a 2-D grid of (channel groups, splits). Each channel's m values are cut
into S contiguous splits and a block reduces TX channels × one split with TX·TY threads, so the
grid fills the GPU whatever the shape: S grows when there are few channels and many values per
channel (small N, large H·W), and channel groups supply the blocks when there are many channels
(large N, small H·W). Channels-last layouts (inner = 1) take TX = min(32, C rounded up to a power
of two) channels per block, so a warp reads 32/TX consecutive rows of TX consecutive channels
(coalesced); channel-first layouts take TX = 1, so a warp reads 32 consecutive values of a row.
A thread walks its values with a stride of TY, keeping its position by increments (no division per
element). Within a block, threads are merged with warp shuffles (``cuda.shfl_down_sync``, down to
the TX lanes of one warp that hold distinct channels), then warps through shared memory, in a
fixed order; the block writes one partial per channel. ``*_finalize`` gives each channel one warp,
which merges the S partials (lanes stride over them, then a shuffle tree) and derives the
per-channel scalars. ``normalize`` and ``input_grad`` are grid-stride element-wise passes that track
each element's channel by increments. No atomics: results are the same on every run.

Statistics: each thread accumulates the deviations d = x − K from its own first value K (Σd, Σd²,
in float64), so mean = K + Σd/n and M2 = Σd² − (Σd)²/n. K is one of the summed values, so K lies
within the data: (Σd)²/n = n(mean − K)² ≤ n·M2 bounds the cancellation (never E[x²] − E[x]², whose
cancellation grows with |μ|/σ). Threads, warps and splits are merged with Chan's update (n = nₐ +
n_b, Δ = μ_b − μₐ, μ = μₐ + Δ·n_b/n, M2 = M2ₐ + M2_b + Δ²·nₐ·n_b/n). A constant channel gives μ equal
to the constant exactly, σ² = 0 and y = β.

Precision, as in the CPU backend: the statistics accumulators (per-thread sums, Σg, Σg·(x − μ)) and
the per-channel scalars derived from them (μ, σ², invstd, the running-statistics update, the
coefficients of the element-wise passes) are float64, deliberately, also for float32 input (fp64
is slow on consumer GPUs, but these kernels are memory-bound on data-centre GPUs, and the f64
work is a few operations per element). So ``batchnorm.stats_partial``, ``stats_finalize``,
``eval_coefficients``, ``grad_partial`` and ``grad_finalize`` contain float64 arithmetic in their
float32 variants; ``batchnorm.normalize`` and ``batchnorm.input_grad`` compute in the arrays' dtype
only (the PTX test checks both statements). μ reaches the float32 normalize pass split in two
float32 parts, μ = hi + lo, and the pass computes ((x − hi) − lo), so a float32 channel with a large
mean loses no accuracy to the rounding of μ. ``saved_mean`` holds μ rounded to the dtype. Backward
recomputes x̂ and the ReLU mask from x and the saved statistics: x − μ in the dtype, g and
g·(x − μ) summed in float64 (the product of two widened float32 values is exact), and
dγ = invstd·Σg·(x − μ). For a pre-activation within rounding of 0 the mask may differ from the
forward's sign; either is a valid subgradient of the ReLU. The kernels compile with NVVM's fma=0
(``_jit.rounding_as_written``), so every product rounds as written; results can still differ from
the CPU backend's in the last bit, the sums being merged in another order.

Nothing is synchronized with or copied to the host; scratch (partials, coefficients) comes from
per-stream workspaces (``_arrays.workspace``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64, types

from ._arrays import dtype_of, fill, flat, shape_of, stream_of, workspace
from ._jit import BLOCKS_PER_SM, SIMULATOR, THREADS, blocks_for, kernel, multiprocessors

__all__ = ["batchnorm_backward", "batchnorm_forward"]

BN_THREADS = 64 if SIMULATOR else 256  # threads per reduction block (TX·TY), a multiple of 32
_BN_WARPS = BN_THREADS // 32
FINAL_WARPS = 2 if SIMULATOR else 4  # channels (one warp each) per finalize block
MIN_PER_THREAD = 2 if SIMULATOR else 16  # fewest values per thread before a channel is split further
_FULL_MASK = 0xFFFFFFFF
_F64 = "per-channel statistics are accumulated and derived in float64, also for float32 input"


# ---------------------------------------------------------------------------------------------
# merges


@cuda.jit(device=True)
def _chan(na, ma, qa, nb, mb, qb):
    """Chan's merge of (count, mean, M2) pairs; an empty side returns the other unchanged."""
    if nb == 0:
        return na, ma, qa
    if na == 0:
        return nb, mb, qb
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), qa + qb + delta * delta * (na * nb / n)


@cuda.jit(device=True)
def _warp_merge(n, mean, m2, stop):
    """Chan-merge (n, mean, M2) down a warp's shuffle tree with offsets 16, 8, …, ``stop``: lanes
    0 … stop − 1 end with the merge of the lanes ≡ their own modulo ``stop``. All lanes call it."""
    offset = 16
    while offset >= stop:
        n2 = cuda.shfl_down_sync(_FULL_MASK, n, offset)
        mean2 = cuda.shfl_down_sync(_FULL_MASK, mean, offset)
        m22 = cuda.shfl_down_sync(_FULL_MASK, m2, offset)
        n, mean, m2 = _chan(n, mean, m2, n2, mean2, m22)
        offset //= 2
    return n, mean, m2


@cuda.jit(device=True)
def _warp_sums(a, b, stop):
    """Σa and Σb down a warp's shuffle tree with offsets 16, …, ``stop`` (see _warp_merge)."""
    offset = 16
    while offset >= stop:
        a += cuda.shfl_down_sync(_FULL_MASK, a, offset)
        b += cuda.shfl_down_sync(_FULL_MASK, b, offset)
        offset //= 2
    return a, b


@cuda.jit(device=True)
def _block_merge(n, mean, m2, tx):
    """Chan-merge (n, mean, M2) over the TY threads of each of the ``tx`` channels of the block
    (thread t = x + tx·y holds channel x): warps by shuffles, then warps in order through shared
    memory. The result is valid in threads 0 … tx − 1. All threads call it."""
    shared_n = cuda.shared.array((_BN_WARPS, 32), float64)
    shared_mean = cuda.shared.array((_BN_WARPS, 32), float64)
    shared_m2 = cuda.shared.array((_BN_WARPS, 32), float64)
    t = cuda.threadIdx.x + cuda.threadIdx.y * cuda.blockDim.x
    lane = t % 32
    warp = t // 32
    n, mean, m2 = _warp_merge(n, mean, m2, tx)
    if lane < tx:
        shared_n[warp, lane] = n
        shared_mean[warp, lane] = mean
        shared_m2[warp, lane] = m2
    cuda.syncthreads()
    if t < tx:
        n = shared_n[0, t]
        mean = shared_mean[0, t]
        m2 = shared_m2[0, t]
        for w in range(1, (cuda.blockDim.x * cuda.blockDim.y) // 32):
            n, mean, m2 = _chan(n, mean, m2, shared_n[w, t], shared_mean[w, t], shared_m2[w, t])
    return n, mean, m2


@cuda.jit(device=True)
def _block_sums(a, b, tx):
    """Σa and Σb over the TY threads of each of the ``tx`` channels of the block, valid in threads
    0 … tx − 1 (shuffles, then warps in order through shared memory). All threads call it."""
    shared_a = cuda.shared.array((_BN_WARPS, 32), float64)
    shared_b = cuda.shared.array((_BN_WARPS, 32), float64)
    t = cuda.threadIdx.x + cuda.threadIdx.y * cuda.blockDim.x
    lane = t % 32
    warp = t // 32
    a, b = _warp_sums(a, b, tx)
    if lane < tx:
        shared_a[warp, lane] = a
        shared_b[warp, lane] = b
    cuda.syncthreads()
    if t < tx:
        a = shared_a[0, t]
        b = shared_b[0, t]
        for w in range(1, (cuda.blockDim.x * cuda.blockDim.y) // 32):
            a += shared_a[w, t]
            b += shared_b[w, t]
    return a, b


@cuda.jit(device=True)
def _split_count(s, m, splits):
    """How many of a channel's m values split s holds."""
    return float64((s + 1) * m // splits - s * m // splits)


# ---------------------------------------------------------------------------------------------
# forward


def _partial_signature(dt):
    part = types.float64[:, ::1]
    return types.void(dt[::1], types.int64, types.int64, types.int64, types.int64, part, part)


@kernel(_partial_signature, float64=_F64)
def _stats_partial(x, channels, inner, m, splits, part_mean, part_m2):
    """Block (channel group, split s): mean and M2 of each of its TX channels over the split's
    values e ∈ [s·m/S, (s + 1)·m/S), written to part_mean[s, c] and part_m2[s, c] (float64)."""
    tx = cuda.blockDim.x
    ty = cuda.blockDim.y
    c = cuda.blockIdx.x * tx + cuda.threadIdx.x
    s = cuda.blockIdx.y
    e = s * m // splits + cuda.threadIdx.y
    e1 = (s + 1) * m // splits
    count = 0
    shift = 0.0
    sd = 0.0
    sq = 0.0
    if c < channels and e < e1:
        o = e // inner
        i = e - o * inner
        a = (o * channels + c) * inner + i
        rows = ty // inner
        di = ty - rows * inner
        step = rows * channels * inner + di
        wrap = channels * inner - inner
        shift = float64(x[a])
        while e < e1:
            d = float64(x[a]) - shift
            sd += d
            sq += d * d
            count += 1
            e += ty
            i += di
            a += step
            if i >= inner:
                i -= inner
                a += wrap
    n = float64(count)
    mean = 0.0
    m2 = 0.0
    if count > 0:
        mean = shift + sd / n
        m2 = max(sq - sd * sd / n, 0.0)
    n, mean, m2 = _block_merge(n, mean, m2, tx)
    if cuda.threadIdx.y == 0 and c < channels:
        part_mean[s, c] = mean
        part_m2[s, c] = m2


@cuda.jit(device=True)
def _store_coefficients(c, mean, invstd, weight, has_weight, bias, has_bias, saved_mean,
                        saved_invstd, coef):
    """saved μ and invstd (rounded to the dtype) and the normalize pass's coefficients in the
    dtype: coef[0] = hi, coef[1] = lo (μ = hi + lo), coef[2] = γ·invstd, coef[3] = β."""
    saved_mean[c] = mean
    saved_invstd[c] = invstd
    coef[0, c] = mean
    coef[1, c] = mean - float64(coef[0, c])  # what rounding μ to the dtype lost
    if has_weight:
        coef[2, c] = weight[c] * saved_invstd[c]  # one rounding, as backward's mask computes it
    else:
        coef[2, c] = saved_invstd[c]
    if has_bias:
        coef[3, c] = bias[c]
    else:
        coef[3, c] = 0


def _finalize_signature(dt):
    part = types.float64[:, ::1]
    vector = dt[::1]
    return types.void(part, part, types.int64, types.int64, types.float64, types.float64,
                      types.boolean, vector, vector, vector, types.boolean, vector, types.boolean,
                      vector, vector, dt[:, ::1])


@kernel(_finalize_signature, float64=_F64)
def _stats_finalize(part_mean, part_m2, m, splits, eps, momentum, update_running, running_mean,
                    running_var, weight, has_weight, bias, has_bias, saved_mean, saved_invstd, coef):
    """One warp per channel: merge the S partials (Chan), then μ, invstd = 1/√(M2/m + δ), the
    running statistics (running_mean ← (1 − α)·running_mean + α·μ, running_var ← (1 − α)·running_var
    + α·M2/(m − 1)), the saved statistics and the normalize coefficients."""
    channels = saved_mean.shape[0]
    lane = cuda.threadIdx.x
    c = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    n = 0.0
    mean = 0.0
    m2 = 0.0
    if c < channels:
        for s in range(lane, splits, 32):
            n, mean, m2 = _chan(n, mean, m2, _split_count(s, m, splits), part_mean[s, c],
                                part_m2[s, c])
    n, mean, m2 = _warp_merge(n, mean, m2, 1)
    if lane == 0 and c < channels:
        invstd = 1.0 / math.sqrt(m2 / n + eps)
        if update_running:
            running_mean[c] = (1.0 - momentum) * float64(running_mean[c]) + momentum * mean
            running_var[c] = (1.0 - momentum) * float64(running_var[c]) + momentum * (m2 / (n - 1.0))
        _store_coefficients(c, mean, invstd, weight, has_weight, bias, has_bias, saved_mean,
                            saved_invstd, coef)


def _eval_signature(dt):
    vector = dt[::1]
    return types.void(vector, vector, types.float64, vector, types.boolean, vector, types.boolean,
                      vector, vector, dt[:, ::1])


@kernel(_eval_signature, float64=_F64)
def _eval_coefficients(running_mean, running_var, eps, weight, has_weight, bias, has_bias,
                       saved_mean, saved_invstd, coef):
    """Eval mode, per channel: μ = running_mean, invstd = 1/√(running_var + δ) (float64), the saved
    statistics and the normalize coefficients."""
    for c in range(cuda.grid(1), saved_mean.shape[0], cuda.gridsize(1)):
        invstd = 1.0 / math.sqrt(float64(running_var[c]) + eps)
        _store_coefficients(c, float64(running_mean[c]), invstd, weight, has_weight, bias, has_bias,
                            saved_mean, saved_invstd, coef)


@kernel(lambda dt: types.void(dt[::1], dt[:, ::1], types.int64, types.int64, types.boolean, dt[::1]))
def _normalize(x, coef, channels, inner, relu, y):
    """y = ((x − hi) − lo)·(γ·invstd) + β, then max(y, 0) with relu (NaN stays NaN); grid-stride
    over the flat elements, the channel tracked by increments. In the dtype only."""
    total = x.shape[0]
    e = cuda.grid(1)
    if e >= total:
        return
    step = cuda.gridsize(1)
    row = e // inner
    i = e - row * inner
    c = row % channels
    step_rows = step // inner
    di = step - step_rows * inner
    dc = step_rows % channels
    while e < total:
        v = ((x[e] - coef[0, c]) - coef[1, c]) * coef[2, c] + coef[3, c]
        if relu and v < 0:
            y[e] = 0
        else:
            y[e] = v
        e += step
        i += di
        c += dc
        if i >= inner:
            i -= inner
            c += 1
        if c >= channels:
            c -= channels


# ---------------------------------------------------------------------------------------------
# backward


def _grad_partial_signature(dt):
    vector = dt[::1]
    part = types.float64[:, ::1]
    return types.void(vector, vector, vector, vector, vector, types.boolean, vector, types.boolean,
                      types.boolean, types.int64, types.int64, types.int64, part, part)


@kernel(_grad_partial_signature, float64=_F64)
def _grad_partial(dy, x, saved_mean, saved_invstd, weight, has_weight, bias, has_bias, relu, inner,
                  m, splits, part_g, part_gx):
    """Block (channel group, split s): Σg and Σg·(x − μ) (float64) of each of its TX channels over
    the split's values, g = dy masked by (x − μ)·γ·invstd + β > 0 with relu."""
    channels = saved_mean.shape[0]
    tx = cuda.blockDim.x
    ty = cuda.blockDim.y
    c = cuda.blockIdx.x * tx + cuda.threadIdx.x
    s = cuda.blockIdx.y
    e = s * m // splits + cuda.threadIdx.y
    e1 = (s + 1) * m // splits
    sg = 0.0
    sgx = 0.0
    if c < channels and e < e1:
        zero = x.dtype.type(0)
        mean = saved_mean[c]
        scale = weight[c] * saved_invstd[c] if has_weight else saved_invstd[c]
        shift = bias[c] if has_bias else zero
        o = e // inner
        i = e - o * inner
        a = (o * channels + c) * inner + i
        rows = ty // inner
        di = ty - rows * inner
        step = rows * channels * inner + di
        wrap = channels * inner - inner
        while e < e1:
            xc = x[a] - mean
            g = dy[a]
            if relu and not xc * scale + shift > 0:
                g = zero
            g64 = float64(g)
            sg += g64
            sgx += g64 * float64(xc)
            e += ty
            i += di
            a += step
            if i >= inner:
                i -= inner
                a += wrap
    sg, sgx = _block_sums(sg, sgx, tx)
    if cuda.threadIdx.y == 0 and c < channels:
        part_g[s, c] = sg
        part_gx[s, c] = sgx


def _grad_finalize_signature(dt):
    vector = dt[::1]
    part = types.float64[:, ::1]
    return types.void(part, part, types.int64, types.int64, types.boolean, vector, vector, vector,
                      types.boolean, vector, types.boolean, vector, vector, dt[:, ::1])


@kernel(_grad_finalize_signature, float64=_F64)
def _grad_finalize(part_g, part_gx, m, splits, training, saved_mean, saved_invstd, weight,
                   has_weight, bias, has_bias, dweight, dbias, coef):
    """One warp per channel: Σg and Σg·(x − μ) from the S partials, dβ = Σg, dγ = invstd·Σg·(x − μ),
    and the input-gradient coefficients in the dtype: coef[0] = μ, coef[1] = k1 = γ·invstd,
    coef[2] = β, coef[3] = k2 = −k1·invstd·dγ/m, coef[4] = k3 = −k1·dβ/m (k2 = k3 = 0 unless
    training)."""
    channels = saved_mean.shape[0]
    lane = cuda.threadIdx.x
    c = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    sg = 0.0
    sgx = 0.0
    if c < channels:
        for s in range(lane, splits, 32):
            sg += part_g[s, c]
            sgx += part_gx[s, c]
    sg, sgx = _warp_sums(sg, sgx, 1)
    if lane == 0 and c < channels:
        invstd = float64(saved_invstd[c])
        dgamma = invstd * sgx
        dbias[c] = sg
        dweight[c] = dgamma
        coef[0, c] = saved_mean[c]
        if has_weight:
            coef[1, c] = weight[c] * saved_invstd[c]
        else:
            coef[1, c] = saved_invstd[c]
        if has_bias:
            coef[2, c] = bias[c]
        else:
            coef[2, c] = 0
        k1 = float64(coef[1, c])
        if training:
            coef[3, c] = -k1 * invstd * dgamma / m
            coef[4, c] = -k1 * sg / m
        else:
            coef[3, c] = 0
            coef[4, c] = 0


@kernel(lambda dt: types.void(dt[::1], dt[::1], dt[:, ::1], types.int64, types.int64, types.boolean,
                              dt[::1]))
def _input_grad(dy, x, coef, channels, inner, relu, dx):
    """dx = k1·g + k2·(x − μ) + k3, g = dy masked by (x − μ)·k1 + β > 0 with relu; grid-stride over
    the flat elements, the channel tracked by increments. In the dtype only."""
    total = x.shape[0]
    e = cuda.grid(1)
    if e >= total:
        return
    zero = x.dtype.type(0)
    step = cuda.gridsize(1)
    row = e // inner
    i = e - row * inner
    c = row % channels
    step_rows = step // inner
    di = step - step_rows * inner
    dc = step_rows % channels
    while e < total:
        xc = x[e] - coef[0, c]
        k1 = coef[1, c]
        g = dy[e]
        if relu and not xc * k1 + coef[2, c] > 0:
            g = zero
        dx[e] = k1 * g + coef[3, c] * xc + coef[4, c]
        e += step
        i += di
        c += dc
        if i >= inner:
            i -= inner
            c += 1
        if c >= channels:
            c -= channels


# ---------------------------------------------------------------------------------------------
# host side: geometry and launches


def _layout(shape, channel_axis):
    """(outer, C, inner) of x viewed around its channel axis."""
    outer = math.prod(shape[:channel_axis])
    inner = math.prod(shape[channel_axis + 1:])
    return outer, shape[channel_axis], inner


def _reduction_grid(channels, inner, m):
    """(grid, block, splits) of a ``*_partial`` launch: TX channels × TY threads per block, S
    splits per channel (see the module docstring)."""
    tx = 1
    if inner == 1:
        while tx < min(channels, 32):
            tx *= 2
    ty = BN_THREADS // tx
    groups = -(-channels // tx)
    target = 3 if SIMULATOR else BLOCKS_PER_SM * multiprocessors()
    splits = max(1, min(-(-m // (ty * MIN_PER_THREAD)), -(-target // groups), 65535))
    return (groups, splits), (tx, ty), splits


def _vector(array, dummy):
    """(flat view, given) of an optional per-channel vector; ``dummy`` stands in for None."""
    return (dummy, False) if array is None else (flat(array), True)


def batchnorm_forward(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                      training, momentum, eps, channel_axis, relu):
    """Batch normalization forward (see the module docstring and ``fastopt.batchnorm``)."""
    stream = stream_of(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd)
    forward_on(stream, x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd,
               training=training, momentum=momentum, eps=eps, channel_axis=channel_axis, relu=relu)


def forward_on(stream, x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
               training, momentum, eps, channel_axis, relu):
    """``batchnorm_forward``'s launches on ``stream`` (chosen by the caller: ``bn_lowp`` passes
    float32 scratch for x and y and launches on the stream of the caller's arrays)."""
    dtype = dtype_of(x)
    outer, channels, inner = _layout(shape_of(x), channel_axis)
    if channels == 0:
        return
    m = outer * inner
    mean_out = flat(saved_mean)
    invstd_out = flat(saved_invstd)
    if training and m == 0:  # an empty batch: nothing to normalize, statistics undefined
        fill(saved_mean, math.nan)
        fill(saved_invstd, math.nan)
        return
    weight_view, has_weight = _vector(weight, invstd_out)
    bias_view, has_bias = _vector(bias, invstd_out)
    coef = workspace("bn_forward_coef", (4, channels), dtype, stream)
    if training:
        grid, block, splits = _reduction_grid(channels, inner, m)
        part_mean = workspace("bn_part_a", (splits, channels), np.float64, stream)
        part_m2 = workspace("bn_part_b", (splits, channels), np.float64, stream)
        _stats_partial[dtype][grid, block, stream](flat(x), channels, inner, m, splits, part_mean,
                                                   part_m2)
        update = running_mean is not None
        rm_view = flat(running_mean) if update else mean_out
        rv_view = flat(running_var) if update else invstd_out
        _stats_finalize[dtype][-(-channels // FINAL_WARPS), (32, FINAL_WARPS), stream](
            part_mean, part_m2, m, splits, float(eps), float(momentum), update, rm_view, rv_view,
            weight_view, has_weight, bias_view, has_bias, mean_out, invstd_out, coef)
    else:
        _eval_coefficients[dtype][blocks_for(channels), THREADS, stream](
            flat(running_mean), flat(running_var), float(eps), weight_view, has_weight, bias_view,
            has_bias, mean_out, invstd_out, coef)
    if m == 0:
        return
    _normalize[dtype][blocks_for(m * channels), THREADS, stream](flat(x), coef, channels, inner,
                                                                 bool(relu), flat(y))


def batchnorm_backward(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                       training, channel_axis, relu):
    """Batch normalization backward (see the module docstring and ``fastopt.batchnorm``)."""
    stream = stream_of(x, dy, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias)
    backward_on(stream, dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias,
                training=training, channel_axis=channel_axis, relu=relu)


def backward_on(stream, dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                training, channel_axis, relu):
    """``batchnorm_backward``'s launches on ``stream`` (see ``forward_on``)."""
    dtype = dtype_of(x)
    outer, channels, inner = _layout(shape_of(x), channel_axis)
    if channels == 0:
        return
    m = outer * inner
    if m == 0:
        fill(dweight, 0.0)
        fill(dbias, 0.0)
        return
    mean_view = flat(saved_mean)
    invstd_view = flat(saved_invstd)
    weight_view, has_weight = _vector(weight, invstd_view)
    bias_view, has_bias = _vector(bias, invstd_view)
    x_view = flat(x)
    dy_view = flat(dy)
    grid, block, splits = _reduction_grid(channels, inner, m)
    part_g = workspace("bn_part_a", (splits, channels), np.float64, stream)
    part_gx = workspace("bn_part_b", (splits, channels), np.float64, stream)
    _grad_partial[dtype][grid, block, stream](dy_view, x_view, mean_view, invstd_view, weight_view,
                                              has_weight, bias_view, has_bias, bool(relu), inner, m,
                                              splits, part_g, part_gx)
    coef = workspace("bn_backward_coef", (5, channels), dtype, stream)
    _grad_finalize[dtype][-(-channels // FINAL_WARPS), (32, FINAL_WARPS), stream](
        part_g, part_gx, m, splits, bool(training), mean_view, invstd_view, weight_view, has_weight,
        bias_view, has_bias, flat(dweight), flat(dbias), coef)
    _input_grad[dtype][blocks_for(m * channels), THREADS, stream](dy_view, x_view, coef, channels,
                                                                  inner, bool(relu), flat(dx))
