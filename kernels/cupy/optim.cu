// Optimizer updates of the "cupy" backend: one fused pass per step, the equations of
// docs/algorithms.md in its notation (θ param, g grad, ε lr, λ weight_decay, δ eps, α momentum,
// ρ rho, t step).
//
// Each update is a struct of its per-step scalars, all of the arrays' type T, declared in the
// order the host packs them (_sources.UPDATES; the generated layout checks compare), with
//
//     static constexpr int states;                       // state arrays it reads and writes
//     void operator()(T& p, T g, T* s) const;            // one element: θ, g, the states
//
// The variants are those of the CPU backend (kernels/numba_cpu/optim.py), one per state set,
// with the same scalars and the same order of operations; the host picks the variant and computes
// the scalars once per step in float64, rounded to T.
//
// Around every update the training-step extras of docs/backends.md, per element:
//
//     g ← g·grad_mul                      (grad_mul a host scalar, or *grad_mul_ptr when not null)
//     g ← clamp(g, −grad_clip, grad_clip) (NaN passes through: both comparisons are false)
//     θ, state ← update(θ, g, state)      (L2 weight decay uses this g)
//     θ̂ ← θ̂ + w·(θ − θ̂)                  (when an average array is given; θ the new parameter)
//
// With the defaults (grad_mul 1, grad_clip ∞, no average) this is the plain update bit for bit:
// g·1 = g and the clamp with ∞ is the identity.
//
// Kernels:
//     update<Op, W>      one tensor; W = 1: element by element; W = 4 (float) / 2 (double): 16-byte
//                        vector loads and stores for the first ⌊n/W⌋·W elements and a scalar tail
//                        (the host picks W = 4/2 only when every pointer is 16-byte aligned)
//     multi_update<Op>   a list of tensors in one launch (TensorList, common.cuh), vectorized per
//                        tensor where its pointers are aligned
// Both are grid-stride loops. Memory traffic per element: θ, g and the k states read, θ and the
// k states written, plus θ̂ read and written with an average.

namespace fo {

// g + λθ, the gradient of the L2-penalized objective; g itself when λ = 0, so that λ = 0 never
// turns an infinite θ into NaN.
template <typename T>
__device__ __forceinline__ T l2(T g, T p, T weight_decay) {
    return weight_decay != T(0) ? g + weight_decay * p : g;
}

// max(a, b) with NaN propagating from either argument, as numpy.maximum.
template <typename T>
__device__ __forceinline__ T max_nan(T a, T b) {
    return (a > b || a != a) ? a : b;
}

// ---------------------------------------------------------------------------------------------
// SGD

// α = 0, both conventions:  g ← g + λθ;  θ ← θ − εg
template <typename T> struct Sgd {
    typedef T value_type;
    static constexpr int states = 0;
    T lr, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        p = p - lr * g;
    }
};

// momentum, both conventions through c and k:  v ← αv + c·g;  θ ← θ + k·v
//   textbook (c = −ε, k = 1): v ← αv − εg; θ ← θ + v      torch (c = 1, k = −ε): b ← αb + g; θ ← θ − εb
template <typename T> struct SgdMomentum {
    typedef T value_type;
    static constexpr int states = 1;  // velocity
    T momentum, c, k, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T v = momentum * s[0] + c * g;
        s[0] = v;
        p = p + k * v;
    }
};

// Nesterov, textbook (look-ahead reparametrization):  v ← αv − εg;  θ ← θ + αv − εg
template <typename T> struct SgdNesterov {
    typedef T value_type;
    static constexpr int states = 1;  // velocity
    T lr, momentum, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T step = lr * g;
        const T v = momentum * s[0] - step;
        s[0] = v;
        p = p + momentum * v - step;
    }
};

// Nesterov, torch:  b ← αb + g;  θ ← θ − ε(g + αb)
template <typename T> struct SgdNesterovTorch {
    typedef T value_type;
    static constexpr int states = 1;  // velocity (b)
    T lr, momentum, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T b = momentum * s[0] + g;
        s[0] = b;
        p = p - lr * (g + momentum * b);
    }
};

// ---------------------------------------------------------------------------------------------
// AdaGrad:  r ← r + g⊙g;  θ ← θ − εg / (δ + √r)

