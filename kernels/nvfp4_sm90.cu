// NVFP4 W4A16 GEMM of the `trtllm` variant for Hopper (sm_90a only: wgmma is not in sm_80 or
// sm_100). y[M, N] = alpha * x[M, K] . (e2m1 * s)[N, K]^T, bf16 activations, f32 accumulation.
//
// Computed as y^T = W . x^T so that the weight is wgmma's A operand, which may come from registers:
// each thread dequantizes its slice of the 4-bit weight straight into the A fragment (no bf16 copy
// of the weight anywhere, not even in shared memory). Activations (128-byte swizzled, read by wgmma
// through descriptors as B), weight codes and block scales of each 64-wide K tile come through one
// cp.async pipeline in shared memory.
//
// CTA: two warpgroups, 128 output features (64 each) x BT tokens. Per tile a thread reads its 8
// code bytes of each of its two weight rows (the weight is prepared in the Hopper code order,
// LayoutKind::TrtllmSm90: each thread of a quad finds the 16 codes it needs of a row's K tile in 8
// bytes of its own) and one 4-byte scale word per row (the 128x4 scale swizzle keeps a row's four
// scales of a 64-wide K tile together).
//
// Dequantization, exact at every step: a code's magnitude bits (exponent 2, mantissa 1) go into
// bf16 bits 8:6 (value x 2^-126; the 0.5 code is a bf16 subnormal, which bf16 arithmetic keeps),
// times the block scale x 2^119 (converted once per tile); the product has at most 6 significant
// bits and lies in [2^-17, 21], and the epilogue multiplies by alpha x 2^7.
//
// A warp-specialized form with cp.async copies (producer warpgroup, mbarriers, setmaxnreg; commit
// 5b0b4db) was 15-25% slower at M >= 1024 and gave one wrong result (docs/PERF.md, session 12), a
// third register set for the A fragments slower too (session 13). The TMA form at the end of this
// file (CTA pairs sharing the activation tile, copies by one producer thread) replaces this one
// wherever the feature blocks pair up; this form runs elsewhere and for comparisons.
//
// Tiles (128 features x BT tokens) are numbered feature block fastest. One launch takes tiles
// tile0 .. tile0 + gridDim.x - 1 over all of K; with splits > 1 (the last, partly filled wave of a
// large product) CTA b takes tile tile0 + b / splits over the K tiles of part b % splits and
// stores its f32 sums in `part` ([CTA][token][feature]), which `nvfp4_sm90_tail_sum` adds up in a
// fixed order (deterministic) and writes to y. (The TMA form below adds a split tile's parts
// inside one cluster instead, in the same order: `sum_parts`.)
//
// Epilogue (every writer of y: the GEMM, its tail sum and the GEMV below): y = act(alpha * sum +
// bias[n]) in f32, one rounding to the output type, with bias (features n < bias_len; null: none)
// and act = tanh-GELU on features n >= gelu_from (hardware tanh for 16-bit outputs): the linear
// layer's bias and activation without another pass over y; gelu_from > 0 activates only the MLP
// columns of a fused q/k/v/MLP projection.
//
// Input in two parts: K < k_split from x, the rest from x2 (each with its own row stride), so an
// output projection reads cat(attention output, MLP activation) where they lie (no cat pass: 8.5 ms
// of a FLUX.1 W4A16 step, docs/PERF.md session 15). One part: x2 = x, k_split = K, ldx = K.

#include <cuda_fp8.h>

#include <type_traits>

#include "gelu.cuh"
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

__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

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

// Pair j (0..3) of a 32-bit word of the Hopper code order (src/nvfp4/layout.rs `sm90_code_bits`,
// prepared at load) as a bf16 pair holding code x 2^-126: magnitude bits (exponent 2, mantissa 1) at
// bf16 bits 8:6, signs at 15 and 31. The order puts each pair's eight bits where a mask (j = 0), a
// rotation and a mask (1, 2), or a mask, a multiplication by three powers of two (shifted copies
// that never carry into the kept bits) and a mask (3) place them: 2 operations per pair on average,
// where the linear order took 5 (docs/PERF.md, session 21). Constants as in layout.rs.
constexpr uint32_t kPairBits = 0x81C081C0u;
constexpr uint32_t kRot1 = 10, kRot2 = 13;
constexpr uint32_t kPair3Src = 0x001B001Bu, kPair3Mul = (1u << 2) | (1u << 7) | (1u << 12);
__device__ __forceinline__ uint32_t sm90_pair(uint32_t w, int j) {
    switch (j) {  // (always a constant after unrolling)
        case 0: return w & kPairBits;
        case 1: return __funnelshift_l(w, w, kRot1) & kPairBits;
        case 2: return __funnelshift_l(w, w, kRot2) & kPairBits;
        default: return ((w & kPair3Src) * kPair3Mul) & kPairBits;
    }
}

// Pair j of word w times the scale pair `s2`: one bf16x2 A-fragment register (exact).
__device__ __forceinline__ uint32_t dequant_pair(uint32_t w, int j, uint32_t s2) {
    uint32_t raw = sm90_pair(w, j);
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

// tanh-GELU with the hardware tanh (MUFU.TANH, absolute error about 2^-11) for 16-bit outputs,
// whose rounding (2^-9 relative) dominates that; f32 outputs take the exact formula. The exact
// tanhf in every element made the epilogue cost up to 4x a FLUX MLP GEMM (docs/PERF.md, session 14).
template <typename OutT>
__device__ __forceinline__ float epilogue_gelu(float v) {
    if constexpr (std::is_same_v<OutT, float>) {
        return gelu_tanh(v);
    } else {
        float t;
        asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(gelu_tanh_arg(v)));
        return 0.5f * v * (1.f + t);
    }
}

// The layer's bias of feature n (0 past bias_len or without one).
template <typename OutT>
__device__ __forceinline__ float bias_of(const OutT* __restrict__ bias, int bias_len, int n) {
    return (bias != nullptr && n < bias_len) ? static_cast<float>(bias[n]) : 0.f;
}

// Runs `body(std::true_type)` where some lane of the warp applies GELU (`any`), else
// `body(std::false_type)`: the tile epilogues' GELU, predicated per element, still took the issue
// slots of its ~8 instructions per element where no feature had it (~1k of ~1.3k instructions per
// thread of a 256-token tile's TMA-store epilogue, SASS; most layers have no GELU). Warp-uniform,
// so warp-collective stores inside stay converged; every lane of the warp must call it.
template <typename Body>
__device__ __forceinline__ void with_gelu(bool any, Body&& body) {
    if (__any_sync(0xffffffffu, any)) {
        body(std::true_type{});
    } else {
        body(std::false_type{});
    }
}

// A fragments of one K tile from shared memory: this thread's 8 code bytes (words w = 0, 1) of each
// of its two rows (`lo`, `hi`: the rows' 32 bytes of the tile) and their scale words (`word_lo`,
// `word_hi`, from the tile's 512-byte 128x4 scale block). Fragment of k16 step s: (row g, k 16s +
// 2t, +1), (row g+8, same), (row g, k + 8), (row g+8, k + 8): word s / 2, pairs 2 (s % 2) and
// 2 (s % 2) + 1; block scale s.
__device__ __forceinline__ void dequant_rows(const uint8_t* lo, const uint8_t* hi, uint32_t word_lo,
                                             uint32_t word_hi, int t, uint32_t (&a)[4][4]) {
    const uint2 l = *reinterpret_cast<const uint2*>(lo + 8 * t);
    const uint2 h = *reinterpret_cast<const uint2*>(hi + 8 * t);
    uint32_t s_lo[4], s_hi[4];
    scale_pairs(word_lo, s_lo);
    scale_pairs(word_hi, s_hi);
    const uint32_t w_lo[2] = {l.x, l.y}, w_hi[2] = {h.x, h.y};
#pragma unroll
    for (int s = 0; s < 4; s++) {
        const int j = 2 * (s % 2);
        a[s][0] = dequant_pair(w_lo[s / 2], j, s_lo[s]);
        a[s][1] = dequant_pair(w_hi[s / 2], j, s_hi[s]);
        a[s][2] = dequant_pair(w_lo[s / 2], j + 1, s_lo[s]);
        a[s][3] = dequant_pair(w_hi[s / 2], j + 1, s_hi[s]);
    }
}

// The accumulators (row g or g+8 of the warp's 16 = features n_lo / n_hi, token 8j + 2t + {0,1}) of
// a CTA's tile leave either as unscaled partial sums into its block `pblock` of `part`
// ([token][feature], split tiles) or as y[token, n] = act(alpha x 2^7 x sum + bias[n]) (the
// thread's two biases loaded once).
template <int BT, typename OutT>
__device__ __forceinline__ void store_tile(const float (&acc)[BT / 2], int splits, float* __restrict__ part,
                                           int pblock, int r_lo, int r_hi, int n_lo, int n_hi, int m0, int t,
                                           OutT* __restrict__ y, int M, int N, float alpha,
                                           const OutT* __restrict__ bias, int bias_len, int gelu_from) {
    if (splits > 1) {
        float* p = part + (size_t)pblock * kRows * BT;
#pragma unroll
        for (int j = 0; j < BT / 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) p[(8 * j + 2 * t + (e & 1)) * kRows + ((e & 2) ? r_hi : r_lo)] = acc[4 * j + e];
        }
        return;
    }
    const float out_scale = alpha * kScaleBias;
    const float b_lo = bias_of(bias, bias_len, n_lo), b_hi = bias_of(bias, bias_len, n_hi);
    with_gelu(n_lo >= gelu_from || n_hi >= gelu_from, [&](auto gelu) {
#pragma unroll
        for (int j = 0; j < BT / 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int m = m0 + 8 * j + 2 * t + (e & 1);
                int n = (e & 2) ? n_hi : n_lo;
                float v = acc[4 * j + e] * out_scale + ((e & 2) ? b_hi : b_lo);
                if (decltype(gelu)::value && n >= gelu_from) v = epilogue_gelu<OutT>(v);
                if (m < M && n < N) y[(size_t)m * N + n] = from_float<OutT>(v);
            }
        }
    });
}

