// Fused element-wise kernels of the transformer blocks, f32 math whatever the storage type:
//   ln_modulate:  y = LayerNorm(x) * (1 + scale) + shift   (LayerNorm without affine, per row)
//   gated_add:    y = x + u * gate
//   ln_modulate_fp8: ln_modulate's bf16 values quantized to E4M3 per row (fp8 mode's layer input)
// `x`/`u`/`y` are [B*S, C] row-major; `shift`/`scale`/`gate` are f32 [B*Sm, C] with Sm = 1 (one
// vector per sample, broadcast over its S rows) or Sm = S (one per token). Each replaces ~10 separate
// passes (casts, mean, variance, broadcasts) of the unfused code. CPU reference: src/models/fused.rs.
// bf16 rows that fit go to the register-resident `*_rows_t*_v*` forms at the end of this file.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "fastdiv.cuh"
#include "fp8_common.cuh"
#include "gelu.cuh"
#include "row_vec.cuh"

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

// Sum over a block of THREADS threads; every thread gets the result.
template <int THREADS>
__device__ float block_sum_n(float v) {
    __shared__ float partial[THREADS / kWarp];
    for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < THREADS / kWarp ? partial[lane] : 0.f;
    for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ float block_sum(float v) { return block_sum_n<kThreads>(v); }

__device__ __forceinline__ long long mod_row(long long row, int s, int sm) {
    return sm == 1 ? row / s : row;  // [B, S] rows -> [B, Sm] modulation rows
}
// The same for the row kernels' block index (below 2^31): a 32-bit division, not a 64-bit one.
__device__ __forceinline__ unsigned mod_row(unsigned row, int s, int sm) { return sm == 1 ? row / unsigned(s) : row; }

// Mean and 1 / std of a row: the two reductions of ln_modulate, shared with its E4M3 variant so that
// both see the same values bit for bit.
template <typename T>
__device__ __forceinline__ float2 row_stats(const T* __restrict__ xr, int c, float eps) {
    float sum = 0.f;
    for (int i = threadIdx.x; i < c; i += kThreads) sum += to_f(xr[i]);
    const float mean = block_sum(sum) / c;
    float ssd = 0.f;
    for (int i = threadIdx.x; i < c; i += kThreads) {
        const float d = to_f(xr[i]) - mean;
        ssd += d * d;
    }
    const float rstd = 1.f / sqrtf(block_sum(ssd) / c + eps);
    return make_float2(mean, rstd);
}

// Element i of a modulated row (f32, before the output's rounding); `m` is the modulation row's
// offset.
template <typename T>
__device__ __forceinline__ float modulated(const T* __restrict__ xr, int i, float2 st, const float* __restrict__ shift,
                                           const float* __restrict__ scale, long long m) {
    const float n = (to_f(xr[i]) - st.x) * st.y;
    return n * (1.f + scale[m + i]) + shift[m + i];
}

template <typename T>
__device__ void ln_modulate(const T* __restrict__ x, const float* __restrict__ shift, const float* __restrict__ scale,
                            T* __restrict__ y, int c, int s, int sm, float eps) {
    const long long row = blockIdx.x;
    const T* xr = x + row * c;
    const float2 st = row_stats(xr, c, eps);
    const long long m = mod_row(row, s, sm) * c;
    for (int i = threadIdx.x; i < c; i += kThreads) y[row * c + i] = from_f<T>(modulated(xr, i, st, shift, scale, m));
}

// ln_modulate of bf16 rows straight to what the fp8 GEMM reads: each value rounded to bf16 (as
// ln_modulate stores it), then E4M3 with one f32 scale per row exactly as kernels/fp8.cu's
// fp8_quant_rows quantizes a bf16 row (the same helpers, fp8_common.cuh). The bf16 output and
// its second read are never made; the result is byte for byte the two kernels' (doctor checks it).
__device__ void ln_modulate_fp8_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ shift,
                                     const float* __restrict__ scale, uint8_t* __restrict__ q,
                                     float* __restrict__ row_scales, int c, int s, int sm, float eps) {
    const long long row = blockIdx.x;
    const __nv_bfloat16* xr = x + row * c;
    const float2 st = row_stats(xr, c, eps);
    const long long m = mod_row(row, s, sm) * c;
    auto value = [&](int i) { return __bfloat162float(__float2bfloat16(modulated(xr, i, st, shift, scale, m))); };
    float amax = 0.f;
    for (int i = threadIdx.x; i < c; i += kThreads) amax = fmaxf(amax, fabsf(value(i)));
    amax = fp8c::block_max<kThreads>(amax);
    const float rs = fp8c::row_scale(amax), inv = fp8c::inv_scale(rs);
    for (int i = threadIdx.x; i < c; i += kThreads) q[row * c + i] = fp8c::quant_e4m3(value(i), inv);
    if (threadIdx.x == 0) row_scales[row] = rs;
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

// 16 bytes of T, the unit of the vectorized variant below.
template <typename T>
struct Vec16 {
    static constexpr int kN = 16 / sizeof(T);
    T v[kN];
};

// gated_add over 16-byte vectors (c a multiple of kN, fewer than 2^31 elements: the host checks):
// the row and the modulation row by fast divisions (fastdiv.cuh; (mul, shift) of c and s).
template <typename T>
__device__ void gated_add_vec(const T* __restrict__ x, const T* __restrict__ u, const float* __restrict__ gate,
                              T* __restrict__ y, long long nvec, int c, int s, int sm, unsigned c_mul,
                              unsigned c_shift, unsigned s_mul, unsigned s_shift) {
    constexpr int kN = Vec16<T>::kN;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += gridDim.x * blockDim.x) {
        const unsigned e = i * kN;
        const unsigned row = fastdiv::div(e, c_mul, c_shift);
        const int col = e - row * c;
        const unsigned mrow = sm == 1 ? fastdiv::div(row, s_mul, s_shift) : row;
        const Vec16<T> a = reinterpret_cast<const Vec16<T>*>(x)[i];
        const Vec16<T> b = reinterpret_cast<const Vec16<T>*>(u)[i];
        const float* gp = gate + (long long)mrow * c + col;
        float g[kN];
#pragma unroll
        for (int k = 0; k < kN; k += 4) *reinterpret_cast<float4*>(g + k) = *reinterpret_cast<const float4*>(gp + k);
        Vec16<T> out;
#pragma unroll
        for (int k = 0; k < kN; ++k) out.v[k] = from_f<T>(to_f(a.v[k]) + to_f(b.v[k]) * g[k]);
        reinterpret_cast<Vec16<T>*>(y)[i] = out;
    }
}

}  // namespace

