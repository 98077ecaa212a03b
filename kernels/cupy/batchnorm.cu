// Batch normalization of the "cupy" backend (docs/algorithms.md, notation of the CPU backend
// kernels/numba_cpu/batchnorm.py: x the input, μ and σ² the per-channel mean and biased
// variance, invstd = 1/√(σ² + δ), x̂ = (x − μ)·invstd, γ weight, β bias, m values per channel,
// g the incoming gradient after the optional ReLU mask):
//
//     forward   y = γx̂ + β  (then max(y, 0) with relu)
//     backward  dβ = Σg,  dγ = Σg·x̂,  dx = k1·g + k2·(x − μ) + k3
//               k1 = γ·invstd, k2 = −k1·invstd·dγ/m, k3 = −k1·dβ/m   (training; else k2 = k3 = 0)
//
// Any layout is viewed as (outer, C, inner): channel-first (inner > 1, e.g. NCHW) or
// channels-last (inner = 1, e.g. NHWC or (N, C)). Kernels, T = float or double:
//
//   statistics (training forward)
//     bn_stats_cf / bn_stats_cl        per block, the (count, mean, M2) of a chunk of one channel's
//                                      values (cf) or of a tile of channels over a chunk of rows (cl)
//     bn_finalize                      one block per channel: merges the chunks, writes saved μ and
//                                      invstd, updates the running statistics, writes the
//                                      normalize pass's per-channel coefficients
//     bn_eval_coefficients             eval forward: the same coefficients from the running statistics
//   normalize
//     bn_normalize_cf / _cl <T, W>     y = ((x − hi) − lo)·(γ·invstd) + β (μ = hi + lo), relu
//   backward
//     bn_grad_reduce_cf / _cl          per block, Σg and Σg·(x − μ) of a chunk (same chunks as the
//                                      statistics)
//     bn_grad_finalize                 one block per channel: dβ, dγ and k1, k2, k3
//     bn_input_grad_cf / _cl <T, W>    dx = k1·g + k2·(x − μ) + k3
//   fill<T>                            saved statistics of an empty batch (NaN)
//
// Grids: the host splits each channel into P chunks so that C·P (cf) or tiles·P (cl) blocks fill
// the GPU whatever the shape: many chunks per channel for a few channels with many values (e.g.
// 256×64×56×56), few for many channels with few values. A chunk is a contiguous range of the
// channel's values in (n, i) order; the threads of a block take every FO_BLOCK-th value (cf:
// consecutive threads read consecutive addresses of a row) or, channels-last, a tile of tc ≤ 32
// consecutive channels × FO_BLOCK/tc rows (a warp reads whole 32-channel row segments).
//
// Statistics: each thread loads a group of K values (16 float, 8 double) into registers, takes the
// group's corrected two-pass moments there (pass 1: b = Σv/k in T, a shift only; pass 2 in double:
// d = v − b, mean = b + Σd/k, M2 = Σd² − (Σd)²/k), and merges groups with Chan's update
// (n = na + nb, Δ = μb − μa, μ = μa + Δ·nb/n, M2 = M2a + M2b + Δ²·na·nb/n). Threads, warps
// (shuffles), blocks and chunks are merged with the same update in a fixed order. All in double
// by design, also for float input; never E[x²] − E[x]². Backward sums Σg and Σg·(x − μ) in double
// (x − μ in T, as in the elementwise pass; the product of two widened floats is exact).
// The elementwise passes compute in T. μ reaches the float normalize pass as hi + lo (two floats),
// as in the CPU backend, so a channel with a large mean loses nothing to the rounding of μ;
// saved_mean holds μ rounded to T. Backward recomputes the ReLU mask (x − μ)·(γ·invstd) + β > 0 from
// x and the saved statistics.

namespace fo {

template <typename T> struct Group { static constexpr int size = 16; };
template <> struct Group<double> { static constexpr int size = 8; };

// (count, mean, M2) of a set of values.
struct Moments {
    double n, mean, m2;

