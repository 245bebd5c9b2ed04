// The `cutlass` NVFP4 variant on GPUs without FP4 tensor cores (sm_80 .. sm_90): a CuTe TiledMMA
// (SM80 16x8x16 bf16 atoms, f32 accumulation) whose mainloop dequantizes the 4-bit weight tile
// into shared memory. Weights come in the cutlass layout: N and K padded to 32, 128x4 scales.
// Compiled only when the CUTLASS headers are available (scripts/setup-cuda.sh --cutlass).

#include <cute/tensor.hpp>

#include "nvfp4_common.cuh"

namespace {
using namespace cute;
using namespace nvfp4;

constexpr int BM = kTileM, BN = kTileN, BK = kTileK;
constexpr int LD = BK + 8;  // padded smem row (bf16 elements) against bank conflicts
constexpr int THREADS = kTileThreads;

template <class OutT>
__device__ __forceinline__ void cute_nvfp4_w4a16(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                                                 const uint8_t* __restrict__ sc, OutT* __restrict__ y, int M, int N,
                                                 int K, int row_bytes, int scale_cols, float alpha) {
    __shared__ __align__(128) cute::bfloat16_t smA[2][BM * LD];
    __shared__ __align__(128) uint8_t braw[2][BN * BK / 2];
    __shared__ __align__(128) cute::bfloat16_t smB[BN * LD];
    __shared__ uint32_t lut[256];

    const int tid = threadIdx.x;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    lut[tid] = e2m1x2_bf16x2(tid);

    auto sA_layout = make_layout(make_shape(Int<BM>{}, Int<BK>{}), make_stride(Int<LD>{}, Int<1>{}));
    auto sB_layout = make_layout(make_shape(Int<BN>{}, Int<BK>{}), make_stride(Int<LD>{}, Int<1>{}));
    // 8 warps as 2 x 4 atoms of 16x8x16; the 128x128 tile is covered by repeating them.
    TiledMMA mma = make_tiled_mma(SM80_16x8x16_F32BF16BF16F32_TN{}, Layout<Shape<_2, _4, _1>>{});
    ThrMMA thr = mma.get_slice(tid);
    Tensor cC = make_identity_tensor(make_shape(Int<BM>{}, Int<BN>{}));
    Tensor tCcC = thr.partition_C(cC);
    Tensor tCrC = thr.partition_fragment_C(cC);
    clear(tCrC);

    const int copy_n = n0 + (tid % BN);
    const bool copy_ok = copy_n < N;
    const uint8_t* copy_src = w + (size_t)(copy_ok ? copy_n : 0) * row_bytes;
    const int dq_row = tid / 2, dq_blk = tid % 2, dq_n = n0 + dq_row;

    auto load = [&](int k0, int st) {
        load_tile_async(x, M, K, m0, k0, reinterpret_cast<__nv_bfloat16*>(&smA[st][0]), LD, copy_ok ? copy_src : nullptr,
                        &braw[st][0], x, tid);
    };

    const int ktiles = (K + BK - 1) / BK;
    load(0, 0);
    for (int kt = 0; kt < ktiles; kt++) {
        const int st = kt & 1;
        cp_async_wait_all();
        __syncthreads();
        if (kt + 1 < ktiles) load((kt + 1) * BK, st ^ 1);
        {
            int kb = kt * 2 + dq_blk;
            float s = dq_n < N && kb * kGroup < K ? e4m3_decode(sc[swizzle_offset(dq_n, kb, scale_cols)]) : 0.0f;
            dequant_block_bf16(&braw[st][dq_row * 16 + dq_blk * 8], s, lut, reinterpret_cast<__nv_bfloat16*>(&smB[dq_row * LD + dq_blk * kGroup]));
        }
        __syncthreads();
        Tensor sA = make_tensor(make_smem_ptr(&smA[st][0]), sA_layout);
        Tensor sB = make_tensor(make_smem_ptr(&smB[0]), sB_layout);
        Tensor tCsA = thr.partition_A(sA);
        Tensor tCsB = thr.partition_B(sB);
        Tensor tCrA = thr.make_fragment_A(tCsA);
        Tensor tCrB = thr.make_fragment_B(tCsB);
        copy(tCsA, tCrA);
        copy(tCsB, tCrB);
        gemm(mma, tCrA, tCrB, tCrC);
    }
    for (int i = 0; i < size(tCrC); i++) {
        int gm = m0 + get<0>(tCcC(i)), gn = n0 + get<1>(tCcC(i));
        if (gm < M && gn < N) y[(size_t)gm * N + gn] = from_float<OutT>(tCrC(i) * alpha);
    }
}

}  // namespace

#define CUTE_GEMM(T, TNAME)                                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        nvfp4_cute_gemm_##TNAME(const __nv_bfloat16* x, const uint8_t* w, const uint8_t* sc, T* y, int M, int N, \
                                int K, int row_bytes, int scale_cols, float alpha) {                          \
        cute_nvfp4_w4a16<T>(x, w, sc, y, M, N, K, row_bytes, scale_cols, alpha);                              \
    }
CUTE_GEMM(float, f32)
CUTE_GEMM(__nv_bfloat16, bf16)
CUTE_GEMM(__half, f16)