#define FUSED_VEC(T, SUF)                                                                                        \
    extern "C" __global__ void gated_add_vec_##SUF(const T* x, const T* u, const float* gate, T* y, long long nvec, \
                                                   int c, int s, int sm, unsigned c_mul, unsigned c_shift,       \
                                                   unsigned s_mul, unsigned s_shift) {                           \
        gated_add_vec<T>(x, u, gate, y, nvec, c, s, sm, c_mul, c_shift, s_mul, s_shift);                        \
    }

FUSED_VEC(float, f32)
FUSED_VEC(__nv_bfloat16, bf16)
FUSED_VEC(__half, f16)

extern "C" __global__ void ln_modulate_fp8(const __nv_bfloat16* x, const float* shift, const float* scale, uint8_t* q,
                                           float* row_scales, int c, int s, int sm, float eps) {
    ln_modulate_fp8_bf16(x, shift, scale, q, row_scales, c, s, sm, eps);
}

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

// bias_act: y[r, c] = act(x[r, c] + bias[c]) with act = identity or tanh-GELU, one pass (replaces a
// broadcast add and a separate activation pass after a GEMM). `bias` is [C] in the activations'
// type (the model's own weight, read as stored: no per-call conversion).
template <typename T>
__device__ void bias_act(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, long long n, int c,
                         int gelu) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = to_f(x[i]) + to_f(bias[i % c]);
        if (gelu) v = gelu_tanh(v);
        y[i] = from_f<T>(v);
    }
}

// (mul, shift) of fast divisions by qk_norm_rope's heads, s_len and hl (fastdiv.cuh; passed by
// value, laid out as src/cuda/fused.rs `QkDivs`).
struct QkDivs {
    unsigned heads_mul, heads_shift, s_mul, s_shift, hl_mul, hl_shift;
};

// Head row r = (b * S + s) * H + h of qk_norm_rope split into its batch, token and head.
struct QkRow {
    unsigned b;
    int s, h;
};
__device__ __forceinline__ QkRow qk_row(unsigned r, const QkDivs& dv, int heads, int s_len) {
    const unsigned bs = fastdiv::div(r, dv.heads_mul, dv.heads_shift);
    const unsigned b = fastdiv::div(bs, dv.s_mul, dv.s_shift);
    return {b, static_cast<int>(bs - b * s_len), static_cast<int>(r - bs * heads)};
}

// Where head h of (b, s) goes: (h / hl) * yp + b * yb + s * ys + (h % hl) * d.
template <typename T>
__device__ __forceinline__ T* qk_out(T* y, unsigned b, int s, int h, const QkDivs& dv, int hl, long long yb,
                                     long long ys, long long yp, int d) {
    const unsigned piece = fastdiv::div(h, dv.hl_mul, dv.hl_shift);
    return y + (long long)piece * yp + b * yb + s * ys + (long long)(h - piece * hl) * d;
}

// Four consecutive elements of T in one load / store.
template <typename T>
struct alignas(4 * sizeof(T)) Four {
    T v[4];
};

