// NVFP4 kernels of the `trtllm` variant for GPUs without FP4 tensor cores (Ampere, Hopper), the
// activation quantizer and input conversions.

#include <mma.h>

#include "nvfp4_common.cuh"

using namespace nvcuda;

namespace {
using namespace nvfp4;

// ---------------------------------------------------------------------------------------------
// W4A16 GEMM: y[M, N] = alpha * x[M, K] . (e2m1 * s)[N, K]^T with x in bf16, the weight read from
// its prepared layout and dequantized to bf16 in shared memory (exact: e2m1 * e4m3 fits bf16's
// 8-bit mantissa), bf16 tensor cores (WMMA 16x16x16) with f32 accumulation. Activations and raw
// weight bytes are double-buffered with cp.async so loads overlap dequantization and MMA.
constexpr int BM = kTileM, BN = kTileN, BK = kTileK;
constexpr int PAD = 8;  // bf16 elements of row padding against shared-memory bank conflicts
constexpr int THREADS = kTileThreads;
constexpr int LDS = BK + PAD;

template <typename OutT>
__device__ __forceinline__ void store_tile(const float* frag_smem, OutT* y, int gm0, int gn0, int M, int N,
                                           float alpha, int lane) {
    for (int i = lane; i < 256; i += 32) {
        int r = i / 16, c = i % 16;
        int gm = gm0 + r, gn = gn0 + c;
        if (gm < M && gn < N) y[(size_t)gm * N + gn] = from_float<OutT>(frag_smem[i] * alpha);
    }
}

template <int LAYOUT, typename OutT>
__device__ __forceinline__ void nvfp4_gemm_w4a16(
    const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w, const uint8_t* __restrict__ sc,
    OutT* __restrict__ y, int M, int N, int K, int row_bytes, int scale_cols, float alpha) {
    __shared__ __align__(128) __nv_bfloat16 As[2][BM * LDS];
    __shared__ __align__(128) uint8_t Braw[2][BN * BK / 2];
    __shared__ __align__(128) __nv_bfloat16 Bs[BN * LDS];
    __shared__ uint32_t lut[256];
    __shared__ __align__(32) float stage[THREADS / 32][256];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;  // 2 x 4 warps, 64 x 32 each
    lut[tid] = e2m1x2_bf16x2(tid);

    // B rows this thread copies (tid < BN) and dequantizes (row tid / 2, scale block tid % 2).
    const int copy_n = n0 + (tid % BN);
    const bool copy_ok = copy_n < N;
    const uint8_t* copy_src = w + (size_t)(copy_ok ? physical_row<LAYOUT>(copy_n) : 0) * row_bytes;
    const int dq_row = tid / 2, dq_blk = tid % 2;
    const int dq_n = n0 + dq_row;
    const int dq_prow = dq_n < N ? physical_row<LAYOUT>(dq_n) : 0;

    auto load = [&](int k0, int st) {
        load_tile_async(x, M, K, m0, k0, &As[st][0], LDS, copy_ok ? copy_src : nullptr, &Braw[st][0], x, tid);
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);

    const int ktiles = (K + BK - 1) / BK;
    load(0, 0);
    for (int kt = 0; kt < ktiles; kt++) {
        const int st = kt & 1;
        cp_async_wait_all();
        __syncthreads();  // tile kt is in place; every warp is done with tile kt - 1
        if (kt + 1 < ktiles) load((kt + 1) * BK, st ^ 1);
        {
            int kb = kt * 2 + dq_blk;  // scale column; < scale_cols for every tile read
            float s = dq_n < N && kb * kGroup < K ? e4m3_decode(sc[swizzle_offset(dq_prow, kb, scale_cols)]) : 0.0f;
            dequant_block_bf16(&Braw[st][dq_row * 16 + dq_blk * 8], s, lut, reinterpret_cast<__nv_bfloat16*>(&Bs[dq_row * LDS + dq_blk * kGroup]));
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 4; i++) wmma::load_matrix_sync(a[i], &As[st][(wm + i * 16) * LDS + kk], LDS);
#pragma unroll
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(b[j], &Bs[(wn + j * 16) * LDS + kk], LDS);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            wmma::store_matrix_sync(stage[warp], acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            store_tile<OutT>(stage[warp], y, m0 + wm + i * 16, n0 + wn + j * 16, M, N, alpha, lane);
            __syncwarp();
        }
}

// ---------------------------------------------------------------------------------------------
// Small-M path (M <= GEMV_MAX_M): memory-bound, so one warp per output column n streams that
// weight row once (8 bytes = one scale block per lane per step) and dots it with every x row.
constexpr int GEMV_MAX_M = 16;
constexpr int GEMV_WARPS = 8;

template <int LAYOUT, typename OutT>
__device__ __forceinline__ void nvfp4_gemv_w4a16(
    const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w, const uint8_t* __restrict__ sc,
    OutT* __restrict__ y, int M, int N, int K, int row_bytes, int scale_cols, float alpha) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n = blockIdx.x * GEMV_WARPS + warp;
    if (n >= N) return;
    const int p = physical_row<LAYOUT>(n);
    const uint8_t* wrow = w + (size_t)p * row_bytes;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) acc[i] = 0.0f;
    const int kb_total = K / kGroup;
    for (int kb = lane; kb < kb_total; kb += 32) {
        uint2 codes = *reinterpret_cast<const uint2*>(wrow + kb * 8);
        float s = e4m3_decode(sc[swizzle_offset(p, kb, scale_cols)]);
        float wv[kGroup];
        uint32_t words[2] = {codes.x, codes.y};
#pragma unroll
        for (int i = 0; i < kGroup; i++) wv[i] = e2m1_decode((words[i / 8] >> ((i % 8) * 4)) & 0xF) * s;
#pragma unroll
        for (int m = 0; m < GEMV_MAX_M; m++) {
            if (m < M) {
                const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)m * K + kb * kGroup);
                uint4 v0 = xr[0], v1 = xr[1];
                const __nv_bfloat162* h0 = reinterpret_cast<const __nv_bfloat162*>(&v0);
                const __nv_bfloat162* h1 = reinterpret_cast<const __nv_bfloat162*>(&v1);
                float sum = 0.0f;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    float2 a = __bfloat1622float2(h0[j]);
                    float2 b = __bfloat1622float2(h1[j]);
                    sum += a.x * wv[2 * j] + a.y * wv[2 * j + 1];
                    sum += b.x * wv[8 + 2 * j] + b.y * wv[8 + 2 * j + 1];
                }
                acc[m] += sum;
            }
        }
    }
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; m++) {
        if (m < M) {
            float v = acc[m];
#pragma unroll
            for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) y[(size_t)m * N + n] = from_float<OutT>(v * alpha);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization (FlashInfer's rule): per 16-element block of a row,
// s = e4m3(amax / 6 * gs), code = e2m1(x / (s / gs)), gs = 1 / input_scale; codes 0 where s == 0.
// Writes low-first packed codes (rows `packed_row_bytes` apart, so K can be padded) and 128x4-swizzled
// scales (both zero-initialised by the caller)
// when `packed` is non-null, and the block-scaled values e2m1 * s as bf16 [M, K] (exact) when `deq`
// is non-null: the latter feeds the bf16 tensor-core GEMM with alpha = input_scale * weight_scale_2.
__device__ __forceinline__ void nvfp4_quantize_act(const __nv_bfloat16* __restrict__ x, int M, int K, float input_scale,
                                   uint8_t* __restrict__ packed, int packed_row_bytes, uint8_t* __restrict__ scales,
                                   int scale_cols, __nv_bfloat16* __restrict__ deq) {
    int blocks_per_row = K / kGroup;
    int id = blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= M * blocks_per_row) return;
    int r = id / blocks_per_row, b = id % blocks_per_row;
    const __nv_bfloat16* src = x + (size_t)r * K + b * kGroup;
    float v[kGroup];
    float amax = 0.0f;
    // One thread per 16-value block: two 16-byte loads where the block is aligned (rows of a
    // contiguous tensor are; a view at an odd offset takes the scalar path). 16 scalar loads per
    // thread made this pass ~10x slower than its bytes (1.1 ms at 4608 x 15360 on an H200).
    union {
        uint4 u[2];
        __nv_bfloat16 h[kGroup];
    } in;
    if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
        in.u[0] = reinterpret_cast<const uint4*>(src)[0];
        in.u[1] = reinterpret_cast<const uint4*>(src)[1];
    } else {
#pragma unroll
        for (int i = 0; i < kGroup; i++) in.h[i] = src[i];
    }
#pragma unroll
    for (int i = 0; i < kGroup; i++) {
        v[i] = __bfloat162float(in.h[i]);
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
        uint8_t* dst = packed + (size_t)r * packed_row_bytes + b * (kGroup / 2);
        uint2 word = make_uint2(0, 0);  // code 2j in the low nibble of byte j
#pragma unroll
        for (int i = 0; i < kGroup; i++) {
            if (i < 8) word.x |= codes[i] << (4 * i);
            else word.y |= codes[i] << (4 * (i - 8));
        }
        if ((reinterpret_cast<uintptr_t>(dst) & 7) == 0) {
            *reinterpret_cast<uint2*>(dst) = word;
        } else {
#pragma unroll
            for (int j = 0; j < kGroup / 2; j++) dst[j] = (uint8_t)(codes[2 * j] | (codes[2 * j + 1] << 4));
        }
        scales[swizzle_offset(r, b, scale_cols)] = (uint8_t)sbits;
    }
    if (deq) {
        __nv_bfloat16* dst = deq + (size_t)r * K + b * kGroup;
        union {
            uint4 u[2];
            __nv_bfloat16 h[kGroup];
        } out;
#pragma unroll
        for (int i = 0; i < kGroup; i++) out.h[i] = __float2bfloat16_rn(e2m1_decode(codes[i]) * s);
        if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
            reinterpret_cast<uint4*>(dst)[0] = out.u[0];
            reinterpret_cast<uint4*>(dst)[1] = out.u[1];
        } else {
#pragma unroll
            for (int i = 0; i < kGroup; i++) dst[i] = out.h[i];
        }
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
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) nvfp4_gemv_##LNAME##_##TNAME(           \
        const __nv_bfloat16* x, const uint8_t* w, const uint8_t* sc, T* y, int M, int N, int K,           \
        int row_bytes, int scale_cols, float alpha) {                                                     \
        nvfp4_gemv_w4a16<LAYOUT, T>(x, w, sc, y, M, N, K, row_bytes, scale_cols, alpha);                  \
    }
