// Fused element-wise kernels of the transformer blocks, f32 math whatever the storage type:
//   ln_modulate:  y = LayerNorm(x) * (1 + scale) + shift   (LayerNorm without affine, per row)
//   gated_add:    y = x + u * gate
// `x`/`u`/`y` are [B*S, C] row-major; `shift`/`scale`/`gate` are f32 [B*Sm, C] with Sm = 1 (one
// vector per sample, broadcast over its S rows) or Sm = S (one per token). Each replaces ~10 separate
// passes (casts, mean, variance, broadcasts) of the unfused code. CPU reference: src/models/fused.rs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 256;  // threads per row block of ln_modulate
constexpr int kWarp = 32;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// Sum over the block; every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[kThreads / kWarp];
    for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < kThreads / kWarp ? partial[lane] : 0.f;
    for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ long long mod_row(long long row, int s, int sm) {
    return sm == 1 ? row / s : row;  // [B, S] rows -> [B, Sm] modulation rows
}

template <typename T>
__device__ void ln_modulate(const T* __restrict__ x, const float* __restrict__ shift, const float* __restrict__ scale,
                            T* __restrict__ y, int c, int s, int sm, float eps) {
    const long long row = blockIdx.x;
    const T* xr = x + row * c;
    float sum = 0.f;
    for (int i = threadIdx.x; i < c; i += kThreads) sum += to_f(xr[i]);
    const float mean = block_sum(sum) / c;
    float ssd = 0.f;
    for (int i = threadIdx.x; i < c; i += kThreads) {
        const float d = to_f(xr[i]) - mean;
        ssd += d * d;
    }
    const float rstd = 1.f / sqrtf(block_sum(ssd) / c + eps);
    const long long m = mod_row(row, s, sm) * c;
    for (int i = threadIdx.x; i < c; i += kThreads) {
        const float n = (to_f(xr[i]) - mean) * rstd;
        y[row * c + i] = from_f<T>(n * (1.f + scale[m + i]) + shift[m + i]);
    }
}

template <typename T>
__device__ void gated_add(const T* __restrict__ x, const T* __restrict__ u, const float* __restrict__ gate,
                          T* __restrict__ y, long long n, int c, int s, int sm) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / c;
        const int col = i % c;
        y[i] = from_f<T>(to_f(x[i]) + to_f(u[i]) * gate[mod_row(row, s, sm) * c + col]);
    }
}

}  // namespace

#define FUSED(T, SUF)                                                                                          \
    extern "C" __global__ void ln_modulate_##SUF(const T* x, const float* shift, const float* scale, T* y, int c, \
                                                 int s, int sm, float eps) {                                    \
        ln_modulate<T>(x, shift, scale, y, c, s, sm, eps);                                                      \
    }                                                                                                           \
    extern "C" __global__ void gated_add_##SUF(const T* x, const T* u, const float* gate, T* y, long long n, int c, \
                                               int s, int sm) {                                                 \
        gated_add<T>(x, u, gate, y, n, c, s, sm);                                                               \
    }

FUSED(float, f32)
FUSED(__nv_bfloat16, bf16)
FUSED(__half, f16)

// Channel RMS norm of the Wan VAE: for x [B, C, P] (P = frames x pixels, contiguous), each position
// p gets y[:, p] = x[:, p] / max(||x[:, p]||_2, eps) * sqrt(C) * gamma, then SiLU when `silu`.
// One thread per (b, p): the loop over C reads P-strided elements, coalesced across the warp.
template <typename T>
__device__ void channel_rms(const T* __restrict__ x, const float* __restrict__ gamma, T* __restrict__ y, int c,
                            long long p, long long total, float eps, int silu) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long b = i / p, pos = i % p;
        const T* xb = x + b * c * p + pos;
        float ss = 0.f;
        for (int ch = 0; ch < c; ++ch) {
            const float v = to_f(xb[ch * p]);
            ss += v * v;
        }
        const float inv = sqrtf((float)c) / fmaxf(sqrtf(ss), eps);
        T* yb = y + b * c * p + pos;
        for (int ch = 0; ch < c; ++ch) {
            float v = to_f(xb[ch * p]) * inv * gamma[ch];
            if (silu) v = v / (1.f + __expf(-v));
            yb[ch * p] = from_f<T>(v);
        }
    }
}

#define CHANNEL_RMS(T, SUF)                                                                                      \
    extern "C" __global__ void channel_rms_##SUF(const T* x, const float* gamma, T* y, int c, long long p,         \
                                                 long long total, float eps, int silu) {                          \
        channel_rms<T>(x, gamma, y, c, p, total, eps, silu);                                                      \
    }

CHANNEL_RMS(float, f32)
CHANNEL_RMS(__nv_bfloat16, bf16)
CHANNEL_RMS(__half, f16)