// One row of D = 4 * 32 elements of qk_norm_rope, four per lane (two RoPE pairs), from the row's
// loaded values, the norm weight and this token's RoPE pairs; same math as below.
template <typename T>
__device__ __forceinline__ Four<T> qk_norm_rope_four(const Four<T>& in, const Four<T>& wv, float2 c, float2 sn, int d,
                                                     float eps, int mode) {
    if (mode == 0) return in;
    float f[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) f[k] = to_f(in.v[k]);
    if (mode == 2) {
        float sq = f[0] * f[0] + f[1] * f[1] + f[2] * f[2] + f[3] * f[3];
        for (int o = kWarp / 2; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffff, sq, o);
        const float rstd = rsqrtf(sq / d + eps);
#pragma unroll
        for (int k = 0; k < 4; ++k) f[k] = to_f(from_f<T>(f[k] * rstd * to_f(wv.v[k])));
    }
    Four<T> out;
    out.v[0] = from_f<T>(f[0] * c.x - f[1] * sn.x);
    out.v[1] = from_f<T>(f[0] * sn.x + f[1] * c.x);
    out.v[2] = from_f<T>(f[2] * c.y - f[3] * sn.y);
    out.v[3] = from_f<T>(f[2] * sn.y + f[3] * c.y);
    return out;
}

// R consecutive rows (heads h0 .. h0 + R - 1 of one token: the same RoPE pairs) in single 8- or
// 16-byte accesses per lane (the host checked the alignment of every offset). All R rows are
// loaded before any is used: one row per warp left too few bytes in flight per SM to reach
// the memory bandwidth (docs/PERF.md, session 14).
template <typename T, int R>
__device__ __forceinline__ void qk_norm_rope_rows4(const T* __restrict__ x, long long sb, long long ss, long long sh,
                                                   const T* __restrict__ w, const float* __restrict__ cos,
                                                   const float* __restrict__ sin, T* __restrict__ y, long long yb,
                                                   long long ys, long long yp, int hl, int s_len, int heads, int d,
                                                   unsigned row0, const QkDivs& dv, float eps, int mode, int lane) {
    const auto [b, s, h0] = qk_row(row0, dv, heads, s_len);
    const T* xr = x + b * sb + s * ss;
    Four<T> in[R];
#pragma unroll
    for (int r = 0; r < R; ++r) in[r] = reinterpret_cast<const Four<T>*>(xr + (long long)(h0 + r) * sh)[lane];
    Four<T> wv{};
    float2 c = make_float2(1.f, 1.f), sn = make_float2(0.f, 0.f);
    if (mode == 2) wv = reinterpret_cast<const Four<T>*>(w)[lane];
    if (mode >= 1) {
        c = reinterpret_cast<const float2*>(cos + (long long)s * (d / 2))[lane];
        sn = reinterpret_cast<const float2*>(sin + (long long)s * (d / 2))[lane];
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        T* yr = qk_out(y, b, s, h0 + r, dv, hl, yb, ys, yp, d);
        reinterpret_cast<Four<T>*>(yr)[lane] = qk_norm_rope_four<T>(in[r], wv, c, sn, d, eps, mode);
    }
}

// Eight consecutive 16-bit elements in one 16-byte access.
template <typename T>
struct alignas(16) Eight {
    T v[8];
};

// R rows of one token as qk_norm_rope_rows4, but by a half-warp with eight elements (four RoPE
// pairs) per lane: 16-byte accesses and a four-step reduction, about half the instructions per
// element of the four-per-lane form, which ncu found issue-bound (SM 65%, DRAM 42%; docs/PERF.md
// session 17). 16-bit types only; same arithmetic and roundings per element.
template <typename T, int R>
__device__ __forceinline__ void qk_norm_rope_rows8(const T* __restrict__ x, long long sb, long long ss, long long sh,
                                                   const T* __restrict__ w, const float* __restrict__ cos,
                                                   const float* __restrict__ sin, T* __restrict__ y, long long yb,
                                                   long long ys, long long yp, int hl, int s_len, int heads, int d,
                                                   unsigned row0, const QkDivs& dv, float eps, int mode, int lane) {
    // This half-warp's lanes: its shuffles (offsets < 16) never leave it, so the other half may
    // have returned already (past the last row).
    const unsigned half_mask = 0xffffu << (lane & 16);
    const int l16 = lane % 16;
    const auto [b, s, h0] = qk_row(row0, dv, heads, s_len);
    const T* xr = x + b * sb + s * ss;
    Eight<T> in[R];
#pragma unroll
    for (int r = 0; r < R; ++r) in[r] = reinterpret_cast<const Eight<T>*>(xr + (long long)(h0 + r) * sh)[l16];
    Eight<T> wv{};
    float4 c = make_float4(1.f, 1.f, 1.f, 1.f), sn = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mode == 2) wv = reinterpret_cast<const Eight<T>*>(w)[l16];
    if (mode >= 1) {
        c = reinterpret_cast<const float4*>(cos + (long long)s * (d / 2))[l16];
        sn = reinterpret_cast<const float4*>(sin + (long long)s * (d / 2))[l16];
    }
    const float cs[4] = {c.x, c.y, c.z, c.w}, ss4[4] = {sn.x, sn.y, sn.z, sn.w};
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float f[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) f[k] = to_f(in[r].v[k]);
        if (mode == 2) {
            float sq = 0.f;
#pragma unroll
            for (int k = 0; k < 8; ++k) sq += f[k] * f[k];
            for (int o = 8; o > 0; o /= 2) sq += __shfl_xor_sync(half_mask, sq, o);
            const float rstd = rsqrtf(sq / d + eps);
#pragma unroll
            for (int k = 0; k < 8; ++k) f[k] = to_f(from_f<T>(f[k] * rstd * to_f(wv.v[k])));
        }
        Eight<T> out;
        if (mode == 0) {
            out = in[r];
        } else {
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                out.v[2 * p] = from_f<T>(f[2 * p] * cs[p] - f[2 * p + 1] * ss4[p]);
                out.v[2 * p + 1] = from_f<T>(f[2 * p] * ss4[p] + f[2 * p + 1] * cs[p]);
            }
        }
        T* yr = qk_out(y, b, s, h0 + r, dv, hl, yb, ys, yp, d);
        reinterpret_cast<Eight<T>*>(yr)[l16] = out;
    }
}

