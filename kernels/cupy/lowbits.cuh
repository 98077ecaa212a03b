// 16-bit storage formats of the "cupy" backend, shared by lowp.cu and convert.cu (both
// translation units include this file after common.cuh; _sources._PREREQUISITES).
//
//   Half, BFloat16     decode (exact) / encode (round to nearest even) a format's bits, INF its +Inf
//   uniform(key, i)    the counter-based uniform of kernels/numba_cpu/lowbits.py
//   stochastic<H>      stochastic rounding (lowbits.stochastic_f16 / stochastic_bf16)
//
// Bit conversions are those of kernels/numba_cpu/lowbits.py: round to nearest even by the PTX
// conversions cvt.rn.f16.f32 / cvt.rn.bf16.f32 (what __float2half_rn / __float2bfloat16_rn compile
// to; NVRTC has no cuda_fp16.h without an include path), NaN encoded as lowbits does (a quiet NaN
// with x's sign: f16 sign|0x7E00, bf16 the top 16 bits | 0x0040); decoding exact, NaN payloads
// included (cvt.f32.f16 alone would canonicalize them; seen on an H200).
// Float arithmetic only.

namespace fo {

typedef unsigned long long u64;

// ---------------------------------------------------------------------------------------------
// 16-bit formats

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    // cvt.f32.f16 returns the canonical NaN for every NaN; keep the payload, as the other backends do
    if ((h & 0x7C00u) == 0x7C00u && (h & 0x03FFu) != 0u)
        return __uint_as_float(((unsigned int)(h & 0x8000u) << 16) | 0x7F800000u | ((unsigned int)(h & 0x03FFu) << 13));
    float x;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(x) : "h"(h));
    return x;
}

__device__ __forceinline__ unsigned short f32_to_f16(float x) {
    if (x != x) return (unsigned short)(((__float_as_uint(x) >> 16) & 0x8000u) | 0x7E00u);
    unsigned short h;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(x));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float((unsigned int)h << 16);
}

__device__ __forceinline__ unsigned short f32_to_bf16(float x) {
    const unsigned int b = __float_as_uint(x);
    if (x != x) return (unsigned short)((b >> 16) | 0x0040u);
#if __CUDA_ARCH__ >= 800
    unsigned short h;
    asm("{ .reg .b16 t; cvt.rn.bf16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(x));
    return h;
#else
    return (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
#endif
}

// H: the storage format; decode/encode its bits, INF its +Inf pattern.
struct Half {
    static constexpr unsigned short INF = 0x7C00;
    static __device__ __forceinline__ float decode(unsigned short h) { return f16_to_f32(h); }
    static __device__ __forceinline__ unsigned short encode(float x) { return f32_to_f16(x); }
};

struct BFloat16 {
    static constexpr unsigned short INF = 0x7F80;
    static __device__ __forceinline__ float decode(unsigned short h) { return bf16_to_f32(h); }
    static __device__ __forceinline__ unsigned short encode(float x) { return f32_to_bf16(x); }
};

// ---------------------------------------------------------------------------------------------
// counter-based uniforms (lowbits.py): MIX the splitmix64 finalizer, γ = 0x9E3779B97F4A7C15

__device__ __forceinline__ u64 mix64(u64 z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

// u = (MIX(key + (i + 1)·γ) >> 40) · 2⁻²⁴ ∈ [0, 1), exact in float
__device__ __forceinline__ float uniform(u64 key, i64 i) {
    const u64 z = mix64(key + ((u64)i + 1ull) * 0x9E3779B97F4A7C15ull);
    return (float)(unsigned int)(z >> 40) * 5.9604644775390625e-08f;  // 2⁻²⁴
}

// Stochastic rounding (lowbits.stochastic_f16 / stochastic_bf16): d the format value nearest x
// toward zero, u⁺ the next one away from zero; u⁺ when u < (|x| − |d|)/(|u⁺| − |d|), else d; the
// fraction is 0 when d or u⁺ is Inf.
template <class H>
__device__ __forceinline__ unsigned short stochastic(float x, float u) {
    const unsigned short r = H::encode(x);
    if (x != x) return r;
    const unsigned short sign = r & 0x8000u;
    unsigned short d = r & 0x7FFFu;
    const float ax = fabsf(x);
    if (H::decode(d) > ax) d -= 1;  // RNE went up (Inf included): step back to the truncation
    const unsigned short up = d + 1;
    if (d == H::INF || up == H::INF) return sign | d;
    const float low = H::decode(d);
    return (u < (ax - low) / (H::decode(up) - low)) ? (unsigned short)(sign | up) : (unsigned short)(sign | d);
}

}  // namespace fo
