// Shared by every CUDA source of the "cupy" backend. The loader (_sources.py) compiles
//
//     generated preamble  +  common.cuh  +  <module>.cu  +  generated layout checks
//
// as one translation unit: the preamble defines FO_BLOCK (threads per block of every kernel) and
// FO_LIST_BYTES (the byte budget of a tensor list passed by value); the layout checks assert that
// the structs below and in the modules have the layout the host packs (see _sources.py).
//
// Numerics: compiled with --fmad=false --prec-div=true --prec-sqrt=true, so every expression
// rounds as written (no contraction into FMA unless fma() is called explicitly), like the CPU
// backend. cupy.RawModule appends -ftz=true to every compilation (_sources.CUPY_ADDED_OPTIONS), and
// that is what runs: float subnormals are flushed to zero, in the inputs and the results of float
// arithmetic (double is not affected), unlike the CPU backends and numba-cuda. Float kernels
// compute in float: every scalar arrives typed T, literals are written T(0), and sqrt is the
// overload for T.

namespace fo {

typedef long long i64;

// ---------------------------------------------------------------------------------------------
// 16-byte vectors: W elements of T moved by one 128-bit load or store.

template <typename T> struct Vec;
template <> struct Vec<float> { typedef float4 type; static constexpr int width = 4; };
template <> struct Vec<double> { typedef double2 type; static constexpr int width = 2; };

__device__ __forceinline__ void unpack(const float4& v, float (&a)[4]) { a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w; }
__device__ __forceinline__ void unpack(const double2& v, double (&a)[2]) { a[0] = v.x; a[1] = v.y; }
__device__ __forceinline__ float4 pack(const float (&a)[4]) { return make_float4(a[0], a[1], a[2], a[3]); }
__device__ __forceinline__ double2 pack(const double (&a)[2]) { return make_double2(a[0], a[1]); }

// a[0..W) = p[0..W): one 16-byte load when W is the vector width (p 16-byte aligned), else scalar.
template <int W, typename T>
__device__ __forceinline__ void load(const T* p, T (&a)[W]) {
    if constexpr (W == 1) {
        a[0] = *p;
    } else {
        static_assert(W == Vec<T>::width, "W is 1 or the 16-byte vector width");
        unpack(*reinterpret_cast<const typename Vec<T>::type*>(p), a);
    }
}

template <int W, typename T>
__device__ __forceinline__ void store(T* p, const T (&a)[W]) {
    if constexpr (W == 1) {
        *p = a[0];
    } else {
        static_assert(W == Vec<T>::width, "W is 1 or the 16-byte vector width");
        *reinterpret_cast<typename Vec<T>::type*>(p) = pack(a);
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor lists: many arrays in one kernel argument, passed by value (kernel parameters live in
// the constant bank; indexing them with a run-time tensor number reads the parameter space
// directly, no local copy). D pointers per tensor; n[t] elements; nvec[t] of them are handled as
// 16-byte vectors (0 when a pointer of tensor t is not 16-byte aligned), the rest one by one.
// The host packs the same layout as a NumPy structured scalar (see _sources.list_dtype).

template <int D> struct ListCapacity {
    static constexpr int value = (FO_LIST_BYTES - 8) / (8 * D + 16);
};

template <typename T, int D> struct TensorList {
    static constexpr int capacity = ListCapacity<D>::value;
    T* ptr[capacity][D];
    i64 n[capacity];
    i64 nvec[capacity];
    i64 count;
};

// The work units of tensor t: nvec[t] vectors of W elements, then n[t] − W·nvec[t] single
// elements. Units of all tensors are numbered consecutively (the tensors' units concatenated);
// the thread with global index j takes units j, j + S, j + 2S, … (S threads in the grid), so
// the work is spread evenly whatever the sizes, and a tensor smaller than the grid does not keep
// low-numbered blocks busy while the others idle. No per-element division: one 64-bit modulo per
// tensor per thread.
//
// f(t, u, nvec): unit u of tensor t (u < nvec: the vector at element W·u; else the element
// W·nvec + (u − nvec)).
template <int W, typename T, int D, typename F>
__device__ __forceinline__ void for_each_unit(const TensorList<T, D>& list, F&& f) {
    const i64 S = (i64)gridDim.x * blockDim.x;
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 base = 0;
    for (i64 t = 0; t < list.count; ++t) {
        const i64 nv = list.nvec[t];
        const i64 units = nv + (list.n[t] - nv * W);
        i64 u = j - base % S;
        if (u < 0) u += S;
        for (; u < units; u += S) f(t, u, nv);
        base += units;
    }
}

// ---------------------------------------------------------------------------------------------
// Block-wide sums of doubles in a fixed order (warp shuffles, then one warp over the warps'
// results), so a result does not depend on timing. Every thread of the block must call it;
// the result is valid in thread 0.

__device__ __forceinline__ double warp_sum(double v) {
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ double block_sum(double v) {
    __shared__ double warp_totals[FO_BLOCK / 32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // warp_totals may still be read by a previous call
    if (lane == 0) warp_totals[warp] = v;
    __syncthreads();
    v = lane < FO_BLOCK / 32 ? warp_totals[lane] : 0.0;
    if (warp == 0) v = warp_sum(v);
    return v;
}

}  // namespace fo