// Calls f(RowsPerGroup<R>{}) for the row-group size r (4, 2, else 1) as a compile-time constant.
template <int R>
struct RowsPerGroup {
    static constexpr int value = R;
};
template <typename F>
__device__ __forceinline__ void with_rows(int r, F&& f) {
    if (r == 4)
        f(RowsPerGroup<4>{});
    else if (r == 2)
        f(RowsPerGroup<2>{});
    else
        f(RowsPerGroup<1>{});
}

// qk_norm_rope: per-head RMSNorm (learned weight) then interleaved-pair RoPE of q or k, or RoPE
// alone, or a plain copy (v): a strided [B, S, H, D] view in, rows written wherever the caller's
// layout puts them. Element (b, s, h, d) of x sits at b*sb + s*ss + h*sh + d (a slice of a fused
// qkv output, or an attention-layout view, read in place); row (b, s, h) of the output starts at
// (h / hl)*yp + b*yb + s*ys + (h % hl)*D: a contiguous [B, S, H, D] (hl = H, yp = 0), or one
// slot of the sequence-parallel send buffer [pieces, S, 3, B, hl, D] whose piece j holds heads
// j*hl ... (src/parallel/pack.rs). The
// normalized value is rounded to T before the rotation, as the unfused ops do. One warp per
// (b, s, h) row of D = 2 * pairs elements, or with vec_rows = R > 0 (D = 128, aligned, R divides
// H) R rows of one token per warp, four elements per lane (qk_norm_rope8 below: eight per lane).
// mode: 0 copy, 1 RoPE, 2 norm + RoPE.
template <typename T>
__device__ void qk_norm_rope(const T* __restrict__ x, long long sb, long long ss, long long sh,
                             const T* __restrict__ w, const float* __restrict__ cos, const float* __restrict__ sin,
                             T* __restrict__ y, long long yb, long long ys, long long yp, int hl, int s_len, int heads,
                             int d, long long rows, float eps, int mode, int vec_rows, const QkDivs& dv) {
    // Row indices below 2^31 (the host checks), so fast divisions by heads, s_len and hl.
    const unsigned warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (vec_rows > 0) {
        const unsigned row0 = warp * vec_rows;
        if (row0 >= rows) return;
        with_rows(vec_rows, [&](auto r) {
            qk_norm_rope_rows4<T, decltype(r)::value>(x, sb, ss, sh, w, cos, sin, y, yb, ys, yp, hl, s_len, heads, d,
                                                      row0, dv, eps, mode, lane);
        });
        return;
    }
    if (warp >= rows) return;
    const auto [b, s, h] = qk_row(warp, dv, heads, s_len);
    const T* xr = x + b * sb + s * ss + (long long)h * sh;
    T* yr = qk_out(y, b, s, h, dv, hl, yb, ys, yp, d);
    if (mode == 0) {
        for (int i = lane; i < d; i += kWarp) yr[i] = xr[i];
        return;
    }
    const bool norm = mode == 2;
    float sq = 0.f;
    if (norm) {
        for (int i = lane; i < d; i += kWarp) {
            const float v = to_f(xr[i]);
            sq += v * v;
        }
        for (int o = kWarp / 2; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffff, sq, o);
    }
    const float rstd = norm ? rsqrtf(sq / d + eps) : 1.f;
    const int half = d / 2;
    for (int i = lane; i < half; i += kWarp) {
        const float n0 = norm ? to_f(from_f<T>(to_f(xr[2 * i]) * rstd * to_f(w[2 * i]))) : to_f(xr[2 * i]);
        const float n1 = norm ? to_f(from_f<T>(to_f(xr[2 * i + 1]) * rstd * to_f(w[2 * i + 1]))) : to_f(xr[2 * i + 1]);
        const float c = cos[(long long)s * half + i], sn = sin[(long long)s * half + i];
        yr[2 * i] = from_f<T>(n0 * c - n1 * sn);
        yr[2 * i + 1] = from_f<T>(n0 * sn + n1 * c);
    }
}

