// E4M3 helpers shared by kernels/fp8.cu and kernels/fused.cu, so that every kernel that writes
// fp8-mode activations rounds, scales and reduces the same way (the doctor compares their bytes).
#pragma once

#include <cfloat>
#include <cuda_fp8.h>
#include <stdint.h>

namespace fp8c {

constexpr float kFp8Max = 448.f;  // largest finite E4M3 value
constexpr int kWarpSize = 32;

// f32 to E4M3: round to nearest even, saturating at +-448 (as src/nvfp4/format.rs e4m3_encode).
__device__ __forceinline__ uint8_t f_to_e4m3(float v) { return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); }

// Two values to E4M3 in one conversion (`a` in the low byte), each rounded as f_to_e4m3.
__device__ __forceinline__ uint16_t f2_to_e4m3x2(float a, float b) {
    return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

// A row's (or tensor's) scale from its amax: amax / 448, or 1 for all zeros (its codes are 0 either way).
__device__ __forceinline__ float row_scale(float amax) { return amax > 0.f ? __fdiv_rn(amax, kFp8Max) : 1.f; }

// What every quantizer multiplies by: 1 / scale rounded once, so each value costs one multiply
// instead of an IEEE division (about ten instructions, which made the row kernels that quantize
// issue-bound: docs/PERF.md, session 17). Capped at FLT_MAX: a scale below 1 / FLT_MAX (amax
// under ~1e-36) would give inf, and 0 * inf a NaN code. CPU reference: src/nvfp4/fp8.rs `inv_scale`.
__device__ __forceinline__ float inv_scale(float scale) { return fminf(__frcp_rn(scale), FLT_MAX); }

// One value's E4M3 code with the multiplier from inv_scale.
__device__ __forceinline__ uint8_t quant_e4m3(float v, float inv) { return f_to_e4m3(__fmul_rn(v, inv)); }

// Max over a block of THREADS threads; every thread gets the result.
template <int THREADS>
__device__ float block_max(float v) {
    __shared__ float partial[THREADS / kWarpSize];
    for (int o = kWarpSize / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < THREADS / kWarpSize ? partial[lane] : 0.f;
    for (int o = kWarpSize / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

}  // namespace fp8c
