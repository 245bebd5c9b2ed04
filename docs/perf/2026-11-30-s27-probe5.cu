// Scratch probe (not part of candiff): the streamed bulk GEMV (included source) against the cluster
// schedule at the planner's split, on garbage data, event-timed over back-to-back launches on
// rotating weight copies (cold L2). KFILE: kernels/nvfp4_sm90.cu with the streamed schedule
// (2026-11-30-s27-stream-schedule-tried.patch is its first form; the "fixed" and "deferred" forms
// timed in calls 3-4 are described in docs/PERF.md session 27, their sources not kept).
#include KFILE
#include "2026-11-30-s27-probe-common.h"
typedef void (*SKern)(const tma::TensorMap, const __nv_bfloat16*, const uint8_t*, const uint8_t*, __nv_bfloat16*, int, int, int, int, int, float, const __nv_bfloat16*, int, int, float*, unsigned*);
int main(int argc, char** argv) {
    load_encoder();
    Garbage g(48ull << 20, 6ull << 20, 16 * 20000);
    const int copies = g.copies;
    const size_t maxw = g.maxw, maxs = g.maxs;
    uint8_t *w = g.w, *sc = g.sc;
    __nv_bfloat16 *x = g.x, *y = g.y;
    float* part; unsigned* counters;
    CK(cudaMalloc(&part, 2 * 264 * 128 * 16 * 4)); CK(cudaMalloc(&counters, 4096 * 4)); CK(cudaMemset(counters, 0, 4096 * 4));
    cudaEvent_t e0 = g.e0, e1 = g.e1;
    struct Shape { int K, N, split; } shapes[] = {{3072, 3072, 4}, {3072, 9216, 1}, {3072, 18432, 1}, {15360, 3072, 4}, {12288, 3072, 4}, {5120, 13824, 1}};
    Kern kerns[2][3] = {{nvfp4_gemv_sm90_bulk_nt1_s1_bf16, nvfp4_gemv_sm90_bulk_nt1_s2_bf16, nvfp4_gemv_sm90_bulk_nt1_s4_bf16},
                        {nvfp4_gemv_sm90_bulk_nt2_s1_bf16, nvfp4_gemv_sm90_bulk_nt2_s2_bf16, nvfp4_gemv_sm90_bulk_nt2_s4_bf16}};
    SKern skerns[2] = {nvfp4_gemv_sm90_stream_nt1_bf16, nvfp4_gemv_sm90_stream_nt2_bf16};
    for (int nt = 1; nt <= 2; nt++) {
        const int smem0 = 1024 + 4 * (16384 + 2048 + nt * 4096) + 16 * 4;
        for (auto s : shapes) {
            const int rb = s.K / 2, tiles = s.N / 128, M = nt == 1 ? 1 : 16;
            std::vector<tma::TensorMap> maps;
            for (int c = 0; c < copies; c++) maps.push_back(make_map(w + c * maxw, s.N, rb));
            printf("%s NT=%d K=%5d N=%5d:", argc > 1 ? argv[1] : "", nt, s.K, s.N);
            auto timeit = [&](auto launch) {
                for (int i = 0; i < 3; i++) launch(i);
                const int it = 30;
                cudaEventRecord(e0);
                for (int i = 0; i < it; i++) launch(i);
                cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
                float ms; cudaEventElapsedTime(&ms, e0, e1);
                return ms * 1e3f / it;
            };
            {
                Kern k = kerns[nt - 1][s.split == 1 ? 0 : s.split == 2 ? 1 : 2];
                const int smem = smem0 + (s.split > 1 ? 128 * nt * 8 * 4 : 0);
                CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
                printf("  clusters s%d %6.2f", s.split, timeit([&](int i) { k<<<dim3(tiles, s.split), 288, smem>>>(maps[i % copies], x, w + (i % copies) * maxw, sc + (i % copies) * maxs, y, M, s.N, s.K, rb, s.K / 16, 1.0f, nullptr, 0, 1 << 30); }));
            }
            SKern k = skerns[nt - 1];
            const int smem = smem0 + 16;
            CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            for (int P : {66, 132, 264}) {
                printf("  stream P%d %6.2f", P, timeit([&](int i) { k<<<P, 288, smem>>>(maps[i % copies], x, w + (i % copies) * maxw, sc + (i % copies) * maxs, y, M, s.N, s.K, rb, s.K / 16, 1.0f, nullptr, 0, 1 << 30, part, counters); }));
            }
            printf(" us\n");
        }
    }
    CK(cudaGetLastError());
    return 0;
}
