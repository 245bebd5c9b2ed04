// Session 35 record (docs/PERF.md), not built by the project: does a stream-ordered allocation and free around each kernel (candle's pattern:
// cuMemAllocAsync of the output, cuMemFreeAsync of the dropped input) add GPU time between kernels?
// Kernels of 132 x 256 threads that spin for a set number of cycles and write 4 bytes per thread.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <vector>

__global__ void spin(float* out, long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {}
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

#define CK(x) do { auto e = (x); if (e) { printf("%s:%d error %d\n", __FILE__, __LINE__, (int)e); return 1; } } while (0)

int main() {
    CK(cuInit(0));
    cudaFree(0);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const size_t bytes = 48ull << 20;  // a FLUX activation-sized output
    const int iters = 2000;
    float* fixed;
    CK(cudaMalloc(&fixed, bytes));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (long long us : {3, 10, 40, 200}) {
        const long long cycles = us * 1800;  // ~1.8 GHz
        for (int mode = 0; mode < 3; mode++) {
            for (int rep = 0; rep < 2; rep++) {
                // warm the pool
                std::vector<CUdeviceptr> live;
                for (int i = 0; i < 4; i++) { CUdeviceptr p; cuMemAllocAsync(&p, bytes, s); live.push_back(p); }
                for (auto p : live) cuMemFreeAsync(p, s);
                cudaStreamSynchronize(s);
                CUdeviceptr prev = 0;
                cudaEventRecord(e0, s);
                for (int i = 0; i < iters; i++) {
                    if (mode == 0) {
                        spin<<<132, 256, 0, s>>>(fixed, cycles);
                    } else {
                        CUdeviceptr o;
                        cuMemAllocAsync(&o, bytes, (CUstream)s);
                        spin<<<132, 256, 0, s>>>((float*)o, cycles);
                        if (mode == 2 && prev) cuMemFreeAsync(prev, (CUstream)s);  // the input dropped after the op
                        if (mode == 1) cuMemFreeAsync(o, (CUstream)s);
                        prev = o;
                    }
                }
                cudaEventRecord(e1, s);
                CK(cudaEventSynchronize(e1));
                if (prev && mode == 2) { cuMemFreeAsync(prev, (CUstream)s); cudaStreamSynchronize(s); }
                float ms;
                cudaEventElapsedTime(&ms, e0, e1);
                const char* name[] = {"no allocation", "alloc + free own output", "alloc output, free previous"};
                printf("kernel ~%3lld us | %-28s | %.3f us per op\n", us, name[mode], ms * 1e3 / iters);
            }
        }
    }
    return 0;
}
