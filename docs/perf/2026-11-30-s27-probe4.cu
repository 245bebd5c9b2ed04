// Scratch probe (not part of candiff): the committed bulk GEMV (included source) on garbage data,
// unsplit, sweeping the number of 128-row tiles at fixed K: how kernel time grows with CTAs per SM.
// Build: as in 2026-11-30-s27-probe-common.h, with -DTHREADS=288 -DNSTAGES=4.
#include KFILE
#include "2026-11-30-s27-probe-common.h"
int main(int argc, char** argv) {
    load_encoder();
    Garbage g(264ull * 128 * 7680, 264ull * 128 * 7680 / 8, 16 * 40000);
    const int copies = g.copies;
    const size_t maxw = g.maxw, maxs = g.maxs;
    uint8_t *w = g.w, *sc = g.sc;
    __nv_bfloat16 *x = g.x, *y = g.y;
    cudaEvent_t e0 = g.e0, e1 = g.e1;
    const int Ks[] = {3072, 5120, 15360};
    const int tiles_list[] = {24, 48, 66, 72, 96, 108, 120, 132, 144, 198, 264};
    Kern kerns[2] = {nvfp4_gemv_sm90_bulk_nt1_s1_bf16, nvfp4_gemv_sm90_bulk_nt2_s1_bf16};
    for (int nt = 1; nt <= 2; nt++) {
        const int smem = 1024 + NSTAGES * (16384 + 2048 + nt * 4096) + 16 * NSTAGES;
        Kern k = kerns[nt - 1];
        CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        for (int K : Ks) {
            printf("NT=%d K=%5d:", nt, K);
            for (int tiles : tiles_list) {
                const int N = tiles * 128, rb = K / 2;
                std::vector<tma::TensorMap> maps;
                for (int c = 0; c < copies; c++) maps.push_back(make_map(w + c * maxw, N, rb));
                const int M = nt == 1 ? 1 : 16;
                auto launch = [&](int i) { k<<<dim3(tiles, 1), THREADS, smem>>>(maps[i % copies], x, w + (i % copies) * maxw, sc + (i % copies) * maxs, y, M, N, K, rb, K / 16, 1.0f, nullptr, 0, 1 << 30); };
                for (int i = 0; i < 3; i++) launch(i);
                const int it = 30;
                cudaEventRecord(e0);
                for (int i = 0; i < it; i++) launch(i);
                cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
                float ms; cudaEventElapsedTime(&ms, e0, e1);
                const double us = ms * 1e3 / it, bytes = (double)N * K * 0.5625;
                printf("  t%d %.2fus(%.2fTB/s)", tiles, us, bytes / us * 1e-6);
            }
            printf("\n");
        }
    }
    CK(cudaGetLastError());
    return 0;
}