    __device__ __forceinline__ void merge(const double nb, const double mb, const double m2b) {
        if (nb == 0.0) return;
        if (n == 0.0) {
            n = nb;
            mean = mb;
            m2 = m2b;
            return;
        }
        const double total = n + nb;
        const double delta = mb - mean;
        const double r = nb / total;
        mean += delta * r;
        m2 += m2b + delta * delta * (n * r);
        n = total;
    }
    __device__ __forceinline__ void merge(const Moments& o) { merge(o.n, o.mean, o.m2); }
    __device__ __forceinline__ Moments shfl_xor(const int offset) const {
        return {__shfl_xor_sync(0xffffffffu, n, offset), __shfl_xor_sync(0xffffffffu, mean, offset),
                __shfl_xor_sync(0xffffffffu, m2, offset)};
    }
};

// Σg and Σg·(x − μ).
struct Sums2 {
    double g, gx;

    __device__ __forceinline__ void merge(const Sums2& o) {
        g += o.g;
        gx += o.gx;
    }
    __device__ __forceinline__ Sums2 shfl_xor(const int offset) const {
        return {__shfl_xor_sync(0xffffffffu, g, offset), __shfl_xor_sync(0xffffffffu, gx, offset)};
    }
};

// Merges the values of all threads with the same threadIdx.x % tc (tc a power of 2, ≤ 32) in a
// fixed order: shuffles within each warp, then the warps one after the other. The result is in
// the threads threadIdx.x < tc. Every thread of the block calls it.
template <typename S>
__device__ __forceinline__ S merge_lanes(S s, const int tc) {
    __shared__ S lanes[FO_BLOCK];
    for (int offset = 16; offset >= tc; offset >>= 1) s.merge(s.shfl_xor(offset));
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane < tc) lanes[warp * 32 + lane] = s;
    __syncthreads();
    if ((int)threadIdx.x < tc) {
        for (int w = 1; w < FO_BLOCK / 32; ++w) s.merge(lanes[w * 32 + threadIdx.x]);
    }
    return s;
}

// Merges the group v[0..cnt) into acc (corrected two-pass within the group, then Chan).
template <int K, typename T>
__device__ __forceinline__ void add_group(Moments& acc, const T (&v)[K], const int cnt) {
    T s = T(0);
    #pragma unroll
    for (int k = 0; k < K; ++k) {
        if (k < cnt) s += v[k];
    }
    T b = s / T(cnt);
    if (isinf(b)) b = v[0];  // Σv overflowed T (finite values near its maximum): shift by a value
    double sd = 0.0;
    double sq = 0.0;
    #pragma unroll
    for (int k = 0; k < K; ++k) {
        if (k < cnt) {
            const double d = double(v[k]) - double(b);
            sd += d;
            sq = fma(d, d, sq);
        }
    }
    const double nb = cnt;
    const double m2 = sq - sd * sd / nb;
    acc.merge(nb, double(b) + sd / nb, m2 < 0.0 ? 0.0 : m2);  // (NaN stays NaN)
}

// Walks the values of channel c of a channel-first (outer, C, inner) array in (n, i) order,
// FO_BLOCK values per step, without a division per value.
struct Cursor {
    i64 n, i, q, r, inner, row_stride, offset;

    __device__ __forceinline__ Cursor(const i64 e, const i64 c, const i64 C, const i64 inner_)
        : inner(inner_), row_stride(C * inner_), offset(c * inner_) {
        n = e / inner;
        i = e - n * inner;
        q = FO_BLOCK / inner;
        r = FO_BLOCK - q * inner;
    }
    __device__ __forceinline__ i64 address() const { return n * row_stride + offset + i; }
    __device__ __forceinline__ void advance() {
        n += q;
        i += r;
        if (i >= inner) {
            i -= inner;
            ++n;
        }
    }
};

// The chunk of channel-first block b: channel c, values [e0, e1) of m, thread's first value e and
// number of values.
struct ChannelFirstChunk {
    i64 c, p, e, count;

