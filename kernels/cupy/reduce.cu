// Gradient reductions of the "cupy" backend (clip-by-norm, loss scaling, non-finite checks):
//
//     sumsq_partial<T>    Σ g² over a list of gradients, per block, in double (one partial per block)
//     sum_partials        the partials added up in a fixed order: sumsq, a device double
//     grad_multiplier<T>  one thread: inv_scale·min(1, max_norm/(√sumsq·inv_scale + 1e-6)) in double,
//                         rounded to T (inv_scale alone without max_norm; NaN when the factor is NaN)
//     scale_list<T>       g ← g·grad_mul in place over a list of gradients
//
// sumsq_partial and grad_multiplier compute in double by design, also for float gradients: each
// float value is widened and its square is exact in double. Sums are formed in a fixed order (each
// thread in index order, then warp shuffles and one warp over the warps, then sum_partials), so a
// result depends only on the sizes and the launch configuration, not on timing. Non-finite values
// propagate: the sum is inf or NaN exactly when some g is (or when a float64 g² overflows, as
// in the NumPy reference).

namespace fo {

template <typename T>
__global__ void __launch_bounds__(FO_BLOCK)
sumsq_partial(const TensorList<T, 1> list, double* __restrict__ partials) {
    constexpr int W = Vec<T>::width;
    double acc = 0.0;
    for_each_unit<W>(list, [&](const i64 t, const i64 u, const i64 nv) {
        const T* g = list.ptr[t][0];
        if (u < nv) {
            T v[W];
            load<W>(g + u * W, v);
            #pragma unroll
            for (int i = 0; i < W; ++i) {
                const double d = v[i];
                acc = fma(d, d, acc);
            }
        } else {
            const double d = g[nv * W + (u - nv)];
            acc = fma(d, d, acc);
        }
    });
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One block: out[0] = Σ partials[0..count).
__global__ void __launch_bounds__(FO_BLOCK)
sum_partials(const double* __restrict__ partials, const i64 count, double* __restrict__ out) {
    double acc = 0.0;
    for (i64 k = threadIdx.x; k < count; k += FO_BLOCK) acc += partials[k];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[0] = acc;
}

// One thread. sumsq is *sumsq_ptr when not null, else the host value sumsq_value.
template <typename T>
__global__ void grad_multiplier(const double* __restrict__ sumsq_ptr, const double sumsq_value,
                                const double max_norm, const double inv_scale, const int clip,
                                T* __restrict__ out) {
    const double sumsq = sumsq_ptr != nullptr ? *sumsq_ptr : sumsq_value;
    double mul = inv_scale;
    if (clip) {
        const double coef = max_norm / (sqrt(sumsq) * inv_scale + 1e-6);
        // min(1, coef) would drop a NaN; a NaN gradient gives a NaN factor, as in torch
        mul = isnan(coef) ? coef : inv_scale * (coef < 1.0 ? coef : 1.0);
    }
    out[0] = T(mul);
}

// g ← g·mul in place; mul is *mul_ptr when not null.
template <typename T>
__global__ void __launch_bounds__(FO_BLOCK)
scale_list(const TensorList<T, 1> list, const T mul_value, const T* __restrict__ mul_ptr) {
    constexpr int W = Vec<T>::width;
    const T mul = mul_ptr != nullptr ? *mul_ptr : mul_value;
    for_each_unit<W>(list, [&](const i64 t, const i64 u, const i64 nv) {
        T* g = list.ptr[t][0];
        if (u < nv) {
            T v[W];
            load<W>(g + u * W, v);
            #pragma unroll
            for (int i = 0; i < W; ++i) v[i] = v[i] * mul;
            store<W>(g + u * W, v);
        } else {
            const i64 e = nv * W + (u - nv);
            g[e] = g[e] * mul;
        }
    });
}

}  // namespace fo
