// Helpers shared by the NVFP4 kernels. Every conversion mirrors src/nvfp4/format.rs and
// src/nvfp4/quant.rs operation for operation (IEEE division, no fast math), so GPU results are
// bit-exact with the CPU reference where the reference is exact (codes, scales, dequantized values).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace nvfp4 {


constexpr int kGroup = 16;        // elements per E4M3 block scale
constexpr float kE2m1Max = 6.0f;  // largest E2M1 magnitude
constexpr float kE4m3Max = 448.0f;

__device__ __forceinline__ float e2m1_decode(uint32_t code) {
    // Magnitudes of codes 0..7; bit 3 is the sign.
    const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float v = mag[code & 7];
    return (code & 8) ? -v : v;
}

__device__ __forceinline__ uint32_t e2m1_encode(float v) {
    uint32_t sign = signbit(v) ? 8u : 0u;
    float a = fabsf(v);
    uint32_t m;
    if (isnan(a)) return 0;
    // Round half to even on the code's mantissa bit (see format.rs).
    if (a <= 0.25f) m = 0;
    else if (a < 0.75f) m = 1;
    else if (a <= 1.25f) m = 2;
    else if (a < 1.75f) m = 3;
    else if (a <= 2.5f) m = 4;
    else if (a < 3.5f) m = 5;
    else if (a <= 5.0f) m = 6;
    else m = 7;
    return sign | m;
}

__device__ __forceinline__ float e4m3_decode(uint32_t bits) {
    uint32_t e = (bits >> 3) & 0xF, m = bits & 7;
    float sign = (bits & 0x80) ? -1.0f : 1.0f;
    if (e == 0xF && m == 7) return __int_as_float(0x7fc00000);
    if (e == 0) return sign * (float)m * 0.001953125f;  // m * 2^-9
    return sign * (1.0f + (float)m * 0.125f) * ldexpf(1.0f, (int)e - 7);
}

__device__ __forceinline__ uint32_t e4m3_encode(float v) {
    if (isnan(v)) return 0x7F;
    uint32_t sign = signbit(v) ? 0x80u : 0u;
    float a = fabsf(v);
    if (a >= kE4m3Max) return sign | 0x7E;
    if (a < 0.015625f) {  // below 2^-6: subnormal grid m * 2^-9
        return sign | (uint32_t)rintf(a * 512.0f);
    }
    int exp = (int)((__float_as_uint(a) >> 23) & 0xFF) - 127;
    float mant = __uint_as_float((__float_as_uint(a) & 0x7FFFFFu) | 0x3F800000u);  // [1, 2)
    int q = (int)rintf(__fsub_rn(mant, 1.0f) * 8.0f);
    int e = exp + 7;
    if (q == 8) { q = 0; e += 1; }
    uint32_t bits = ((uint32_t)e << 3) | (uint32_t)q;
    return sign | (bits < 0x7E ? bits : 0x7E);
}

// Offset of scale (r, c) in a 128x4-swizzled buffer with padded width cpad.
__device__ __forceinline__ int swizzle_offset(int r, int c, int cpad) {
    return (r / 128) * (cpad / 4) * 512 + (c / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + (c % 4);
}

// Layout 0 = trtllm (rows shuffled within groups of 32), 1 = cutlass/cudnn (rows in order).
template <int LAYOUT>
__device__ __forceinline__ int physical_row(int n) {
    if (LAYOUT == 0) return (n / 32) * 32 + (n % 4) * 8 + (n % 32) / 4;
    return n;
}
// Its inverse (layout.rs `trtllm_original_row`): the logical row stored at physical row p.
template <int LAYOUT>
__device__ __forceinline__ int logical_row(int p) {
    if (LAYOUT == 0) return (p / 32) * 32 + (p % 8) * 4 + (p % 32) / 8;
    return p;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    int n = valid ? 16 : 0;  // zero-fill when out of range
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// bf16x2 of the two E2M1 codes of a byte (low nibble first), for a 256-entry lookup table.
__device__ __forceinline__ uint32_t e2m1x2_bf16x2(uint32_t byte) {
    __nv_bfloat162 v = __floats2bfloat162_rn(e2m1_decode(byte & 0xF), e2m1_decode(byte >> 4));
    return *reinterpret_cast<uint32_t*>(&v);
}

// Dequantizes one 16-element block (8 code bytes `src`, block scale `s`) to bf16 at `dst` (16-byte
// aligned), through the 256-entry byte -> bf16x2 table `lut` (see e2m1x2_bf16x2). e2m1 * s is exact.
__device__ __forceinline__ void dequant_block_bf16(const uint8_t* src, float s, const uint32_t* lut, __nv_bfloat16* dst) {
    __nv_bfloat162 s2 = __floats2bfloat162_rn(s, s);
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        uint32_t v = lut[src[j]];
        __nv_bfloat162 p = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&v), s2);
        out[j] = *reinterpret_cast<uint32_t*>(&p);
    }
    uint4* d = reinterpret_cast<uint4*>(dst);
    d[0] = make_uint4(out[0], out[1], out[2], out[3]);
    d[1] = make_uint4(out[4], out[5], out[6], out[7]);
}
// Tile geometry shared by the tiled W4A16 GEMMs (trtllm and cutlass variants).
constexpr int kTileM = 128, kTileN = 128, kTileK = 32, kTileThreads = 256;

// Issues the cp.async copies of one K tile and commits them as a group: activations (kTileM x kTileK
// bf16 from row m0, column k0; rows `lda` elements apart in `a_smem`, zero past M and K) and, for
// threads below kTileN, 16 raw code bytes of weight row `w_row` (null: out of range, zero-filled).
// `any` is any valid global address (cp.async needs one even when it copies nothing).
__device__ __forceinline__ void load_tile_async(const __nv_bfloat16* x, int M, int K, int m0, int k0,
                                                __nv_bfloat16* a_smem, int lda, const uint8_t* w_row,
                                                uint8_t* b_smem, const void* any, int tid) {
#pragma unroll
    for (int it = 0; it < kTileM * kTileK / 8 / kTileThreads; it++) {
        int idx = tid + it * kTileThreads;
        int r = idx / (kTileK / 8), c = (idx % (kTileK / 8)) * 8;
        int gm = m0 + r, gk = k0 + c;
        bool ok = gm < M && gk < K;
        cp_async16(&a_smem[r * lda + c], ok ? (const void*)(x + (size_t)gm * K + gk) : any, ok);
    }
    if (tid < kTileN) cp_async16(&b_smem[tid * 16], w_row ? (const void*)(w_row + k0 / 2) : any, w_row != nullptr);
    cp_async_commit();
}
}  // namespace nvfp4
