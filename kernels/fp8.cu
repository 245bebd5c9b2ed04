// FP8 execution of NVFP4 checkpoints (`--nvfp4-mode fp8`), the conversions around cuBLASLt's FP8
// GEMM (tensor cores on sm_89+):
//   nvfp4_to_fp8_weight: canonical NVFP4 (low nibble first, linear [N, K/16] E4M3 block scales,
//                        weight_scale_2) -> E4M3 [N, K] with one f32 scale per output row
//                        (row amax / 448), once at load.
//   fp8_quant_rows:      bf16 activations [M, K] -> E4M3 [M, K] with one f32 scale per row (token).
//   fp8_scale_out:       y[m, n] *= sa[m] * sw[n] in place, where cuBLASLt has no kernel with
//                        per-row/per-column scale vectors.
// Every value is decoded/encoded in the same f32 operation order as the CPU reference
// (src/nvfp4/fp8.rs), so the FP8 bytes and scales match it bit for bit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "fp8_common.cuh"
#include "row_vec.cuh"

namespace {

constexpr int kThreads = 256;  // threads per row block
constexpr int kWarp = 32;
constexpr int kGroup = 16;        // NVFP4 block size along K
using fp8c::kFp8Max;
using fp8c::row_scale;

__device__ __forceinline__ float block_max(float v) { return fp8c::block_max<kThreads>(v); }

__device__ __forceinline__ float e2m1(uint8_t code) {
    const float mag[8] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    const float v = mag[code & 7];
    return (code & 8) ? -v : v;
}

__device__ __forceinline__ float e4m3_to_f(uint8_t b) {
    __nv_fp8_e4m3 v;
    v.__x = b;
    return float(v);
}

__device__ __forceinline__ float nvfp4_value(const uint8_t* packed, const uint8_t* scales, int k, float ws2) {
    const uint8_t byte = packed[k / 2];
    const uint8_t code = (k & 1) ? (byte >> 4) : (byte & 0xF);
    return __fmul_rn(__fmul_rn(e2m1(code), e4m3_to_f(scales[k / kGroup])), ws2);
}

}  // namespace

// One block per weight row.
extern "C" __global__ void nvfp4_to_fp8_weight(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ scales,
                                               float ws2, int K, uint8_t* __restrict__ out,
                                               float* __restrict__ row_scales) {
    const long long r = blockIdx.x;
    const uint8_t* p = packed + r * (K / 2);
    const uint8_t* s = scales + r * (K / kGroup);
    float amax = 0.f;
    for (int k = threadIdx.x; k < K; k += kThreads) amax = fmaxf(amax, fabsf(nvfp4_value(p, s, k, ws2)));
    const float scale = row_scale(block_max(amax)), inv = fp8c::inv_scale(scale);
    for (int k = threadIdx.x; k < K; k += kThreads) out[r * K + k] = fp8c::quant_e4m3(nvfp4_value(p, s, k, ws2), inv);
    if (threadIdx.x == 0) row_scales[r] = scale;
}

// One block per activation row; x is bf16 (inputs of other dtypes are rounded to bf16 first).
extern "C" __global__ void fp8_quant_rows(const __nv_bfloat16* __restrict__ x, int K, uint8_t* __restrict__ out,
                                          float* __restrict__ row_scales) {
    const long long r = blockIdx.x;
    const __nv_bfloat16* xr = x + r * K;
    float amax = 0.f;
    for (int k = threadIdx.x; k < K; k += kThreads) amax = fmaxf(amax, fabsf(__bfloat162float(xr[k])));
    const float scale = row_scale(block_max(amax)), inv = fp8c::inv_scale(scale);
    for (int k = threadIdx.x; k < K; k += kThreads) out[r * K + k] = fp8c::quant_e4m3(__bfloat162float(xr[k]), inv);
    if (threadIdx.x == 0) row_scales[r] = scale;
}