template <int BT, typename OutT>
__device__ __forceinline__ void gemm_sm90(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                                          const uint8_t* __restrict__ sc, OutT* __restrict__ y, int M, int N,
                                          int K, int row_bytes, int scale_cols, float alpha, int tile0,
                                          int splits, float* __restrict__ part, const OutT* __restrict__ bias,
                                          int bias_len, int gelu_from, const __nv_bfloat16* __restrict__ x2,
                                          int ldx, int ldx2, int k_split) {
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
    const int feature_blocks = (N + kRows - 1) / kRows;
    const int tile = tile0 + (int)blockIdx.x / splits, part_k = (int)blockIdx.x % splits;
    const int n0 = (tile % feature_blocks) * kRows, m0 = (tile / feature_blocks) * BT;
    // This CTA's K tiles [kb, ke) (all of them without a split; an empty range leaves zero sums).
    const int ktiles_all = (K + kBK - 1) / kBK;
    const int per_part = (ktiles_all + splits - 1) / splits;
    const int kb = min(ktiles_all, part_k * per_part), ktiles = min(ktiles_all, kb + per_part);

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
    // Two parts: K < k_split from x (rows ldx apart), the rest from x2 (rows ldx2 apart, its
    // column 0 at k_split); k_split is a multiple of kBK, so a tile never straddles them.
    const __nv_bfloat16* act_src = x + (size_t)(m0 + my_r) * ldx + my_c * 8;
    const __nv_bfloat16* act_src2 = x2 + (size_t)(m0 + my_r) * ldx2 + my_c * 8 - k_split;
    const int act_dst = my_r * kTileBytesPerToken + ((my_c ^ (my_r % 8)) * 16);

    const bool full_m = m0 + BT <= M;
    auto load_tile = [&](int kt, int st) {
        uint8_t* dst = smem + st * kActBytes + act_dst;
        const int gk = kt * kBK + my_c * 8;
        const bool first = kt * kBK < k_split;
        const __nv_bfloat16* src = (first ? act_src : act_src2) + kt * kBK;
        const size_t token_step = (size_t)kTokenStep * (first ? ldx : ldx2);
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

    auto dequant = [&](int st, uint32_t (&a)[4][4]) {
        const uint8_t* cs = codes_smem + st * kCodeBytes;
        const uint8_t* ss = scales_smem + st * 512;
        dequant_rows(cs + r_lo * (kBK / 2), cs + r_hi * (kBK / 2), *reinterpret_cast<const uint32_t*>(ss + sw_lo),
                     *reinterpret_cast<const uint32_t*>(ss + sw_hi), t, a);
    };

    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; i++) acc[i] = 0.0f;
    uint32_t a0[4][4], a1[4][4];

    // Prologue: tiles 0 .. kStages-3 in flight; tile 0's weights dequantized.
#pragma unroll
    for (int s = 0; s < kStages - 2; s++) {
        if (kb + s < ktiles) load_tile(kb + s, (kb + s) % kStages);
        cp_async_commit();
    }
    cp_async_wait<kStages - 3>();
    __syncthreads();
    if (kb < ktiles) dequant(kb % kStages, a0);

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
            wgmma_rs<BT>(acc, cur[s], d);
        }
        wgmma_commit();
        wgmma_wait<1>();  // tile kt - 1 done: `next` may be overwritten
        if (kt + 1 < ktiles) dequant((kt + 1) % kStages, next);
    };
    for (int kt = kb; kt < ktiles; kt += 2) {
        step(kt, a0, a1);
        if (kt + 1 < ktiles) step(kt + 1, a1, a0);
    }
    wgmma_wait<0>();

    store_tile<BT, OutT>(acc, splits, part, blockIdx.x, r_lo, r_hi, n_lo, n_hi, m0, t, y, M, N, alpha, bias, bias_len,
                         gelu_from);
}

}  // namespace

// Dynamic shared memory: kStages x (activation tile, weight codes, scales) plus 1024 bytes to align
// the first activation tile. 1-D grid of tiles (see the top of the file).
#define GEMM_SM90(BT, T, TNAME)                                                                          \
    extern "C" __global__ void __launch_bounds__(kThreads, 1) nvfp4_gemm_sm90_bt##BT##_##TNAME(        \
        const __nv_bfloat16* x, const uint8_t* w, const uint8_t* sc, T* y, int M, int N, int K,           \
        int row_bytes, int scale_cols, float alpha, int tile0, int splits, float* part, const T* bias,     \
        int bias_len, int gelu_from, const __nv_bfloat16* x2, int ldx, int ldx2, int k_split) {             \
        gemm_sm90<BT, T>(x, w, sc, y, M, N, K, row_bytes, scale_cols, alpha, tile0, splits, part, bias,    \
                         bias_len, gelu_from, x2, ldx, ldx2, k_split);                                      \
    }
// A GEMM form at BT tokens per CTA for each output type.
#define GEMM_SM90_TYPES(FORM, BT)   \
    FORM(BT, float, f32)            \
    FORM(BT, __nv_bfloat16, bf16)   \
    FORM(BT, __half, f16)
// Every GEMM form is compiled for these tokens per CTA and output types.
#define GEMM_SM90_INSTANCES(FORM) GEMM_SM90_TYPES(FORM, 128) GEMM_SM90_TYPES(FORM, 256)
GEMM_SM90_INSTANCES(GEMM_SM90)

// The split tiles' sums: one thread per (tile, token, feature), features fastest (coalesced reads
// of `part` and writes of y), the parts added in order; scaled as the unsplit epilogue scales.
template <typename OutT>
__device__ __forceinline__ void tail_sum(const float* __restrict__ part, OutT* __restrict__ y, int M, int N, int bt,
                                         int tile0, int tiles, int splits, float alpha, const OutT* __restrict__ bias,
                                         int bias_len, int gelu_from) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)tiles * bt * kRows) return;
    const int r = (int)(i % kRows), tok = (int)(i / kRows % bt), ti = (int)(i / ((size_t)kRows * bt));
    const int feature_blocks = (N + kRows - 1) / kRows, tile = tile0 + ti;
    const int n = (tile % feature_blocks) * kRows + r, m = (tile / feature_blocks) * bt + tok;
    if (m >= M || n >= N) return;
    float s = 0.0f;
    for (int p = 0; p < splits; p++) s += part[((size_t)(ti * splits + p) * bt + tok) * kRows + r];
    float v = s * (alpha * kScaleBias) + bias_of(bias, bias_len, n);
    y[(size_t)m * N + n] = from_float<OutT>(n >= gelu_from ? epilogue_gelu<OutT>(v) : v);
}
#define TAIL_SUM(T, TNAME)                                                                                 \
    extern "C" __global__ void nvfp4_sm90_tail_sum_##TNAME(const float* part, T* y, int M, int N, int bt,   \
                                                           int tile0, int tiles, int splits, float alpha,   \
                                                           const T* bias, int bias_len, int gelu_from) {    \
        tail_sum<T>(part, y, M, N, bt, tile0, tiles, splits, alpha, bias, bias_len, gelu_from);             \
    }
TAIL_SUM(float, f32)
TAIL_SUM(__nv_bfloat16, bf16)
TAIL_SUM(__half, f16)

// ---------------------------------------------------------------------------------------------
// Small-M product (M <= 16 tokens) on Hopper: memory-bound, so the aim is to stream the 4.5-bit
// weight once at full bandwidth. Tensor cores (mma.sync m16n8k16, weight as A from registers,
// tokens as B) keep the arithmetic off the CUDA cores: 16 FMAs per weight on CUDA cores would cost
// more than the loads at M = 16.
//
// CTA: 8 warps, 16 physical rows each (one 128-row tile of the trtllm layout, zero-padded, so rows
// need no bounds checks). SPLIT > 1: a cluster of SPLIT CTAs along y splits K, and the CTAs add their
// partial sums through distributed shared memory (one launch, no workspace, deterministic).
//
// K order inside a 256-wide chunk is permuted identically for weights and activations (a dot
// product does not care): thread t of a quad takes k0 = 64 t .. 64 t + 63, i.e. 32 contiguous code
// bytes per row (two 16-byte loads) and one 4-byte scale word (the 128x4 swizzle keeps a row's four
// consecutive K blocks together); its k16 step s uses k0 + 4 s .. 4 s + 3 in the fragment slots
// {2t, 2t+1} and {2t+8, 2t+9}, so the token's activations are 8 contiguous bytes per step.
//
// Activations: every warp of the CTA reads the same chunk, so it is copied once into shared memory
// (cp.async, kGemvXStages chunks ahead; the first version read it from global memory in each warp,
// and the exposed load latency per chunk made M = 8 cost 1.3x M = 1). The weight's next chunk waits
// in registers.
namespace {
constexpr int kGemvWarps = 8;       // warps per CTA: 8 x 16 rows = one 128-row tile
constexpr int kGemvChunk = 256;     // K per warp step (64 per thread of a quad)
constexpr int kGemvChunkBytes = kGemvChunk / 2;
constexpr int kGemvThreadBytes = 32;  // code bytes per thread and row in a chunk
constexpr int kScaleTileBytes = 512;  // one 128x4 scale tile
constexpr int kGemvXStages = 3;       // activation chunks in shared memory
constexpr int kGemvXRow = kGemvChunk * 2;  // bytes of one token's chunk
constexpr int kGemvTokens = 16;

__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ uint32_t ld_stream4(const void* p) {
    uint32_t v;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// `v` to the same shared-memory offset in CTA `rank` of the cluster.
__device__ __forceinline__ void st_cluster_f32(float* local, uint32_t rank, float v) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr(local)), "r"(rank));
    asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(remote), "f"(v) : "memory");
}

// Byte offset of 16-byte unit u (0..31) of a token's chunk row: XOR-swizzled within each group of 8
// units by (thread t = u / 8, token parity) so that the 8 lanes of a quarter-warp (two tokens, four
// t) read 8 different bank groups.
__device__ __forceinline__ int x_unit_offset(int token, int u) {
    return token * kGemvXRow + 16 * ((u & ~7) | ((u ^ ((u >> 3) + 4 * (token & 1))) & 7));
}

