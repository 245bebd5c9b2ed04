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

// bias_act: y[r, c] = act(x[r, c] + bias[c]) with act = identity or tanh-GELU, one pass (replaces a
// broadcast add and a separate activation pass after a GEMM). `bias` is [C] in the activations'
// type (the model's own weight, read as stored: no per-call conversion).
__device__ __forceinline__ float gelu_tanh(float v) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2 / pi)
    constexpr float kCubic = 0.044715f;                  // tanh-GELU's cubic coefficient
    return 0.5f * v * (1.f + tanhf(kSqrt2OverPi * v * (1.f + kCubic * v * v)));
}

template <typename T>
__device__ void bias_act(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, long long n, int c,
                         int gelu) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = to_f(x[i]) + to_f(bias[i % c]);
        if (gelu) v = gelu_tanh(v);
        y[i] = from_f<T>(v);
    }
}

// qk_norm_rope: per-head RMSNorm (learned weight) then interleaved-pair RoPE, from a strided view
// of q or k to a contiguous [B, S, H, D]. Element (b, s, h, d) of x sits at b*sb + s*ss + h*D + d
// (heads contiguous within a token, any token/batch stride: a slice of a fused qkv output is read
// in place). The normalized value is rounded to T before the rotation, as the unfused ops do.
// One warp per (b, s, h) row of D = 2 * pairs elements.
template <typename T>
__device__ void qk_norm_rope(const T* __restrict__ x, long long sb, long long ss, const T* __restrict__ w,
                             const float* __restrict__ cos, const float* __restrict__ sin, T* __restrict__ y, int s_len,
                             int heads, int d, long long rows, float eps, int norm) {
    const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (warp >= rows) return;
    const int h = warp % heads;
    const long long bs = warp / heads;
    const int s = bs % s_len;
    const long long b = bs / s_len;
    const T* xr = x + b * sb + s * ss + (long long)h * d;
    float sq = 0.f;
    for (int i = lane; i < d; i += kWarp) {
        const float v = to_f(xr[i]);
        sq += v * v;
    }
    for (int o = kWarp / 2; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffff, sq, o);
    // norm = 0: RoPE alone (the model normalized already); the values pass through unchanged.
    const float rstd = norm ? rsqrtf(sq / d + eps) : 1.f;
    T* yr = y + warp * d;
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
    extern "C" __global__ void qk_norm_rope_##SUF(const T* x, long long sb, long long ss, const T* w,                \
                                                  const float* cos, const float* sin, T* y, int s_len, int heads,     \
                                                  int d, long long rows, float eps, int norm) {                       \
        qk_norm_rope<T>(x, sb, ss, w, cos, sin, y, s_len, heads, d, rows, eps, norm);                                 \
    }

BLOCK_OPS(float, f32)
BLOCK_OPS(__nv_bfloat16, bf16)
BLOCK_OPS(__half, f16)

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

// Sequence-parallel (Ulysses) exchange layouts: each replaces the stack / permute / concatenate
// copies around an all-to-all with one pass. Pure data movement in units U of 2-16 bytes (the host
// picks the widest unit dividing the head size, every stride and every offset), so any element
// type moves bit-exactly. CPU reference: the Candle composition in src/parallel/mod.rs
// (`SeqParallel::gather_heads` / `scatter_heads`), compared by `candiff doctor`.
//
// Row tables (`map`, three u32 per token of the full sequence, in the single-rank token order):
// p = the token's row among the rows that ranks send in member order, base = the first such row
// of the token's member, held = how many tokens that member holds.

// send[j][t][s][b][hh][:] = src_t[b][j*h + hh][s][:] for t = q, k, v: local tokens, all heads ->
// per-member pieces, member j getting heads j*h .. j*h + h - 1.
template <typename U>
__device__ void sp_pack_qkv(const U* __restrict__ q, const U* __restrict__ k, const U* __restrict__ v,
                            const long long (&st)[3][3], U* __restrict__ out, int n, int h, int s_loc, int b, int dv) {
    const long long total = (long long)n * 3 * s_loc * b * h * dv;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i;
        const int x = r % dv; r /= dv;
        const int hh = r % h; r /= h;
        const int bb = r % b; r /= b;
        const int s = r % s_loc; r /= s_loc;
        const int t = r % 3;
        const int j = r / 3;
        const U* src = t == 0 ? q : (t == 1 ? k : v);
        out[i] = src[bb * st[t][0] + (long long)(j * h + hh) * st[t][1] + s * st[t][2] + x];
    }
}

