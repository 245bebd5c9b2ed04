// tanh-GELU, shared by the fused bias/activation pass (fused.cu) and the GEMM epilogues
// (nvfp4_sm90.cu), so that fused and unfused paths apply the very same function.
#pragma once

// The argument of tanh in tanh-GELU: sqrt(2 / pi) * (v + 0.044715 v^3).
__device__ __forceinline__ float gelu_tanh_arg(float v) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2 / pi)
    constexpr float kCubic = 0.044715f;                  // tanh-GELU's cubic coefficient
    return kSqrt2OverPi * v * (1.f + kCubic * v * v);
}

__device__ __forceinline__ float gelu_tanh(float v) { return 0.5f * v * (1.f + tanhf(gelu_tanh_arg(v))); }