// fp8_quant_rows with the row held in registers: THREADS threads read it once in 16-byte vectors
// of 8 bf16 (NV per thread), so rows of up to THREADS * 8 * NV values with K % 8 == 0 (and
// 16-byte aligned rows). The same arithmetic as fp8_quant_rows, so the same bytes; the scalar
// kernel read each row twice in 2-byte loads. Launched by src/cuda/fp8.rs (`quant_rows_vec`).
template <int THREADS, int NV>
__device__ void quant_rows_vec(const __nv_bfloat16* __restrict__ x, int K, uint8_t* __restrict__ out,
                               float* __restrict__ row_scales) {
    const long long r = blockIdx.x;
    const int nv = K / rowv::kVec;
    uint4 v[NV];
    const float amax = rowv::load_row<THREADS, NV>(x + r * K, nv, v, [](float f) { return fabsf(f); },
                                                  [](float a, float b) { return fmaxf(a, b); });
    const float scale = row_scale(fp8c::block_max<THREADS>(amax)), inv = fp8c::inv_scale(scale);
    rowv::each_vec<THREADS, NV>(nv, [&](int j, int i) {
        float f[rowv::kVec];
        rowv::unpack8(v[j], f);
        reinterpret_cast<uint2*>(out + r * K)[i] = rowv::e4m3x8(f, inv);
    });
    if (threadIdx.x == 0) row_scales[r] = scale;
}

// Instances: 128 threads for rows of up to 8192 values, 256 above (up to 16384).
#define QUANT_ROWS_VEC(THREADS, NV)                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS) fp8_quant_rows_t##THREADS##_v##NV(                   \
        const __nv_bfloat16* x, int K, uint8_t* out, float* row_scales) {                                       \
        quant_rows_vec<THREADS, NV>(x, K, out, row_scales);                                                     \
    }
#define QUANT_ROWS_VEC_ALL(THREADS)                                                                               \
    QUANT_ROWS_VEC(THREADS, 1) QUANT_ROWS_VEC(THREADS, 2) QUANT_ROWS_VEC(THREADS, 3) QUANT_ROWS_VEC(THREADS, 4) \
    QUANT_ROWS_VEC(THREADS, 5) QUANT_ROWS_VEC(THREADS, 6) QUANT_ROWS_VEC(THREADS, 7) QUANT_ROWS_VEC(THREADS, 8)
QUANT_ROWS_VEC_ALL(128)
QUANT_ROWS_VEC_ALL(256)

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// In place: y[m, n] = acc[m, n] * sa[m] * sw[n] over the unscaled GEMM output.
template <typename T>
__device__ void scale_out(T* y, const float* __restrict__ sa, const float* __restrict__ sw, long long M, int N) {
    const long long total = M * N;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long m = i / N;
        const int n = i % N;
        y[i] = from_f<T>(__fmul_rn(__fmul_rn(to_f<T>(y[i]), sa[m]), sw[n]));
    }
}

extern "C" __global__ void fp8_scale_out_f32(float* y, const float* sa, const float* sw, long long M, int N) {
    scale_out(y, sa, sw, M, N);
}
extern "C" __global__ void fp8_scale_out_bf16(__nv_bfloat16* y, const float* sa, const float* sw, long long M, int N) {
    scale_out(y, sa, sw, M, N);
}
extern "C" __global__ void fp8_scale_out_f16(__half* y, const float* sa, const float* sw, long long M, int N) {
    scale_out(y, sa, sw, M, N);
}

// A gated residual folded into the fp8 GEMM (`residual + gate * (x W^T + b)`, one gate per output
// feature): sw_out[n] = sw[n] * gate[n] and b_out[n] = b[n] * gate[n] (b optional), so the GEMM's
// per-row scales and bias carry the gate and the residual comes in as C (beta = 1).
template <typename T>
__device__ void gate_fold(const float* __restrict__ sw, const T* __restrict__ b, const float* __restrict__ gate,
                          float* __restrict__ sw_out, T* __restrict__ b_out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i];
    sw_out[i] = __fmul_rn(sw[i], g);
    if (b) b_out[i] = from_f<T>(__fmul_rn(to_f<T>(b[i]), g));
}
extern "C" __global__ void fp8_gate_fold_bf16(const float* sw, const __nv_bfloat16* b, const float* gate, float* sw_out,
                                              __nv_bfloat16* b_out, int n) {
    gate_fold(sw, b, gate, sw_out, b_out, n);
}
extern "C" __global__ void fp8_gate_fold_f16(const float* sw, const __half* b, const float* gate, float* sw_out,
                                             __half* b_out, int n) {
    gate_fold(sw, b, gate, sw_out, b_out, n);
}
extern "C" __global__ void fp8_gate_fold_f32(const float* sw, const float* b, const float* gate, float* sw_out,
                                             float* b_out, int n) {
    gate_fold(sw, b, gate, sw_out, b_out, n);
}