// One 256-wide K chunk of a warp's 16 rows: the thread's 32 code bytes of rows lo and hi (`w_lo`,
// `w_hi`) and their scale words, against the chunk's activations (`xload(j, i)`: the 16 bytes of
// unit i of the thread's 64 k for token 8 j + g), into the accumulator sets.
template <int NT, int ACCS, typename XLoad>
__device__ __forceinline__ void gemv_chunk(float (&accs)[ACCS][NT][4], const uint4 (&w_lo)[2], const uint4 (&w_hi)[2],
                                           uint32_t s_lo, uint32_t s_hi, XLoad xload) {
    const uint32_t cl[8] = {w_lo[0].x, w_lo[0].y, w_lo[0].z, w_lo[0].w, w_lo[1].x, w_lo[1].y, w_lo[1].z, w_lo[1].w};
    const uint32_t ch[8] = {w_hi[0].x, w_hi[0].y, w_hi[0].z, w_hi[0].w, w_hi[1].x, w_hi[1].y, w_hi[1].z, w_hi[1].w};
    uint32_t sp_lo[4], sp_hi[4];
    scale_pairs(s_lo, sp_lo);
    scale_pairs(s_hi, sp_hi);
#pragma unroll
    for (int i = 0; i < 8; i++) {  // unit i of this thread's 64 k: k16 steps 2 i and 2 i + 1
        uint4 xv[NT];
#pragma unroll
        for (int j = 0; j < NT; j++) xv[j] = xload(j, i);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            // Step s takes the pairs k = 4s, 4s + 1 and 4s + 2, 4s + 3 of the thread's 64: in
            // the Hopper code order pair i % 4 of words 2q + i / 4 for q = 2h, 2h + 1.
            const int s = 2 * i + h, pair = i % 4, wi = i / 4;
            uint32_t a[4];
            a[0] = dequant_pair(cl[4 * h + wi], pair, sp_lo[s / 4]);
            a[1] = dequant_pair(ch[4 * h + wi], pair, sp_hi[s / 4]);
            a[2] = dequant_pair(cl[4 * h + 2 + wi], pair, sp_lo[s / 4]);
            a[3] = dequant_pair(ch[4 * h + 2 + wi], pair, sp_hi[s / 4]);
#pragma unroll
            for (int j = 0; j < NT; j++)
                mma_bf16_16816(accs[h % ACCS][j], a, h ? xv[j].z : xv[j].x, h ? xv[j].w : xv[j].y);
        }
    }
}

// The GEMV's end: the accumulator sets added, then y written (SPLIT = 1) or the cluster's partial
// sums added through distributed shared memory (`xfer`: kGemvXferFloats<NT> floats of this CTA's
// shared memory that nothing else uses, so that other CTAs may write them while this one still
// computes). Every thread of the CTA calls it; `computes`: this thread holds sums (the bulk form's
// copying warp does not).
template <int NT>
constexpr int kGemvXferFloats = 128 * NT * 8;
template <int NT, int SPLIT, typename OutT, int ACCS>
__device__ __forceinline__ void gemv_finish(const float (&accs)[ACCS][NT][4], float* xfer, bool computes, int tile,
                                            int slice, OutT* __restrict__ y, int M, int N, float alpha,
                                            const OutT* __restrict__ bias, int bias_len, int gelu_from) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int p_lo = tile * 128 + warp * 16 + g, p_hi = p_lo + 8;
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            acc[j][e] = accs[0][j][e];
#pragma unroll
            for (int a = 1; a < ACCS; a++) acc[j][e] += accs[a][j][e];
        }

    const float out_scale = alpha * kScaleBias;
    // The GEMM's epilogue (bias, GELU from feature gelu_from on, one rounding): no pass after a
    // small layer (the blocks' modulation: 76 bias passes of a FLUX.1 step, docs/PERF.md session 18).
    auto store = [&](int m, int n, float sum) {
        const float v = sum * out_scale + bias_of(bias, bias_len, n);
        y[(size_t)m * N + n] = from_float<OutT>(n >= gelu_from ? epilogue_gelu<OutT>(v) : v);
    };
    if constexpr (SPLIT == 1) {
        if (!computes) return;
        // Accumulator (row g or g + 8 of the warp's 16, token 8 j + 2 t + {0, 1}) -> y[token, n].
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int m = 8 * j + 2 * t + (e & 1);
                const int n = logical_row<0>((e & 2) ? p_hi : p_lo);
                if (m < M && n < N) store(m, n, acc[j][e]);
            }
    } else {
        // CTA q (its cluster rank, = its slice) owns rows 128 / SPLIT x q .. of the tile: every CTA
        // stores its partial sums of those rows into the owner's xfer, in the slot of its own rank;
        // one cluster barrier (release, acquire) makes them visible, and the owner adds the slots
        // in rank order. After the barrier no CTA touches another's shared memory, so none has to
        // wait for the others to leave (pulling the sums instead took a second barrier: with the
        // remote loads ~0.7 us at split 4, docs/PERF.md session 26).
        constexpr int kRowsPerCta = 128 / SPLIT, kTokens = NT * 8;
        if (computes) {
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = warp * 16 + g + (e & 2 ? 8 : 0), m = 8 * j + 2 * t + (e & 1);
                    st_cluster_f32(&xfer[((r % kRowsPerCta) * SPLIT + slice) * kTokens + m], r / kRowsPerCta,
                                   acc[j][e]);
                }
        }
        cluster_sync();
        // Only the M tokens' sums are added (M = 1: 16 of the 256 a 16-token pass would).
        const int tokens = min(M, kTokens);
        if (computes) {
            for (int i = tid; i < kRowsPerCta * tokens; i += kGemvWarps * 32) {
                const int r = i / tokens, m = i % tokens;
                float sum = 0.0f;
#pragma unroll
                for (int q = 0; q < SPLIT; q++) sum += xfer[(r * SPLIT + q) * kTokens + m];
                const int n = logical_row<0>(tile * 128 + slice * kRowsPerCta + r);
                if (n < N) store(m, n, sum);
            }
        }
    }
}

// NT = n8 token tiles (1: M <= 8, 2: M <= 16). ACCS = accumulator sets the k16 steps alternate
// between (shorter chains of dependent mma; added at the end).
template <int NT, int SPLIT, typename OutT, int ACCS>
__device__ __forceinline__ void gemv_sm90(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                                          const uint8_t* __restrict__ sc, OutT* __restrict__ y, int M, int N,
                                          int K, int row_bytes, int scale_cols, float alpha,
                                          const OutT* __restrict__ bias, int bias_len, int gelu_from) {
    __shared__ __align__(128) uint8_t xs[kGemvXStages][kGemvTokens * kGemvXRow];
    __shared__ float xfer[SPLIT > 1 ? kGemvXferFloats<NT> : 1];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x, slice = SPLIT > 1 ? blockIdx.y : 0;
    const int p_lo = tile * 128 + warp * 16 + g, p_hi = p_lo + 8;
    const uint8_t* row_lo = w + (size_t)p_lo * row_bytes + t * kGemvThreadBytes;
    const uint8_t* row_hi = w + (size_t)p_hi * row_bytes + t * kGemvThreadBytes;
    // Scale word of this thread's four K blocks in chunk c: swizzle_offset(p, 16 c + 4 t) =
    // offset(p, 0) + (4 c + t) x 512.
    const uint8_t* sc_lo = sc + swizzle_offset(p_lo, 0, scale_cols) + t * kScaleTileBytes;
    const uint8_t* sc_hi = sc + swizzle_offset(p_hi, 0, scale_cols) + t * kScaleTileBytes;
    const int chunks = (row_bytes + kGemvChunkBytes - 1) / kGemvChunkBytes;
    const int c_begin = slice * chunks / SPLIT, c_end = (slice + 1) * chunks / SPLIT;

    // Activation chunk c into stage st: NT x 8 tokens x 32 units of 16 bytes, zero past M and K
    // (K is a multiple of 8, so a unit is whole or absent). Always one commit group per call.
    auto load_x = [&](int c, int st) {
        if (c < c_end) {
#pragma unroll
            for (int r = 0; r < NT; r++) {
                const int q = tid + r * kGemvWarps * 32, token = q / 32, u = q % 32;
                const int k = c * kGemvChunk + 8 * u;
                const bool ok = token < M && k < K;
                cp_async16(&xs[st][x_unit_offset(token, u)], ok ? (const void*)(x + (size_t)token * K + k) : (const void*)x, ok);
            }
        }
        cp_async_commit();
    };
    // This thread's weight piece of chunk c: whole or absent (row_bytes is a multiple of 32).
    auto load_w = [&](int c, uint4 (&lo)[2], uint4 (&hi)[2], uint32_t& s_lo, uint32_t& s_hi) {
        const int off = c * kGemvChunkBytes;
        if (c < c_end && off + t * kGemvThreadBytes < row_bytes) {
            lo[0] = ld_stream16(row_lo + off);
            lo[1] = ld_stream16(row_lo + off + 16);
            hi[0] = ld_stream16(row_hi + off);
            hi[1] = ld_stream16(row_hi + off + 16);
            s_lo = ld_stream4(sc_lo + (size_t)c * 4 * kScaleTileBytes);
            s_hi = ld_stream4(sc_hi + (size_t)c * 4 * kScaleTileBytes);
        } else {
            lo[0] = lo[1] = hi[0] = hi[1] = make_uint4(0, 0, 0, 0);
            s_lo = s_hi = 0;
        }
    };

    float accs[ACCS][NT][4] = {};

    uint4 w_lo[2], w_hi[2];
    uint32_t s_lo, s_hi;
    load_w(c_begin, w_lo, w_hi, s_lo, s_hi);
#pragma unroll
    for (int i = 0; i < kGemvXStages - 1; i++) load_x(c_begin + i, i);
    for (int c = c_begin; c < c_end; c++) {
        const int st = (c - c_begin) % kGemvXStages;
        asm volatile("cp.async.wait_group %0;\n" ::"n"(kGemvXStages - 2) : "memory");
        __syncthreads();  // chunk c visible to all; every warp is done with chunk c - 1's stage
        load_x(c + kGemvXStages - 1, (c - c_begin + kGemvXStages - 1) % kGemvXStages);
        const uint4 cur_lo[2] = {w_lo[0], w_lo[1]}, cur_hi[2] = {w_hi[0], w_hi[1]};
        const uint32_t cur_s_lo = s_lo, cur_s_hi = s_hi;
        load_w(c + 1, w_lo, w_hi, s_lo, s_hi);  // next chunk's weight in flight during this one's math
        gemv_chunk<NT, ACCS>(accs, cur_lo, cur_hi, cur_s_lo, cur_s_hi, [&](int j, int i) {
            return *reinterpret_cast<const uint4*>(&xs[st][x_unit_offset(g + 8 * j, t * 8 + i)]);
        });
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    gemv_finish<NT, SPLIT, OutT, ACCS>(accs, xfer, true, tile, slice, y, M, N, alpha, bias, bias_len, gelu_from);
}
}  // namespace

