// Scratch probe (not part of candiff): the committed bulk GEMV launched back to back, plainly and with
// programmatic dependent launch (a copy of the kernel with -DPDL: it lets the next launch start at
// once, issues its first stages' weight copies, then waits for the kernel before it ahead of the
// activations and of y). Event-timed per call over 30 launches rotating over 6 weight copies.
#include KFILE
#include "2026-11-30-s27-probe-common.h"
int main(int argc, char** argv) {
    load_encoder();
    Garbage g(48ull << 20, 6ull << 20, 16 * 20000);
    const int copies = g.copies;
    const size_t maxw = g.maxw, maxs = g.maxs;
    uint8_t *w = g.w, *sc = g.sc;
    __nv_bfloat16 *x = g.x, *y = g.y;
    cudaEvent_t e0 = g.e0, e1 = g.e1;
    struct Shape { int K, N, split; } shapes[] = {{3072, 3072, 4}, {3072, 9216, 1}, {3072, 18432, 1}, {15360, 3072, 4}, {12288, 3072, 4}, {5120, 13824, 1}};
    Kern kerns[2][3] = {{nvfp4_gemv_sm90_bulk_nt1_s1_bf16, nvfp4_gemv_sm90_bulk_nt1_s2_bf16, nvfp4_gemv_sm90_bulk_nt1_s4_bf16},
                        {nvfp4_gemv_sm90_bulk_nt2_s1_bf16, nvfp4_gemv_sm90_bulk_nt2_s2_bf16, nvfp4_gemv_sm90_bulk_nt2_s4_bf16}};
    for (int nt = 1; nt <= 2; nt++) {
        const int smem0 = 1024 + 4 * (16384 + 2048 + nt * 4096) + 16 * 4;
        for (auto s : shapes) {
            const int rb = s.K / 2, tiles = s.N / 128, M = nt == 1 ? 1 : 16;
            std::vector<tma::TensorMap> maps;
            for (int c = 0; c < copies; c++) maps.push_back(make_map(w + c * maxw, s.N, rb));
            Kern k = kerns[nt - 1][s.split == 1 ? 0 : s.split == 2 ? 1 : 2];
            const int smem = smem0 + (s.split > 1 ? 128 * nt * 8 * 4 : 0);
            CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            printf("%s NT=%d K=%5d N=%5d s%d:", argc > 1 ? argv[1] : "", nt, s.K, s.N, s.split);
            for (int pdl = 0; pdl <= 1; pdl++) {
                auto launch = [&](int i) {
                    cudaLaunchConfig_t cfg = {};
                    cfg.gridDim = dim3(tiles, s.split); cfg.blockDim = dim3(288); cfg.dynamicSmemBytes = smem;
                    cudaLaunchAttribute at; at.id = cudaLaunchAttributeProgrammaticStreamSerialization; at.val.programmaticStreamSerializationAllowed = 1;
                    cfg.attrs = &at; cfg.numAttrs = pdl;
                    const uint8_t* wp = w + (i % copies) * maxw; const uint8_t* sp = sc + (i % copies) * maxs;
                    float alpha = 1.0f; const __nv_bfloat16* bias = nullptr; int bl = 0, gf = 1 << 30, K = s.K, N = s.N, sc16 = s.K / 16, rbb = rb;
                    CK(cudaLaunchKernelEx(&cfg, k, maps[i % copies], (const __nv_bfloat16*)x, wp, sp, y, M, N, K, rbb, sc16, alpha, bias, bl, gf));
                };
                for (int i = 0; i < 5; i++) launch(i);
                const int it = 30;
                cudaEventRecord(e0);
                for (int i = 0; i < it; i++) launch(i);
                cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
                float ms; cudaEventElapsedTime(&ms, e0, e1);
                printf("  %s %6.2f", pdl ? "pdl" : "plain", ms * 1e3 / it);
            }
            printf(" us\n");
        }
    }
    CK(cudaGetLastError());
    return 0;
}
