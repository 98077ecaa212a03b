// Conversions between 16-bit storage formats and float32 of the "cupy" backend: the decode and
// encode passes of 16-bit batch normalization (bn_lowp.py; docs/algorithms.md, "Batch
// normalization", "16-bit inputs"), as kernels/numba_cpu/bn_lowp.py's _decode_* / _encode_*.
//
// The translation unit is  preamble + common.cuh + lowbits.cuh + convert.cu + layout checks
// (_sources.py); H is lowbits.cuh's Half or BFloat16.
//
// Kernels (grid-stride loops, one element per thread and step), T = float (the only
// instantiation; the wide type is a template argument so the name says which, and the offline
// no-.f64 check of float kernels covers them):
//
//   decode16<H, T>   out[i] ← f32(bits[i])      exact (float16 subnormals, ±0, ±Inf, NaN included)
//   encode16<H, T>   bits[i] ← rn(values[i])    round to nearest, ties to even; NaN as lowbits encodes it
//
// Float arithmetic only (no double): the conversions are PTX cvt instructions and bit operations.

namespace fo {

template <class H, typename T>
__global__ void __launch_bounds__(FO_BLOCK)
decode16(const unsigned short* __restrict__ bits, T* __restrict__ out, const i64 n) {
    static_assert(sizeof(T) == 4, "float only: the formats decode to float");
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = H::decode(bits[i]);
}

template <class H, typename T>
__global__ void __launch_bounds__(FO_BLOCK)
encode16(const T* __restrict__ values, unsigned short* __restrict__ bits, const i64 n) {
    static_assert(sizeof(T) == 4, "float only: the formats encode from float");
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) bits[i] = H::encode(values[i]);
}

}  // namespace fo