// SPLIT = 1: no cluster; SPLIT > 1: SPLIT CTAs per cluster along y, the grid's y extent.
// Two accumulator sets everywhere; three CTAs per SM for one token tile (its registers allow it),
// two for two (three made them spill). Measured per shape, split and form in docs/PERF.md
// (session 16): 2-7% faster than one set at two CTAs per SM.
constexpr int kGemvAccSets = 2;
#define GEMV_SM90_T(NT, SPLIT, T, TNAME)                                                                  \
    extern "C" __global__ void __cluster_dims__(1, SPLIT, 1) __launch_bounds__(kGemvWarps * 32, NT == 1 ? 3 : 2) \
        nvfp4_gemv_sm90_nt##NT##_s##SPLIT##_##TNAME(const __nv_bfloat16* x, const uint8_t* w,              \
                                                    const uint8_t* sc, T* y, int M, int N, int K,          \
                                                    int row_bytes, int scale_cols, float alpha,            \
                                                    const T* bias, int bias_len, int gelu_from) {          \
        gemv_sm90<NT, SPLIT, T, kGemvAccSets>(x, w, sc, y, M, N, K, row_bytes, scale_cols, alpha, bias,    \
                                              bias_len, gelu_from);                                        \
    }
// Every GEMV form in every output type, token tile count and compiled K split (cluster size).
#define GEMV_SM90_INSTANCES(FORM)                                                                    \
    FORM(1, 1, float, f32) FORM(1, 1, __nv_bfloat16, bf16) FORM(1, 1, __half, f16)                   \
    FORM(1, 2, float, f32) FORM(1, 2, __nv_bfloat16, bf16) FORM(1, 2, __half, f16)                   \
    FORM(1, 4, float, f32) FORM(1, 4, __nv_bfloat16, bf16) FORM(1, 4, __half, f16)                   \
    FORM(1, 8, float, f32) FORM(1, 8, __nv_bfloat16, bf16) FORM(1, 8, __half, f16)                   \
    FORM(2, 1, float, f32) FORM(2, 1, __nv_bfloat16, bf16) FORM(2, 1, __half, f16)                   \
    FORM(2, 2, float, f32) FORM(2, 2, __nv_bfloat16, bf16) FORM(2, 2, __half, f16)                   \
    FORM(2, 4, float, f32) FORM(2, 4, __nv_bfloat16, bf16) FORM(2, 4, __half, f16)                   \
    FORM(2, 8, float, f32) FORM(2, 8, __nv_bfloat16, bf16) FORM(2, 8, __half, f16)
GEMV_SM90_INSTANCES(GEMV_SM90_T)

// ---------------------------------------------------------------------------------------------
// The same GEMM with TMA copies and CTA pairs (`nvfp4_gemm_sm90_tma_*`): the form that runs where
// the 128-feature blocks pair up (N / 128 even, as in every FLUX.1/FLUX.2/Wan2.2 linear); the
// cp.async form above stays for the rest and for comparisons (`CANDIFF_SM90_GEMM=pipe`). Same tiles,
// same dequantization, same wgmmas in the same K order: the two forms give the same bits.
//
// Why (docs/PERF.md, sessions 14 and 19): with every thread issuing cp.async copies and a CTA
// barrier per K tile, the cp.async form's main loop takes ~1340-1460 cycles per tile against 1024
// of tensor work, even with no dequantization; halving the activation traffic was worth 6-8%.
// - A cluster of two CTAs computes the two neighbouring feature blocks of the same BT tokens. Each
//   CTA's TMA fetches half of the tile's activations and multicasts it into both CTAs, so every
//   activation byte crosses from L2 once per pair.
// - One thread of a third (producer) warpgroup issues all copies of a stage: its activation half
//   (2-D tensor map, 128-byte swizzle, the layout wgmma's descriptor expects), the tile's 128 code
//   rows (2-D tensor map, in physical trtllm row order: each thread reads its rows at their
//   physical slots) and the 512-byte scale block (one bulk copy). Out-of-range tokens and features
//   arrive as zeros. The two consumer warpgroups spend no instructions on copies.
// - No CTA-wide barrier in the loop: a stage's "full" mbarrier counts the bytes in, and its "empty"
//   mbarrier takes one arrival from each consumer warpgroup of both CTAs once that warpgroup's
//   wgmmas of the stage completed (a copy into a stage writes both CTAs' shared memory).
namespace {
namespace tma {

constexpr int kCtas = 2;                               // CTAs per cluster (along the feature blocks)
constexpr uint32_t kEmptyArrivals = 2 * kCtas;         // one per warpgroup of each CTA
constexpr int kCodeTileBytes = kRows * kBK / 2;        // 128 rows x 32 code bytes
constexpr int kScaleTileBytes = 512;                   // one 128x4 scale tile
constexpr uint16_t kBothCtas = (1u << kCtas) - 1;      // multicast mask
constexpr int kConsumerWarps = kThreads / 32;          // the two consumer warpgroups' warps

// The driver's opaque CUtensorMap (128 bytes, 64-byte aligned), passed by value as a
// __grid_constant__ kernel parameter; the TMA instructions take its generic address.
struct alignas(64) TensorMap {
    uint64_t opaque[16];
};

__device__ __forceinline__ uint32_t cta_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// One arrival on the barrier at the same offset in CTA `rank` of the cluster (this one included).
// CTA-scope release (the default): the arrival publishes no writes of ours, it only says that our
// wgmmas finished reading the stage; a cluster-scope release would fence every time.
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
    asm volatile(
        "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
        "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
        "r"(rank)
        : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TensorMap* map, uint32_t bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}
// The box lands at offset `dst` of every CTA in `mask`, each CTA's barrier at offset `bar` counting it.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const TensorMap* map, uint32_t bar, int c0, int c1,
                                                      uint16_t mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, "
        "%4}], [%2], %5;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "h"(mask)
        : "memory");
}
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
__device__ __forceinline__ void prefetch_map(const TensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// A box of shared memory (written by this thread's warp, then fenced) stored at {c0, c1} of the
// map's tensor (clipped at its edges) as this thread's next bulk group.
__device__ __forceinline__ void tma_store_2d(const TensorMap* map, uint32_t src, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n"
        "cp.async.bulk.commit_group;\n" ::"l"(reinterpret_cast<uint64_t>(map)),
        "r"(src), "r"(c0), "r"(c1)
        : "memory");
}
// This thread's bulk stores have finished reading shared memory (it may be written again).
__device__ __forceinline__ void tma_store_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
__device__ __forceinline__ void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Four 8x8 16-bit matrices, transposed: lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0),
                 "r"(r1), "r"(r2), "r"(r3)
                 : "memory");
}
template <typename OutT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    if constexpr (std::is_same_v<OutT, __nv_bfloat16>) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    } else {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
}

// The TMA-store epilogue (16-bit outputs): each warp's 16 features x BT tokens leave through a
// staging box of 16 features x kStoreTokens tokens (32-byte rows, 32-byte swizzle: stmatrix's 8
// rows of a matrix hit 8 different bank groups) that one TMA store copies out, clipped at M and
// N, while the warp goes on to its next unit. The per-element stores this replaces (128 per thread,
// each row of a warp's store 16 bytes) cost ~2.8k of the ~11.7k cycles around each tile pair, 5%
// of a K = 3072 product (docs/PERF.md, session 20).
// Tokens per staging box at BT tokens per CTA: the whole tile up to 128, else half of it (two
// stores, the second box written once the first was read), where that half is a whole number of
// stmatrix steps (16 tokens); the tile widths that fill the SMs with an odd number of such steps
// (176, 208) take one box of BT (the host's `sm90_store_box_tokens`).
template <int BT>
constexpr int store_tokens() {
    return BT <= 128 ? BT : (BT % 32 == 0 ? BT / 2 : BT);
}
template <int BT>
constexpr int store_box_bytes() {
    return store_tokens<BT>() * 16 * 2;  // 16 features x 2 bytes per token row
}
template <int BT>
constexpr int store_bytes() {
    return kConsumerWarps * store_box_bytes<BT>();
}
// Byte offset of (token row, 16-byte half) in a warp's box: the 32-byte swizzle (bit 4 ^= bit 7).
__device__ __forceinline__ uint32_t store_box_offset(int row, int half) {
    const uint32_t off = (uint32_t)row * 32u + (uint32_t)half * 16u;
    return off ^ ((off >> 3) & 16u);
}

// Work units as in gemm_sm90's tiles, taken in pairs: unit u (`units` of them) is the tile pair
// tile0 + 2 (u / splits) + rank over the K tiles of part u % splits. Persistent: cluster c of the
// grid's G takes units c, c + G, c + 2G, ... (G = units: one each). The producer runs on into the
// next unit's stages while the consumers store a finished tile, so the pipeline fills once per
// cluster rather than once per tile (docs/PERF.md, session 20).
// Warpgroups 0 and 1 consume (dequantize, wgmma); one thread of warpgroup 2 issues the copies, up
// to STAGES tiles ahead, its warpgroup's registers handed to the consumers (setmaxnreg). Thread 0
// issuing them between its own warpgroup's wgmmas instead ran 2-7% slower (docs/PERF.md, session 19).
constexpr int kProducerThreads = 128;
// setmaxnreg budgets: 2 x 128 x 232 + 128 x 40 = 64512 of the SM's 65536 registers.
constexpr int kConsumerRegs = 232;
constexpr int kProducerRegs = 40;
static_assert(2 * 128 * kConsumerRegs + kProducerThreads * kProducerRegs <= 65536, "register file");