// mod_finish: a block's modulation vectors as f32 (the fused ops read f32 shift / scale / gate) and,
// in the same launch, each of up to kModJobs gates folded into an fp8 layer's row scales and bias
// as gate_fold does (the gate read from the projection's own output: its f32 value is exact). Grid
// y: part 0 the f32 copy of `mod` (skipped when out is null), part 1 + j job j. One launch per
// block instead of a cast and one fold per gated layer (1.2 ms in 305 launches of a FLUX.1 fp8
// step, docs/PERF.md session 17).
constexpr int kModJobs = 4;  // fold jobs per launch (src/cuda/fp8.rs MOD_JOBS)
struct FoldJob {
    const float* sw;   // the layer's weight scales [n]
    const void* b;     // its bias [n] (T; null: none)
    float* sw_out;     // [n]
    void* b_out;       // [n] (T; null without a bias)
    long long gate;    // the gate's first element in mod
    int n;
};
struct ModJobs {
    FoldJob job[kModJobs];
    int count;
};

template <typename T>
__device__ void mod_finish(const T* __restrict__ mod, float* __restrict__ out, long long len, const ModJobs& jobs) {
    const int part = blockIdx.y;
    const long long step = (long long)gridDim.x * blockDim.x;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (part == 0) {
        if (out)
            for (long long i = first; i < len; i += step) out[i] = to_f(mod[i]);
        return;
    }
    if (part > jobs.count) return;
    const FoldJob& j = jobs.job[part - 1];
    const T* b = static_cast<const T*>(j.b);
    T* b_out = static_cast<T*>(j.b_out);
    for (long long i = first; i < j.n; i += step) {
        const float g = to_f(mod[j.gate + i]);
        j.sw_out[i] = __fmul_rn(j.sw[i], g);
        if (b) b_out[i] = from_f<T>(__fmul_rn(to_f(b[i]), g));
    }
}
extern "C" __global__ void mod_finish_bf16(const __nv_bfloat16* mod, float* out, long long len, ModJobs jobs) {
    mod_finish(mod, out, len, jobs);
}
extern "C" __global__ void mod_finish_f16(const __half* mod, float* out, long long len, ModJobs jobs) {
    mod_finish(mod, out, len, jobs);
}
extern "C" __global__ void mod_finish_f32(const float* mod, float* out, long long len, ModJobs jobs) {
    mod_finish(mod, out, len, jobs);
}

// ---- FP8 attention (`--attention fp8`): the conversions around cuDNN's FP8 flash attention ----
// q, k, v are [B, H, S, D] views (D contiguous, rows 8-byte aligned) quantized per tensor to E4M3
// [B, S, H, D]; the scalars live in one f32 buffer, slot i at ATTN_SLOT_FLOATS * i (16-byte
// aligned, as cuDNN's scalar tensors like). Slots: 0-2 amax of q, k, v (f32 bits, atomicMax on
// non-negative floats ordered as unsigned); 3-5 their descales (amax / target); 6 descale_s and 7
// scale_s of the probabilities (1/448 and 448, set by the host); 8 scale_o (1 / descale_v); 9, 10 amax_s and amax_o written by cuDNN.