template <typename T> struct Adagrad {
    typedef T value_type;
    static constexpr int states = 1;  // accumulator
    T lr, eps, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T r = s[0] + g * g;
        s[0] = r;
        p = p - lr * g / (eps + sqrt(r));
    }
};

// ---------------------------------------------------------------------------------------------
// RMSProp. d = √(δ_in + r) + δ_out (centered: √(δ_in + r − s⊙s) + δ_out): textbook δ_in = δ,
// δ_out = 0; torch δ_in = 0, δ_out = δ. Adding the zero is exact.

// α = 0:  r ← ρr + (1 − ρ)g⊙g;  θ ← θ − εg/d
template <typename T> struct Rmsprop {
    typedef T value_type;
    static constexpr int states = 1;  // square_avg
    T lr, rho, one_minus_rho, eps_in, eps_out, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T r = rho * s[0] + one_minus_rho * g * g;
        s[0] = r;
        const T d = sqrt(eps_in + r) + eps_out;
        p = p - lr * g / d;
    }
};

// centered, α = 0:  r ← ρr + (1 − ρ)g⊙g;  s ← ρs + (1 − ρ)g;  θ ← θ − εg/d
template <typename T> struct RmspropCentered {
    typedef T value_type;
    static constexpr int states = 2;  // square_avg, grad_avg
    T lr, rho, one_minus_rho, eps_in, eps_out, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T r = rho * s[0] + one_minus_rho * g * g;
        const T a = rho * s[1] + one_minus_rho * g;
        s[0] = r;
        s[1] = a;
        const T d = sqrt(eps_in + r - a * a) + eps_out;
        p = p - lr * g / d;
    }
};

// momentum, both conventions through c and k:  v ← αv + c·g/d;  θ ← θ + k·v
//   textbook (c = −ε, k = 1): v ← αv − εg/d; θ ← θ + v     torch (c = 1, k = −ε): b ← αb + g/d; θ ← θ − εb
template <typename T> struct RmspropMomentum {
    typedef T value_type;
    static constexpr int states = 2;  // square_avg, velocity
    T rho, one_minus_rho, eps_in, eps_out, momentum, c, k, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T r = rho * s[0] + one_minus_rho * g * g;
        s[0] = r;
        const T d = sqrt(eps_in + r) + eps_out;
        const T v = momentum * s[1] + c * g / d;
        s[1] = v;
        p = p + k * v;
    }
};

// centered with momentum (c, k as above)
template <typename T> struct RmspropMomentumCentered {
    typedef T value_type;
    static constexpr int states = 3;  // square_avg, grad_avg, velocity
    T rho, one_minus_rho, eps_in, eps_out, momentum, c, k, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T r = rho * s[0] + one_minus_rho * g * g;
        const T a = rho * s[1] + one_minus_rho * g;
        s[0] = r;
        s[1] = a;
        const T d = sqrt(eps_in + r - a * a) + eps_out;
        const T v = momentum * s[2] + c * g / d;
        s[2] = v;
        p = p + k * v;
    }
};

// Nesterov, textbook only:  u = εg/√(δ + r);  v ← αv − u;  θ ← θ + αv − u
template <typename T> struct RmspropNesterov {
    typedef T value_type;
    static constexpr int states = 2;  // square_avg, velocity
    T lr, rho, one_minus_rho, eps, momentum, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T r = rho * s[0] + one_minus_rho * g * g;
        s[0] = r;
        const T u = lr * g / sqrt(eps + r);
        const T v = momentum * s[1] - u;
        s[1] = v;
        p = p + momentum * v - u;
    }
};

// centered Nesterov, textbook only:  u = εg/√(δ + r − s⊙s);  v ← αv − u;  θ ← θ + αv − u
template <typename T> struct RmspropNesterovCentered {
    typedef T value_type;
    static constexpr int states = 3;  // square_avg, grad_avg, velocity
    T lr, rho, one_minus_rho, eps, momentum, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T r = rho * s[0] + one_minus_rho * g * g;
        const T a = rho * s[1] + one_minus_rho * g;
        s[0] = r;
        s[1] = a;
        const T u = lr * g / sqrt(eps + r - a * a);
        const T v = momentum * s[2] - u;
        s[2] = v;
        p = p + momentum * v - u;
    }
};