// Where unit u lies: its tile (this CTA's of the pair), first output token and feature, and K range.
struct Unit {
    int tile, part_k, m0, n0, kb, nt;
    __device__ __forceinline__ Unit(int u, uint32_t rank, int tile0, int splits, int N, int K, int BT) {
        const int feature_blocks = (N + kRows - 1) / kRows;
        part_k = u % splits;
        tile = tile0 + kCtas * (u / splits) + (int)rank;
        n0 = (tile % feature_blocks) * kRows;
        m0 = (tile / feature_blocks) * BT;
        const int ktiles_all = (K + kBK - 1) / kBK;
        const int per_part = (ktiles_all + splits - 1) / splits;
        kb = min(ktiles_all, part_k * per_part);
        nt = min(ktiles_all, kb + per_part) - kb;
    }
};

// A warp's 16 features (f0 .. f0 + 15; this thread's n_lo, n_hi) x BT tokens from m0 through its
// staging box `box`: y = act(alpha x 2^7 x sum + bias[n]) packed in pairs of tokens, stmatrix'ed
// transposed (token rows of 16 features), one TMA store per kStoreTokens tokens. The box is free
// again once the previous store read it (the wait, by the lane that issued it).
template <int BT, typename OutT>
__device__ __forceinline__ void store_tile_tma(const float (&acc)[BT / 2], const TensorMap* out_map, uint32_t box,
                                               int lane, int f0, int m0, int n_lo, int n_hi, float alpha,
                                               const OutT* __restrict__ bias, int bias_len, int gelu_from) {
    const float out_scale = alpha * kScaleBias;
    const float b_lo = bias_of(bias, bias_len, n_lo), b_hi = bias_of(bias, bias_len, n_hi);
    const bool gelu_lo = n_lo >= gelu_from, gelu_hi = n_hi >= gelu_from;
    // Lane l addresses row l % 8 of matrix l / 8: matrices (group j, lo), (j, hi), (j + 1, lo),
    // (j + 1, hi) of 8 tokens x 8 features.
    const int mat = lane / 8, row = lane % 8;
    const uint32_t lane_off = store_box_offset(8 * (mat / 2) + row, mat % 2);
    constexpr int kStoreTokens = store_tokens<BT>();
    static_assert(BT % kStoreTokens == 0 && kStoreTokens % 16 == 0, "whole stmatrix steps per box");
    with_gelu(gelu_lo || gelu_hi, [&](auto gelu) {
        auto value = [&](int i) {
            const bool hi = i & 2;
            float v = acc[i] * out_scale + (hi ? b_hi : b_lo);
            if constexpr (decltype(gelu)::value) return (hi ? gelu_hi : gelu_lo) ? epilogue_gelu<OutT>(v) : v;
            return v;
        };
#pragma unroll
        for (int h = 0; h < BT / kStoreTokens; h++) {
            if (lane == 0) tma_store_wait_read();
            __syncwarp();
#pragma unroll
            for (int jj = 0; jj < kStoreTokens / 8; jj += 2) {
                const int j = h * (kStoreTokens / 8) + jj;
                // (store_box_offset of row 8 jj + r is its offset for row r plus 8 jj x 32: the
                // swizzle bit comes from bit 7, which 8 jj x 32 = 256 jj leaves alone.)
                stmatrix_x4_trans(box + lane_off + 256u * jj, pack2<OutT>(value(4 * j), value(4 * j + 1)),
                                  pack2<OutT>(value(4 * j + 2), value(4 * j + 3)),
                                  pack2<OutT>(value(4 * j + 4), value(4 * j + 5)),
                                  pack2<OutT>(value(4 * j + 6), value(4 * j + 7)));
            }
            // The box's generic-proxy writes made visible to the TMA unit's reads.
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            __syncwarp();
            if (lane == 0) tma_store_2d(out_map, box, f0, m0 + h * kStoreTokens);
        }
    });
}

// K parts inside a cluster (KS > 1, short products, docs/PERF.md session 29): the cluster is KS CTA
// pairs, pair p computing the tile pair over K part p; the parts' sums meet in distributed shared
// memory instead of going through global memory to a second kernel (`nvfp4_sm90_tail_sum`). Each
// CTA writes its f32 sums into its own activation stages (float4 j of thread tid at j x 256 + tid:
// acc[4 j .. 4 j + 3], conflict-free), one cluster barrier publishes them, and CTA p of a pair
// finishes the tokens of groups j in [p J / KS, (p + 1) J / KS) (J = BT / 8 groups of 8 tokens):
// it reads the KS parts' sums at the same offset in the pair's KS CTAs, adds them in part order
// from 0 (tail_sum's order: the same bits) and stores y per element. The kernel's last cluster
// barrier keeps every CTA's shared memory alive until the others have read it.
//
// This takes 8-11k cycles per unit at 256 tokens whatever KS (17-33% of a split CTA at K = 3072-
// 5120, phase marks, docs/PERF.md session 34), ~14 bytes per cycle for the 128 KB each CTA reads.
// Neither issuing the reads of 4-8 groups at once (one round trip per group here; +-5%) nor reading
// the CTA's own part through its own shared-memory window (11-13% slower at 2 parts) made it faster
// (same session). In a micro-benchmark of the exchange alone (session 35) this pull was the fastest
// of seven ways: pushing with st.async or bulk copies, going through L2 (loads and stores, or TMA),
// half through each, and sums packed to 24 bits all took 7-50% longer; every path moved the bytes
// at 13-16 per cycle per SM.
constexpr int kSumBytesPerToken = kRows * 4;  // f32 sums of a token's 128 features

__device__ __forceinline__ float4 ld_cluster_f32x4(uint32_t local, uint32_t rank) {
    uint32_t remote;
    float4 v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(remote)
                 : "memory");
    return v;
}

template <int BT, typename OutT, int KS>
__device__ __forceinline__ void sum_parts(const float (&acc)[BT / 2], float4* sums, uint32_t kpart, uint32_t rank,
                                          int tid, int t, int m0, int n_lo, int n_hi, OutT* __restrict__ y, int M,
                                          int N, float alpha, const OutT* __restrict__ bias, int bias_len,
                                          int gelu_from) {
    constexpr int J = BT / 8, kPerPart = (J + KS - 1) / KS;
#pragma unroll
    for (int j = 0; j < J; j++)
        sums[j * kThreads + tid] = make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
    cluster_sync();
    const int jb = (int)kpart * J / KS, je = ((int)kpart + 1) * J / KS;
    const float out_scale = alpha * kScaleBias;
    const float b_lo = bias_of(bias, bias_len, n_lo), b_hi = bias_of(bias, bias_len, n_hi);
    const uint32_t base = smem_addr(sums + tid);
#pragma unroll
    for (int jj = 0; jj < kPerPart; jj++) {
        const int j = jb + jj;
        if (j >= je) break;
        float4 part[KS];
#pragma unroll
        for (int q = 0; q < KS; q++) part[q] = ld_cluster_f32x4(base + j * kThreads * 16, kCtas * q + rank);
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int q = 0; q < KS; q++) {
            s[0] += part[q].x;
            s[1] += part[q].y;
            s[2] += part[q].z;
            s[3] += part[q].w;
        }
        // (GELU per element, not `with_gelu`: nvcc branches around it here rather than predicating
        // it, and a second copy of this loop only doubled its code; products in 2 parts ran
        // 1.5-2% slower with it, session 34.)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int m = m0 + 8 * j + 2 * t + (e & 1), n = (e & 2) ? n_hi : n_lo;
            float v = s[e] * out_scale + ((e & 2) ? b_hi : b_lo);
            if (n >= gelu_from) v = epilogue_gelu<OutT>(v);
            if (m < M && n < N) y[(size_t)m * N + n] = from_float<OutT>(v);
        }
    }
}

// Phase marks (profiling builds only: nvcc -DCANDIFF_SM90_PHASES, the cargo feature `sm90-phases`,
// read by `candiff bench gemm --phases` through src/nvfp4/phases.rs, which documents the words).
// Each CTA of the kernel writes one record of SM clock64 marks per unit it runs: when its first
// stage landed, when the main loop and the store ended, how long the consumers and the producer
// waited on their barriers. Nsight Compute's stall sampling says where warps wait, not when: these
// marks split a tile's time into fill, main loop, sums and store, and place the CTAs' ends on one
// timeline (%globaltimer) for the last wave. Without the define every mark compiles to nothing.
#ifdef CANDIFF_SM90_PHASES
constexpr bool kPhases = true;
#else
constexpr bool kPhases = false;
#endif
constexpr int kPhaseCtas = 1024;      // records: the first half for a product's whole tiles, the second
                                      // for its split last tiles (a second launch); more CTAs: not recorded
