// Low-precision storage of the "cupy" backend: 16-bit parameters (float16, bfloat16) updated in
// float32, and optimizer updates with 8-bit block-quantized state (docs/algorithms.md,
// "Low-precision parameters", "Optimizers with 8-bit state", "Low-precision storage").
//
// The translation unit is  preamble + common.cuh + optim.cu + lowbits.cuh + generated tables +
// lowp.cu + layout checks (_sources.py): the element updates of optim.cu (its Op structs, float
// instantiations) are reused as they are; optim.cu's kernels are templates this module never
// instantiates. The 16-bit formats (Half, BFloat16), the uniforms and stochastic rounding are
// lowbits.cuh's.
//
// Kernels:
//
//   mixed_update<Op, H>     a list of 16-bit tensors (H = Half or BFloat16) in one launch; per element
//                               p ← m[i]  (master weights, when the tensor has them)  or  p ← f32(θ[i])
//                               g ← f32(g[i])·grad_mul, clamped to ±grad_clip   (g 16-bit or float32)
//                               p, state ← Op(p, g, state)                      (optim.cu, float32)
//                               m[i] ← p;  θ[i] ← rn(p)  or  sr(p, uniform(key_t, i))
//                               θ̂[i] ← θ̂[i] + w·(p − θ̂[i])                      (when θ̂ is given)
//                           as kernels/numba_cpu/mixed.py. Master weights, the average and the
//                           gradient's width are per launch / per tensor run-time choices (uniform
//                           branches), so one kernel per (Op, H).
//   mixed_sumsq_partial<H>  Σ g² of 16-bit gradients per block, in double (reduce.cu's
//                           sum_partials adds the partials)
//   state8_update<Op>       float32 θ with 8-bit states: one warp per quantization block (≤ 32·FO_LANE
//                           elements, FO_LANE a lane), as kernels/numba_cpu/state8.py:
//                               s_k = map_k[q_k,i]·a_k        dequantize
//                               g ← clamp(g·grad_mul, ±grad_clip);  θ, s ← Op(θ, g, s);  θ̂ update
//                               A_k = max |s_k| over the block (as uint32 bit patterns: NaN above Inf)
//                                     by warp shuffles
//                               a_k = A_k; q_k,i = #{j : s_k,i/a_k > t_j} (a bucket table and one
//                                     compare, in shared memory: kernels/_code_search.py); a
//                                     non-finite block:
//                                     a_k = NaN, zero codes; an all-zero block: a_k = 0, zero codes.
//                           Op is an optim.cu struct (same expressions as the CPU's 8-bit updates)
//                           or Adam8 below (the reference's Adam expression order).
//   state8_update_low<Op, H>
//                           the same with 16-bit θ (H = Half or BFloat16), the update of θ being
//                           mixed_update's:
//                               p ← m[i] or f32(θ[i]);  g ← clamp(f32(g[i])·grad_mul, ±grad_clip)
//                               p, s ← Op(p, g, s);  m[i] ← p;  θ[i] ← rn(p) or sr(p, uniform(key_t, i))
//                               θ̂[i] ← θ̂[i] + w·(p − θ̂[i]);  then the requantization above
//                           (kernels/numba_cpu/state8.py with 16-bit params). Masters, the gradient's
//                           width and the rounding are run-time choices (uniform branches), so one
//                           kernel per (Op, H). Both kernels share the body state8_blocks, which
//                           takes the parameter access (Float32Access, LowAccess<H>) as a template.
//   bf16_state_update<Op>, bf16_state_update_low<Op, H>
//                           the same updates with bfloat16 state instead of 8-bit state (float32 θ,
//                           16-bit θ as above), one thread per element, as kernels/numba_cpu/state8.py
//                           with state_dtype="bfloat16":
//                               s_k = f32(b_k[i])                             exact (a shift)
//                               g ← clamp(f32(g[i])·grad_mul, ±grad_clip);  p ← m[i] or θ[i] (decoded)
//                               p, s ← Op(p, g, s);  θ, m, θ̂ as above;  b_k[i] ← rn_bf16(s_k)
//                           (round to nearest even, NaN a quiet NaN: lowbits.cuh's f32_to_bf16).
//                           No blocks, no shared memory; the key of stochastic rounding in AuxList::aux.
//
// Float arithmetic only: no double except in mixed_sumsq_partial (by design).

