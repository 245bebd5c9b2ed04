//! Quantization to NVFP4 with the exact f32 operation order of the references
//! (FlashInfer's activation quantizer, ModelOpt's weight export).

use super::format::{e2m1_decode, e2m1_encode, e4m3_decode, e4m3_encode, pack_pair, NibbleOrder};
use super::format::{E2M1_MAX, GROUP_SIZE, NVFP4_AMAX_TARGET};
use super::layout::Nvfp4Weight;
use crate::error::{CResult, CandiffError};

/// Quantizes one row of `k` values (k a multiple of 16) with global scale `gs`.
/// Per block: `s = e4m3(amax/6 * gs)`, `code = e2m1(x / (s/gs))`, all codes 0 where `s == 0`.
/// Writes low-first packed codes (`k/2` bytes) and E4M3 scale bytes (`k/16`).
pub fn quantize_row(x: &[f32], gs: f32, packed: &mut [u8], scales: &mut [u8]) {
    for (b, blk) in x.chunks_exact(GROUP_SIZE).enumerate() {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s_bits = e4m3_encode(amax / E2M1_MAX * gs);
        scales[b] = s_bits;
        let s = e4m3_decode(s_bits);
        let out = &mut packed[b * GROUP_SIZE / 2..(b + 1) * GROUP_SIZE / 2];
        if s == 0.0 {
            out.fill(0);
            continue;
        }
        let step = s / gs;
        for (j, pair) in blk.chunks_exact(2).enumerate() {
            out[j] = pack_pair(e2m1_encode(pair[0] / step), e2m1_encode(pair[1] / step), NibbleOrder::Low);
        }
    }
}

/// Activation codes and scales for `[m, k]` rows with a calibrated `input_scale`
/// (global scale `1 / input_scale`). Returns (`[m, k/2]` codes, `[m, k/16]` linear scales).
pub fn quantize_activations(x: &[f32], m: usize, k: usize, input_scale: f32) -> (Vec<u8>, Vec<u8>) {
    let gs = 1.0 / input_scale;
    let mut packed = vec![0u8; m * k / 2];
    let mut scales = vec![0u8; m * k / GROUP_SIZE];
    for r in 0..m {
        quantize_row(
            &x[r * k..(r + 1) * k],
            gs,
            &mut packed[r * k / 2..(r + 1) * k / 2],
            &mut scales[r * k / GROUP_SIZE..(r + 1) * k / GROUP_SIZE],
        );
    }
    (packed, scales)
}

/// Fake-quantizes a row in place: `x_fq = (e2m1 * s) * input_scale` (Blackwell W4A4 numerics).
pub fn fake_quantize_row(x: &mut [f32], input_scale: f32) {
    let gs = 1.0 / input_scale;
    let k = x.len();
    let mut packed = vec![0u8; k / 2];
    let mut scales = vec![0u8; k / GROUP_SIZE];
    quantize_row(x, gs, &mut packed, &mut scales);
    for (b, &sb) in scales.iter().enumerate() {
        let s = e4m3_decode(sb);
        for j in 0..GROUP_SIZE / 2 {
            let byte = packed[b * GROUP_SIZE / 2 + j];
            x[b * GROUP_SIZE + 2 * j] = (e2m1_decode(byte & 0xF) * s) * input_scale;
            x[b * GROUP_SIZE + 2 * j + 1] = (e2m1_decode(byte >> 4) * s) * input_scale;
        }
    }
}

/// Below this many values one thread quantizes the whole weight (spawning costs more).
const PARALLEL_MIN_VALUES: usize = 1 << 20;

/// max |w|, over the cores for large weights.
fn par_amax(w: &[f32]) -> f32 {
    let fold = |c: &[f32]| c.iter().fold(0f32, |m, v| m.max(v.abs()));
    if w.len() < PARALLEL_MIN_VALUES {
        return fold(w);
    }
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    std::thread::scope(|sc| {
        let parts: Vec<_> = w.chunks(w.len().div_ceil(threads)).map(|c| sc.spawn(move || fold(c))).collect();
        parts.into_iter().map(|h| h.join().expect("amax thread")).fold(0f32, f32::max)
    })
}

/// Quantizes a dense `[n, k]` weight as ModelOpt exports it: `gs = 2688 / amax(|W|)`,
/// `weight_scale_2 = 1 / gs`.
pub fn quantize_weight(w: &[f32], n: usize, k: usize) -> CResult<Nvfp4Weight> {
    if !k.is_multiple_of(GROUP_SIZE) || w.len() != n * k {
        return Err(CandiffError::layout(format!(
            "cannot quantize a [{n}, {k}] weight from {} values: K must be a multiple of {GROUP_SIZE}",
            w.len()
        )));
    }
    let amax = par_amax(w);
    let gs = if amax > 0.0 { NVFP4_AMAX_TARGET / amax } else { 1.0 };
    let mut packed = vec![0u8; n * k / 2];
    let mut scales = vec![0u8; n * k / GROUP_SIZE];
    let band = |wb: &[f32], pb: &mut [u8], sb: &mut [u8]| {
        for ((wr, pr), sr) in wb.chunks(k).zip(pb.chunks_mut(k / 2)).zip(sb.chunks_mut(k / GROUP_SIZE)) {
            quantize_row(wr, gs, pr, sr);
        }
    };
    if w.len() < PARALLEL_MIN_VALUES {
        band(w, &mut packed, &mut scales);
    } else {
        // Rows are independent: full-size layers (up to ~10^8 values, quantized at load by
        // `compare`) are split over the cores in row bands.
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n);
        let rows = n.div_ceil(threads);
        std::thread::scope(|sc| {
            let bands =
                w.chunks(rows * k).zip(packed.chunks_mut(rows * k / 2)).zip(scales.chunks_mut(rows * k / GROUP_SIZE));
            for ((wb, pb), sb) in bands {
                sc.spawn(move || band(wb, pb, sb));
            }
        });
    }
    Nvfp4Weight::new(n, k, packed, scales, 1.0 / gs)
}