constexpr int kPhaseUnits = 16;       // units recorded per CTA
constexpr int kPhaseHeaderWords = 8;  // per CTA
constexpr int kPhaseUnitWords = 8;    // per unit
constexpr int kPhaseCtaWords = kPhaseHeaderWords + kPhaseUnits * kPhaseUnitWords;
static_assert(kPhaseCtas * kPhaseCtaWords * 8 <= (2 << 20), "the log (a module global) stays ~1 MiB");

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    return t;
}
__device__ __forceinline__ uint32_t sm_id() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%smid;\n" : "=r"(r));
    return r;
}

}  // namespace tma
#ifdef CANDIFF_SM90_PHASES
extern "C" {
__device__ unsigned long long candiff_sm90_phases[tma::kPhaseCtas * tma::kPhaseCtaWords];
}
#endif
namespace tma {

// One thread's marks in its CTA's record (a no-op object unless kPhases): `on` for the one thread
// of each role that records (consumer thread 0, the producer's issuing thread). Waits count in
// 32-bit clocks and the record's address is formed per mark, so the marks hold three registers
// (the 256-token kernels have few to spare).
struct PhaseMarks {
    bool on;
    uint32_t rec;       // the record: blockIdx.x, in the second half for the split last tiles' launch
    uint32_t wait = 0;  // cycles waited on barriers in the current unit
    int unit = 0;
    __device__ __forceinline__ PhaseMarks(bool on_, int tile0)
        : on(on_ && blockIdx.x < (unsigned)kPhaseCtas / 2), rec(blockIdx.x + (tile0 > 0 ? kPhaseCtas / 2 : 0)) {}
    __device__ __forceinline__ static long long now() {
        if constexpr (kPhases) return clock64();
        return 0;
    }
    __device__ __forceinline__ static uint32_t now32() {
        if constexpr (kPhases) return (uint32_t)clock();
        return 0;
    }
    __device__ __forceinline__ void put(int word, unsigned long long v) const {
#ifdef CANDIFF_SM90_PHASES
        if (on) candiff_sm90_phases[rec * kPhaseCtaWords + word] = v;
#endif
    }
    __device__ __forceinline__ void header(int word, unsigned long long v) const { put(word, v); }
    // Word `word` of the current unit.
    __device__ __forceinline__ void mark(int word, unsigned long long v) const {
        if (unit < kPhaseUnits) put(kPhaseHeaderWords + unit * kPhaseUnitWords + word, v);
    }
    __device__ __forceinline__ void waited(uint32_t since) {
        if constexpr (kPhases) wait += now32() - since;
    }
    // The current unit's waits into `word`; the next unit starts.
    __device__ __forceinline__ void next_unit(int word) {
        if constexpr (kPhases) {
            mark(word, wait);
            wait = 0;
            unit++;
        }
    }
};
// Unit words (consumer unless marked): when it started, when its first stage landed, when its
// main loop ended, when its sums or store ended, cycles waited on full barriers, K tiles | tile
// << 32, the producer's cycles waited on empty barriers, when the producer issued its last copy.
enum PhaseWord { kUnitStart, kUnitFirst, kUnitLoop, kUnitStore, kUnitFullWait, kUnitTiles, kUnitEmptyWait, kUnitIssued };
// Header words: SM, %globaltimer at entry, clock at entry, clock after the barrier set-up, clock
// at exit, %globaltimer at exit, units run, BT | KS << 16 | STAGES << 24 | first tile << 32.
enum PhaseHeader { kHeadSm, kHeadNsIn, kHeadIn, kHeadSetUp, kHeadOut, kHeadNsOut, kHeadUnits, kHeadShape };

// TMA_STORE (16-bit outputs): unsplit tiles leave through the TMA-store epilogue and `out_map`
// (y as [M][N], boxes of 16 features x kStoreTokens tokens); else (and for split tiles) as
// store_tile writes them.
template <int BT, typename OutT, int STAGES, bool TMA_STORE, int KS>
__device__ __forceinline__ void gemm(const TensorMap* act1, const TensorMap* act2, const TensorMap* codes_map,
                                     const TensorMap* out_map, const uint8_t* __restrict__ sc, OutT* __restrict__ y,
                                     int M, int N, int K, int scale_cols, float alpha, int tile0, int splits,
                                     int units, float* __restrict__ part, const OutT* __restrict__ bias,
                                     int bias_len, int gelu_from, int k_split) {
    static_assert(!TMA_STORE || sizeof(OutT) == 2, "the TMA-store epilogue writes 16-bit outputs");
    static_assert(KS == 1 || !TMA_STORE, "K parts in a cluster store per element");
    static_assert(KS == 1 || BT * kSumBytesPerToken <= STAGES * BT * kTileBytesPerToken,
                  "the parts' sums fit in the activation stages");
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
    constexpr int kActBytes = BT * kTileBytesPerToken;
    uint8_t* const codes_smem = smem + STAGES * kActBytes;
    uint8_t* const scales_smem = codes_smem + STAGES * kCodeTileBytes;
    // (Every region above is a multiple of 256 bytes: the staging boxes keep their swizzle.)
    uint8_t* const store_smem = scales_smem + STAGES * kScaleTileBytes;
    const uint32_t full0 = smem_addr(store_smem + (TMA_STORE ? store_bytes<BT>() : 0)), empty0 = full0 + 8 * STAGES;
    const uint32_t act0 = smem_addr(smem);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wg = warp / 4, wq = warp % 4, g = lane / 4, t = lane % 4;
    // KS > 1: ranks 2 p and 2 p + 1 are the CTA pair of K part p (the pair's rank: `rank`).
    const uint32_t cluster_rank = cta_rank(), rank = cluster_rank % kCtas, kpart = KS > 1 ? cluster_rank / kCtas : 0;
    const uint16_t pair_mask = (uint16_t)(kBothCtas << (kCtas * kpart));
    const int first_unit = (int)blockIdx.x / (kCtas * KS), clusters = (int)gridDim.x / (kCtas * KS);
    // With K parts the sums pass through the activation stages, which another unit's copies would
    // overwrite: one unit per cluster (the host launches that many; anything else is a bug).
    if (KS > 1 && clusters != units) __trap();
    // Unit u of this CTA: with K parts, tile pair u over this CTA's part.
    auto unit = [&](int u) {
        return KS > 1 ? Unit(u * KS + (int)kpart, rank, tile0, KS, N, K, BT) : Unit(u, rank, tile0, splits, N, K, BT);
    };

    PhaseMarks pm(tid == 0, tile0);  // the consumers' marks
    if constexpr (kPhases) {
        pm.header(kHeadNsIn, global_ns());
        pm.header(kHeadIn, (unsigned long long)PhaseMarks::now());
        pm.header(kHeadSm, sm_id());
        pm.header(kHeadShape, (unsigned long long)(BT | KS << 16 | STAGES << 24) | (unsigned long long)tile0 << 32);
    }
    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, kEmptyArrivals);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        prefetch_map(act1);
        prefetch_map(act2);
        prefetch_map(codes_map);
        if constexpr (TMA_STORE) prefetch_map(out_map);
    }
    cluster_sync();  // both CTAs' barriers initialized before any copy or arrival reaches them
    pm.header(kHeadSetUp, (unsigned long long)PhaseMarks::now());

    // Stage use c (counted over all of this cluster's units, the same in both CTAs) goes to stage
    // c % STAGES in phase c / STAGES.
    if (warp >= kConsumerWarps) {  // the producer warpgroup
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs) : "memory");
        if (warp == kConsumerWarps && lane == 0) {
            PhaseMarks pp(true, tile0);  // the producer's marks
            int c = 0;
            for (int u = first_unit; u < units; u += clusters) {
                const Unit w = unit(u);
                const uint8_t* scale_src = sc + swizzle_offset(w.n0, 0, scale_cols);
                for (int j = 0; j < w.nt; j++, c++) {
                    const int st = c % STAGES, kt = w.kb + j;
                    // The stage's previous tile released by all four consumer warpgroups of the pair.
                    if (c >= STAGES) {
                        const uint32_t w0 = PhaseMarks::now32();
                        mbar_wait(empty0 + 8 * st, (uint32_t)(c / STAGES - 1) & 1u);
                        pp.waited(w0);
                    }
                    const uint32_t bar = full0 + 8 * st;
                    mbar_expect_tx(bar, kActBytes + kCodeTileBytes + kScaleTileBytes);
                    const int col = kt * kBK;
                    const bool first = col < k_split;
                    tma_load_2d_multicast(act0 + st * kActBytes + rank * (kActBytes / kCtas), first ? act1 : act2,
                                          bar, first ? col : col - k_split, w.m0 + (int)rank * (BT / kCtas),
                                          pair_mask);
                    tma_load_2d(smem_addr(codes_smem + st * kCodeTileBytes), codes_map, bar, kt * (kBK / 2), w.n0);
                    bulk_load(smem_addr(scales_smem + st * kScaleTileBytes), scale_src + (size_t)kt * kScaleTileBytes,
                              kScaleTileBytes, bar);
                }
                pp.mark(kUnitIssued, (unsigned long long)PhaseMarks::now());
                pp.next_unit(kUnitEmptyWait);
            }
        }
        // (The consumers' cluster barriers below, which every thread of the cluster must reach:
        // the last one, and with K parts one per unit.)
        const int my_units = first_unit < units ? (units - first_unit + clusters - 1) / clusters : 0;
        for (int i = 0; i < 1 + (KS > 1 ? my_units : 0); i++)
            asm volatile("barrier.cluster.arrive.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs) : "memory");

    const int r_lo = wg * 64 + wq * 16 + g, r_hi = r_lo + 8;
    const int p_lo = physical_row<0>(r_lo), p_hi = physical_row<0>(r_hi);
    const int sw_lo = swizzle_offset(p_lo, 0, 4), sw_hi = swizzle_offset(p_hi, 0, 4);
    // The stage uses in order, counted for the tiles dequantized, issued and released (each one K
    // tile ahead of the next). Below 256 tokens as a stage and its phase (a ring) and descriptors
    // as an offset from stage 0's: of ~138 instructions per K tile and warp ~40 were a division by
    // the stage count per use and five per descriptor, and the ring form measured 1.5-8% faster at
    // 128-224 tokens; at 256 it measured 0.2-0.8% slower (Nsight Compute, docs/PERF.md session 32),
    // so those kernels keep the division per use.
    constexpr bool kRing = BT < 256;
    struct Ring {
        int st = 0;
        uint32_t ph = 0;
        __device__ __forceinline__ void advance() {
            if (++st == STAGES) {
                st = 0;
                ph ^= 1u;
            }
        }
    };
    Ring deq, iss, rel;  // (unused at 256 tokens)
    // The wgmma descriptor of stage st's k16 step s: with the rings, stage 0's plus the offset in
    // 16-byte units in its low word (shared-memory addresses stay below 2^18: the 14-bit address
    // field never carries).
    const uint64_t desc0 = desc_sw128(act0);
    const uint32_t desc0_lo = (uint32_t)desc0, desc0_hi = (uint32_t)(desc0 >> 32);
    auto desc_at = [&](int st, int s) {
        constexpr uint32_t kStageUnits = kActBytes / 16, kStepUnits = 32 / 16;
        if constexpr (kRing) {
            return ((uint64_t)desc0_hi << 32) | (desc0_lo + (uint32_t)st * kStageUnits + (uint32_t)s * kStepUnits);
        } else {
            return desc_sw128(act0 + st * kActBytes + s * 32);
        }
    };
    // Stage use c: wait until its copies landed, dequantize this thread's fragments.
    auto dequant = [&](int c, uint32_t (&a)[4][4]) {
        const int st = kRing ? deq.st : c % STAGES;
        const uint32_t w0 = PhaseMarks::now32();
        mbar_wait(full0 + 8 * st, kRing ? deq.ph : (uint32_t)(c / STAGES) & 1u);
        pm.waited(w0);
        const uint8_t* cs = codes_smem + st * kCodeTileBytes;
        const uint8_t* ss = scales_smem + st * kScaleTileBytes;
        dequant_rows(cs + p_lo * (kBK / 2), cs + p_hi * (kBK / 2), *reinterpret_cast<const uint32_t*>(ss + sw_lo),
                     *reinterpret_cast<const uint32_t*>(ss + sw_hi), t, a);
        if constexpr (kRing) deq.advance();
    };
    // Stage use c done with by this warpgroup (its wgmmas completed): one arrival in each CTA.
    auto release = [&](int c) {
        if (tid % 128 == 0) {
            const uint32_t bar = empty0 + 8 * (kRing ? rel.st : c % STAGES);
#pragma unroll
            for (int r = 0; r < kCtas; r++) mbar_arrive_cluster(bar, kCtas * kpart + (uint32_t)r);
        }
        if constexpr (kRing) rel.advance();
    };

    int c0 = 0;  // stage use of the unit's first K tile
    for (int u = first_unit; u < units; u += clusters) {
        const Unit w = unit(u);
        const int nt = w.nt;
        float acc[BT / 2];
#pragma unroll
        for (int i = 0; i < BT / 2; i++) acc[i] = 0.0f;
        uint32_t a0[4][4], a1[4][4];
        const long long start = PhaseMarks::now();
        pm.mark(kUnitStart, (unsigned long long)start);
        if (nt > 0) dequant(c0, a0);
        pm.mark(kUnitFirst, (unsigned long long)(start + pm.wait));  // when the first stage had landed

        // One K tile, as gemm_sm90's step: issue tile i's wgmmas, release tile i - 1's stage (in
        // both CTAs) once its wgmmas completed, dequantize tile i + 1 while tile i's run. (Loading
        // tile i + 1's words before the wait instead measured 2-5% slower, docs/PERF.md session 20.)
        auto step = [&](int i, uint32_t (&cur)[4][4], uint32_t (&next)[4][4]) {
            const int st = kRing ? iss.st : (c0 + i) % STAGES;
            wgmma_fence();
#pragma unroll
            for (int s = 0; s < 4; s++) wgmma_rs<BT>(acc, cur[s], desc_at(st, s));
            if constexpr (kRing) iss.advance();
            wgmma_commit();
            wgmma_wait<1>();
            if (i >= 1) release(c0 + i - 1);
            if (i + 1 < nt) dequant(c0 + i + 1, next);
        };
        for (int i = 0; i < nt; i += 2) {
            step(i, a0, a1);
            if (i + 1 < nt) step(i + 1, a1, a0);
        }
        wgmma_wait<0>();
        if (nt > 0) release(c0 + nt - 1);
        pm.mark(kUnitLoop, (unsigned long long)PhaseMarks::now());
        c0 += nt;
        if constexpr (KS > 1) {
            // Every wgmma of this CTA has read its stages (both warpgroups), and no copy is left
            // to land in them (one unit per cluster): the activation stages take the sums.
            asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
            sum_parts<BT, OutT, KS>(acc, reinterpret_cast<float4*>(smem), kpart, rank, tid, t, w.m0,
                                    w.n0 + r_lo, w.n0 + r_hi, y, M, N, alpha, bias, bias_len, gelu_from);
        } else if (TMA_STORE && splits == 1) {
            store_tile_tma<BT, OutT>(acc, out_map, smem_addr(store_smem) + warp * store_box_bytes<BT>(), lane,
                                     w.n0 + wg * 64 + wq * 16, w.m0, w.n0 + r_lo, w.n0 + r_hi, alpha, bias,
                                     bias_len, gelu_from);
        } else {
            const int pblock = (w.tile - tile0) * splits + w.part_k;
            store_tile<BT, OutT>(acc, splits, part, pblock, r_lo, r_hi, w.n0 + r_lo, w.n0 + r_hi, w.m0, t, y, M, N,
                                 alpha, bias, bias_len, gelu_from);
        }
        // (A TMA store is issued here, not finished.)
        pm.mark(kUnitStore, (unsigned long long)PhaseMarks::now());
        pm.mark(kUnitTiles, (unsigned long long)nt | (unsigned long long)w.tile << 32);
        pm.next_unit(kUnitFullWait);
    }
    // This warp's stores have read their staging box (the shared memory is released below).
    if (TMA_STORE && lane == 0) tma_store_wait_all();
    // The other CTA may still arrive on this one's barriers until it passes here: this CTA's
    // shared memory stays alive until then.
    cluster_sync();
    if constexpr (kPhases) {
        pm.header(kHeadOut, (unsigned long long)PhaseMarks::now());
        pm.header(kHeadNsOut, global_ns());
        pm.header(kHeadUnits, (unsigned long long)pm.unit);
    }
}

}  // namespace tma

