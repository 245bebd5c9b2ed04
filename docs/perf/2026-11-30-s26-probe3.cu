// Session 26 scratch probe, kept as the record of docs/perf/2026-11-30-h200-s26-calls.txt (not built by the
// crate). It was built from a copy in .gpu/ (its #include of ../kernels/nvfp4_sm90.cu is relative to there):
//   source .toolchain/cuda/env.sh && nvcc -O3 -std=c++17 --expt-relaxed-constexpr -I kernels \
//       -gencode=arch=compute_90a,code=sm_90a -cudart static -o .gpu/probe3 .gpu/probe3.cu -DKFILE='"../kernels/nvfp4_sm90.cu"' \
//       -DTHREADS=288 -DNSTAGES=4
// Scratch probe (not part of candiff): times the committed bulk GEMV kernels (included source) on
// garbage data, every split, event-timed over back-to-back launches on rotating copies (cold L2).
#include KFILE
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#define CK(x) do { auto e = (x); if (e != 0) { printf("%s: %d\n", #x, (int)e); exit(1);} } while (0)
static PFN_cuTensorMapEncodeTiled_v12000 encode;
tma::TensorMap make_map(const void* w, int rows, int row_bytes) {
    CUtensorMap m;
    cuuint32_t es[2] = {1, 1};
    cuuint64_t dims[2] = {(cuuint64_t)row_bytes, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)row_bytes};
    cuuint32_t box[2] = {128, 128};
    CUresult r = encode(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, (void*)w, dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
               CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r) { printf("encode failed %d\n", (int)r); exit(1); }
    tma::TensorMap out;
    memcpy(&out, &m, sizeof(m));
    return out;
}
typedef void (*Kern)(const tma::TensorMap, const __nv_bfloat16*, const uint8_t*, const uint8_t*, __nv_bfloat16*, int, int, int, int, int, float, const __nv_bfloat16*, int, int);
int main(int argc, char** argv) {
    cudaDriverEntryPointQueryResult q;
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void**)&encode, 12000, cudaEnableDefault, &q));
    const int copies = 6;
    const size_t maxw = 48ull << 20, maxs = 6ull << 20;
    uint8_t *w, *sc; __nv_bfloat16 *x, *y;
    CK(cudaMalloc(&w, copies * maxw)); CK(cudaMalloc(&sc, copies * maxs)); CK(cudaMalloc(&x, 16 * 20000 * 2)); CK(cudaMalloc(&y, 16 * 20000 * 2));
    CK(cudaMemset(w, 0x35, copies * maxw)); CK(cudaMemset(sc, 0x30, copies * maxs)); CK(cudaMemset(x, 0x3c, 16 * 20000 * 2));
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    struct Shape { int K, N; } shapes[] = {{3072, 3072}, {3072, 9216}, {3072, 18432}, {15360, 3072}, {12288, 3072}, {5120, 13824}};
    Kern kerns[2][4] = {{nvfp4_gemv_sm90_bulk_nt1_s1_bf16, nvfp4_gemv_sm90_bulk_nt1_s2_bf16, nvfp4_gemv_sm90_bulk_nt1_s4_bf16, nvfp4_gemv_sm90_bulk_nt1_s8_bf16},
                        {nvfp4_gemv_sm90_bulk_nt2_s1_bf16, nvfp4_gemv_sm90_bulk_nt2_s2_bf16, nvfp4_gemv_sm90_bulk_nt2_s4_bf16, nvfp4_gemv_sm90_bulk_nt2_s8_bf16}};
    for (int nt = 1; nt <= 2; nt++) {
        const int smem = 1024 + NSTAGES * (16384 + 2048 + nt * 4096) + 16 * NSTAGES;
        for (auto s : shapes) {
            const int rb = s.K / 2, tiles = s.N / 128;
            std::vector<tma::TensorMap> maps;
            for (int c = 0; c < copies; c++) maps.push_back(make_map(w + c * maxw, s.N, rb));
            printf("%s NT=%d K=%5d N=%5d:", argc > 1 ? argv[1] : "", nt, s.K, s.N);
            for (int si = 0; si < 4; si++) {
                const int split = 1 << si;
                Kern k = kerns[nt - 1][si];
                CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
                dim3 grid(tiles, split);
                const int M = nt == 1 ? 1 : 16;
                auto launch = [&](int i) { k<<<grid, THREADS, smem>>>(maps[i % copies], x, w + (i % copies) * maxw, sc + (i % copies) * maxs, y, M, s.N, s.K, rb, s.K / 16, 1.0f, nullptr, 0, 1 << 30); };
                for (int i = 0; i < 3; i++) launch(i);
                const int it = 30;
                cudaEventRecord(e0);
                for (int i = 0; i < it; i++) launch(i);
                cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
                float ms; cudaEventElapsedTime(&ms, e0, e1);
                printf("  s%d %6.2f", split, ms * 1e3 / it);
            }
            printf(" us\n");
        }
    }
    CK(cudaGetLastError());
    return 0;
}
