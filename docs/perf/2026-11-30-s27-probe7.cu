// Scratch probe (not part of candiff): phases of the bulk GEMV's CTAs (an instrumented copy of the
// committed kernel): clock64 from CTA entry to barrier init done, first TMA issued, first chunk
// ready, loop done, finish done; globaltimer at entry and exit across CTAs. KFILE: the kernel with
// 2026-11-30-s27-phase-timers.patch applied. (Call 5 ran the same program over the six FLUX/Wan
// shapes at the planner's splits.)
#include KFILE
#include "2026-11-30-s27-probe-common.h"
#include <algorithm>
int main(int argc, char** argv) {
    load_encoder();
    Garbage g(48ull << 20, 6ull << 20, 16 * 20000);
    const int copies = g.copies;
    const size_t maxw = g.maxw, maxs = g.maxs;
    uint8_t *w = g.w, *sc = g.sc;
    __nv_bfloat16 *x = g.x, *y = g.y;
    cudaEvent_t e0 = g.e0, e1 = g.e1;
    // 128 CTAs of 12 chunks each, as 128 tiles unsplit, 64 x 2, 32 x 4 and 16 x 8 (clusters).
    struct Shape { int K, N, split; } shapes[] = {{3072, 16384, 1}, {6144, 8192, 2}, {12288, 4096, 4}, {24576, 2048, 8}, {3072, 8448, 1}, {24576, 1920, 8}};
    Kern kerns[2][4] = {{nvfp4_gemv_sm90_bulk_nt1_s1_bf16, nvfp4_gemv_sm90_bulk_nt1_s2_bf16, nvfp4_gemv_sm90_bulk_nt1_s4_bf16, nvfp4_gemv_sm90_bulk_nt1_s8_bf16},
                        {nvfp4_gemv_sm90_bulk_nt2_s1_bf16, nvfp4_gemv_sm90_bulk_nt2_s2_bf16, nvfp4_gemv_sm90_bulk_nt2_s4_bf16, nvfp4_gemv_sm90_bulk_nt2_s8_bf16}};
    static unsigned long long h[16384][8];
    for (int nt = 1; nt <= 2; nt++) {
        const int smem0 = 1024 + 4 * (16384 + 2048 + nt * 4096) + 16 * 4;
        for (auto s : shapes) {
            const int rb = s.K / 2, tiles = s.N / 128, M = nt == 1 ? 1 : 16;
            std::vector<tma::TensorMap> maps;
            for (int c = 0; c < copies; c++) maps.push_back(make_map(w + c * maxw, s.N, rb));
            Kern k = kerns[nt - 1][s.split == 1 ? 0 : s.split == 2 ? 1 : s.split == 4 ? 2 : 3];
            const int smem = smem0 + (s.split > 1 ? 128 * nt * 8 * 4 : 0);
            CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            {
                cudaLaunchConfig_t cfg = {};
                cfg.gridDim = dim3(tiles, s.split); cfg.blockDim = dim3(288); cfg.dynamicSmemBytes = smem;
                cudaLaunchAttribute at; at.id = cudaLaunchAttributeClusterDimension; at.val.clusterDim.x = 1; at.val.clusterDim.y = s.split; at.val.clusterDim.z = 1;
                cfg.attrs = &at; cfg.numAttrs = 1;
                int clusters = -1; cudaOccupancyMaxActiveClusters(&clusters, (void*)k, &cfg);
                printf("[max active clusters of %d: %d] ", s.split, clusters);
            }
            auto launch = [&](int i) { k<<<dim3(tiles, s.split), 288, smem>>>(maps[i % copies], x, w + (i % copies) * maxw, sc + (i % copies) * maxs, y, M, s.N, s.K, rb, s.K / 16, 1.0f, nullptr, 0, 1 << 30); };
            for (int i = 0; i < 10; i++) launch(i);
            cudaEventRecord(e0);
            for (int i = 0; i < 20; i++) launch(i);
            cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
            float ms; cudaEventElapsedTime(&ms, e0, e1);
            CK(cudaMemcpyFromSymbol(h, g_t, sizeof(h)));
            const int n = tiles * s.split;
            unsigned long long g0 = ~0ull, g1 = 0, ge_min = ~0ull;
            double avg[6] = {0}, mx[6] = {0};
            std::vector<int> per_sm(200, 0);
            for (int i = 0; i < n; i++) {
                g0 = std::min(g0, h[i][0]); g1 = std::max(g1, h[i][6]); ge_min = std::min(ge_min, h[i][6]);
                for (int j = 1; j < 6; j++) { avg[j] += h[i][j] / 1.98e3 / n; mx[j] = std::max(mx[j], h[i][j] / 1.98e3); }
                per_sm[h[i][7] % 200]++;
            }
            unsigned long long last_entry = 0; for (int i = 0; i < n; i++) last_entry = std::max(last_entry, h[i][0]);
            int maxper = *std::max_element(per_sm.begin(), per_sm.end());
            printf("NT=%d K=%5d N=%5d s%d ctas=%d ev=%.2fus span=%.2fus entry-spread=%.2fus first-exit=%.2fus maxCTA/SM=%d | avg(max) us: init %.2f(%.2f) tma1 %.2f(%.2f) data1 %.2f(%.2f) loop %.2f(%.2f) finish %.2f(%.2f)\n",
                   nt, s.K, s.N, s.split, n, ms * 1e3 / 20, (g1 - g0) / 1e3, (last_entry - g0) / 1e3, (ge_min - g0) / 1e3, maxper,
                   avg[1], mx[1], avg[2], mx[2], avg[3], mx[3], avg[4], mx[4], avg[5], mx[5]);
        }
    }
    CK(cudaGetLastError());
    return 0;
}