// ---------------------------------------------------------------------------------------------
// The GEMV (M <= 16) with TMA copies (`nvfp4_gemv_sm90_bulk_*`, the default where K >= 256; the form
// above stays for shorter K and comparisons: `CANDIFF_SM90_GEMV=reg`). Same chunks, same mma order,
// same bits.
//
// Why: the form above keeps one weight chunk per thread in flight in registers (16 KB per CTA),
// and most SMs hold one or two of its CTAs, so every warp waits for DRAM once per chunk: 31% of
// the bandwidth at M = 1 (docs/PERF.md, session 16). Here a copying warp fills a pipeline of
// kGemvBulkStages chunks in shared memory: the tile's 128 code rows of a chunk in one 2-D TMA box
// (128-byte swizzle: the lanes of a quarter-warp read 8 different bank groups), its 4 scale tiles
// in one bulk copy (2 KB, contiguous in the 128x4 swizzle), and the activations through cp.async
// (zero past M and K, in the form above's layout) whose completion arrives on the same mbarrier.
// No CTA barrier in the loop: a stage's "full" mbarrier counts the TMA bytes and the copying
// lanes' cp.async arrivals, its "empty" mbarrier one arrival per computing warp. (Per-row bulk
// copies of 128 bytes instead of the box measured 2.5x slower than the form above: session 25.)
constexpr int kGemvBulkStages = 4;
constexpr int kBulkCodeBytes = 128 * kGemvChunkBytes;    // one box: 128 rows x 128 code bytes
constexpr int kBulkScaleBytes = 4 * kScaleTileBytes;
constexpr int kBulkThreads = (kGemvWarps + 1) * 32;
constexpr uint32_t kBulkFullArrivals = 1 + 32;           // the expect_tx and the copying lanes' cp.async
template <int NT>
constexpr int bulk_stage_bytes() {
    return kBulkCodeBytes + kBulkScaleBytes + NT * 8 * kGemvXRow;  // multiples of 1024: boxes stay aligned
}
static_assert(bulk_stage_bytes<1>() % 1024 == 0 && bulk_stage_bytes<2>() % 1024 == 0,
              "each stage's code box must start on the 128-byte swizzle's 1024-byte period");

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival on `bar` once this thread's cp.async copies so far have landed.
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

