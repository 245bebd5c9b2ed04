// NVFP4 W4A16 GEMM of the `trtllm` variant for Hopper (sm_90a only: wgmma is not in sm_80 or
// sm_100). y[M, N] = alpha * x[M, K] . (e2m1 * s)[N, K]^T, bf16 activations, f32 accumulation.
//
// Computed as y^T = W . x^T so that the weight is wgmma's A operand, which may come from registers:
// each thread dequantizes its slice of the 4-bit weight straight into the A fragment (no bf16 copy
// of the weight anywhere, not even in shared memory). Activations (128-byte swizzled, read by wgmma
// through descriptors as B), weight codes and block scales of each 64-wide K tile come through one
// cp.async pipeline in shared memory.
//
// CTA: two warpgroups, 128 output features (64 each) x BT tokens. Per tile a thread reads the 32
// code bytes of each of its two weight rows and one 4-byte scale word per row (the 128x4 scale
// swizzle keeps a row's four scales of a 64-wide K tile together).
//
// Dequantization, exact at every step: a code's magnitude bits (exponent 2, mantissa 1) go into
// bf16 bits 8:6 (value x 2^-126; the 0.5 code is a bf16 subnormal, which bf16 arithmetic keeps),
// times the block scale x 2^119 (converted once per tile); the product has at most 6 significant
// bits and lies in [2^-17, 21], and the epilogue multiplies by alpha x 2^7.

#include <cuda_fp8.h>

#include "nvfp4_common.cuh"
#include "sm90_wgmma.cuh"

namespace {
using namespace nvfp4;

constexpr int kRows = 128;        // output features per CTA (two warpgroups of 64)
constexpr int kBK = 64;           // K per tile: one 128-byte swizzled row of bf16 per token
constexpr int kThreads = 256;
constexpr int kStages = 5;        // K tiles in shared memory (up to 3 loads in flight)
constexpr int kTileBytesPerToken = kBK * 2;
constexpr int kAtomBytes = 8 * kTileBytesPerToken;  // 8 rows of the 128-byte swizzle pattern
constexpr float kScaleBias = 128.0f;                // 2^7: dequantized weights are w x 2^-7
constexpr float kBf16ScaleBias = 0x1p119f;          // 2^119 x 2^-126 (placed codes) = 2^-7

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row atoms kAtomBytes apart
// (leading offset unused for this mode, set to one 16-byte unit).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
    constexpr uint64_t kLayoutSw128 = 1;
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(kAtomBytes >> 4) << 32) |
           (kLayoutSw128 << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Byte `sh / 8` of `w` (two E2M1 codes, low nibble = even k) as a bf16 pair holding code x 2^-126:
// magnitude bits (exponent 2, mantissa 1) to bits 8:6 of each half, signs to bits 15 and 31. The
// multiplications place both nibbles at once (the partial products do not overlap the kept bits).
__device__ __forceinline__ uint32_t e2m1x2_bf16_raw(uint32_t w, uint32_t sh) {
    constexpr uint32_t kMagMul = (1u << 6) | (1u << 18);  // low nibble -> bits 8:6, high -> 24:22
    constexpr uint32_t kKeep = (7u << 6) | (7u << 22) | 0x80008000u;
    uint32_t b = w >> sh;
    uint32_t mag = (b & 0x77u) * kMagMul;
    uint32_t sgn = (b & 0x88u) * 0x01001000u;  // bit 3 -> 15, bit 7 -> 31
    return (mag | sgn) & kKeep;
}

// One bf16x2 A-fragment register: the codes of byte `sh / 8` of `w` times the scale pair `s2`.
__device__ __forceinline__ uint32_t dequant_pair(uint32_t w, uint32_t sh, uint32_t s2) {
    uint32_t raw = e2m1x2_bf16_raw(w, sh);
    __nv_bfloat162 b = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&raw), *reinterpret_cast<__nv_bfloat162*>(&s2));
    return *reinterpret_cast<uint32_t*>(&b);
}

// Four E4M3 block scales (one per 16-wide K block of the tile) as duplicated bf16 pairs x 2^119
// (exact: E4M3 values lie in [2^-9, 448], x 2^119 below bf16's largest finite value).
__device__ __forceinline__ void scale_pairs(uint32_t word, uint32_t (&out)[4]) {
    __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(word & 0xFFFF), __NV_E4M3);
    __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(word >> 16), __NV_E4M3);
    const __half2 h[2] = {*reinterpret_cast<__half2*>(&lo), *reinterpret_cast<__half2*>(&hi)};
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float2 f = __half22float2(h[i]);
        __nv_bfloat162 a = __float2bfloat162_rn(f.x * kBf16ScaleBias);
        __nv_bfloat162 b = __float2bfloat162_rn(f.y * kBf16ScaleBias);
        out[2 * i] = *reinterpret_cast<uint32_t*>(&a);
        out[2 * i + 1] = *reinterpret_cast<uint32_t*>(&b);
    }
}