namespace {
constexpr int kSlot = 4;  // floats per scalar slot (ATTN_SLOT_FLOATS)
constexpr int kVec = 4;   // elements per lane access (8 bytes of bf16/f16)

template <typename T> struct Vec4 { T v[kVec]; };

// Start of row r = (b * H + h) * S + s of a strided [B, H, S, D] view.
__device__ __forceinline__ long long attn_row(long long r, int H, int S, long long sb, long long sh, long long ss) {
    const long long s = r % S, bh = r / S;
    return (bh / H) * sb + (bh % H) * sh + s * ss;
}

// The descale of a per-tensor E4M3 quantization: amax / target, or 1 for an all-zero tensor.
__device__ __forceinline__ float attn_descale(float amax, float target) {
    return amax > 0.f ? __fdiv_rn(amax, target) : 1.f;
}

// Tensor t's descale, and for v the output's scale that follows from it (the probabilities'
// fixed scales, slots 6 and 7, are set by the host with the buffer).
__device__ void attn_write_scalars(float* scalars, int t, float descale) {
    scalars[(3 + t) * kSlot] = descale;
    if (t == 2) scalars[8 * kSlot] = __fdiv_rn(1.f, descale);
}

template <typename T>
__device__ void attn_amax(const T* __restrict__ x, int H, int S, int D, long long sb, long long sh, long long ss,
                          long long rows, unsigned int* amax_bits) {
    const int lane = threadIdx.x % kWarp;
    const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / kWarp;
    const long long warps = (gridDim.x * (long long)blockDim.x) / kWarp;
    float m = 0.f;
    for (long long r = warp; r < rows; r += warps) {
        const T* row = x + attn_row(r, H, S, sb, sh, ss);
        for (int d = lane * kVec; d < D; d += kWarp * kVec) {
            const Vec4<T> v = *reinterpret_cast<const Vec4<T>*>(row + d);
#pragma unroll
            for (int i = 0; i < kVec; i++) m = fmaxf(m, fabsf(to_f<T>(v.v[i])));
        }
    }
    m = block_max(m);
    if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(m));
}

template <typename T>
__device__ void attn_quant(const T* __restrict__ x, int H, int S, int D, long long sb, long long sh, long long ss,
                           long long rows, float* scalars, int t, float target, uint8_t* __restrict__ out) {
    const float descale = attn_descale(__uint_as_float(reinterpret_cast<const unsigned int*>(scalars)[t * kSlot]), target);
    const float inv = fp8c::inv_scale(descale);
    const int lane = threadIdx.x % kWarp;
    const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / kWarp;
    const long long warps = (gridDim.x * (long long)blockDim.x) / kWarp;
    for (long long r = warp; r < rows; r += warps) {
        const T* row = x + attn_row(r, H, S, sb, sh, ss);
        // Output row of [B, S, H, D]: ((b * S + s) * H + h).
        const long long s = r % S, bh = r / S;
        uint8_t* o = out + (((bh / H) * S + s) * H + bh % H) * D;
        for (int d = lane * kVec; d < D; d += kWarp * kVec) {
            const Vec4<T> v = *reinterpret_cast<const Vec4<T>*>(row + d);
            uchar4 q;
            q.x = fp8c::quant_e4m3(to_f<T>(v.v[0]), inv);
            q.y = fp8c::quant_e4m3(to_f<T>(v.v[1]), inv);
            q.z = fp8c::quant_e4m3(to_f<T>(v.v[2]), inv);
            q.w = fp8c::quant_e4m3(to_f<T>(v.v[3]), inv);
            *reinterpret_cast<uchar4*>(o + d) = q;
        }
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) attn_write_scalars(scalars, t, descale);
}

// The same two passes over a view that is contiguous [B, S, H, D] (how the models lay q, k, v
// out): output index = input index, so a flat loop of 16-byte loads (8 values) with no row
// arithmetic; n is a multiple of 8.
template <typename T>
__device__ void attn_amax_flat(const T* __restrict__ x, long long n, unsigned int* amax_bits) {
    float m = 0.f;
    for (long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 8; i < n; i += gridDim.x * (long long)blockDim.x * 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(x + i);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < 8; j++) m = fmaxf(m, fabsf(to_f<T>(v[j])));
    }
    m = block_max(m);
    if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(m));
}