#define BLOCK_OPS(T, SUF)                                                                                            \
    extern "C" __global__ void bias_act_##SUF(const T* x, const T* bias, T* y, long long n, int c, int gelu) {       \
        bias_act<T>(x, bias, y, n, c, gelu);                                                                          \
    }                                                                                                                 \
    extern "C" __global__ void qk_norm_rope_##SUF(const T* x, long long sb, long long ss, long long sh, const T* w, \
                                                  const float* cos, const float* sin, T* y, long long yb,             \
                                                  long long ys, long long yp, int hl, int s_len, int heads, int d,    \
                                                  long long rows, float eps, int mode, int vec_rows, QkDivs dv) {     \
        qk_norm_rope<T>(x, sb, ss, sh, w, cos, sin, y, yb, ys, yp, hl, s_len, heads, d, rows, eps, mode, vec_rows, dv); \
    }

BLOCK_OPS(float, f32)
BLOCK_OPS(__nv_bfloat16, bf16)
BLOCK_OPS(__half, f16)

// qk_norm_rope with eight 16-bit values per lane: R = vec_rows rows of one token per half-warp
// (D = 128, R divides H, every offset 16-byte aligned; the host checks). A kernel of its own so
// that its registers do not lower the four-per-lane form's occupancy (sharing one kernel took both
// to 69 registers, 3 CTAs per SM; docs/PERF.md session 18), bounded to kQk8Ctas CTAs per SM.
constexpr int kQk8Threads = 256;  // src/cuda/fused.rs QK_THREADS
constexpr int kQk8Ctas = 4;       // CTAs per SM the register bound keeps (56 registers, no spills)
template <typename T>
__device__ void qk_norm_rope8(const T* __restrict__ x, long long sb, long long ss, long long sh,
                              const T* __restrict__ w, const float* __restrict__ cos, const float* __restrict__ sin,
                              T* __restrict__ y, long long yb, long long ys, long long yp, int hl, int s_len, int heads,
                              int d, long long rows, float eps, int mode, int vec_rows, const QkDivs& dv) {
    const unsigned half_id = (blockIdx.x * blockDim.x + threadIdx.x) / (kWarp / 2);
    const int lane = threadIdx.x % kWarp;
    const unsigned row0 = half_id * vec_rows;
    if (row0 >= rows) return;
    with_rows(vec_rows, [&](auto r) {
        qk_norm_rope_rows8<T, decltype(r)::value>(x, sb, ss, sh, w, cos, sin, y, yb, ys, yp, hl, s_len, heads, d, row0,
                                                  dv, eps, mode, lane);
    });
}
#define QK8(T, SUF)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(kQk8Threads, kQk8Ctas) qk_norm_rope8_##SUF(                        \
        const T* x, long long sb, long long ss, long long sh, const T* w, const float* cos, const float* sin, T* y,    \
        long long yb, long long ys, long long yp, int hl, int s_len, int heads, int d, long long rows, float eps,      \
        int mode, int vec_rows, QkDivs dv) {                                                                          \
        qk_norm_rope8<T>(x, sb, ss, sh, w, cos, sin, y, yb, ys, yp, hl, s_len, heads, d, rows, eps, mode, vec_rows,   \
                         dv);                                                                                         \
    }
QK8(__nv_bfloat16, bf16)
QK8(__half, f16)

// cat_act: y[r] = [o[r] (c values), act(m[r])] in one pass, for the parallel (single-stream) blocks
// whose output projection takes cat(attention, mlp): act = tanh-GELU (w values of m) or SwiGLU
// (silu(first w of m) * next w). c may be 0 (the activation alone). m rows are `m_stride` apart
// (a slice of the fused projection output, read in place); o and y are contiguous.
template <typename T>
__device__ void cat_act(const T* __restrict__ o, const T* __restrict__ m, long long m_stride, T* __restrict__ y,
                        long long rows, int c, int w, int swiglu) {
    const long long width = c + w;
    const long long n = rows * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / width;
        const int j = i % width;
        float v;
        if (j < c) {
            v = to_f(o[r * c + j]);
        } else {
            const T* mr = m + r * m_stride;
            const int k = j - c;
            if (swiglu) {
                const float g = to_f(mr[k]);
                v = g / (1.f + __expf(-g)) * to_f(mr[w + k]);
            } else {
                v = gelu_tanh(to_f(mr[k]));
            }
        }
        y[i] = from_f<T>(v);
    }
}

#define CAT_ACT(T, SUF)                                                                                           \
    extern "C" __global__ void cat_act_##SUF(const T* o, const T* m, long long m_stride, T* y, long long rows,    \
                                             int c, int w, int swiglu) {                                          \
        cat_act<T>(o, m, m_stride, y, rows, c, w, swiglu);                                                        \
    }

CAT_ACT(float, f32)
CAT_ACT(__nv_bfloat16, bf16)
CAT_ACT(__half, f16)

