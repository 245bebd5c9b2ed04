//! FP8 execution of NVFP4 weights (`--nvfp4-mode fp8`): the CPU reference of kernels/fp8.cu.
//!
//! Hopper has FP8 tensor cores but no FP4 ones, so NVFP4 weights are converted once at load to E4M3
//! with one f32 scale per output row (row amax / 448), and activations are quantized per row
//! (token) on every call; the GEMM then runs on FP8 tensor cores with those two scale vectors.
//! Weights stay 8-bit in memory (2x NVFP4's footprint, half of bf16). The conversion loses what
//! E4M3 cannot represent of `e2m1 * block scale` relative to the row's largest value; the extra
//! error is measured against W4A16 on the fixtures (tests/nvfp4_fp8.rs).

use super::format::{e2m1_decode, e4m3_decode, e4m3_encode, GROUP_SIZE};
use super::layout::Nvfp4Weight;

/// How an fp8-mode GEMM accumulates its K products (`--fp8-accum`).
///
/// Hopper's FP8 tensor cores add products into an accumulator with fewer mantissa bits than
/// f32. By default cuBLASLt moves the partial sums into f32 registers every few K steps
/// (`F32`: the GPU output is within ~3e-4 of max |y| of the f32 CPU reference, docs/PERF.md).
/// `Fast` leaves the sum in the tensor cores for all of K (cuBLASLt's fast accumulation, what
/// TransformerEngine and torchao use for inference GEMMs): on an H200 3-22% less GEMM time and a
/// 7% faster FLUX.1 fp8 step, but errors up to ~5e-3 of max |y| at K = 4096-5120, a random-weight
/// step output 2.5e-2 (rel. L2; FLUX.2-dev 0.29) away from the `F32` one, and outputs that depend
/// on how many tokens share a GEMM (several GPUs no longer reproduce one exactly). Measured in
/// docs/PERF.md, session 24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fp8Accum {
    /// Partial sums promoted to f32 registers (cuBLASLt's default).
    #[default]
    F32,
    /// The tensor cores' own accumulator throughout K (faster, less exact).
    Fast,
}

impl std::fmt::Display for Fp8Accum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fp8Accum::F32 => "f32",
            Fp8Accum::Fast => "fast",
        })
    }
}

/// Largest finite E4M3 value.
pub const FP8_MAX: f32 = 448.0;

/// Scale of a row whose largest magnitude is `amax`: `amax / 448`, or 1 for an all-zero row.
pub fn row_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        amax / FP8_MAX
    } else {
        1.0
    }
}

/// What every E4M3 quantizer multiplies by: `1 / scale` rounded once, capped at `f32::MAX` (a
/// scale below `1 / f32::MAX` would give infinity, and `0 * inf` a NaN code). The GPU kernels
/// multiply too (kernels/fp8_common.cuh `inv_scale`): one multiply per value instead of a
/// division, which made their row kernels issue-bound; both round the same way, so the codes
/// match bit for bit.
pub fn inv_scale(scale: f32) -> f32 {
    (1.0 / scale).min(f32::MAX)
}

/// Element `i` of row `r` of a canonical NVFP4 weight, `(e2m1 * block scale) * weight_scale_2` in
/// f32 (the kernel's operation order).
fn value(w: &Nvfp4Weight, r: usize, i: usize) -> f32 {
    let byte = w.packed[r * w.k / 2 + i / 2];
    let code = if i.is_multiple_of(2) { byte & 0xF } else { byte >> 4 };
    let s = e4m3_decode(w.scales[r * (w.k / GROUP_SIZE) + i / GROUP_SIZE]);
    e2m1_decode(code) * s * w.weight_scale_2
}

/// E4M3 weight `[n, k]` and one scale per row.
pub fn weight_to_fp8(w: &Nvfp4Weight) -> (Vec<u8>, Vec<f32>) {
    let mut out = vec![0u8; w.n * w.k];
    let mut scales = vec![0f32; w.n];
    let mut row = vec![0f32; w.k];
    for r in 0..w.n {
        for (i, v) in row.iter_mut().enumerate() {
            *v = value(w, r, i);
        }
        scales[r] = quantize_row(&row, &mut out[r * w.k..(r + 1) * w.k]);
    }
    (out, scales)
}

/// Quantizes one row to E4M3 with a per-row scale; returns the scale.
pub fn quantize_row(x: &[f32], out: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = row_scale(amax);
    let inv = inv_scale(scale);
    for (o, v) in out.iter_mut().zip(x) {
        *o = e4m3_encode(v * inv);
    }
    scale
}

/// Decoded E4M3 values.
pub fn decode(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&b| e4m3_decode(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_scale_to_the_fp8_range_and_round_trip_within_e4m3_precision() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let mut q = vec![0u8; 64];
        let s = quantize_row(&x, &mut q);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(s, amax / FP8_MAX);
        let back: Vec<f32> = decode(&q).iter().map(|v| v * s).collect();
        // The largest element maps to 448 exactly (to rounding of the scale).
        assert!(decode(&q).iter().any(|v| v.abs() == FP8_MAX));
        for (a, b) in x.iter().zip(&back) {
            // 3 mantissa bits: relative error <= 2^-4 for normal values, absolute below 2^-9 * s.
            assert!((a - b).abs() <= a.abs() / 16.0 + s * (2f32).powi(-9), "{a} vs {b}");
        }
        let mut z = vec![1u8; 4];
        assert_eq!(quantize_row(&[0.0; 4], &mut z), 1.0);
        assert_eq!(z, vec![0u8; 4]);
    }

    #[test]
    fn nvfp4_rows_convert_with_their_own_scale() {
        // Row 0: codes 7 (6.0) with scale 1.0 -> amax 6 * ws2; row 1 all zero.
        let (n, k) = (2, 16);
        let w = Nvfp4Weight::new(n, k, [vec![0x77u8; 8], vec![0u8; 8]].concat(), vec![0x38, 0x38], 0.5).unwrap();
        let (q, s) = weight_to_fp8(&w);
        assert_eq!(s, vec![3.0 / FP8_MAX, 1.0]);
        assert!(q[..16].iter().all(|&b| e4m3_decode(b) == FP8_MAX));
        assert!(q[16..].iter().all(|&b| b == 0));
    }
}
