// Session 26 scratch probe, kept as the record of docs/perf/2026-11-30-h200-s26-calls.txt (not built by the
// crate). It was built from a copy in .gpu/ (its #include of ../kernels/nvfp4_sm90.cu is relative to there):
//   source .toolchain/cuda/env.sh && nvcc -O3 -std=c++17 --expt-relaxed-constexpr -I kernels \
//       -gencode=arch=compute_90a,code=sm_90a -cudart static -o .gpu/probe2 .gpu/probe2.cu
// Scratch probe (not part of candiff): the bulk GEMV's pipeline with P chunks per stage, boxes
// laid out per chunk (mode 0: P 2-D boxes) or per row (mode 1: one 3-D box, a row's P chunks
// contiguous), with or without the math. Garbage data: timing only.
#include "../kernels/nvfp4_sm90.cu"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#define CK(x) do { auto e = (x); if (e != 0) { printf("%s: %d\n", #x, (int)e); exit(1);} } while (0)

__device__ __forceinline__ void tma_load_3d(uint32_t dst, const tma::TensorMap* map, uint32_t bar, int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}

template <int NT, int P, int S, int MODE, bool MATH, bool WAIT = true>
__global__ void __launch_bounds__(288, 1) probe_gemv(const __grid_constant__ tma::TensorMap codes_map, const __nv_bfloat16* __restrict__ x,
                                                     const uint8_t* __restrict__ sc, float* y, int M, int K, int row_bytes, int scale_cols) {
    constexpr int CB = kBulkCodeBytes * P, SCB = kBulkScaleBytes * P, XB = NT * 8 * kGemvXRow;
    constexpr int SB = CB + SCB + P * XB;
    extern __shared__ __align__(128) uint8_t smem_raw[];
    uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const uint32_t bars = smem_addr(smem + S * SB);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x, slice = blockIdx.y, split = gridDim.y;
    const int groups = row_bytes / kGemvChunkBytes / P;
    const int g_begin = slice * groups / split, g_end = (slice + 1) * groups / split;
    if (tid == 0) {
        tma::prefetch_map(&codes_map);
        for (int s = 0; s < S; s++) {
            tma::mbar_init(bars + 8 * s, kBulkFullArrivals);
            tma::mbar_init(bars + 8 * (S + s), kGemvWarps);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    float accs[2][NT][4] = {};
    uint32_t sink = 0;
    if (warp == kGemvWarps) {
        if (!WAIT) return;
        for (int gr = g_begin; gr < g_end; gr++) {
            const int it = gr - g_begin, st = it % S;
            if (it >= S) tma::mbar_wait(bars + 8 * (S + st), (it / S - 1) & 1);
            uint8_t* codes = smem + st * SB;
            uint8_t* xs = codes + CB + SCB;
            const uint32_t full = bars + 8 * st;
            const int c = gr * P;
            if (lane == 0) {
                tma::mbar_expect_tx(full, CB + SCB);
                if (MODE == 0) {
                    for (int p = 0; p < P; p++) tma::tma_load_2d(smem_addr(codes + p * kBulkCodeBytes), &codes_map, full, (c + p) * kGemvChunkBytes, tile * 128);
                } else {
                    tma_load_3d(smem_addr(codes), &codes_map, full, 0, c, tile * 128);
                }
                tma::bulk_load(smem_addr(codes + CB), sc + ((size_t)tile * (scale_cols / 4) + 4 * (size_t)c) * kScaleTileBytes, SCB, full);
            }
#pragma unroll
            for (int p = 0; p < P; p++)
#pragma unroll
                for (int token = 0; token < NT * 8; token++) {
                    const int k = (c + p) * kGemvChunk + 8 * lane;
                    const bool ok = token < M && k < K;
                    cp_async16(xs + p * XB + x_unit_offset(token, lane), ok ? (const void*)(x + (size_t)token * K + k) : (const void*)x, ok);
                }
            cp_async_arrive(full);
        }
    } else {
        const int r_lo = warp * 16 + g, r_hi = r_lo + 8;
        const int sw = g & 1;  // mode 1: odd rows read their second unit first (no bank conflicts)
        for (int gr = g_begin; gr < g_end; gr++) {
            const int it = gr - g_begin, st = it % S;
            if (WAIT) tma::mbar_wait(bars + 8 * st, (it / S) & 1);
            const uint8_t* stage = smem + st * SB;
#pragma unroll
            for (int p = 0; p < P; p++) {
                uint4 lo[2], hi[2];
                if (MODE == 0) {
                    const uint8_t* b = stage + p * kBulkCodeBytes;
                    lo[0] = *reinterpret_cast<const uint4*>(b + r_lo * 128 + 16 * ((2 * t) ^ (r_lo & 7)));
                    lo[1] = *reinterpret_cast<const uint4*>(b + r_lo * 128 + 16 * ((2 * t + 1) ^ (r_lo & 7)));
                    hi[0] = *reinterpret_cast<const uint4*>(b + r_hi * 128 + 16 * ((2 * t) ^ (r_hi & 7)));
                    hi[1] = *reinterpret_cast<const uint4*>(b + r_hi * 128 + 16 * ((2 * t + 1) ^ (r_hi & 7)));
                } else {
                    const int L_lo = r_lo * P + p, L_hi = r_hi * P + p;
                    const uint4 a0 = *reinterpret_cast<const uint4*>(stage + L_lo * 128 + 16 * ((2 * t + sw) ^ (L_lo & 7)));
                    const uint4 a1 = *reinterpret_cast<const uint4*>(stage + L_lo * 128 + 16 * ((2 * t + 1 - sw) ^ (L_lo & 7)));
                    const uint4 b0 = *reinterpret_cast<const uint4*>(stage + L_hi * 128 + 16 * ((2 * t + sw) ^ (L_hi & 7)));
                    const uint4 b1 = *reinterpret_cast<const uint4*>(stage + L_hi * 128 + 16 * ((2 * t + 1 - sw) ^ (L_hi & 7)));
                    lo[0] = sw ? a1 : a0; lo[1] = sw ? a0 : a1; hi[0] = sw ? b1 : b0; hi[1] = sw ? b0 : b1;
                }
                const uint8_t* scs = stage + CB + p * kBulkScaleBytes;
                const uint32_t s_lo = *reinterpret_cast<const uint32_t*>(scs + t * kScaleTileBytes + (r_lo % 32) * 16 + (r_lo / 32) * 4);
                const uint32_t s_hi = *reinterpret_cast<const uint32_t*>(scs + t * kScaleTileBytes + (r_hi % 32) * 16 + (r_hi / 32) * 4);
                const uint8_t* xs = stage + CB + SCB + p * XB;
                if (MATH) {
                    gemv_chunk<NT, 2>(accs, lo, hi, s_lo, s_hi, [&](int j, int i) {
                        return *reinterpret_cast<const uint4*>(xs + x_unit_offset(g + 8 * j, t * 8 + i));
                    });
                } else {
                    sink ^= lo[0].x ^ lo[1].y ^ hi[0].z ^ hi[1].w ^ s_lo ^ s_hi;
                }
            }
            __syncwarp();
            if (WAIT && lane == 0) mbar_arrive(bars + 8 * (S + st));
        }
        float v = sink;
        for (int a = 0; a < 2; a++) for (int j = 0; j < NT; j++) for (int e = 0; e < 4; e++) v += accs[a][j][e];
        y[(size_t)(blockIdx.y * gridDim.x + blockIdx.x) * 256 + tid] = v;
    }
}

static PFN_cuTensorMapEncodeTiled_v12000 encode;
tma::TensorMap make_map(const void* w, int mode, int P, int rows, int row_bytes) {
    CUtensorMap m;
    cuuint32_t es[3] = {1, 1, 1};
    CUresult r;
    if (mode == 0) {
        cuuint64_t dims[2] = {(cuuint64_t)row_bytes, (cuuint64_t)rows};
        cuuint64_t strides[1] = {(cuuint64_t)row_bytes};
        cuuint32_t box[2] = {128, 128};
        r = encode(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, (void*)w, dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                   CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    } else {
        cuuint64_t dims[3] = {128, (cuuint64_t)row_bytes / 128, (cuuint64_t)rows};
        cuuint64_t strides[2] = {128, (cuuint64_t)row_bytes};
        cuuint32_t box[3] = {128, (cuuint32_t)P, 128};
        r = encode(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, (void*)w, dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                   CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    }
    if (r) { printf("encode failed %d\n", (int)r); exit(1); }
    tma::TensorMap out;
    memcpy(&out, &m, sizeof(m));
    return out;
}

int main(int argc, char** argv) {
    cudaDriverEntryPointQueryResult q;
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void**)&encode, 12000, cudaEnableDefault, &q));
    const int copies = 6;
    const size_t maxw = 48ull << 20, maxs = 6ull << 20;
    uint8_t *w, *sc; __nv_bfloat16* x; float* y;
    CK(cudaMalloc(&w, copies * maxw)); CK(cudaMalloc(&sc, copies * maxs)); CK(cudaMalloc(&x, 16 * 20000 * 2)); CK(cudaMalloc(&y, 64 << 20));
    CK(cudaMemset(w, 0x35, copies * maxw)); CK(cudaMemset(sc, 0x30, copies * maxs)); CK(cudaMemset(x, 0x3c, 16 * 20000 * 2));
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    struct Shape { int K, N; } shapes[] = {{3072, 3072}, {3072, 9216}, {3072, 18432}, {15360, 3072}, {12288, 3072}, {5120, 13824}};
    auto run = [&](const char* name, auto kern, int NT, int P, int S, int mode) {
        const int SB = P * (16384 + 2048 + NT * 4096);
        const int smem = 1024 + S * SB + 16 * S;
        CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        int per_sm; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, 288, smem));
        const char* only_shape = getenv("PROBE_SHAPE");
        int si = -1;
        for (auto s : shapes) {
            si++;
            if (only_shape && atoi(only_shape) != si) continue;
            const int rb = s.K / 2, tiles = s.N / 128, groups = rb / 128 / P;
            std::vector<tma::TensorMap> maps;
            for (int c = 0; c < copies; c++) maps.push_back(make_map(w + c * maxw, mode, P, s.N, rb));
            double best = 1e9; int best_split = 0;
            for (int split : {1, 2, 4, 8}) {
                if (groups < split) continue;
                dim3 grid(tiles, split);
                const bool cl = getenv("CLUSTER") != nullptr;
                auto launch = [&](int i) {
                    if (!cl) { kern<<<grid, 288, smem>>>(maps[i % copies], x, sc + (i % copies) * maxs, y, NT == 1 ? 1 : 16, s.K, rb, s.K / 16); return; }
                    cudaLaunchConfig_t cfg = {};
                    cfg.gridDim = grid; cfg.blockDim = dim3(288); cfg.dynamicSmemBytes = smem;
                    cudaLaunchAttribute at[1];
                    at[0].id = cudaLaunchAttributeClusterDimension;
                    at[0].val.clusterDim.x = 1; at[0].val.clusterDim.y = split; at[0].val.clusterDim.z = 1;
                    cfg.attrs = at; cfg.numAttrs = 1;
                    CK(cudaLaunchKernelEx(&cfg, kern, maps[i % copies], (const __nv_bfloat16*)x, (const uint8_t*)(sc + (i % copies) * maxs), y, NT == 1 ? 1 : 16, s.K, rb, s.K / 16));
                };
                for (int i = 0; i < 3; i++) launch(i);
                const int it = 30;
                cudaEventRecord(e0);
                for (int i = 0; i < it; i++) launch(i);
                cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
                float ms; cudaEventElapsedTime(&ms, e0, e1);
                const double us = ms * 1e3 / it;
                if (us < best) { best = us; best_split = split; }
                printf("    split %d: %.2f us\n", split, us);
            }
            const double bytes = (double)rb * s.N * 1.125;
            printf("%-28s NT=%d P=%d S=%d mode=%d ctas/sm=%d  K=%5d N=%5d  best split %d: %6.2f us  %.2f TB/s\n", name, NT, P, S, mode, per_sm, s.K, s.N, best_split, best, bytes / best / 1e6);
        }
        CK(cudaGetLastError());
    };
    const int only = argc > 1 ? atoi(argv[1]) : -1;
    int idx = 0;
#define RUN(NT, P, S, MODE, MATH) if (only < 0 || only == idx++) run(MATH ? "math" : "nomath", probe_gemv<NT, P, S, MODE, MATH>, NT, P, S, MODE)
#define RUNW(NT, P, S, MODE) if (only < 0 || only == idx++) run("math-nowait", probe_gemv<NT, P, S, MODE, true, false>, NT, P, S, MODE)
    RUN(1, 1, 4, 0, true);
    RUN(1, 1, 4, 0, false);
    RUNW(1, 1, 4, 0);
    RUNW(2, 1, 4, 0);
    RUN(1, 2, 2, 0, true);
    RUN(1, 2, 2, 1, true);
    RUN(1, 2, 2, 1, false);
    RUN(1, 4, 2, 1, true);
    RUN(1, 4, 2, 1, false);
    RUN(1, 2, 4, 1, true);
    RUN(1, 2, 3, 1, true);
    RUN(2, 1, 4, 0, true);
    RUN(2, 2, 2, 1, true);
    RUN(2, 4, 2, 1, true);
    RUN(2, 2, 3, 1, true);
    return 0;
}