template <int BT, typename OutT>
__device__ __forceinline__ void gemm_sm90(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                                          const uint8_t* __restrict__ sc, OutT* __restrict__ y, int M, int N,
                                          int K, int row_bytes, int scale_cols, float alpha) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    // The 128-byte swizzle pattern repeats every 1024 bytes: activation stages start on that
    // boundary; the weight codes and scales of each stage follow all activation stages.
    // (Offset from the shared-window address, so the compiler keeps shared-memory instructions.)
    uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
    constexpr int kActBytes = BT * kTileBytesPerToken;
    constexpr int kCodeBytes = kRows * kBK / 2;
    uint8_t* const codes_smem = smem + kStages * kActBytes;
    uint8_t* const scales_smem = codes_smem + kStages * kCodeBytes;
    constexpr int kAcc = BT / 2;  // f32 accumulators per thread: 64 x BT / 128 threads

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wg = warp / 4, wq = warp % 4, g = lane / 4, t = lane % 4;
    const int n0 = blockIdx.x * kRows, m0 = blockIdx.y * BT;
    const int ktiles = (K + kBK - 1) / kBK;
    const uint32_t sh = 8u * t;  // this thread's byte within each 4-byte code word

    // Copies of one K tile's weight bytes: thread tid takes 16 bytes of physical row n0 + tid / 2
    // (rows read in order) and stores them at the row's logical slot, so that each warp later
    // reads 8 consecutive slots. Scales: the 512-byte 128x4 tile (n0 / 128, kt), by 32 threads.
    const int cp_p = tid / 2, cp_h = tid % 2;
    const int cp_slot = logical_row<0>(cp_p);
    const uint8_t* code_src = w + (size_t)(n0 + cp_p) * row_bytes + cp_h * 16;
    const int code_dst = cp_slot * (kBK / 2) + cp_h * 16;
    const uint8_t* scale_src = sc + swizzle_offset(n0, 0, scale_cols) + tid * 16;

    // This thread's two weight rows (CTA-local logical slots) and their scale words in a tile.
    const int r_lo = wg * 64 + wq * 16 + g, r_hi = r_lo + 8;
    const int n_lo = n0 + r_lo, n_hi = n0 + r_hi;
    // (Rows below 128 sit in the first 128x4 tile: its offset for block 0 is the word's.)
    const int sw_lo = swizzle_offset(physical_row<0>(r_lo), 0, 4), sw_hi = swizzle_offset(physical_row<0>(r_hi), 0, 4);

    // Activation tile kt: token r, 16-byte chunk c at r * 128 + ((c ^ (r % 8)) * 16). A thread
    // always copies chunk c = tid % 8 of tokens tid / 8 + 32 i.
    constexpr int kChunks = BT * 8 / kThreads;
    constexpr int kTokenStep = kThreads / 8;
    const int my_c = tid % 8, my_r = tid / 8;
    const __nv_bfloat16* act_src = x + (size_t)(m0 + my_r) * K + my_c * 8;
    const int act_dst = my_r * kTileBytesPerToken + ((my_c ^ (my_r % 8)) * 16);

    const bool full_m = m0 + BT <= M;
    const size_t token_step = (size_t)kTokenStep * K;
    auto load_tile = [&](int kt, int st) {
        uint8_t* dst = smem + st * kActBytes + act_dst;
        const int gk = kt * kBK + my_c * 8;
        const __nv_bfloat16* src = act_src + kt * kBK;
        if (full_m && (kt + 1) * kBK <= K) {  // interior tile: no bounds to test
#pragma unroll
            for (int i = 0; i < kChunks; i++) cp_async16(dst + i * kTokenStep * kTileBytesPerToken, src + i * token_step, true);
        } else {
#pragma unroll
            for (int i = 0; i < kChunks; i++) {
                bool ok = m0 + my_r + i * kTokenStep < M && gk < K;
                cp_async16(dst + i * kTokenStep * kTileBytesPerToken, ok ? (const void*)(src + i * token_step) : (const void*)x, ok);
            }
        }
        cp_async16(codes_smem + st * kCodeBytes + code_dst, code_src + kt * (kBK / 2), true);
        if (tid < 32) cp_async16(scales_smem + st * 512 + tid * 16, scale_src + (size_t)kt * 512, true);
    };

    // A fragment of k16 step s: (row g, k 2t..2t+1), (row g+8, same), (row g, k +8), (row g+8, k +8);
    // code word j of a row holds k = 8j + 2t, 8j + 2t + 1 in byte t, so step s uses words 2s, 2s+1.
    auto dequant = [&](int st, uint32_t (&a)[4][4]) {
        const uint8_t* cs = codes_smem + st * kCodeBytes;
        const uint4 lo0 = *reinterpret_cast<const uint4*>(cs + r_lo * (kBK / 2));
        const uint4 lo1 = *reinterpret_cast<const uint4*>(cs + r_lo * (kBK / 2) + 16);
        const uint4 hi0 = *reinterpret_cast<const uint4*>(cs + r_hi * (kBK / 2));
        const uint4 hi1 = *reinterpret_cast<const uint4*>(cs + r_hi * (kBK / 2) + 16);
        uint32_t s_lo[4], s_hi[4];
        scale_pairs(*reinterpret_cast<const uint32_t*>(scales_smem + st * 512 + sw_lo), s_lo);
        scale_pairs(*reinterpret_cast<const uint32_t*>(scales_smem + st * 512 + sw_hi), s_hi);
        const uint32_t w_lo[8] = {lo0.x, lo0.y, lo0.z, lo0.w, lo1.x, lo1.y, lo1.z, lo1.w};
        const uint32_t w_hi[8] = {hi0.x, hi0.y, hi0.z, hi0.w, hi1.x, hi1.y, hi1.z, hi1.w};
#pragma unroll
        for (int s = 0; s < 4; s++) {
            a[s][0] = dequant_pair(w_lo[2 * s], sh, s_lo[s]);
            a[s][1] = dequant_pair(w_hi[2 * s], sh, s_hi[s]);
            a[s][2] = dequant_pair(w_lo[2 * s + 1], sh, s_lo[s]);
            a[s][3] = dequant_pair(w_hi[2 * s + 1], sh, s_hi[s]);
        }
    };

    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; i++) acc[i] = 0.0f;
    uint32_t a0[4][4], a1[4][4];

    // Prologue: tiles 0 .. kStages-3 in flight; tile 0's weights dequantized.
