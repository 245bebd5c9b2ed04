// The register-resident bf16 row kernels' pieces (kernels/fused.cu `*_rows`, kernels/fp8.cu
// `quant_rows_vec`): a row of c values read once as c / 8 16-byte vectors, vector i held by thread
// i % THREADS in its slot i / THREADS (NV slots per thread).
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "fp8_common.cuh"

namespace rowv {

constexpr int kVec = 8;  // bf16 per 16-byte vector

__device__ __forceinline__ void unpack8(const uint4& u, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 t = __bfloat1622float2(h[k]);
        f[2 * k] = t.x;
        f[2 * k + 1] = t.y;
    }
}

// Each value rounded to bf16 (round to nearest even, as __float2bfloat16).
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
    return u;
}

// Eight values to E4M3 codes as x * inv (inv = fp8c::inv_scale(scale), as every quantizer
// here), packed.
__device__ __forceinline__ uint2 e4m3x8(const float* f, float inv) {
    uint16_t b[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) b[k] = fp8c::f2_to_e4m3x2(__fmul_rn(f[2 * k], inv), __fmul_rn(f[2 * k + 1], inv));
    return make_uint2(b[0] | (uint32_t(b[1]) << 16), b[2] | (uint32_t(b[3]) << 16));
}

// f(j, i) for each slot j of this thread that holds a vector (vector i of the row's nv).
template <int THREADS, int NV, typename F>
__device__ __forceinline__ void each_vec(int nv, F f) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
        const int i = threadIdx.x + j * THREADS;
        if (i < nv) f(j, i);
    }
}

// This thread's vectors of `row` into v, folding op(acc, g(value)) over their values from 0, in
// slot then element order.
template <int THREADS, int NV, typename G, typename Op>
__device__ __forceinline__ float load_row(const __nv_bfloat16* __restrict__ row, int nv, uint4* v, G g, Op op) {
    const uint4* xr = reinterpret_cast<const uint4*>(row);
    float acc = 0.f;
    each_vec<THREADS, NV>(nv, [&](int j, int i) {
        float f[kVec];
        v[j] = xr[i];
        unpack8(v[j], f);
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc = op(acc, g(f[k]));
    });
    return acc;
}

}  // namespace rowv