namespace fo {

// ---------------------------------------------------------------------------------------------
// tensor lists with one 64-bit extra per tensor: the stochastic-rounding key (mixed) or the
// tensor's first quantization block in the launch (state8). Layout: _sources.aux_list_dtype.

template <int D> struct AuxList {
    static constexpr int capacity = (FO_LIST_BYTES - 8) / (8 * D + 16);
    void* ptr[capacity][D];
    i64 n[capacity];
    i64 aux[capacity];
    i64 count;
};

// A tensor list with two 64-bit extras per tensor (state8_update_low): aux = the tensor's first
// quantization block in the launch, key = its stochastic-rounding key. Layout:
// _sources.keyed_list_dtype.
template <int D> struct KeyedList {
    static constexpr int capacity = (FO_LIST_BYTES - 8) / (8 * D + 24);
    void* ptr[capacity][D];
    i64 n[capacity];
    i64 aux[capacity];
    i64 key[capacity];
    i64 count;
};

// f(t, i) for every element i of every tensor t, the elements of all tensors numbered
// consecutively and dealt to the grid's threads round-robin (as for_each_unit with W = 1).
template <int D, typename F>
__device__ __forceinline__ void for_each_element(const AuxList<D>& list, F&& f) {
    const i64 S = (i64)gridDim.x * blockDim.x;
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 base = 0;
    for (i64 t = 0; t < list.count; ++t) {
        const i64 n = list.n[t];
        i64 i = j - base % S;
        if (i < 0) i += S;
        for (; i < n; i += S) f(t, i);
        base += n;
    }
}

// ---------------------------------------------------------------------------------------------
// 16-bit parameters. Slots per tensor: θ (16-bit), g (16-bit or float32), master (float32 or
// null), θ̂ (float32 or null), then the Op::states float32 states; aux = the tensor's key.

template <class Op, class H>
__global__ void __launch_bounds__(FO_BLOCK)
mixed_update(const Op op, const AuxList<Op::states + 4> list, const float grad_mul,
             const float* __restrict__ grad_mul_ptr, const float grad_clip, const float avg_weight,
             const int grad32, const int stochastic_rounding) {
    constexpr int S = Op::states;
    const float mul = grad_mul_ptr != nullptr ? *grad_mul_ptr : grad_mul;
    for_each_element(list, [&](const i64 t, const i64 i) {
        unsigned short* theta = static_cast<unsigned short*>(list.ptr[t][0]);
        const void* grad = list.ptr[t][1];
        float* master = static_cast<float*>(list.ptr[t][2]);
        float* avg = static_cast<float*>(list.ptr[t][3]);
        float g = grad32 ? static_cast<const float*>(grad)[i] : H::decode(static_cast<const unsigned short*>(grad)[i]);
        g = g * mul;
        g = g > grad_clip ? grad_clip : (g < -grad_clip ? -grad_clip : g);
        float p = master != nullptr ? master[i] : H::decode(theta[i]);
        float st[S > 0 ? S : 1];
        #pragma unroll
        for (int k = 0; k < S; ++k) st[k] = static_cast<float*>(list.ptr[t][4 + k])[i];
        op(p, g, st);
        #pragma unroll
        for (int k = 0; k < S; ++k) static_cast<float*>(list.ptr[t][4 + k])[i] = st[k];
        if (master != nullptr) master[i] = p;
        theta[i] = stochastic_rounding ? stochastic<H>(p, uniform((u64)list.aux[t], i)) : H::encode(p);
        if (avg != nullptr) {
            const float a = avg[i];
            avg[i] = a + avg_weight * (p - a);
        }
    });
}

// Σ g² of 16-bit gradients: one double partial per block (each value widened: g² exact).
template <class H>
__global__ void __launch_bounds__(FO_BLOCK)
mixed_sumsq_partial(const AuxList<1> list, double* __restrict__ partials) {
    double acc = 0.0;
    for_each_element(list, [&](const i64 t, const i64 i) {
        const double d = H::decode(static_cast<const unsigned short*>(list.ptr[t][0])[i]);
        acc = fma(d, d, acc);
    });
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// ---------------------------------------------------------------------------------------------
// 8-bit state

// Adam / AdamW in the reference's expression order (kernels/numba_cpu/state8.py _adam8_update):
//   θ ← θ − ελθ (AdamW);  g ← g + λθ (Adam);  m ← β1m + (1 − β1)g;  v ← β2v + (1 − β2)g⊙g;
//   θ ← θ − ε(m/(1 − β1ᵗ)) / (δ + √(v/(1 − β2ᵗ)))      (bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ from the host)
template <typename T> struct Adam8 {
    typedef T value_type;
    static constexpr int states = 2;  // m, v
    T lr, bc1, bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        if (decay != T(0)) p = p - decay * p;
        g = l2(g, p, weight_decay);
        const T m = beta1 * s[0] + one_minus_beta1 * g;
        const T v = beta2 * s[1] + one_minus_beta2 * g * g;
        s[0] = m;
        s[1] = v;
        p = p - lr * (m / bc1) / (eps + sqrt(v / bc2));
    }
};

// The maps (row 0 unsigned, row 1 signed), their midpoints rounded down to float (+Inf as a 256th
// entry), the encode's bucket tables (kernels/_code_search.py) and the code of 0 in each map are
// generated from the quantizer's definition: fo_map8, fo_thresholds8, fo_lut8, fo_zero8
// (_sources.state8_tables).

// q = #{i : x > t_i} for |x| ≤ 1: q' of x's bucket (the sign and the top 15 bits of the rest of
// its pattern, clamped to [FO_LUT_LOW, FO_LUT_HIGH]), then one compare with t_{q'}
// (kernels/_code_search.py). lut and t: one map's bucket table and midpoints, in shared memory.
__device__ __forceinline__ int encode8(const float x, const unsigned char* lut, const float* t) {
    const unsigned int bits = __float_as_uint(x);
    const int top = (int)((bits & 0x7FFFFFFFu) >> 16);
    const int q = lut[(int)(bits >> 31) * FO_LUT_RANGE + min(max(top, FO_LUT_LOW), FO_LUT_HIGH) - FO_LUT_LOW];
    return q + (x > t[q] ? 1 : 0);
}

__device__ __forceinline__ unsigned int warp_max(unsigned int v) {
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Parameter access of the 8-bit and bfloat16-state kernels: read θᵢ and gᵢ as float, write the
// updated θᵢ. Slots 0 and 1 of a tensor: θ and g. bind(list, t, at) resolves tensor t's pointers
// once, offset to element at; grad, load and store then take an offset o from there (element
// at + o; i = at + o is passed to store for the rounding stream). Resolving once keeps the 64-bit
// address arithmetic and the list's parameter loads out of the per-element code.

// float32 θ and g
struct Float32Access {
    struct Bound {
        const float* g;
        float* theta;
    };
    template <class L> __device__ __forceinline__ Bound bind(const L& list, const i64 t, const i64 at) const {
        return {static_cast<const float*>(list.ptr[t][1]) + at, static_cast<float*>(list.ptr[t][0]) + at};
    }
    __device__ __forceinline__ float grad(const Bound& b, const int o) const { return b.g[o]; }
    __device__ __forceinline__ float load(const Bound& b, const int o) const { return b.theta[o]; }
    __device__ __forceinline__ void store(const Bound& b, const int o, const i64, const float p) const {
        b.theta[o] = p;
    }
};

// The stochastic-rounding key of tensor t: KeyedList::key (state8_update_low), AuxList::aux
// (bf16_state_update_low, whose lists have no quantization blocks).
template <int D> __device__ __forceinline__ u64 rounding_key(const KeyedList<D>& list, const i64 t) {
    return (u64)list.key[t];
}
template <int D> __device__ __forceinline__ u64 rounding_key(const AuxList<D>& list, const i64 t) {
    return (u64)list.aux[t];
}

// 16-bit θ (format H), g of θ's format or float32 (grad32), the float32 master in slot M (or null),
// θ rounded to nearest or stochastically with the tensor's key (rounding_key) and the element's
// index i.
template <class H, int M = 7> struct LowAccess {
    int grad32, stochastic_rounding;
    struct Bound {
        const float* g32;
        const unsigned short* g16;
        unsigned short* theta;
        float* master;
        u64 key;
    };
    template <class L> __device__ __forceinline__ Bound bind(const L& list, const i64 t, const i64 at) const {
        float* master = static_cast<float*>(list.ptr[t][M]);
        return {static_cast<const float*>(list.ptr[t][1]) + at, static_cast<const unsigned short*>(list.ptr[t][1]) + at,
                static_cast<unsigned short*>(list.ptr[t][0]) + at, master != nullptr ? master + at : nullptr,
                stochastic_rounding ? rounding_key(list, t) : 0};
    }
    __device__ __forceinline__ float grad(const Bound& b, const int o) const {
        return grad32 ? b.g32[o] : H::decode(b.g16[o]);
    }
    __device__ __forceinline__ float load(const Bound& b, const int o) const {
        return b.master != nullptr ? b.master[o] : H::decode(b.theta[o]);
    }
    __device__ __forceinline__ void store(const Bound& b, const int o, const i64 i, const float p) const {
        if (b.master != nullptr) b.master[o] = p;
        b.theta[o] = stochastic_rounding ? stochastic<H>(p, uniform(b.key, i)) : H::encode(p);
    }
};

// The body of both 8-bit kernels: one warp per quantization block of ≤ 32·FO_LANE elements, lane l
// holding elements l, l + 32, …, l + 32·(FO_LANE − 1) of the block (coalesced), the block's absmax
// a warp reduction (no barrier inside the loop). Each lane loads all of its elements before it
// updates any (the stores to θ could alias later loads as far as the compiler knows). Slots per
// tensor: θ, g, θ̂ (or null), codes₀, absmax₀, codes₁, absmax₁ (null when Op::states is 1)
// [, master]; aux = the tensor's first quantization block in this launch. signed_k: the map row
// of state k.
//
// Measured on an H200 (bench/RESULTS.md, "Second lease"), 8-bit Adam over 2^28 elements: a CUDA
// block per quantization block, one element a thread, 4.40 ms (23% of the copy bandwidth); this
// warp layout 4.62 ms; the binary search's table in breadth-first order 4.04 ms; the bucket-table
// encode (encode8) and pointers resolved once per block (the access structs' bind) 2.58 ms (40%).
// The kernel is bound by instructions, not memory: it keeps the reference's five IEEE divisions an
// element (m/bc1, v/bc2, the step, s/a per state).
template <class Op, class L, class A>
__device__ __forceinline__ void state8_blocks(const Op& op, const L& list, const A& access, const i64 blocks,
                                              const int block, const float grad_mul,
                                              const float* __restrict__ grad_mul_ptr, const float grad_clip,
                                              const float avg_weight, const int signed0, const int signed1) {
    constexpr int S = Op::states;
    constexpr int E = FO_LANE;
    constexpr int warps = FO_BLOCK / 32;
    static_assert(S == 1 || S == 2, "one or two 8-bit states");
    __shared__ float values[S][256];
    __shared__ float thresholds[S][256];
    __shared__ unsigned char lut[S][FO_LUT_SIZE];
    const int j = threadIdx.x;
    const int rows[2] = {signed0, signed1};
    #pragma unroll
    for (int k = 0; k < S; ++k) {
        for (int q = j; q < 256; q += FO_BLOCK) {
            values[k][q] = fo_map8[rows[k]][q];
            thresholds[k][q] = __uint_as_float(fo_thresholds8[rows[k]][q]);
        }
        for (int q = j; q < FO_LUT_SIZE; q += FO_BLOCK) lut[k][q] = fo_lut8[rows[k]][q];
    }
    __syncthreads();
    const float mul = grad_mul_ptr != nullptr ? *grad_mul_ptr : grad_mul;
    const int lane = j & 31;
    i64 t = 0;
    // b is the same for the warp's lanes: the shuffles below see all 32
    for (i64 b = (i64)blockIdx.x * warps + (j >> 5); b < blocks; b += (i64)gridDim.x * warps) {
        while (t + 1 < list.count && list.aux[t + 1] <= b) ++t;  // b only grows
        const i64 lb = b - list.aux[t];
        const i64 n = list.n[t];
        const i64 first = lb * block;
        float* avg = static_cast<float*>(list.ptr[t][2]);
        unsigned char* codes[2] = {static_cast<unsigned char*>(list.ptr[t][3]), static_cast<unsigned char*>(list.ptr[t][5])};
        float* absmax[2] = {static_cast<float*>(list.ptr[t][4]), static_cast<float*>(list.ptr[t][6])};
        float scale[S];
        #pragma unroll
        for (int k = 0; k < S; ++k) scale[k] = absmax[k][lb];
        // this lane's elements: at + 32·r for 32·r < left (at most FO_LANE of them)
        const i64 at = first + lane;
        const int left = (int)(n - first < (i64)block ? n - first : (i64)block) - lane;
        const auto bound = access.bind(list, t, at);
        unsigned char* lane_codes[S];
        #pragma unroll
        for (int k = 0; k < S; ++k) lane_codes[k] = codes[k] + at;
        float* lane_avg = avg != nullptr ? avg + at : nullptr;
        bool active[E];
        unsigned char c[S][E];
        float g[E], p[E], a[E];
        #pragma unroll
        for (int r = 0; r < E; ++r) {
            active[r] = 32 * r < left;
            if (active[r]) {
                #pragma unroll
                for (int k = 0; k < S; ++k) c[k][r] = lane_codes[k][32 * r];
                g[r] = access.grad(bound, 32 * r);
                p[r] = access.load(bound, 32 * r);
                if (lane_avg != nullptr) a[r] = lane_avg[32 * r];
            }
        }
        float s[S][E];
        unsigned int bits[S];
        #pragma unroll
        for (int k = 0; k < S; ++k) bits[k] = 0u;
        #pragma unroll
        for (int r = 0; r < E; ++r) {
            if (!active[r]) continue;
            float sr[S];
            #pragma unroll
            for (int k = 0; k < S; ++k) sr[k] = values[k][c[k][r]] * scale[k];
            float gr = g[r] * mul;
            gr = gr > grad_clip ? grad_clip : (gr < -grad_clip ? -grad_clip : gr);
            float pr = p[r];
            op(pr, gr, sr);
            access.store(bound, 32 * r, at + 32 * r, pr);
            if (lane_avg != nullptr) lane_avg[32 * r] = a[r] + avg_weight * (pr - a[r]);
            #pragma unroll
            for (int k = 0; k < S; ++k) {
                s[k][r] = sr[k];
                bits[k] = max(bits[k], __float_as_uint(sr[k]) & 0x7FFFFFFFu);
            }
        }
        #pragma unroll
        for (int k = 0; k < S; ++k) {
            const unsigned int amax = warp_max(bits[k]);
            const unsigned char zero = fo_zero8[rows[k]];
            if (amax >= 0x7F800000u || amax == 0u) {  // NaN or ±Inf in the block; or all zero
                if (lane == 0) absmax[k][lb] = amax == 0u ? 0.0f : __uint_as_float(0x7FC00000u);
                #pragma unroll
                for (int r = 0; r < E; ++r)
                    if (active[r]) lane_codes[k][32 * r] = zero;
            } else {
                const float am = __uint_as_float(amax);
                if (lane == 0) absmax[k][lb] = am;
                #pragma unroll
                for (int r = 0; r < E; ++r) {
                    if (!active[r]) continue;
                    lane_codes[k][32 * r] = (unsigned char)encode8(s[k][r] / am, lut[k], thresholds[k]);
                }
            }
        }
    }
}

// float32 θ. Slots: θ, g, θ̂, codes₀, absmax₀, codes₁, absmax₁.
template <class Op>
__global__ void __launch_bounds__(FO_BLOCK)
state8_update(const Op op, const AuxList<7> list, const i64 blocks, const int block, const float grad_mul,
              const float* __restrict__ grad_mul_ptr, const float grad_clip, const float avg_weight,
              const int signed0, const int signed1) {
    state8_blocks(op, list, Float32Access{}, blocks, block, grad_mul, grad_mul_ptr, grad_clip, avg_weight,
                  signed0, signed1);
}

// 16-bit θ of format H. Slots: θ (16-bit), g (16-bit or float32: grad32), θ̂, codes₀, absmax₀,
// codes₁, absmax₁, master (float32 or null); key = the tensor's rounding key (stochastic_rounding).
template <class Op, class H>
__global__ void __launch_bounds__(FO_BLOCK)
state8_update_low(const Op op, const KeyedList<8> list, const i64 blocks, const int block, const float grad_mul,
                  const float* __restrict__ grad_mul_ptr, const float grad_clip, const float avg_weight,
                  const int signed0, const int signed1, const int grad32, const int stochastic_rounding) {
    state8_blocks(op, list, LowAccess<H>{grad32, stochastic_rounding}, blocks, block, grad_mul, grad_mul_ptr,
                  grad_clip, avg_weight, signed0, signed1);
}

// ---------------------------------------------------------------------------------------------
// bfloat16 state: each state one bfloat16 array (uint16 bits) of θ's shape, decoded exactly, the
// same element update as the 8-bit kernels, stored rounded to nearest even (NaN: a quiet NaN with
// its sign, f32_to_bf16). One thread per element (for_each_element); no quantization blocks.
// Slots per tensor: θ, g, θ̂ (or null), s₀, s₁ (null when Op::states is 1), master (16-bit θ: float32
// or null; float32 θ: null); aux = the tensor's rounding key (16-bit θ, stochastic rounding).

template <class Op, class A>
__device__ __forceinline__ void bf16_state_elements(const Op& op, const AuxList<6>& list, const A& access,
                                                    const float grad_mul, const float* __restrict__ grad_mul_ptr,
                                                    const float grad_clip, const float avg_weight) {
    constexpr int S = Op::states;
    static_assert(S == 1 || S == 2, "one or two bfloat16 states");
    const float mul = grad_mul_ptr != nullptr ? *grad_mul_ptr : grad_mul;
    for_each_element(list, [&](const i64 t, const i64 i) {
        float s[S];
        #pragma unroll
        for (int k = 0; k < S; ++k) s[k] = bf16_to_f32(static_cast<const unsigned short*>(list.ptr[t][3 + k])[i]);
        const auto bound = access.bind(list, t, i);
        float g = access.grad(bound, 0) * mul;
        g = g > grad_clip ? grad_clip : (g < -grad_clip ? -grad_clip : g);
        float p = access.load(bound, 0);
        op(p, g, s);
        access.store(bound, 0, i, p);
        float* avg = static_cast<float*>(list.ptr[t][2]);
        if (avg != nullptr) {
            const float a = avg[i];
            avg[i] = a + avg_weight * (p - a);
        }
        #pragma unroll
        for (int k = 0; k < S; ++k) static_cast<unsigned short*>(list.ptr[t][3 + k])[i] = f32_to_bf16(s[k]);
    });
}

// float32 θ and g with bfloat16 state.
template <class Op>
__global__ void __launch_bounds__(FO_BLOCK)
bf16_state_update(const Op op, const AuxList<6> list, const float grad_mul, const float* __restrict__ grad_mul_ptr,
                  const float grad_clip, const float avg_weight) {
    bf16_state_elements(op, list, Float32Access{}, grad_mul, grad_mul_ptr, grad_clip, avg_weight);
}

// 16-bit θ of format H with bfloat16 state: g 16-bit or float32 (grad32), the master in slot 5,
// θ rounded to nearest or stochastically with the key in aux (stochastic_rounding).
template <class Op, class H>
__global__ void __launch_bounds__(FO_BLOCK)
bf16_state_update_low(const Op op, const AuxList<6> list, const float grad_mul,
                      const float* __restrict__ grad_mul_ptr, const float grad_clip, const float avg_weight,
                      const int grad32, const int stochastic_rounding) {
    bf16_state_elements(op, list, LowAccess<H, 5>{grad32, stochastic_rounding}, grad_mul, grad_mul_ptr, grad_clip,
                        avg_weight);
}

}  // namespace fo