// cat_act for bf16 over 16-byte vectors (c, w, the row stride and both starts multiples of 8
// values): rows along the grid's y, vectors of a row along x, so no index division per element (the
// element loop above ran at ~1.4 TB/s: 8.5 ms of a FLUX.1 W4A16 step, docs/PERF.md session 15).
// Same arithmetic and rounding as the element loop.
extern "C" __global__ void cat_act_vec_bf16(const __nv_bfloat16* __restrict__ o, const __nv_bfloat16* __restrict__ m,
                                            long long m_stride, __nv_bfloat16* __restrict__ y, long long rows, int c,
                                            int w, int swiglu) {
    const int cv = c / rowv::kVec, wv = w / rowv::kVec;
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        uint4* yr = reinterpret_cast<uint4*>(y + r * (c + w));
        const uint4* orow = reinterpret_cast<const uint4*>(o + r * c);
        const uint4* mr = reinterpret_cast<const uint4*>(m + r * m_stride);
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < cv + wv; j += gridDim.x * blockDim.x) {
            if (j < cv) {
                yr[j] = orow[j];
                continue;
            }
            const int k = j - cv;
            float f[rowv::kVec];
            rowv::unpack8(mr[k], f);
            if (swiglu) {
                float u[rowv::kVec];
                rowv::unpack8(mr[wv + k], u);
#pragma unroll
                for (int e = 0; e < rowv::kVec; e++) f[e] = f[e] / (1.f + __expf(-f[e])) * u[e];
            } else {
#pragma unroll
                for (int e = 0; e < rowv::kVec; e++) f[e] = gelu_tanh(f[e]);
            }
            yr[j] = rowv::pack8(f);
        }
    }
}

// Sequence-parallel (Ulysses) exchange: q, k, v reach the send buffer straight from
// `qk_norm_rope` (its output layout), the transport places the received pieces in the single-rank
// token order, and the attention output's rows go back per member as they lie. What is left is
// the last step below: every member's heads of the local tokens into one row per token. Pure data
// movement in units U of 2-16 bytes (the host picks the widest unit dividing the head size and the
// offset), so any element type moves bit-exactly. CPU reference: the Candle composition in
// src/parallel/mod.rs, compared by `candiff doctor`.

// out[b][s][head0 + j*h + hh][:] = recv[j][s][b][hh][:] in a [B, S_local, ht, D] output: the
// outputs of every member's heads of one head chunk for the local tokens, placed among all `ht`
// heads (one chunk: head0 = 0, ht = n*h) in the [B, S_local, H, D] layout the output projection
// reads. Threads step through the chunk in the output's order, so writes stay coalesced per row.
template <typename U>
__device__ void sp_unpack_out(const U* __restrict__ recv, U* __restrict__ out, int n, int s_loc, int b, int h, int dv,
                              int ht, int head0) {
    const long long total = (long long)b * s_loc * n * h * dv;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i;
        const int x = r % dv; r /= dv;
        const int hh = r % h; r /= h;
        const int j = r % n; r /= n;
        const int s = r % s_loc;
        const int bb = r / s_loc;
        out[(((long long)bb * s_loc + s) * ht + head0 + j * h + hh) * dv + x] =
            recv[(((long long)(j * s_loc + s) * b + bb) * h + hh) * dv + x];
    }
}

#define SP_OPS(U, SUF)                                                                                          \
    extern "C" __global__ void sp_unpack_out_##SUF(const U* recv, U* out, int n, int s_loc, int b, int h, int dv, \
                                                  int ht, int head0) {                                          \
        sp_unpack_out<U>(recv, out, n, s_loc, b, h, dv, ht, head0);                                             \
    }

SP_OPS(uint4, u16b)
SP_OPS(uint2, u8b)
SP_OPS(unsigned int, u4b)
SP_OPS(unsigned short, u2b)

// rms_rope: Wan's q/k norm (RMSNorm over a token's whole row, all heads; weight [C]), each value
// rounded to T as the unfused norm writes it, then, when cos/sin are given, interleaved-pair RoPE
// per head of d (the `qk_norm_rope` rotation): one pass instead of the norm's and RoPE's. One block
// of kThreads per token row of C values, the row held in registers (C <= kThreads * 4 * kRowVecs);
// x and y contiguous [rows, C], rows = B * S (token s = row % s_len). CPU reference: the unfused
// ops (src/models/fused.rs `rms_rope`).
constexpr int kRowVecs = 8;

// With `y8`, the values (rounded to T) go out as E4M3 codes e4m3(v * (1 / descale)) instead: FP8
// attention's q or k with a scale fixed beforehand (no amax pass), the same bytes as quantizing
// the T output with that scale.
template <typename T>
__device__ void rms_rope(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ cos,
                         const float* __restrict__ sin, T* __restrict__ y, uint8_t* __restrict__ y8, float descale,
                         int c, int d, int s_len, float eps, int rope) {
    const long long row = blockIdx.x;
    const Four<T>* xr = reinterpret_cast<const Four<T>*>(x + row * c);
    Four<T>* yr = reinterpret_cast<Four<T>*>(y + row * c);
    const int n4 = c / 4;
    const float inv = fp8c::inv_scale(descale);
    Four<T> v[kRowVecs];
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < kRowVecs; ++j) {
        const int i = threadIdx.x + j * kThreads;
        if (i < n4) {
            v[j] = xr[i];
#pragma unroll
            for (int k = 0; k < 4; ++k) sq += to_f(v[j].v[k]) * to_f(v[j].v[k]);
        }
    }
    const float rstd = rsqrtf(block_sum(sq) / c + eps);
    const long long s = row % s_len;
