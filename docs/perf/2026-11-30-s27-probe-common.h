// Scratch probes of session 27 (not part of candiff): what they share. Include after KFILE (the
// kernel source, for tma::TensorMap). Build from the repository root, e.g.
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -I kernels \
//        -I docs/perf -DKFILE='"nvfp4_sm90.cu"' -o probe4 docs/perf/2026-11-30-s27-probe4.cu
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#define CK(x) do { auto e = (x); if (e != 0) { printf("%s: %d\n", #x, (int)e); exit(1);} } while (0)
static PFN_cuTensorMapEncodeTiled_v12000 encode;
// The driver's descriptor encoder (call once before make_map).
static void load_encoder() {
    cudaDriverEntryPointQueryResult q;
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void**)&encode, 12000, cudaEnableDefault, &q));
}
// The GEMV's code map: boxes of 128 rows x 128 bytes, 128-byte swizzle (as src/cuda/mod.rs).
static tma::TensorMap make_map(const void* w, int rows, int row_bytes) {
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
// The bulk GEMV's signature (kernels/nvfp4_sm90.cu GEMV_SM90_BULK_T).
typedef void (*Kern)(const tma::TensorMap, const __nv_bfloat16*, const uint8_t*, const uint8_t*, __nv_bfloat16*, int, int,
                     int, int, int, float, const __nv_bfloat16*, int, int);
// Garbage inputs: `copies` weight and scale copies of `maxw` / `maxs` bytes (launches rotate over
// them, so each reads DRAM), 16 tokens of activations up to K = 20000, and y for `y_elems` values;
// two timing events.
struct Garbage {
    static constexpr int copies = 6;
    uint8_t *w, *sc;
    __nv_bfloat16 *x, *y;
    size_t maxw, maxs;
    cudaEvent_t e0, e1;
    Garbage(size_t maxw_, size_t maxs_, size_t y_elems) : maxw(maxw_), maxs(maxs_) {
        CK(cudaMalloc(&w, copies * maxw)); CK(cudaMalloc(&sc, copies * maxs));
        CK(cudaMalloc(&x, 16 * 20000 * 2)); CK(cudaMalloc(&y, y_elems * 2));
        CK(cudaMemset(w, 0x35, copies * maxw)); CK(cudaMemset(sc, 0x30, copies * maxs)); CK(cudaMemset(x, 0x3c, 16 * 20000 * 2));
        cudaEventCreate(&e0); cudaEventCreate(&e1);
    }
};