#pragma unroll
    for (int s = 0; s < kStages - 2; s++) {
        if (s < ktiles) load_tile(s, s);
        cp_async_commit();
    }
    cp_async_wait<kStages - 3>();
    __syncthreads();
    dequant(0, a0);

    // One K tile: wait until tiles kt and kt + 1 are in, refill the stage freed two tiles ago,
    // issue tile kt's four wgmmas, then (while they run) dequantize tile kt + 1's weights into
    // the other fragment set.
    auto step = [&](int kt, uint32_t (&cur)[4][4], uint32_t (&next)[4][4]) {
        // (No proxy fence: cp.async results are visible to wgmma after the wait and the barrier,
        // as in CUTLASS's cp.async GMMA mainloops; a fence here costs a MEMBAR per tile.)
        cp_async_wait<kStages - 4>();
        __syncthreads();  // tiles kt, kt + 1 visible to all; tile kt - 2 fully consumed
        if (kt + kStages - 2 < ktiles) load_tile(kt + kStages - 2, (kt + kStages - 2) % kStages);
        cp_async_commit();
        const uint32_t stage = smem_addr(smem + (kt % kStages) * kActBytes);
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 4; s++) {
            const uint64_t d = desc_sw128(stage + s * 32);  // k16 step = 32 bytes along the row
            if constexpr (BT == 256) wgmma_m64n256k16_rs(acc, cur[s], d);
            else wgmma_m64n128k16_rs(acc, cur[s], d);
        }
        wgmma_commit();
        wgmma_wait<1>();  // tile kt - 1 done: `next` may be overwritten
        if (kt + 1 < ktiles) dequant((kt + 1) % kStages, next);
    };
    for (int kt = 0; kt < ktiles; kt += 2) {
        step(kt, a0, a1);
        if (kt + 1 < ktiles) step(kt + 1, a1, a0);
    }
    wgmma_wait<0>();

    // Accumulator (row g or g+8 of the warp's 16, token 8j + 2t + {0,1}) -> y[token, n].
    const float out_scale = alpha * kScaleBias;
#pragma unroll
    for (int j = 0; j < BT / 8; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int m = m0 + 8 * j + 2 * t + (e & 1);
            int n = (e & 2) ? n_hi : n_lo;
            if (m < M && n < N) y[(size_t)m * N + n] = from_float<OutT>(acc[4 * j + e] * out_scale);
        }
    }
}

}  // namespace

// Dynamic shared memory: kStages x (activation tile, weight codes, scales) plus 1024 bytes to align
// the first activation tile.
#define GEMM_SM90(BT, T, TNAME)                                                                          \
    extern "C" __global__ void __launch_bounds__(kThreads, 1) nvfp4_gemm_sm90_bt##BT##_##TNAME(        \
        const __nv_bfloat16* x, const uint8_t* w, const uint8_t* sc, T* y, int M, int N, int K,           \
        int row_bytes, int scale_cols, float alpha) {                                                     \
        gemm_sm90<BT, T>(x, w, sc, y, M, N, K, row_bytes, scale_cols, alpha);                             \
    }
GEMM_SM90(128, float, f32)
GEMM_SM90(128, __nv_bfloat16, bf16)
GEMM_SM90(128, __half, f16)
GEMM_SM90(256, float, f32)
GEMM_SM90(256, __nv_bfloat16, bf16)
GEMM_SM90(256, __half, f16)