#pragma unroll
    for (int j = 0; j < kRowVecs; ++j) {
        const int i = threadIdx.x + j * kThreads;
        if (i >= n4) continue;
        const Four<T> wv = reinterpret_cast<const Four<T>*>(w)[i];
        float f[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) f[k] = to_f(from_f<T>(to_f(v[j].v[k]) * rstd * to_f(wv.v[k])));
        Four<T> out;
        if (rope) {
            // Pairs (4i % d) / 2 and the next of this token's head: an even pair index, so one
            // float2 of each table.
            const long long p = s * (d / 2) + (4 * i % d) / 2;
            const float2 cc = *reinterpret_cast<const float2*>(cos + p), sn = *reinterpret_cast<const float2*>(sin + p);
            out.v[0] = from_f<T>(f[0] * cc.x - f[1] * sn.x);
            out.v[1] = from_f<T>(f[0] * sn.x + f[1] * cc.x);
            out.v[2] = from_f<T>(f[2] * cc.y - f[3] * sn.y);
            out.v[3] = from_f<T>(f[2] * sn.y + f[3] * cc.y);
        } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) out.v[k] = from_f<T>(f[k]);
        }
        if (y8) {
            uchar4 q;
            q.x = fp8c::quant_e4m3(to_f(out.v[0]), inv);
            q.y = fp8c::quant_e4m3(to_f(out.v[1]), inv);
            q.z = fp8c::quant_e4m3(to_f(out.v[2]), inv);
            q.w = fp8c::quant_e4m3(to_f(out.v[3]), inv);
            reinterpret_cast<uchar4*>(y8 + row * c)[i] = q;
        } else {
            yr[i] = out;
        }
    }
}

#define RMS_ROPE(T, SUF)                                                                                         \
    extern "C" __global__ void rms_rope_##SUF(const T* x, const T* w, const float* cos, const float* sin, T* y,  \
                                              uint8_t* y8, float descale, int c, int d, int s_len, float eps,    \
                                              int rope) {                                                        \
        rms_rope<T>(x, w, cos, sin, y, y8, descale, c, d, s_len, eps, rope);                                     \
    }
RMS_ROPE(float, f32)
RMS_ROPE(__nv_bfloat16, bf16)
RMS_ROPE(__half, f16)