template <typename T>
__device__ void attn_quant_flat(const T* __restrict__ x, long long n, float* scalars, int t, float target,
                                uint8_t* __restrict__ out) {
    const float descale = attn_descale(__uint_as_float(reinterpret_cast<const unsigned int*>(scalars)[t * kSlot]), target);
    const float inv = fp8c::inv_scale(descale);
    for (long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 8; i < n; i += gridDim.x * (long long)blockDim.x * 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(x + i);
        const T* v = reinterpret_cast<const T*>(&raw);
        uint2 q;
        uint8_t* b = reinterpret_cast<uint8_t*>(&q);
#pragma unroll
        for (int j = 0; j < 8; j++) b[j] = fp8c::quant_e4m3(to_f<T>(v[j]), inv);
        *reinterpret_cast<uint2*>(out + i) = q;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) attn_write_scalars(scalars, t, descale);
}

// y = e4m3(o) * descale_v, 8 values per thread (n is a multiple of 8).
template <typename T>
__device__ void attn_dequant(const uint8_t* __restrict__ o, const float* scalars, long long n, T* __restrict__ y) {
    const float descale = scalars[5 * kSlot];
    for (long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 8; i < n; i += gridDim.x * (long long)blockDim.x * 8) {
        const uint2 b = *reinterpret_cast<const uint2*>(o + i);
        T out[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const uint8_t byte = ((j < 4 ? b.x : b.y) >> (8 * (j % 4))) & 0xFF;
            out[j] = from_f<T>(__fmul_rn(e4m3_to_f(byte), descale));
        }
        *reinterpret_cast<uint4*>(y + i) = *reinterpret_cast<const uint4*>(out);
    }
}
}  // namespace

#define ATTN_FP8_KERNELS(SUFFIX, T)                                                                                    \
    extern "C" __global__ void attn_fp8_amax_##SUFFIX(const T* x, int H, int S, int D, long long sb, long long sh,      \
                                                      long long ss, long long rows, unsigned int* amax_bits) {         \
        attn_amax(x, H, S, D, sb, sh, ss, rows, amax_bits);                                                            \
    }                                                                                                                  \
    extern "C" __global__ void attn_fp8_quant_##SUFFIX(const T* x, int H, int S, int D, long long sb, long long sh,     \
                                                       long long ss, long long rows, float* scalars, int t,            \
                                                       float target, uint8_t* out) {                                   \
        attn_quant(x, H, S, D, sb, sh, ss, rows, scalars, t, target, out);                                             \
    }                                                                                                                  \
    extern "C" __global__ void attn_fp8_amax_flat_##SUFFIX(const T* x, long long n, unsigned int* amax_bits) {        \
        attn_amax_flat(x, n, amax_bits);                                                                               \
    }                                                                                                                  \
    extern "C" __global__ void attn_fp8_quant_flat_##SUFFIX(const T* x, long long n, float* scalars, int t,            \
                                                            float target, uint8_t* out) {                              \
        attn_quant_flat(x, n, scalars, t, target, out);                                                                \
    }                                                                                                                  \
    extern "C" __global__ void attn_fp8_dequant_##SUFFIX(const uint8_t* o, const float* scalars, long long n, T* y) {   \
        attn_dequant(o, scalars, n, y);                                                                                \
    }
// The FP8 attention's scalar buffer set from a launch argument (amax slots 0, fixed scales): a
// host-to-device copy from pageable memory may wait for the stream's queued work, stalling the
// host once per attention call.
constexpr int kAttnScalars = 44;  // SLOTS * SLOT_FLOATS of src/cuda/attn_fp8.rs
struct AttnScalarInit {
    float v[kAttnScalars];
};
extern "C" __global__ void attn_fp8_init(float* scalars, AttnScalarInit init) {
    if (threadIdx.x < kAttnScalars) scalars[threadIdx.x] = init.v[threadIdx.x];
}

ATTN_FP8_KERNELS(bf16, __nv_bfloat16)
ATTN_FP8_KERNELS(f16, __half)