// ---------------------------------------------------------------------------------------------
// AdaDelta, both conventions through c (textbook c = ε, torch c = 1):
//   r ← ρr + (1 − ρ)g⊙g;  Δ ← √(u + δ)/√(r + δ)⊙g;  θ ← θ − εΔ;  u ← ρu + (1 − ρ)(cΔ)⊙(cΔ)

template <typename T> struct Adadelta {
    typedef T value_type;
    static constexpr int states = 2;  // square_avg, acc_delta
    T lr, rho, one_minus_rho, eps, c, weight_decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        g = l2(g, p, weight_decay);
        const T r = rho * s[0] + one_minus_rho * g * g;
        s[0] = r;
        const T u = s[1];
        const T delta = sqrt(u + eps) / sqrt(r + eps) * g;
        p = p - lr * delta;
        const T w = c * delta;
        s[1] = rho * u + one_minus_rho * w * w;
    }
};

// ---------------------------------------------------------------------------------------------
// Adam / AdamW. The host passes step_size = ε/(1 − β1ᵗ) and inv_sqrt_bc2 = 1/√(1 − β2ᵗ), and
// zeroes λ (weight_decay, L2) for AdamW or decay (= ελ, decoupled) for Adam:
//   θ ← θ − ελθ (AdamW);  g ← g + λθ (Adam);  m ← β1m + (1 − β1)g;  v ← β2v + (1 − β2)g⊙g;
//   θ ← θ − step_size·m / (δ + √v·inv_sqrt_bc2)

template <typename T> struct Adam {
    typedef T value_type;
    static constexpr int states = 2;  // m, v
    T step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        if (decay != T(0)) p = p - decay * p;
        g = l2(g, p, weight_decay);
        const T m = beta1 * s[0] + one_minus_beta1 * g;
        const T v = beta2 * s[1] + one_minus_beta2 * g * g;
        s[0] = m;
        s[1] = v;
        p = p - step_size * m / (eps + sqrt(v) * inv_sqrt_bc2);
    }
};

// amsgrad: v_max ← max(v_max, v) (NaN propagates), then v_max replaces v in the last line
template <typename T> struct AdamAmsgrad {
    typedef T value_type;
    static constexpr int states = 3;  // m, v, v_max
    T step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        if (decay != T(0)) p = p - decay * p;
        g = l2(g, p, weight_decay);
        const T m = beta1 * s[0] + one_minus_beta1 * g;
        const T v = beta2 * s[1] + one_minus_beta2 * g * g;
        const T vmax = max_nan(s[2], v);
        s[0] = m;
        s[1] = v;
        s[2] = vmax;
        p = p - step_size * m / (eps + sqrt(vmax) * inv_sqrt_bc2);
    }
};

// ---------------------------------------------------------------------------------------------
// Delta-bar-delta (textbook), in this order:
//   θ ← θ − e⊙g;  e ← e + κ where δ̄⊙g > 0, e − φe where δ̄⊙g < 0;  δ̄ ← (1 − γ)g + γδ̄

template <typename T> struct DeltaBarDelta {
    typedef T value_type;
    static constexpr int states = 2;  // rates, delta_bar
    T kappa, phi, gamma, one_minus_gamma;
    __device__ __forceinline__ void operator()(T& p, T g, T* s) const {
        const T e = s[0];
        const T db = s[1];
        p = p - e * g;
        const T agreement = db * g;
        T new_e = e;
        if (agreement > T(0)) {
            new_e = e + kappa;
        } else if (agreement < T(0)) {
            new_e = e - phi * e;
        }
        s[0] = new_e;
        s[1] = one_minus_gamma * g + gamma * db;
    }
};

// ---------------------------------------------------------------------------------------------
// The fused pass