    __device__ __forceinline__ ChannelFirstChunk(const i64 m, const i64 P) {
        c = blockIdx.x / P;
        p = blockIdx.x - c * P;
        const i64 e0 = m * p / P;
        const i64 e1 = m * (p + 1) / P;
        e = e0 + threadIdx.x;
        count = e < e1 ? (e1 - e + FO_BLOCK - 1) / FO_BLOCK : 0;
        if (count == 0) e = e0;
    }
};

// The tile of channels-last block b: channels tile·tc + [0, tc), rows [n0, n1) of the chunk;
// this thread's channel c, first row n and number of rows.
struct ChannelsLastChunk {
    i64 c, p, n, count;
    int ty_count;

    __device__ __forceinline__ ChannelsLastChunk(const i64 rows, const i64 C, const int tc, const i64 tiles,
                                                 const i64 P) {
        p = blockIdx.x / tiles;
        const i64 tile = blockIdx.x - p * tiles;
        const int tx = threadIdx.x & (tc - 1);
        const int ty = threadIdx.x / tc;
        ty_count = FO_BLOCK / tc;
        c = tile * tc + tx;
        const i64 n0 = rows * p / P;
        const i64 n1 = rows * (p + 1) / P;
        n = n0 + ty;
        count = (c < C && n < n1) ? (n1 - n + ty_count - 1) / ty_count : 0;
    }
};

// ---------------------------------------------------------------------------------------------
// statistics (training forward)
//
// The reduction kernels ask for 3 blocks per SM (≤ 85 registers): enough loads in flight per SM
// to stream from memory, and ptxas 12.9 allocates them without spilling for sm_80 and sm_90.

// part is [3][P][C]: count, mean, M2 of chunk p of channel c.
template <typename T>
__global__ void __launch_bounds__(FO_BLOCK, 3)
bn_stats_cf(const T* __restrict__ x, const i64 C, const i64 inner, const i64 m, const i64 P,
            double* __restrict__ part) {
    constexpr int K = Group<T>::size;
    const ChannelFirstChunk chunk(m, P);
    Cursor cursor(chunk.e, chunk.c, C, inner);
    Moments acc = {0.0, 0.0, 0.0};
    T v[K];
    i64 left = chunk.count;
    for (; left >= K; left -= K) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            v[k] = x[cursor.address()];
            cursor.advance();
        }
        add_group<K>(acc, v, K);
    }
    if (left > 0) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            if (k < left) {
                v[k] = x[cursor.address()];
                cursor.advance();
            }
        }
        add_group<K>(acc, v, (int)left);
    }
    acc = merge_lanes(acc, 1);
    if (threadIdx.x == 0) {
        part[chunk.p * C + chunk.c] = acc.n;
        part[(P + chunk.p) * C + chunk.c] = acc.mean;
        part[(2 * P + chunk.p) * C + chunk.c] = acc.m2;
    }
}

template <typename T>
__global__ void __launch_bounds__(FO_BLOCK, 3)
bn_stats_cl(const T* __restrict__ x, const i64 rows, const i64 C, const int tc, const i64 tiles, const i64 P,
            double* __restrict__ part) {
    constexpr int K = Group<T>::size;
    const ChannelsLastChunk chunk(rows, C, tc, tiles, P);
    const i64 step = chunk.ty_count * C;
    i64 address = chunk.n * C + chunk.c;
    Moments acc = {0.0, 0.0, 0.0};
    T v[K];
    i64 left = chunk.count;
    for (; left >= K; left -= K) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            v[k] = x[address];
            address += step;
        }
        add_group<K>(acc, v, K);
    }
    if (left > 0) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            if (k < left) {
                v[k] = x[address];
                address += step;
            }
        }
        add_group<K>(acc, v, (int)left);
    }
    acc = merge_lanes(acc, tc);
    if ((int)threadIdx.x < tc && chunk.c < C) {
        part[chunk.p * C + chunk.c] = acc.n;
        part[(P + chunk.p) * C + chunk.c] = acc.mean;
        part[(2 * P + chunk.p) * C + chunk.c] = acc.m2;
    }
}

