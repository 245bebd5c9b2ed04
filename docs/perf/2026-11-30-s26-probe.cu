// Session 26 scratch probe, kept as the record of docs/perf/2026-11-30-h200-s26-calls.txt (not built by the
// crate). It was built from a copy in .gpu/ (its #include of ../kernels/nvfp4_sm90.cu is relative to there):
//   source .toolchain/cuda/env.sh && nvcc -O3 -std=c++17 --expt-relaxed-constexpr -I kernels \
//       -gencode=arch=compute_90a,code=sm_90a -cudart static -o .gpu/probe .gpu/probe.cu
// Scratch probe (not part of candiff): DRAM read rate of the GEMV's access pattern.
// rowmajor: 128-row tiles of an N x RB byte matrix, read W bytes per row per chunk;
// blocked: each tile's chunk (128 x W bytes) contiguous.
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1);} } while (0)

__device__ __forceinline__ uint4 ldg(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <int W, bool BLOCKED>
__global__ void __launch_bounds__(256) probe(const uint8_t* w, int RB, int split, unsigned* sink) {
  constexpr int PER = W / 32;          // uint4 per thread per chunk
  constexpr int D = 16 / PER;          // chunks in flight
  const int tile = blockIdx.x, slice = blockIdx.y, tid = threadIdx.x;
  const int chunks = RB / W;
  const int c0 = slice * chunks / split, c1 = (slice + 1) * chunks / split;
  unsigned acc = 0;
  for (int c = c0; c < c1; c += D) {
    uint4 v[D][PER];
#pragma unroll
    for (int d = 0; d < D; d++)
#pragma unroll
      for (int i = 0; i < PER; i++) {
        const int q = tid + i * 256, row = q / (W / 16), col = q % (W / 16);
        const int cc = min(c + d, c1 - 1);
        size_t off = BLOCKED ? ((size_t)tile * chunks + cc) * 128 * W + (size_t)q * 16
                             : ((size_t)tile * 128 + row) * RB + (size_t)cc * W + col * 16;
        v[d][i] = ldg(reinterpret_cast<const uint4*>(w + off));
      }
#pragma unroll
    for (int d = 0; d < D; d++)
#pragma unroll
      for (int i = 0; i < PER; i++) acc ^= v[d][i].x ^ v[d][i].y ^ v[d][i].z ^ v[d][i].w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

__global__ void stream(const uint4* w, size_t n, unsigned* sink) {
  unsigned acc = 0;
  size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 a = ldg(w + i), b = ldg(w + i + stride), c = ldg(w + i + 2 * stride), d = ldg(w + i + 3 * stride);
    acc ^= a.x ^ b.y ^ c.z ^ d.w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

int main() {
  const int copies = 8;
  const size_t maxb = 64ull << 20;
  uint8_t* buf; unsigned* sink;
  CK(cudaMalloc(&buf, copies * maxb)); CK(cudaMalloc(&sink, 4));
  CK(cudaMemset(buf, 1, copies * maxb));
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  auto timeit = [&](auto launch, size_t bytes) {
    for (int i = 0; i < 3; i++) launch(buf + (i % copies) * maxb);
    const int it = 40;
    cudaEventRecord(e0);
    for (int i = 0; i < it; i++) launch(buf + (i % copies) * maxb);
    cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
    float ms; cudaEventElapsedTime(&ms, e0, e1);
    const double us = ms * 1e3 / it;
    return std::make_pair(us, bytes / us / 1e6);
  };
  {
    size_t bytes = 24ull << 20;
    for (int ctas : {sms, 2 * sms, 4 * sms, 8 * sms}) {
      auto r = timeit([&](uint8_t* p) { stream<<<ctas, 256>>>((const uint4*)p, bytes / 16, sink); }, bytes);
      printf("stream ctas=%d bytes=%zu: %.1f us %.0f GB/s\n", ctas, bytes, r.first, r.second);
    }
  }
  struct Shape { int K, N; } shapes[] = {{15360, 3072}, {3072, 18432}, {5120, 13824}, {3072, 3072}};
  for (auto s : shapes) {
    const int RB = s.K / 2, tiles = s.N / 128;
    const size_t bytes = (size_t)RB * s.N;
    for (int split : {1, 2, 4, 8}) {
      const int ctas = tiles * split;
      if (ctas > 8 * sms) continue;
      dim3 grid(tiles, split);
      auto pr = [&](const char* name, auto kern, int W) {
        if (RB / W < split) return;
        auto r = timeit([&](uint8_t* p) { kern<<<grid, 256>>>(p, RB, split, sink); }, bytes);
        printf("K=%d N=%d split=%d ctas=%d %s W=%d: %.1f us %.0f GB/s\n", s.K, s.N, split, ctas, name, W, r.first, r.second);
      };
      pr("rowmajor", probe<128, false>, 128);
      pr("rowmajor", probe<256, false>, 256);
      pr("rowmajor", probe<512, false>, 512);
      pr("blocked ", probe<128, true>, 128);
      pr("blocked ", probe<512, true>, 512);
    }
  }
  CK(cudaGetLastError());
  return 0;
}