// W consecutive elements starting at element e of one tensor: load, extras + update, store.
// s[k] is the k-th state array (k < Op::states); avg may be null.
template <int W, class Op, typename T>
__device__ __forceinline__ void update_unit(const Op& op, T* __restrict__ p, const T* __restrict__ g,
                                            T* const (&s)[3], T* __restrict__ avg, const i64 e,
                                            const T mul, const T clip, const T avg_weight) {
    constexpr int S = Op::states;
    T pv[W], gv[W];
    T sv[S > 0 ? S : 1][W];
    load<W>(p + e, pv);
    load<W>(g + e, gv);
    #pragma unroll
    for (int k = 0; k < S; ++k) load<W>(s[k] + e, sv[k]);
    #pragma unroll
    for (int i = 0; i < W; ++i) {
        T gi = gv[i] * mul;
        gi = gi > clip ? clip : (gi < -clip ? -clip : gi);
        T st[S > 0 ? S : 1];
        #pragma unroll
        for (int k = 0; k < S; ++k) st[k] = sv[k][i];
        op(pv[i], gi, st);
        #pragma unroll
        for (int k = 0; k < S; ++k) sv[k][i] = st[k];
    }
    store<W>(p + e, pv);
    #pragma unroll
    for (int k = 0; k < S; ++k) store<W>(s[k] + e, sv[k]);
    if (avg != nullptr) {
        T av[W];
        load<W>(avg + e, av);
        #pragma unroll
        for (int i = 0; i < W; ++i) av[i] = av[i] + avg_weight * (pv[i] - av[i]);
        store<W>(avg + e, av);
    }
}

// One tensor of n elements: p, g, the states s0..s2 (null beyond Op::states), avg (or null).
// grad_mul is used when grad_mul_ptr is null, else *grad_mul_ptr (a device scalar of type T).
// (At least 4 blocks per SM: without it ptxas 12.9 keeps some W = 1 variants at 32-40 registers
// and spills around the IEEE division's slow path; with it none spills, ≤ 64 registers.)
template <class Op, int W>
__global__ void __launch_bounds__(FO_BLOCK, 4)
update(const Op op, typename Op::value_type* __restrict__ p, const typename Op::value_type* __restrict__ g,
       typename Op::value_type* __restrict__ s0, typename Op::value_type* __restrict__ s1,
       typename Op::value_type* __restrict__ s2, typename Op::value_type* __restrict__ avg,
       const typename Op::value_type grad_mul, const typename Op::value_type* __restrict__ grad_mul_ptr,
       const typename Op::value_type grad_clip, const typename Op::value_type avg_weight, const i64 n) {
    typedef typename Op::value_type T;
    const T mul = grad_mul_ptr != nullptr ? *grad_mul_ptr : grad_mul;
    T* const s[3] = {s0, s1, s2};
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 nvec = n / W;
    for (i64 u = j; u < nvec; u += stride) update_unit<W>(op, p, g, s, avg, u * W, mul, grad_clip, avg_weight);
    if constexpr (W > 1) {
        for (i64 e = nvec * W + j; e < n; e += stride) update_unit<1>(op, p, g, s, avg, e, mul, grad_clip, avg_weight);
    }
}

// Many tensors: slots per tensor p, g, the Op::states states, avg (null where a tensor has none).
template <class Op>
__global__ void __launch_bounds__(FO_BLOCK)
multi_update(const Op op, const TensorList<typename Op::value_type, Op::states + 3> list,
             const typename Op::value_type grad_mul, const typename Op::value_type* __restrict__ grad_mul_ptr,
             const typename Op::value_type grad_clip, const typename Op::value_type avg_weight) {
    typedef typename Op::value_type T;
    constexpr int W = Vec<T>::width;
    constexpr int S = Op::states;
    const T mul = grad_mul_ptr != nullptr ? *grad_mul_ptr : grad_mul;
    for_each_unit<W>(list, [&](const i64 t, const i64 u, const i64 nv) {
        T* p = list.ptr[t][0];
        const T* g = list.ptr[t][1];
        T* s[3] = {nullptr, nullptr, nullptr};
        #pragma unroll
        for (int k = 0; k < S; ++k) s[k] = list.ptr[t][2 + k];
        T* avg = list.ptr[t][2 + S];
        if (u < nv) {
            update_unit<W>(op, p, g, s, avg, u * W, mul, grad_clip, avg_weight);
        } else {
            update_unit<1>(op, p, g, s, avg, nv * W + (u - nv), mul, grad_clip, avg_weight);
        }
    });
}

}  // namespace fo
