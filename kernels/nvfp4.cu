// NVFP4 kernels for GPUs without FP4 tensor cores (Ampere, Hopper) and the shared helpers.
//
// Every conversion mirrors src/nvfp4/format.rs and src/nvfp4/quant.rs operation for operation
// (IEEE division, no fast math), so the GPU results are bit-exact with the CPU reference where the
// reference is exact (codes, scales, dequantized values).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;

namespace {

constexpr int kGroup = 16;        // elements per E4M3 block scale
constexpr float kE2m1Max = 6.0f;  // largest E2M1 magnitude
constexpr float kE4m3Max = 448.0f;

__device__ __forceinline__ float e2m1_decode(uint32_t code) {
    // Magnitudes of codes 0..7; bit 3 is the sign.
    const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float v = mag[code & 7];
    return (code & 8) ? -v : v;
}

__device__ __forceinline__ uint32_t e2m1_encode(float v) {
    uint32_t sign = signbit(v) ? 8u : 0u;
    float a = fabsf(v);
    uint32_t m;
    if (isnan(a)) return 0;
    // Round half to even on the code's mantissa bit (see format.rs).
    if (a <= 0.25f) m = 0;
    else if (a < 0.75f) m = 1;
    else if (a <= 1.25f) m = 2;
    else if (a < 1.75f) m = 3;
    else if (a <= 2.5f) m = 4;
    else if (a < 3.5f) m = 5;
    else if (a <= 5.0f) m = 6;
    else m = 7;
    return sign | m;
}

__device__ __forceinline__ float e4m3_decode(uint32_t bits) {
    uint32_t e = (bits >> 3) & 0xF, m = bits & 7;
    float sign = (bits & 0x80) ? -1.0f : 1.0f;
    if (e == 0xF && m == 7) return __int_as_float(0x7fc00000);
    if (e == 0) return sign * (float)m * 0.001953125f;  // m * 2^-9
    return sign * (1.0f + (float)m * 0.125f) * ldexpf(1.0f, (int)e - 7);
}

__device__ __forceinline__ uint32_t e4m3_encode(float v) {
    if (isnan(v)) return 0x7F;
    uint32_t sign = signbit(v) ? 0x80u : 0u;
    float a = fabsf(v);
    if (a >= kE4m3Max) return sign | 0x7E;
    if (a < 0.015625f) {  // below 2^-6: subnormal grid m * 2^-9
        return sign | (uint32_t)rintf(a * 512.0f);
    }
    int exp = (int)((__float_as_uint(a) >> 23) & 0xFF) - 127;
    float mant = __uint_as_float((__float_as_uint(a) & 0x7FFFFFu) | 0x3F800000u);  // [1, 2)
    int q = (int)rintf(__fsub_rn(mant, 1.0f) * 8.0f);
    int e = exp + 7;
    if (q == 8) { q = 0; e += 1; }
    uint32_t bits = ((uint32_t)e << 3) | (uint32_t)q;
    return sign | (bits < 0x7E ? bits : 0x7E);
}

// Offset of scale (r, c) in a 128x4-swizzled buffer with padded width cpad.
__device__ __forceinline__ int swizzle_offset(int r, int c, int cpad) {
    return (r / 128) * (cpad / 4) * 512 + (c / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + (c % 4);
}

// Layout 0 = trtllm (rows shuffled within groups of 32), 1 = cutlass/cudnn (rows in order).
template <int LAYOUT>
__device__ __forceinline__ int physical_row(int n) {
    if (LAYOUT == 0) return (n / 32) * 32 + (n % 4) * 8 + (n % 32) / 4;
    return n;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// ---------------------------------------------------------------------------------------------
// W4A16 GEMM: y[M, N] = alpha * x[M, K] . (e2m1 * s)[N, K]^T, weights read from the prepared
// layout and dequantized to bf16 in shared memory (exact: e2m1 * e4m3 fits bf16's 8-bit mantissa),
// bf16 tensor cores (WMMA 16x16x16) with f32 accumulation.
constexpr int BM = 64, BN = 64, BK = 32;
constexpr int PAD = 8;  // bf16 elements of row padding against shared-memory bank conflicts
constexpr int THREADS = 128;

template <int LAYOUT, typename OutT>
__device__ __forceinline__ void nvfp4_gemm_w4a16(
    const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w, const uint8_t* __restrict__ sc,
    OutT* __restrict__ y, int M, int N, int K, int row_bytes, int scale_cols, float alpha) {
    __shared__ __align__(32) __nv_bfloat16 As[BM][BK + PAD];
    __shared__ __align__(32) __nv_bfloat16 Bs[BN][BK + PAD];
    __shared__ __align__(32) float Cs[BM][BN + 4];

    const int tid = threadIdx.x, warp = tid / 32;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);

    // B loader: thread -> (row, half of the 32-wide K tile = one 16-element scale block).
    const int b_row = tid / 2, b_blk = tid % 2;
    const int n = n0 + b_row;
    const int prow = n < N ? physical_row<LAYOUT>(n) : 0;

    for (int k0 = 0; k0 < K; k0 += BK) {
        // A tile: 64 x 32 bf16, 8 elements (16 bytes) per load, two loads per thread.
#pragma unroll
        for (int it = 0; it < 2; it++) {
            int idx = tid + it * THREADS;
            int r = idx / 4, c = (idx % 4) * 8;
            int gm = m0 + r, gk = k0 + c;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (gm < M && gk < K) v = *reinterpret_cast<const uint4*>(x + (size_t)gm * K + gk);
            *reinterpret_cast<uint4*>(&As[r][c]) = v;
        }
        // B tile: 16 codes + 1 scale per thread, dequantized to bf16.
        {
            int gk = k0 + b_blk * kGroup;
            __align__(16) __nv_bfloat16 vals[kGroup];
            if (n < N && gk < K) {
                uint2 codes = *reinterpret_cast<const uint2*>(w + (size_t)prow * row_bytes + gk / 2);
                float s = e4m3_decode(sc[swizzle_offset(prow, gk / kGroup, scale_cols)]);
                uint32_t words[2] = {codes.x, codes.y};
#pragma unroll
                for (int i = 0; i < kGroup; i++) {
                    uint32_t code = (words[i / 8] >> ((i % 8) * 4)) & 0xF;
                    vals[i] = __float2bfloat16_rn(e2m1_decode(code) * s);
                }
            } else {
#pragma unroll
                for (int i = 0; i < kGroup; i++) vals[i] = __float2bfloat16_rn(0.0f);
            }
            *reinterpret_cast<uint4*>(&Bs[b_row][b_blk * kGroup]) = *reinterpret_cast<uint4*>(&vals[0]);
            *reinterpret_cast<uint4*>(&Bs[b_row][b_blk * kGroup + 8]) = *reinterpret_cast<uint4*>(&vals[8]);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], &As[wm + i * 16][kk], BK + PAD);
#pragma unroll
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(b[j], &Bs[wn + j * 16][kk], BK + PAD);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(&Cs[wm + i * 16][wn + j * 16], acc[i][j], BN + 4, wmma::mem_row_major);
    __syncthreads();
    for (int idx = tid; idx < BM * BN; idx += THREADS) {
        int r = idx / BN, c = idx % BN;
        int gm = m0 + r, gn = n0 + c;
        if (gm < M && gn < N) y[(size_t)gm * N + gn] = from_float<OutT>(Cs[r][c] * alpha);
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization (FlashInfer's rule): per 16-element block of a row,
// s = e4m3(amax / 6 * gs), code = e2m1(x / (s / gs)), gs = 1 / input_scale; codes 0 where s == 0.
// Writes low-first packed codes [M, K/2] and 128x4-swizzled scales (zero-initialised by the caller)
// when `packed` is non-null, and the block-scaled values e2m1 * s as bf16 [M, K] (exact) when `deq`
// is non-null: the latter feeds the bf16 tensor-core GEMM with alpha = input_scale * weight_scale_2.
__device__ __forceinline__ void nvfp4_quantize_act(const __nv_bfloat16* __restrict__ x, int M, int K, float input_scale,
                                   uint8_t* __restrict__ packed, uint8_t* __restrict__ scales, int scale_cols,
                                   __nv_bfloat16* __restrict__ deq) {
    int blocks_per_row = K / kGroup;
    int id = blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= M * blocks_per_row) return;
    int r = id / blocks_per_row, b = id % blocks_per_row;
    const __nv_bfloat16* src = x + (size_t)r * K + b * kGroup;
    float v[kGroup];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kGroup; i++) {
        v[i] = __bfloat162float(src[i]);
        amax = fmaxf(amax, fabsf(v[i]));
    }
    float gs = __fdiv_rn(1.0f, input_scale);
    uint32_t sbits = e4m3_encode(__fmul_rn(__fdiv_rn(amax, kE2m1Max), gs));
    float s = e4m3_decode(sbits);
    uint32_t codes[kGroup];
    if (s == 0.0f) {
#pragma unroll
        for (int i = 0; i < kGroup; i++) codes[i] = 0;
    } else {
        float step = __fdiv_rn(s, gs);
#pragma unroll
        for (int i = 0; i < kGroup; i++) codes[i] = e2m1_encode(__fdiv_rn(v[i], step));
    }
    if (packed) {
        uint8_t* dst = packed + (size_t)r * (K / 2) + b * (kGroup / 2);
#pragma unroll
        for (int j = 0; j < kGroup / 2; j++) dst[j] = (uint8_t)(codes[2 * j] | (codes[2 * j + 1] << 4));
        scales[swizzle_offset(r, b, scale_cols)] = (uint8_t)sbits;
    }
    if (deq) {
        __nv_bfloat16* dst = deq + (size_t)r * K + b * kGroup;
#pragma unroll
        for (int i = 0; i < kGroup; i++) dst[i] = __float2bfloat16_rn(e2m1_decode(codes[i]) * s);
    }
}

// Input rounding to bf16 (what the reference quantizer sees) for f32 / f16 activations.
template <typename T>
__device__ __forceinline__ void to_bf16(const T* __restrict__ src, __nv_bfloat16* __restrict__ dst, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16_rn(to_float<T>(src[i]));
}

}  // namespace

// Exported entry points, with C names so the host finds them in the fatbin.
#define GEMM(LAYOUT, LNAME, T, TNAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) nvfp4_gemm_##LNAME##_##TNAME(                   \
        const __nv_bfloat16* x, const uint8_t* w, const uint8_t* sc, T* y, int M, int N, int K,           \
        int row_bytes, int scale_cols, float alpha) {                                                     \
        nvfp4_gemm_w4a16<LAYOUT, T>(x, w, sc, y, M, N, K, row_bytes, scale_cols, alpha);                  \
    }
GEMM(0, trtllm, float, f32)
GEMM(0, trtllm, __nv_bfloat16, bf16)
GEMM(0, trtllm, __half, f16)
GEMM(1, cutlass, float, f32)
GEMM(1, cutlass, __nv_bfloat16, bf16)
GEMM(1, cutlass, __half, f16)

extern "C" __global__ void nvfp4_quantize_act_bf16(const __nv_bfloat16* x, int M, int K, float input_scale,
                                                   uint8_t* packed, uint8_t* scales, int scale_cols,
                                                   __nv_bfloat16* deq) {
    nvfp4_quantize_act(x, M, K, input_scale, packed, scales, scale_cols, deq);
}

extern "C" __global__ void f32_to_bf16(const float* src, __nv_bfloat16* dst, size_t n) { to_bf16<float>(src, dst, n); }
extern "C" __global__ void f16_to_bf16(const __half* src, __nv_bfloat16* dst, size_t n) { to_bf16<__half>(src, dst, n); }