/// How to join NVFP4 shards along N (e.g. q, k, v into one qkv matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardMerge {
    /// Shards must share `weight_scale_2`; otherwise an error (callers then keep them separate).
    RequireEqualScale,
    /// Use the largest `weight_scale_2` and re-round the other shards' block scales to it. The
    /// codes stay; each rescaled block moves by at most half an E4M3 step.
    RescaleToMax,
}

/// Concatenates shards along N. Returns the fused weight and whether any block scale was re-rounded.
pub fn concat_rows(parts: &[Nvfp4Weight], merge: ShardMerge) -> CResult<(Nvfp4Weight, bool)> {
    let first = parts.first().ok_or_else(|| CandiffError::layout("no shards to concatenate"))?;
    let k = first.k;
    if let Some(p) = parts.iter().find(|p| p.k != k) {
        return Err(CandiffError::layout(format!("shards to fuse must share K: found {k} and {}", p.k)));
    }
    let ws2 = parts.iter().fold(0f32, |m, p| m.max(p.weight_scale_2));
    let differ = parts.iter().any(|p| p.weight_scale_2 != ws2);
    if differ && merge == ShardMerge::RequireEqualScale {
        let all: Vec<f32> = parts.iter().map(|p| p.weight_scale_2).collect();
        return Err(CandiffError::layout(format!(
            "shards have different weight_scale_2 {all:?}; fusing them needs rescaled block scales"
        )));
    }
    let mut packed = Vec::new();
    let mut scales = Vec::new();
    for p in parts {
        packed.extend_from_slice(&p.packed);
        if p.weight_scale_2 == ws2 {
            scales.extend_from_slice(&p.scales);
        } else {
            let f = p.weight_scale_2 / ws2;
            scales.extend(p.scales.iter().map(|&s| e4m3_encode(e4m3_decode(s) * f)));
        }
    }
    let n = parts.iter().map(|p| p.n).sum();
    Ok((Nvfp4Weight::new(n, k, packed, scales, ws2)?, differ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight large enough to be split over threads quantizes exactly as row by row.
    #[test]
    fn threaded_quantization_equals_serial() {
        let (n, k) = (513, 2048);
        assert!(n * k >= PARALLEL_MIN_VALUES);
        let mut rng = crate::rng::Rng::new(11);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32 * 0.02).collect();
        let q = quantize_weight(&w, n, k).unwrap();
        let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let gs = NVFP4_AMAX_TARGET / amax;
        let (mut packed, mut scales) = (vec![0u8; n * k / 2], vec![0u8; n * k / GROUP_SIZE]);
        for r in 0..n {
            let (p, sc) =
                (&mut packed[r * k / 2..(r + 1) * k / 2], &mut scales[r * k / GROUP_SIZE..(r + 1) * k / GROUP_SIZE]);
            quantize_row(&w[r * k..(r + 1) * k], gs, p, sc);
        }
        assert_eq!(q.weight_scale_2, 1.0 / gs);
        assert!(q.packed == packed && q.scales == scales);
    }

    #[test]
    fn zero_block_gives_zero_codes_and_scale() {
        let x = vec![0f32; 16];
        let (p, s) = quantize_activations(&x, 1, 16, 0.01);
        assert!(p.iter().all(|&b| b == 0));
        assert_eq!(s, vec![0]);
    }

    #[test]
    fn rescaled_shards_stay_close() {
        let w1: Vec<f32> = (0..64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
        let w2: Vec<f32> = w1.iter().map(|v| v * 3.0).collect();
        let a = quantize_weight(&w1, 2, 32).unwrap();
        let b = quantize_weight(&w2, 2, 32).unwrap();
        assert!(concat_rows(&[a.clone(), b.clone()], ShardMerge::RequireEqualScale).is_err());
        let (f, lossy) = concat_rows(&[a.clone(), b.clone()], ShardMerge::RescaleToMax).unwrap();
        assert!(lossy);
        let d = f.dequantize();
        let da = a.dequantize();
        for (x, y) in d[..64].iter().zip(&da) {
            assert!((x - y).abs() <= 0.07 * y.abs() + 1e-6, "{x} vs {y}");
        }
        assert_eq!(&d[64..], &b.dequantize()[..]);
    }
}