// ---- bf16 row kernels with the row held in registers ----
// THREADS threads per row, each holding NV 16-byte vectors of 8 bf16 (vector i of the row at
// thread i % THREADS): one read of the row from memory, 16-byte accesses, reductions from
// registers. For rows of c values with c % 8 == 0 and c <= THREADS * 8 * NV, 16-byte aligned
// (the host checks; src/cuda/mod.rs `row_vec`). The per-element arithmetic is that of the
// kernels above, so outputs differ from theirs only through the order of the row sums.
namespace {

using rowv::e4m3x8;
using rowv::each_vec;
using rowv::kVec;
using rowv::load_row;
using rowv::pack8;
using rowv::unpack8;


// ln_modulate of a bf16 row, to bf16 `y` or (FP8) to E4M3 `q` with one scale per row as
// ln_modulate_fp8 (the bf16 values quantized as fp8_quant_rows does).
template <int THREADS, int NV, bool FP8>
__device__ void ln_modulate_rows(const __nv_bfloat16* __restrict__ x, const float* __restrict__ shift,
                                 const float* __restrict__ scale, __nv_bfloat16* __restrict__ y,
                                 uint8_t* __restrict__ q, float* __restrict__ row_scales, int c, int s, int sm,
                                 float eps) {
    const long long row = blockIdx.x;
    const int nv = c / kVec;
    uint4 v[NV];
    const float mean = block_sum_n<THREADS>(load_row<THREADS, NV>(x + row * c, nv, v, [](float f) { return f; }, [](float a, float b) { return a + b; })) / c;
    float ssd = 0.f;
    each_vec<THREADS, NV>(nv, [&](int j, int) {
        float f[kVec];
        unpack8(v[j], f);
#pragma unroll
        for (int k = 0; k < kVec; ++k) ssd += (f[k] - mean) * (f[k] - mean);
    });
    const float rstd = 1.f / sqrtf(block_sum_n<THREADS>(ssd) / c + eps);
    const long long m = (long long)mod_row(unsigned(row), s, sm) * c;
    float amax = 0.f;
    each_vec<THREADS, NV>(nv, [&](int j, int i) {
        float f[kVec];
        unpack8(v[j], f);
        const float4* sh = reinterpret_cast<const float4*>(shift + m + kVec * i);
        const float4* sc = reinterpret_cast<const float4*>(scale + m + kVec * i);
        const float4 sh0 = sh[0], sh1 = sh[1], sc0 = sc[0], sc1 = sc[1];
        const float shv[kVec] = {sh0.x, sh0.y, sh0.z, sh0.w, sh1.x, sh1.y, sh1.z, sh1.w};
        const float scv[kVec] = {sc0.x, sc0.y, sc0.z, sc0.w, sc1.x, sc1.y, sc1.z, sc1.w};
#pragma unroll
        for (int k = 0; k < kVec; ++k) f[k] = (f[k] - mean) * rstd * (1.f + scv[k]) + shv[k];
        v[j] = pack8(f);
        if (FP8) {
            unpack8(v[j], f);
#pragma unroll
            for (int k = 0; k < kVec; ++k) amax = fmaxf(amax, fabsf(f[k]));
        } else {
            reinterpret_cast<uint4*>(y + row * c)[i] = v[j];
        }
    });
    if (!FP8) return;
    const float rs = fp8c::row_scale(fp8c::block_max<THREADS>(amax)), inv = fp8c::inv_scale(rs);
    each_vec<THREADS, NV>(nv, [&](int j, int i) {
        float f[kVec];
        unpack8(v[j], f);
        reinterpret_cast<uint2*>(q + row * c)[i] = e4m3x8(f, inv);
    });
    if (threadIdx.x == 0) row_scales[row] = rs;
}

// rms_rope of a bf16 row (RMSNorm over the row, then RoPE per head of d values), to bf16 `y` or,
// with `y8`, to E4M3 codes with the fixed `descale`; the arithmetic of rms_rope above.
template <int THREADS, int NV>
__device__ void rms_rope_rows(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                              const float* __restrict__ cos, const float* __restrict__ sin,
                              __nv_bfloat16* __restrict__ y, uint8_t* __restrict__ y8, float descale, int c, int d,
                              int s_len, float eps, int rope) {
    const long long row = blockIdx.x;
    const float inv = fp8c::inv_scale(descale);
    const int nv = c / kVec;
    uint4 v[NV];
    const float sq = load_row<THREADS, NV>(x + row * c, nv, v, [](float f) { return f * f; }, [](float a, float b) { return a + b; });
    const float rstd = rsqrtf(block_sum_n<THREADS>(sq) / c + eps);
    const long long s = row % s_len;
    each_vec<THREADS, NV>(nv, [&](int j, int i) {
        float f[kVec], wv[kVec];
        unpack8(v[j], f);
        unpack8(reinterpret_cast<const uint4*>(w)[i], wv);
#pragma unroll
        for (int k = 0; k < kVec; ++k) f[k] = __bfloat162float(__float2bfloat16(f[k] * rstd * wv[k]));
        if (rope) {
            // Pairs (8i % d) / 2 .. +3 of this token's head: a multiple of 4, so one float4 of each table.
            const long long p = s * (d / 2) + (kVec * i % d) / 2;
            const float4 cc = *reinterpret_cast<const float4*>(cos + p), sn = *reinterpret_cast<const float4*>(sin + p);
            const float cv[4] = {cc.x, cc.y, cc.z, cc.w}, sv[4] = {sn.x, sn.y, sn.z, sn.w};
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const float a = f[2 * t], b = f[2 * t + 1];
                f[2 * t] = a * cv[t] - b * sv[t];
                f[2 * t + 1] = a * sv[t] + b * cv[t];
            }
        }
        const uint4 out = pack8(f);
        if (y8) {
            unpack8(out, f);
            reinterpret_cast<uint2*>(y8 + row * c)[i] = e4m3x8(f, inv);
        } else {
            reinterpret_cast<uint4*>(y + row * c)[i] = out;
        }
    });
}

}  // namespace

#define ROW_VEC(THREADS, NV)                                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) ln_modulate_rows_t##THREADS##_v##NV(                     \
        const __nv_bfloat16* x, const float* shift, const float* scale, __nv_bfloat16* y, int c, int s, int sm,    \
        float eps) {                                                                                                \
        ln_modulate_rows<THREADS, NV, false>(x, shift, scale, y, nullptr, nullptr, c, s, sm, eps);                 \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS) ln_modulate_fp8_rows_t##THREADS##_v##NV(                 \
        const __nv_bfloat16* x, const float* shift, const float* scale, uint8_t* q, float* row_scales, int c, int s, \
        int sm, float eps) {                                                                                        \
        ln_modulate_rows<THREADS, NV, true>(x, shift, scale, nullptr, q, row_scales, c, s, sm, eps);               \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS) rms_rope_rows_t##THREADS##_v##NV(                        \
        const __nv_bfloat16* x, const __nv_bfloat16* w, const float* cos, const float* sin, __nv_bfloat16* y,      \
        uint8_t* y8, float descale, int c, int d, int s_len, float eps, int rope) {                                 \
        rms_rope_rows<THREADS, NV>(x, w, cos, sin, y, y8, descale, c, d, s_len, eps, rope);                        \
    }
#define ROW_VEC_ALL(THREADS)                                                                                       \
    ROW_VEC(THREADS, 1) ROW_VEC(THREADS, 2) ROW_VEC(THREADS, 3) ROW_VEC(THREADS, 4) ROW_VEC(THREADS, 5)            \
    ROW_VEC(THREADS, 6) ROW_VEC(THREADS, 7) ROW_VEC(THREADS, 8)
ROW_VEC_ALL(128)
ROW_VEC_ALL(256)