GEMM(0, trtllm, float, f32)
GEMM(0, trtllm, __nv_bfloat16, bf16)
GEMM(0, trtllm, __half, f16)
GEMM(1, cutlass, float, f32)
GEMM(1, cutlass, __nv_bfloat16, bf16)
GEMM(1, cutlass, __half, f16)

extern "C" __global__ void nvfp4_quantize_act_bf16(const __nv_bfloat16* x, int M, int K, float input_scale,
                                                   uint8_t* packed, int packed_row_bytes, uint8_t* scales,
                                                   int scale_cols, __nv_bfloat16* deq) {
    nvfp4_quantize_act(x, M, K, input_scale, packed, packed_row_bytes, scales, scale_cols, deq);
}

// Keeps the first `dst_cols` of each row (output of a GEMM run on a padded N).
extern "C" __global__ void crop_cols(const uint8_t* src, uint8_t* dst, int rows, int src_cols, int dst_cols,
                                     int elem_bytes) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * dst_cols) return;
    size_t r = i / dst_cols, c = i % dst_cols;
    for (int b = 0; b < elem_bytes; b++) dst[i * elem_bytes + b] = src[(r * src_cols + c) * elem_bytes + b];
}

extern "C" __global__ void f32_to_bf16(const float* src, __nv_bfloat16* dst, size_t n) { to_bf16<float>(src, dst, n); }
extern "C" __global__ void f16_to_bf16(const __half* src, __nv_bfloat16* dst, size_t n) { to_bf16<__half>(src, dst, n); }