// saved μ and invstd rounded to T, and the normalize pass's coefficients (coef is [4][C]):
// hi = μ in T, lo = μ − hi, γ·invstd (as backward's mask computes it), β.
template <typename T>
__device__ __forceinline__ void forward_coefficients(const i64 c, const i64 C, const double mean, const double invstd,
                                                     const T* __restrict__ weight, const T* __restrict__ bias,
                                                     T* __restrict__ saved_mean, T* __restrict__ saved_invstd,
                                                     T* __restrict__ coef) {
    const T mean_t = T(mean);
    const T invstd_t = T(invstd);
    saved_mean[c] = mean_t;
    saved_invstd[c] = invstd_t;
    coef[c] = mean_t;
    coef[C + c] = T(mean - double(mean_t));
    coef[2 * C + c] = T((weight != nullptr ? double(weight[c]) : 1.0) * double(invstd_t));
    coef[3 * C + c] = bias != nullptr ? bias[c] : T(0);
}

// One block per channel: merge the P chunks (Chan), then σ² = M2/m, invstd = 1/√(σ² + δ);
// running_mean ← (1 − α)·running_mean + α·μ, running_var ← (1 − α)·running_var + α·M2/(m − 1)
// when running_mean is not null.
template <typename T>
__global__ void __launch_bounds__(FO_BLOCK)
bn_finalize(const double* __restrict__ part, const i64 P, const i64 C, const double eps, const double momentum,
            T* __restrict__ running_mean, T* __restrict__ running_var, const T* __restrict__ weight,
            const T* __restrict__ bias, T* __restrict__ saved_mean, T* __restrict__ saved_invstd,
            T* __restrict__ coef) {
    const i64 c = blockIdx.x;
    Moments acc = {0.0, 0.0, 0.0};
    for (i64 p = threadIdx.x; p < P; p += FO_BLOCK) {
        acc.merge(part[p * C + c], part[(P + p) * C + c], part[(2 * P + p) * C + c]);
    }
    acc = merge_lanes(acc, 1);
    if (threadIdx.x == 0) {
        const double var = acc.m2 / acc.n;
        const double invstd = 1.0 / sqrt(var + eps);
        if (running_mean != nullptr) {
            running_mean[c] = T((1.0 - momentum) * double(running_mean[c]) + momentum * acc.mean);
            running_var[c] = T((1.0 - momentum) * double(running_var[c]) + momentum * (acc.m2 / (acc.n - 1.0)));
        }
        forward_coefficients(c, C, acc.mean, invstd, weight, bias, saved_mean, saved_invstd, coef);
    }
}

// Eval forward: μ = running_mean, invstd = 1/√(running_var + δ), one thread per channel.
template <typename T>
__global__ void __launch_bounds__(FO_BLOCK)
bn_eval_coefficients(const T* __restrict__ running_mean, const T* __restrict__ running_var, const double eps,
                     const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ saved_mean,
                     T* __restrict__ saved_invstd, T* __restrict__ coef, const i64 C) {
    const i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    forward_coefficients(c, C, double(running_mean[c]), 1.0 / sqrt(double(running_var[c]) + eps), weight, bias,
                         saved_mean, saved_invstd, coef);
}

// ---------------------------------------------------------------------------------------------
// elementwise passes: grid-stride loops over units of W elements (W = 1, or the 16-byte vector
// width when every array is aligned and a unit never spans two channels). The channel of each
// unit is followed incrementally, no division per unit.

// channel-first: unit u is in channel (u / inner_units) % C.
struct ChannelFirstWalk {
    i64 c, i, di, dc, inner, C;

    __device__ __forceinline__ ChannelFirstWalk(const i64 u, const i64 stride, const i64 C_, const i64 inner_)
        : inner(inner_), C(C_) {
        const i64 row = u / inner;
        i = u - row * inner;
        c = row % C;
        const i64 q = stride / inner;
        di = stride - q * inner;
        dc = q % C;
    }
    __device__ __forceinline__ void advance() {
        i += di;
        i64 step = dc;
        if (i >= inner) {
            i -= inner;
            ++step;
        }
        c += step;
        if (c >= C) c -= C;
    }
};

