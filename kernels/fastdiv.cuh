// Division by a divisor fixed for a launch as one widening multiply and a shift (the
// multiply-and-shift of Granlund & Montgomery, in CUTLASS's FastDivmod form): index arithmetic in
// the element-wise kernels divided 64-bit integers by runtime values, ~70 instructions each, and
// that made them issue-bound (docs/PERF.md, session 17). The host computes (mul, shift) for
// divisors in [1, 2^31) (src/models/fused.rs `FastDiv`, which also holds the reference of
// this formula and its test); exact for dividends below 2^31.
#pragma once

namespace fastdiv {

__device__ __forceinline__ unsigned div(unsigned n, unsigned mul, unsigned shift) {
    return static_cast<unsigned>((static_cast<unsigned long long>(n) * mul) >> shift);
}

}  // namespace fastdiv