template <int NT, int SPLIT, typename OutT, int ACCS>
__device__ __forceinline__ void gemv_sm90_bulk(const tma::TensorMap* codes_map, const __nv_bfloat16* __restrict__ x,
                                               const uint8_t* __restrict__ sc, OutT* __restrict__ y, int M, int N,
                                               int K, int row_bytes, int scale_cols, float alpha,
                                               const OutT* __restrict__ bias, int bias_len, int gelu_from) {
    constexpr int S = kGemvBulkStages, SB = bulk_stage_bytes<NT>();
    extern __shared__ __align__(128) uint8_t smem_raw[];
    // The 128-byte swizzle repeats every 1024 bytes: boxes start at multiples of it.
    uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const uint32_t bars = smem_addr(smem + S * SB);  // full[S], then empty[S]
    // A split's partial sums from the other CTAs, after the barriers.
    float* xfer = reinterpret_cast<float*>(smem + S * SB + 2 * S * 8);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x, slice = SPLIT > 1 ? blockIdx.y : 0;
    const int chunks = (row_bytes + kGemvChunkBytes - 1) / kGemvChunkBytes;
    const int c_begin = slice * chunks / SPLIT, c_end = (slice + 1) * chunks / SPLIT;

    if (tid == 0) {
        tma::prefetch_map(codes_map);
        for (int s = 0; s < S; s++) {
            tma::mbar_init(bars + 8 * s, kBulkFullArrivals);
            tma::mbar_init(bars + 8 * (S + s), kGemvWarps);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    float accs[ACCS][NT][4] = {};

    if (warp == kGemvWarps) {
        // The copying warp: chunk c into stage (c - c_begin) % S once its previous chunk is read.
        for (int c = c_begin; c < c_end; c++) {
            const int it = c - c_begin, st = it % S;
            if (it >= S) tma::mbar_wait(bars + 8 * (S + st), (it / S - 1) & 1);
            uint8_t* codes = smem + st * SB;
            uint8_t* xs = codes + kBulkCodeBytes + kBulkScaleBytes;
            const uint32_t full = bars + 8 * st;
            const int off = c * kGemvChunkBytes;
            if (lane == 0) {
                // Whole 64-wide K tiles of scales; the box's bytes past the row arrive as zeros.
                const int scale_bytes = min(kGemvChunkBytes, row_bytes - off) / kGemvThreadBytes * kScaleTileBytes;
                tma::mbar_expect_tx(full, kBulkCodeBytes + scale_bytes);
                tma::tma_load_2d(smem_addr(codes), codes_map, full, off, tile * 128);
                tma::bulk_load(smem_addr(codes + kBulkCodeBytes),
                               sc + ((size_t)tile * (scale_cols / 4) + 4 * (size_t)c) * kScaleTileBytes, scale_bytes,
                               full);
            }
#pragma unroll
            for (int token = 0; token < NT * 8; token++) {
                const int k = c * kGemvChunk + 8 * lane;
                const bool ok = token < M && k < K;
                cp_async16(xs + x_unit_offset(token, lane), ok ? (const void*)(x + (size_t)token * K + k) : (const void*)x,
                           ok);
            }
            cp_async_arrive(full);
        }
    } else {
        // Everything a thread reads of a stage sits at a fixed offset from the stage's start:
        // the offsets are computed once, and the loop below is unrolled over the stages so that
        // each read is one shared load at (offset register + constant), with no address
        // arithmetic per chunk (a third of the loop's instructions before: session 26).
        const int r_lo = warp * 16 + g, r_hi = r_lo + 8;
        // This thread's two 16-byte units of a code row (2 t, 2 t + 1) under the 128-byte swizzle.
        const uint32_t o_lo0 = r_lo * kGemvChunkBytes + 16 * ((2 * t) ^ (r_lo & 7));
        const uint32_t o_lo1 = r_lo * kGemvChunkBytes + 16 * ((2 * t + 1) ^ (r_lo & 7));
        const uint32_t o_hi0 = r_hi * kGemvChunkBytes + 16 * ((2 * t) ^ (r_hi & 7));
        const uint32_t o_hi1 = r_hi * kGemvChunkBytes + 16 * ((2 * t + 1) ^ (r_hi & 7));
        // This thread's scale word of a chunk: tile t of the four, row r's word (128x4 swizzle).
        const uint32_t o_s_lo = kBulkCodeBytes + t * kScaleTileBytes + (r_lo % 32) * 16 + (r_lo / 32) * 4;
        const uint32_t o_s_hi = kBulkCodeBytes + t * kScaleTileBytes + (r_hi % 32) * 16 + (r_hi / 32) * 4;
        // This thread's activation units; token g + 8's sit 8 rows after token g's (same swizzle).
        uint32_t o_x[8];
#pragma unroll
        for (int i = 0; i < 8; i++) o_x[i] = kBulkCodeBytes + kBulkScaleBytes + x_unit_offset(g, t * 8 + i);
        // Chunks where this thread has a code piece: a piece past the row arrives as zeros (the
        // box's bytes outside the tensor), but its scale word is not copied, so it reads as 0.
        const int piece_end = (row_bytes - t * kGemvThreadBytes + kGemvChunkBytes - 1) / kGemvChunkBytes;
        auto consume = [&](const uint8_t* stage, int c) {
            const uint4 lo[2] = {*reinterpret_cast<const uint4*>(stage + o_lo0),
                                 *reinterpret_cast<const uint4*>(stage + o_lo1)};
            const uint4 hi[2] = {*reinterpret_cast<const uint4*>(stage + o_hi0),
                                 *reinterpret_cast<const uint4*>(stage + o_hi1)};
            uint32_t s_lo = 0, s_hi = 0;
            if (c < piece_end) {
                s_lo = *reinterpret_cast<const uint32_t*>(stage + o_s_lo);
                s_hi = *reinterpret_cast<const uint32_t*>(stage + o_s_hi);
            }
            gemv_chunk<NT, ACCS>(accs, lo, hi, s_lo, s_hi, [&](int j, int i) {
                return *reinterpret_cast<const uint4*>(stage + o_x[i] + j * 8 * kGemvXRow);
            });
        };
        for (int c0 = c_begin, phase = 0; c0 < c_end; c0 += S, phase ^= 1) {
#pragma unroll
            for (int st = 0; st < S; st++) {
                const int c = c0 + st;
                if (c >= c_end) break;
                tma::mbar_wait(bars + 8 * st, phase);
                consume(smem + st * SB, c);
                __syncwarp();
                if (lane == 0) mbar_arrive(bars + 8 * (S + st));
            }
        }
    }
    gemv_finish<NT, SPLIT, OutT, ACCS>(accs, xfer, warp < kGemvWarps, tile, slice, y, M, N, alpha, bias, bias_len,
                                       gelu_from);
}
}  // namespace

// Dynamic shared memory: 1024 bytes of alignment slack, kGemvBulkStages x bulk_stage_bytes<NT>(),
// 2 x stages mbarriers and, for SPLIT > 1, kGemvXferFloats<NT> floats (the host's
// `sm90_gemv_bulk_smem`). Grid as the form above; 288 threads.
#define GEMV_SM90_BULK_T(NT, SPLIT, T, TNAME)                                                              \
    extern "C" __global__ void __cluster_dims__(1, SPLIT, 1) __launch_bounds__(kBulkThreads, 2)            \
        nvfp4_gemv_sm90_bulk_nt##NT##_s##SPLIT##_##TNAME(                                                  \
            const __grid_constant__ tma::TensorMap codes, const __nv_bfloat16* x, const uint8_t* w,         \
            const uint8_t* sc, T* y, int M, int N, int K, int row_bytes, int scale_cols, float alpha,       \
            const T* bias, int bias_len, int gelu_from) {                                                  \
        gemv_sm90_bulk<NT, SPLIT, T, kGemvAccSets>(&codes, x, sc, y, M, N, K, row_bytes, scale_cols, alpha, \
                                                   bias, bias_len, gelu_from);                             \
    }
GEMV_SM90_INSTANCES(GEMV_SM90_BULK_T)

// Dynamic shared memory: STAGES x (activation tile, weight codes, scales), the staging boxes of the
// TMA-store epilogue (tmast kernels), 2 x STAGES mbarriers, 1024 bytes of alignment slack. Grid: two
// CTAs per cluster, at most one cluster per unit (tile pair, or tile pair and K part); the host
// launches as many clusters as fit on the GPU at once.
#define GEMM_SM90_TMA(BT, T, TNAME, STAGES, STORE, KIND) GEMM_SM90_TMA_KS(BT, T, TNAME, STAGES, STORE, KIND, 1)
#define GEMM_SM90_TMA_KS(BT, T, TNAME, STAGES, STORE, KIND, KS)                                            \
    extern "C" __global__ void __cluster_dims__(tma::kCtas * KS, 1, 1)                                    \
        __launch_bounds__(kThreads + tma::kProducerThreads, 1) nvfp4_gemm_sm90_##KIND##_s##STAGES##_bt##BT##_##TNAME( \
            const __grid_constant__ tma::TensorMap act1, const __grid_constant__ tma::TensorMap act2,        \
            const __grid_constant__ tma::TensorMap codes, const __grid_constant__ tma::TensorMap out,        \
            const uint8_t* sc, T* y, int M, int N, int K, int scale_cols, float alpha, int tile0, int splits, \
            int units, float* part, const T* bias, int bias_len, int gelu_from, int k_split) {               \
        tma::gemm<BT, T, STAGES, STORE, KS>(&act1, &act2, &codes, &out, sc, y, M, N, K, scale_cols, alpha, tile0, \
                                        splits, units, part, bias, bias_len, gelu_from, k_split);            \
    }
// Per-element stores: 5 stages (as the cp.async form) and 6 (227 KiB of shared memory at 256 tokens);
// the host picks. The TMA-store epilogue (16-bit outputs): 5 stages, its staging boxes taking the
// sixth's room.
#define GEMM_SM90_TMA_STAGES(BT, T, TNAME)     \
    GEMM_SM90_TMA(BT, T, TNAME, 5, false, tma) \
    GEMM_SM90_TMA(BT, T, TNAME, 6, false, tma)
#define GEMM_SM90_TMA_STORE(BT, T, TNAME) GEMM_SM90_TMA(BT, T, TNAME, 5, true, tmast)
// The TMA-store epilogue's 16-bit outputs at BT tokens per CTA.
#define GEMM_SM90_TMA_STORE_16(BT)                  \
    GEMM_SM90_TMA_STORE(BT, __nv_bfloat16, bf16)    \
    GEMM_SM90_TMA_STORE(BT, __half, f16)
GEMM_SM90_INSTANCES(GEMM_SM90_TMA_STAGES)
GEMM_SM90_TMA_STORE_16(128)
GEMM_SM90_TMA_STORE_16(256)
// Tile widths between 128 and 256 tokens (the host's tiling::SM90_FILL_TOKENS), which fill the
// SMs where 256-token tiles leave many idle and would take as many waves (1024 tokens x 3072
// features: 120 tiles of 208 tokens instead of 96 of 256 on 132 SMs). TMA form only, whole tiles
// only (no K parts): the plan uses them only where neither is needed.
#define GEMM_SM90_FILL_WIDTH(BT) GEMM_SM90_TYPES(GEMM_SM90_TMA_STAGES, BT) GEMM_SM90_TMA_STORE_16(BT)
GEMM_SM90_FILL_WIDTH(176)
GEMM_SM90_FILL_WIDTH(208)
GEMM_SM90_FILL_WIDTH(224)
// K parts in the cluster (`tmak{KS}_s6_`): 2, 3 or 4 parts (clusters of 4, 6, 8 CTAs), per-element
// stores, 6 stages (the host's SM90_TMA_SPLIT_STAGES).
#define GEMM_SM90_TMA_PARTS(BT, T, TNAME)                  \
    GEMM_SM90_TMA_KS(BT, T, TNAME, 6, false, tmak2, 2)     \
    GEMM_SM90_TMA_KS(BT, T, TNAME, 6, false, tmak3, 3)     \
    GEMM_SM90_TMA_KS(BT, T, TNAME, 6, false, tmak4, 4)
GEMM_SM90_INSTANCES(GEMM_SM90_TMA_PARTS)