// channels-last: unit u holds channels W·(u % Cu) + [0, W), Cu = C / W.
struct ChannelsLastWalk {
    i64 c, dc, Cu;

    __device__ __forceinline__ ChannelsLastWalk(const i64 u, const i64 stride, const i64 Cu_) : Cu(Cu_) {
        c = u % Cu;
        dc = stride % Cu;
    }
    __device__ __forceinline__ void advance() {
        c += dc;
        if (c >= Cu) c -= Cu;
    }
};

template <typename T>
__device__ __forceinline__ T normalized(const T v, const T hi, const T lo, const T scale, const T shift, const int relu) {
    const T t = ((v - hi) - lo) * scale + shift;
    return (relu && t < T(0)) ? T(0) : t;  // NaN stays NaN
}

template <typename T, int W>
__global__ void __launch_bounds__(FO_BLOCK)
bn_normalize_cf(const T* __restrict__ x, const T* __restrict__ coef, T* __restrict__ y, const i64 units,
                const i64 C, const i64 inner_units, const int relu) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 u0 = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (u0 >= units) return;
    ChannelFirstWalk walk(u0, stride, C, inner_units);
    for (i64 u = u0; u < units; u += stride, walk.advance()) {
        const i64 c = walk.c;
        const T hi = coef[c], lo = coef[C + c], scale = coef[2 * C + c], shift = coef[3 * C + c];
        T v[W];
        load<W>(x + u * W, v);
        #pragma unroll
        for (int i = 0; i < W; ++i) v[i] = normalized(v[i], hi, lo, scale, shift, relu);
        store<W>(y + u * W, v);
    }
}

template <typename T, int W>
__global__ void __launch_bounds__(FO_BLOCK)
bn_normalize_cl(const T* __restrict__ x, const T* __restrict__ coef, T* __restrict__ y, const i64 units,
                const i64 C, const int relu) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 u0 = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (u0 >= units) return;
    ChannelsLastWalk walk(u0, stride, C / W);
    for (i64 u = u0; u < units; u += stride, walk.advance()) {
        const i64 c0 = walk.c * W;
        T hi[W], lo[W], scale[W], shift[W], v[W];
        load<W>(coef + c0, hi);
        load<W>(coef + C + c0, lo);
        load<W>(coef + 2 * C + c0, scale);
        load<W>(coef + 3 * C + c0, shift);
        load<W>(x + u * W, v);
        #pragma unroll
        for (int i = 0; i < W; ++i) v[i] = normalized(v[i], hi[i], lo[i], scale[i], shift[i], relu);
        store<W>(y + u * W, v);
    }
}

// ---------------------------------------------------------------------------------------------
// backward

// Adds g and g·(x − μ) of cnt values; with relu, g = dy where (x − μ)·(γ·invstd) + β > 0, else 0.
template <int K, typename T>
__device__ __forceinline__ void add_grad_terms(Sums2& acc, const T (&xv)[K], const T (&gv)[K], const int cnt,
                                               const T mean, const T scale, const T shift, const int relu) {
    #pragma unroll
    for (int k = 0; k < K; ++k) {
        if (k < cnt) {
            const T xc = xv[k] - mean;
            T g = gv[k];
            if (relu) g = xc * scale + shift > T(0) ? g : T(0);
            const double gd = g;
            acc.g += gd;
            acc.gx = fma(gd, double(xc), acc.gx);
        }
    }
}

// Per channel, the mask's coefficients in T: μ, γ·invstd, β.
template <typename T>
struct MaskCoefficients {
    T mean, scale, shift;

    __device__ __forceinline__ MaskCoefficients(const i64 c, const T* __restrict__ saved_mean,
                                                const T* __restrict__ saved_invstd, const T* __restrict__ weight,
                                                const T* __restrict__ bias) {
        mean = saved_mean[c];
        scale = T((weight != nullptr ? double(weight[c]) : 1.0) * double(saved_invstd[c]));
        shift = bias != nullptr ? bias[c] : T(0);
    }
};