// out[t][r][:] (the full sequence's q, k, v for this rank's heads, [3, S, B, h, D]) from the
// received pieces: member m's piece is [3, held_m, B, h, D], pieces in member order.
template <typename U>
__device__ void sp_unpack_qkv(const U* __restrict__ recv, const unsigned* __restrict__ map, U* __restrict__ out,
                              int s_total, long long row) {
    const long long total = 3LL * s_total * row;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long inner = i % row;
        const long long tr = i / row;
        const int r = tr % s_total;
        const int t = tr / s_total;
        const unsigned p = map[3 * r], base = map[3 * r + 1], held = map[3 * r + 2];
        out[i] = recv[((long long)p + 2LL * base + (long long)t * held) * row + inner];
    }
}

// send[p(r)][b][hh][:] = o[b][hh][r][:]: this rank's heads of the attention output, each token's
// row sent to the member holding it (rows in member order).
template <typename U>
__device__ void sp_pack_out(const U* __restrict__ o, long long sb, long long sh, long long ss,
                            const unsigned* __restrict__ map, U* __restrict__ out, int s_total, int b, int h, int dv) {
    const long long row = (long long)b * h * dv;
    const long long total = (long long)s_total * row;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long rest = i;
        const int x = rest % dv; rest /= dv;
        const int hh = rest % h; rest /= h;
        const int bb = rest % b;
        const int r = rest / b;
        out[(long long)map[3 * r] * row + (bb * h + hh) * dv + x] = o[bb * sb + hh * sh + (long long)r * ss + x];
    }
}

// out[b][s][j*h + hh][:] = recv[j][s][b][hh][:]: the outputs of every member's heads for the local
// tokens, back in the [B, S_local, H, D] layout the output projection reads.
template <typename U>
__device__ void sp_unpack_out(const U* __restrict__ recv, U* __restrict__ out, int n, int s_loc, int b, int h, int dv) {
    const long long total = (long long)b * s_loc * n * h * dv;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i;
        const int x = r % dv; r /= dv;
        const int hh = r % h; r /= h;
        const int j = r % n; r /= n;
        const int s = r % s_loc;
        const int bb = r / s_loc;
        out[i] = recv[(((long long)(j * s_loc + s) * b + bb) * h + hh) * dv + x];
    }
}

#define SP_OPS(U, SUF)                                                                                              \
    extern "C" __global__ void sp_pack_qkv_##SUF(const U* q, const U* k, const U* v, long long qb, long long qh,   \
                                                 long long qs, long long kb, long long kh, long long ks,           \
                                                 long long vb, long long vh, long long vs, U* out, int n, int h,   \
                                                 int s_loc, int b, int dv) {                                       \
        const long long st[3][3] = {{qb, qh, qs}, {kb, kh, ks}, {vb, vh, vs}};                                     \
        sp_pack_qkv<U>(q, k, v, st, out, n, h, s_loc, b, dv);                                                      \
    }                                                                                                               \
    extern "C" __global__ void sp_unpack_qkv_##SUF(const U* recv, const unsigned* map, U* out, int s_total,         \
                                                   long long row) {                                                \
        sp_unpack_qkv<U>(recv, map, out, s_total, row);                                                            \
    }                                                                                                               \
    extern "C" __global__ void sp_pack_out_##SUF(const U* o, long long sb, long long sh, long long ss,              \
                                                 const unsigned* map, U* out, int s_total, int b, int h, int dv) { \
        sp_pack_out<U>(o, sb, sh, ss, map, out, s_total, b, h, dv);                                                \
    }                                                                                                               \
    extern "C" __global__ void sp_unpack_out_##SUF(const U* recv, U* out, int n, int s_loc, int b, int h, int dv) { \
        sp_unpack_out<U>(recv, out, n, s_loc, b, h, dv);                                                           \
    }

SP_OPS(uint4, u16b)
SP_OPS(uint2, u8b)
SP_OPS(unsigned int, u4b)
SP_OPS(unsigned short, u2b)
