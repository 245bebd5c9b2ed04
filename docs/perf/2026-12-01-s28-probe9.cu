// Scratch probe of session 28 (not part of candiff): the bulk GEMV with programmatic dependent launch built
// in (kernels/nvfp4_sm90.cu with the kernel part of 2026-12-01-s28-pdl-in-candiff-tried.patch applied),
// launched back to back on a stream of its own; per call over 30 launches rotating over 6 weight copies:
// plain, PDL, PDL with a cudaMallocAsync + cudaFreeAsync of y around each launch (as Candle's
// allocator does around every op), plain with them; on the stream, then the same captured as a graph
// of 30 launches (timed over 20 graph launches). Build as the session 27 probes (their common header).
#include KFILE
#include "2026-11-30-s27-probe-common.h"
int main(int argc, char** argv) {
    load_encoder();
    Garbage g(48ull << 20, 6ull << 20, 16 * 20000);
    cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    struct Shape { int K, N, split; } shapes[] = {{3072, 3072, 4}, {3072, 9216, 1}, {15360, 3072, 4}, {5120, 13824, 1}};
    Kern kerns[3] = {nvfp4_gemv_sm90_bulk_nt1_s1_bf16, nvfp4_gemv_sm90_bulk_nt1_s2_bf16, nvfp4_gemv_sm90_bulk_nt1_s4_bf16};
    const char* names[] = {"plain", "pdl", "pdl+alloc", "plain+alloc"};
    for (auto s : shapes) {
        const int rb = s.K / 2, tiles = s.N / 128, M = 1;
        const int smem = 1024 + 4 * (16384 + 2048 + 4096) + 16 * 4 + (s.split > 1 ? 128 * 8 * 4 : 0);
        std::vector<tma::TensorMap> maps;
        for (int c = 0; c < g.copies; c++) maps.push_back(make_map(g.w + c * g.maxw, s.N, rb));
        Kern k = kerns[s.split == 1 ? 0 : s.split == 2 ? 1 : 2];
        CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        for (int graph = 0; graph <= 1; graph++) {
            printf("K=%5d N=%5d s%d %s:", s.K, s.N, s.split, graph ? "graph " : "stream");
            for (int mode = 0; mode < 4; mode++) {
                const bool pdl = mode == 1 || mode == 2, alloc = mode >= 2;
                auto launch = [&](int i) {
                    __nv_bfloat16* yy = g.y;
                    if (alloc) CK(cudaMallocAsync((void**)&yy, s.N * 2 * 16, st));
                    cudaLaunchConfig_t cfg = {};
                    cfg.gridDim = dim3(tiles, s.split); cfg.blockDim = dim3(288); cfg.dynamicSmemBytes = smem; cfg.stream = st;
                    cudaLaunchAttribute at; at.id = cudaLaunchAttributeProgrammaticStreamSerialization; at.val.programmaticStreamSerializationAllowed = 1;
                    cfg.attrs = &at; cfg.numAttrs = pdl;
                    const uint8_t* wp = g.w + (i % g.copies) * g.maxw; const uint8_t* sp = g.sc + (i % g.copies) * g.maxs;
                    float alpha = 1.0f; const __nv_bfloat16* bias = nullptr; int bl = 0, gf = 1 << 30, K = s.K, N = s.N, sc16 = s.K / 16, rbb = rb;
                    CK(cudaLaunchKernelEx(&cfg, k, maps[i % g.copies], (const __nv_bfloat16*)g.x, wp, sp, yy, M, N, K, rbb, sc16, alpha, bias, bl, gf));
                    if (alloc) CK(cudaFreeAsync(yy, st));
                };
                const int it = 30;
                for (int i = 0; i < 5; i++) launch(i);
                CK(cudaStreamSynchronize(st));
                float ms;
                if (!graph) {
                    cudaEventRecord(g.e0, st);
                    for (int i = 0; i < it; i++) launch(i);
                    cudaEventRecord(g.e1, st); CK(cudaEventSynchronize(g.e1));
                    cudaEventElapsedTime(&ms, g.e0, g.e1);
                    ms /= it;
                } else {
                    cudaGraph_t gr; cudaGraphExec_t ge;
                    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed));
                    for (int i = 0; i < it; i++) launch(i);
                    CK(cudaStreamEndCapture(st, &gr));
                    CK(cudaGraphInstantiate(&ge, gr, 0));
                    CK(cudaGraphLaunch(ge, st)); CK(cudaStreamSynchronize(st));
                    cudaEventRecord(g.e0, st);
                    for (int r = 0; r < 20; r++) CK(cudaGraphLaunch(ge, st));
                    cudaEventRecord(g.e1, st); CK(cudaEventSynchronize(g.e1));
                    cudaEventElapsedTime(&ms, g.e0, g.e1);
                    ms /= 20 * it;
                    cudaGraphExecDestroy(ge); cudaGraphDestroy(gr);
                }
                printf("  %s %6.2f", names[mode], ms * 1e3);
            }
            printf(" us\n");
        }
    }
    CK(cudaGetLastError());
    return 0;
}