// part is [2][P][C]: Σg, Σg·(x − μ) of chunk p of channel c.
template <typename T>
__global__ void __launch_bounds__(FO_BLOCK, 3)
bn_grad_reduce_cf(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ saved_mean,
                  const T* __restrict__ saved_invstd, const T* __restrict__ weight, const T* __restrict__ bias,
                  const int relu, const i64 C, const i64 inner, const i64 m, const i64 P,
                  double* __restrict__ part) {
    constexpr int K = Group<T>::size;
    const ChannelFirstChunk chunk(m, P);
    const MaskCoefficients<T> mask(chunk.c, saved_mean, saved_invstd, weight, bias);
    Cursor cursor(chunk.e, chunk.c, C, inner);
    Sums2 acc = {0.0, 0.0};
    T xv[K], gv[K];
    i64 left = chunk.count;
    for (; left >= K; left -= K) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            const i64 a = cursor.address();
            xv[k] = x[a];
            gv[k] = dy[a];
            cursor.advance();
        }
        add_grad_terms<K>(acc, xv, gv, K, mask.mean, mask.scale, mask.shift, relu);
    }
    if (left > 0) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            if (k < left) {
                const i64 a = cursor.address();
                xv[k] = x[a];
                gv[k] = dy[a];
                cursor.advance();
            }
        }
        add_grad_terms<K>(acc, xv, gv, (int)left, mask.mean, mask.scale, mask.shift, relu);
    }
    acc = merge_lanes(acc, 1);
    if (threadIdx.x == 0) {
        part[chunk.p * C + chunk.c] = acc.g;
        part[(P + chunk.p) * C + chunk.c] = acc.gx;
    }
}

template <typename T>
__global__ void __launch_bounds__(FO_BLOCK, 3)
bn_grad_reduce_cl(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ saved_mean,
                  const T* __restrict__ saved_invstd, const T* __restrict__ weight, const T* __restrict__ bias,
                  const int relu, const i64 rows, const i64 C, const int tc, const i64 tiles, const i64 P,
                  double* __restrict__ part) {
    constexpr int K = Group<T>::size;
    const ChannelsLastChunk chunk(rows, C, tc, tiles, P);
    const i64 c = chunk.c < C ? chunk.c : C - 1;  // threads beyond the last channel load nothing
    const MaskCoefficients<T> mask(c, saved_mean, saved_invstd, weight, bias);
    const i64 step = chunk.ty_count * C;
    i64 address = chunk.n * C + chunk.c;
    Sums2 acc = {0.0, 0.0};
    T xv[K], gv[K];
    i64 left = chunk.count;
    for (; left >= K; left -= K) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            xv[k] = x[address];
            gv[k] = dy[address];
            address += step;
        }
        add_grad_terms<K>(acc, xv, gv, K, mask.mean, mask.scale, mask.shift, relu);
    }
    if (left > 0) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            if (k < left) {
                xv[k] = x[address];
                gv[k] = dy[address];
                address += step;
            }
        }
        add_grad_terms<K>(acc, xv, gv, (int)left, mask.mean, mask.scale, mask.shift, relu);
    }
    acc = merge_lanes(acc, tc);
    if ((int)threadIdx.x < tc && chunk.c < C) {
        part[chunk.p * C + chunk.c] = acc.g;
        part[(P + chunk.p) * C + chunk.c] = acc.gx;
    }
}

