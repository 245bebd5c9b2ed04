// Session 36 record (docs/PERF.md), not built by the project: which half of a stream-ordered allocation +
// free costs GPU time between kernels, whether the memory pool's attributes change it, and what a run of frees
// or a free on an idle side stream costs. Call 1 ran it with three pool settings and modes 0-4; call 5 with the
// default pool and modes 0-6 (the cfg loop cut to 1).
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <vector>

__global__ void spin(float* out, long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {}
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

#define CK(x) do { auto e = (x); if (e) { printf("%s:%d error %d\n", __FILE__, __LINE__, (int)e); return 1; } } while (0)

static int set_reuse(CUmemoryPool pool, int on) {
    int v = on;
    CK(cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES, &v));
    CK(cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC, &v));
    CK(cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES, &v));
    return 0;
}

int main() {
    CK(cuInit(0));
    cudaFree(0);
    CUdevice dev; CK(cuDeviceGet(&dev, 0));
    CUmemoryPool pool; CK(cuDeviceGetDefaultMemPool(&pool, dev));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaStream_t side;
    CK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    const size_t bytes = 48ull << 20;
    const int iters = 2000;
    float* fixed;
    CK(cudaMalloc(&fixed, bytes));
    cudaEvent_t e0, e1, ev;
    cudaEventCreate(&e0); cudaEventCreate(&e1);
    cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    const char* name[] = {"no allocation", "alloc out, free prev (candle)", "event record between", "alloc only (leak, prealloc)", "free only", "16 frees after every 16th", "free on an idle side stream"};
    for (int cfg = 0; cfg < 1; cfg++) {
        // cfg 0: default pool; 1: reuse flags off; 2: reuse off + release threshold max
        if (cfg == 1) { if (set_reuse(pool, 0)) return 1; }
        if (cfg == 2) { uint64_t t = UINT64_MAX; CK(cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &t)); }
        const char* cname[] = {"default pool", "reuse flags off", "reuse off + threshold max"};
        for (long long us : {5, 20, 100}) {
            const long long cycles = us * 1800;
            for (int mode = 0; mode < 7; mode++) {
                for (int rep = 0; rep < 2; rep++) {
                    std::vector<CUdeviceptr> live;
                    for (int i = 0; i < 4; i++) { CUdeviceptr p; cuMemAllocAsync(&p, bytes, s); live.push_back(p); }
                    for (auto p : live) cuMemFreeAsync(p, s);
                    cudaStreamSynchronize(s);
                    // mode 4: frees of buffers allocated before the timed chain
                    std::vector<CUdeviceptr> pre;
                    if (mode >= 4) for (int i = 0; i < iters; i++) { CUdeviceptr p; CK(cuMemAllocAsync(&p, 4096, s)); pre.push_back(p); }
                    cudaStreamSynchronize(s);
                    CUdeviceptr prev = 0;
                    std::vector<CUdeviceptr> leak;
                    cudaEventRecord(e0, s);
                    for (int i = 0; i < iters; i++) {
                        if (mode == 0) {
                            spin<<<132, 256, 0, s>>>(fixed, cycles);
                        } else if (mode == 1) {
                            CUdeviceptr o;
                            cuMemAllocAsync(&o, bytes, (CUstream)s);
                            spin<<<132, 256, 0, s>>>((float*)o, cycles);
                            if (prev) cuMemFreeAsync(prev, (CUstream)s);
                            prev = o;
                        } else if (mode == 2) {
                            spin<<<132, 256, 0, s>>>(fixed, cycles);
                            cudaEventRecord(ev, s);
                        } else if (mode == 3) {
                            CUdeviceptr o;
                            cuMemAllocAsync(&o, 4096, (CUstream)s);
                            leak.push_back(o);
                            spin<<<132, 256, 0, s>>>(fixed, cycles);
                        } else if (mode == 4) {
                            spin<<<132, 256, 0, s>>>(fixed, cycles);
                            cuMemFreeAsync(pre[i], (CUstream)s);
                        } else if (mode == 6) {
                            spin<<<132, 256, 0, s>>>(fixed, cycles);
                            cuMemFreeAsync(pre[i], (CUstream)side);
                        } else {
                            spin<<<132, 256, 0, s>>>(fixed, cycles);
                            if (i % 16 == 15) for (int j = i - 15; j <= i; j++) cuMemFreeAsync(pre[j], (CUstream)s);
                        }
                    }
                    cudaEventRecord(e1, s);
                    CK(cudaEventSynchronize(e1));
                    if (prev) cuMemFreeAsync(prev, (CUstream)s);
                    for (auto p : leak) cuMemFreeAsync(p, (CUstream)s);
                    CK(cudaStreamSynchronize(s));
                    float ms;
                    cudaEventElapsedTime(&ms, e0, e1);
                    printf("%-26s | kernel ~%3lld us | %-30s | %.3f us per op\n", cname[cfg], us, name[mode], ms * 1e3 / iters);
                }
            }
        }
    }
    return 0;
}
