//! FP8 attention (`--attention fp8`): what the GPU path computes, on the CPU.
//!
//! q, k and v are quantized to E4M3 with one scale per tensor (`descale = amax / target`), cuDNN's
//! FP8 flash attention multiplies E4M3 q k^T on FP8 tensor cores, rounds the probabilities
//! `exp(s - max)` (in [0, 1]) to E4M3 after scaling them by 448, multiplies them with E4M3 v and
//! writes the output as E4M3 with `scale_o = 1 / descale_v`, which the last pass turns back into
//! bf16. [`reference`] does the same arithmetic in f32 with the row maximum over the whole row (the
//! GPU's running maximum rounds each block's probabilities against the maximum seen so far, so the
//! two differ by a few E4M3 roundings of small probabilities).

use candle_core::{DType, Result, Tensor};

use crate::nvfp4::format::{e4m3_decode, e4m3_encode, E4M3_MAX};

/// q and k map their largest magnitude to the largest E4M3 value.
pub const QK_TARGET: f32 = E4M3_MAX;
/// v maps its largest magnitude below it: the output is a convex combination of v's rows, so
/// `|o| <= max |v|`, and with `scale_o = 1 / descale_v` it reuses v's range. Headroom 1.125 covers the
/// probabilities' E4M3 rounding, which can make the weights sum to up to 2^-4 above 1.
pub const V_TARGET: f32 = E4M3_MAX / 1.125;

type Dims4 = (usize, usize, usize, usize);

/// E4M3 codes of `x` with one scale: `descale = amax / target` (1 for an all-zero tensor), codes
/// `e4m3(x * (1 / descale))`: the GPU quantizer's operations in its order.
pub fn quantize_per_tensor(x: &[f32], target: f32) -> (Vec<u8>, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let descale = if amax > 0.0 { amax / target } else { 1.0 };
    (quantize_with(x, descale), descale)
}

/// `[B, H, S, D]` as f32 values in that order, with its dims.
fn rows(t: &Tensor) -> Result<(Vec<f32>, Dims4)> {
    let dims = t.dims4()?;
    Ok((t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, dims))
}

/// FP8 attention of `[B, H, S, D]` q, k, v (any device and dtype; values are read as they are, so
/// pass the bf16 tensors the GPU path would see), f32 `[B, H, Sq, D]` on the CPU.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    reference_with(q, k, v, None)
}

/// E4M3 codes of `x` with a given descale: `e4m3(x * (1 / descale))`, as the GPU quantizers
/// ([`crate::nvfp4::fp8::inv_scale`]).
pub fn quantize_with(x: &[f32], descale: f32) -> Vec<u8> {
    let inv = crate::nvfp4::fp8::inv_scale(descale);
    x.iter().map(|&v| e4m3_encode(v * inv)).collect()
}

/// [`reference`] with q and k quantized with given descales (`qk_descales`, as when their producer
/// fixes the scale beforehand) instead of their amax.
pub fn reference_with(q: &Tensor, k: &Tensor, v: &Tensor, qk_descales: Option<(f32, f32)>) -> Result<Tensor> {
    let ((qv, (b, h, sq, d)), (kv, (_, _, sk, _)), (vv, _)) = (rows(q)?, rows(k)?, rows(v)?);
    let ((q8, dq), (k8, dk)) = match qk_descales {
        Some((dq, dk)) => ((quantize_with(&qv, dq), dq), (quantize_with(&kv, dk), dk)),
        None => (quantize_per_tensor(&qv, QK_TARGET), quantize_per_tensor(&kv, QK_TARGET)),
    };
    let (v8, dv) = quantize_per_tensor(&vv, V_TARGET);
    let dec = |c: &[u8]| c.iter().map(|&x| e4m3_decode(x)).collect::<Vec<f32>>();
    let (qf, kf, vf) = (dec(&q8), dec(&k8), dec(&v8));
    let scale = 1.0 / (d as f32).sqrt();
    let score_scale = dq * dk * scale;
    let mut out = vec![0f32; b * h * sq * d];
    let mut p = vec![0f32; sk];
    for bh in 0..b * h {
        let (qb, kb, vb) = (&qf[bh * sq * d..], &kf[bh * sk * d..], &vf[bh * sk * d..]);
        for i in 0..sq {
            let qi = &qb[i * d..(i + 1) * d];
            for (j, pj) in p.iter_mut().enumerate() {
                let kj = &kb[j * d..(j + 1) * d];
                *pj = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * score_scale;
            }
            let m = p.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut l = 0f32;
            for pj in p.iter_mut() {
                let e = (*pj - m).exp();
                l += e;
                // The probability as the second GEMM sees it: E4M3 of 448 * p, scaled back.
                *pj = e4m3_decode(e4m3_encode(e * E4M3_MAX)) / E4M3_MAX;
            }
            let o = &mut out[(bh * sq + i) * d..(bh * sq + i + 1) * d];
            for (j, &pj) in p.iter().enumerate() {
                for (od, &vjd) in o.iter_mut().zip(&vb[j * d..(j + 1) * d]) {
                    *od += pj * vjd;
                }
            }
            // o = (P v8) descale_v / l, written as E4M3 with scale_o = 1 / descale_v, read back.
            for od in o.iter_mut() {
                *od = e4m3_decode(e4m3_encode(*od / l)) * dv;
            }
        }
    }
    Tensor::from_vec(out, (b, h, sq, d), &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        (diff / norm).sqrt()
    }

    #[test]
    fn per_tensor_quantization_maps_amax_to_the_target() {
        let x: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let (codes, descale) = quantize_per_tensor(&x, V_TARGET);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(descale, amax / V_TARGET);
        let back: Vec<f32> = codes.iter().map(|&c| e4m3_decode(c) * descale).collect();
        // Largest magnitude lands on the E4M3 grid value nearest V_TARGET (398.2 -> 384 or 416).
        let top = back.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((top - amax).abs() <= amax / 16.0, "amax {amax} came back as {top}");
        // Every normal value within half an E4M3 step (2^-4 relative).
        for (a, b) in x.iter().zip(&back) {
            if a.abs() > descale * 2f32.powi(-6) {
                assert!((a - b).abs() <= a.abs() / 16.0, "{a} -> {b}");
            }
        }
    }

    /// The emulation is FP8 attention: close to exact attention, but not equal to it.
    #[test]
    fn reference_is_attention_within_e4m3_rounding() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 48, 64), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 2, 80, 64), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 2, 80, 64), &dev).unwrap();
        let exact = crate::models::ops::attention_reference(&q, &k, &v).unwrap();
        let got = reference(&q, &k, &v).unwrap();
        let err = rel_l2(&got, &exact);
        assert!(err < crate::doctor::FP8_ATTENTION_TOL, "FP8 attention emulation vs exact: rel. L2 {err}");
        assert!(err > 1e-3, "FP8 attention emulation equals exact attention (rel. L2 {err}): nothing was rounded");
    }
}