// One block per channel: dβ = Σg, dγ = invstd·Σg·(x − μ), and the input-gradient pass's
// coefficients (coef is [5][C]): k1 = γ·invstd in T, k2 = −k1·invstd·dγ/m, k3 = −k1·dβ/m
// (0 unless training), μ, β. m > 0.
template <typename T>
__global__ void __launch_bounds__(FO_BLOCK)
bn_grad_finalize(const double* __restrict__ part, const i64 P, const i64 C, const double m, const int training,
                 const T* __restrict__ saved_mean, const T* __restrict__ saved_invstd, const T* __restrict__ weight,
                 const T* __restrict__ bias, T* __restrict__ dweight, T* __restrict__ dbias, T* __restrict__ coef) {
    const i64 c = blockIdx.x;
    Sums2 acc = {0.0, 0.0};
    for (i64 p = threadIdx.x; p < P; p += FO_BLOCK) {
        acc.g += part[p * C + c];
        acc.gx += part[(P + p) * C + c];
    }
    acc = merge_lanes(acc, 1);
    if (threadIdx.x == 0) {
        const double invstd = saved_invstd[c];
        const double sum_g = acc.g;
        const double sum_g_xhat = invstd * acc.gx;
        dbias[c] = T(sum_g);
        dweight[c] = T(sum_g_xhat);
        const T k1 = T((weight != nullptr ? double(weight[c]) : 1.0) * invstd);
        const double k1d = k1;
        coef[c] = k1;
        coef[C + c] = training ? T(-k1d * invstd * sum_g_xhat / m) : T(0);
        coef[2 * C + c] = training ? T(-k1d * sum_g / m) : T(0);
        coef[3 * C + c] = saved_mean[c];
        coef[4 * C + c] = bias != nullptr ? bias[c] : T(0);
    }
}

template <typename T>
__device__ __forceinline__ T input_grad(const T x, T g, const T k1, const T k2, const T k3, const T mean,
                                        const T shift, const int relu) {
    const T xc = x - mean;
    if (relu) g = xc * k1 + shift > T(0) ? g : T(0);  // k1 = γ·invstd, the mask's scale
    return k1 * g + k2 * xc + k3;
}

template <typename T, int W>
__global__ void __launch_bounds__(FO_BLOCK)
bn_input_grad_cf(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ coef, T* __restrict__ dx,
                 const i64 units, const i64 C, const i64 inner_units, const int relu) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 u0 = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (u0 >= units) return;
    ChannelFirstWalk walk(u0, stride, C, inner_units);
    for (i64 u = u0; u < units; u += stride, walk.advance()) {
        const i64 c = walk.c;
        const T k1 = coef[c], k2 = coef[C + c], k3 = coef[2 * C + c], mean = coef[3 * C + c], shift = coef[4 * C + c];
        T xv[W], gv[W];
        load<W>(x + u * W, xv);
        load<W>(dy + u * W, gv);
        #pragma unroll
        for (int i = 0; i < W; ++i) xv[i] = input_grad(xv[i], gv[i], k1, k2, k3, mean, shift, relu);
        store<W>(dx + u * W, xv);
    }
}

template <typename T, int W>
__global__ void __launch_bounds__(FO_BLOCK)
bn_input_grad_cl(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ coef, T* __restrict__ dx,
                 const i64 units, const i64 C, const int relu) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 u0 = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (u0 >= units) return;
    ChannelsLastWalk walk(u0, stride, C / W);
    for (i64 u = u0; u < units; u += stride, walk.advance()) {
        const i64 c0 = walk.c * W;
        T k1[W], k2[W], k3[W], mean[W], shift[W], xv[W], gv[W];
        load<W>(coef + c0, k1);
        load<W>(coef + C + c0, k2);
        load<W>(coef + 2 * C + c0, k3);
        load<W>(coef + 3 * C + c0, mean);
        load<W>(coef + 4 * C + c0, shift);
        load<W>(x + u * W, xv);
        load<W>(dy + u * W, gv);
        #pragma unroll
        for (int i = 0; i < W; ++i) xv[i] = input_grad(xv[i], gv[i], k1[i], k2[i], k3[i], mean[i], shift[i], relu);
        store<W>(dx + u * W, xv);
    }
}

// p[0..n) = value
template <typename T>
__global__ void __launch_bounds__(FO_BLOCK) fill(T* __restrict__ p, const i64 n, const T value) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) p[e] = value;
}

}  // namespace fo
