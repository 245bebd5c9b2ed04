//! `candiff doctor`: what this machine can run, and every NVFP4 variant checked against the CPU
//! reference on fresh random shapes (and on the golden GEMM cases when they are at hand).

use candle_core::{DType, Device, Module, Tensor};

use crate::nvfp4::fp8::Fp8Accum;
use crate::nvfp4::quant::quantize_weight;
use crate::nvfp4::{ActMode, Backend, Nvfp4Linear, Nvfp4Weight};
use crate::rng::Rng;

/// One GEMM problem: activations, weight, calibrated input scale.
pub struct Problem {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub x: Vec<f32>,
    pub w: Nvfp4Weight,
    pub input_scale: f32,
    pub label: String,
}

impl Problem {
    /// Random bf16-valued data; `input_scale` is calibrated a little below the true amax so
    /// saturation is exercised in w4a4.
    pub fn random(m: usize, k: usize, n: usize, seed: u64) -> candle_core::Result<Self> {
        let mut rng = Rng::new(seed);
        let x = rng.normal_bf16_values(m * k, 1.0);
        let wf = rng.normal_bf16_values(n * k, 0.05);
        let w = quantize_weight(&wf, n, k)?;
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        const CALIBRATION_HEADROOM: f32 = 0.9;
        let input_scale =
            (amax * CALIBRATION_HEADROOM / crate::nvfp4::format::NVFP4_AMAX_TARGET).max(f32::MIN_POSITIVE);
        Ok(Self { m, k, n, x, w, input_scale, label: format!("{m}x{k}x{n}") })
    }

    /// The shapes every doctor run checks: M = 1, M not a multiple of 128, N needing padding,
    /// K/16 not a multiple of 4, M just past the GEMV path and past two 256-token tiles (the
    /// Hopper kernel's tails), both n8 token tiles of the Hopper GEMV (M = 9 and 16, K slices of
    /// uneven length), plus `extra` fresh random shapes drawn from `seed`.
    pub fn standard_set(seed: u64, extra: usize) -> candle_core::Result<Vec<Self>> {
        let mut shapes = vec![
            (1, 3072, 64),
            (19, 80, 150),
            (130, 256, 200),
            (7, 96, 40),
            (300, 512, 384),
            (33, 4096, 256),
            (517, 1024, 640),
            (9, 1040, 130),
            (16, 5120, 384),
            // An even number of 128-feature blocks at several hundred tokens: the Hopper GEMM's
            // TMA form with its CTA pairs, split along K when planned for 4 SMs.
            (520, 576, 768),
            // Few 256-token tiles at 512 tokens: the TMA form takes 256 tokens per CTA split
            // along K in clusters where the base rule takes 128.
            (512, 1024, 512),
        ];
        let mut rng = Rng::new(seed);
        for _ in 0..extra {
            shapes.push((rng.range(1, 600), 16 * rng.range(1, 96), rng.range(1, 700)));
        }
        shapes.iter().enumerate().map(|(i, &(m, k, n))| Self::random(m, k, n, seed.wrapping_add(i as u64))).collect()
    }

    pub fn layer(&self, backend: Backend, mode: ActMode, device: &Device) -> candle_core::Result<Nvfp4Linear> {
        Nvfp4Linear::new(&self.w, Some(self.input_scale), None, backend, mode, device)
    }

    /// Output of a layer for this problem's x in `dtype`, as f32 on the host.
    pub fn run(&self, layer: &Nvfp4Linear, dtype: DType, device: &Device) -> candle_core::Result<Vec<f32>> {
        let x = Tensor::from_vec(self.x.clone(), (self.m, self.k), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
        layer.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
    }
}

/// The golden GEMM cases (`nvfp4/gemm_cases.*` under a fixture root) with their reference outputs
/// `(problem, y_w4a16, y_w4a4)`.
pub fn fixture_cases(root: &std::path::Path) -> crate::error::CResult<Vec<(Problem, Vec<f32>, Vec<f32>)>> {
    use crate::error::CandiffError;
    use crate::safetensors::MappedFile;
    let json_path = root.join("nvfp4/gemm_cases.json");
    let text = std::fs::read_to_string(&json_path).map_err(|e| CandiffError::io(&json_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CandiffError::bad_config(json_path.display(), e.to_string(), "Regenerate the fixtures."))?;
    let f = MappedFile::open(&root.join("nvfp4/gemm_cases.safetensors"))?;
    let missing =
        |t: &str| CandiffError::bad_tensor(f.name(), t, "a fixture tensor", "nothing", "Regenerate the fixtures.");
    let bytes = |t: &str| f.bytes(t).map(<[u8]>::to_vec).ok_or_else(|| missing(t));
    let floats = |t: &str| -> crate::error::CResult<Vec<f32>> {
        Ok(bytes(t)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    let mut out = Vec::new();
    for c in v["cases"].as_array().into_iter().flatten() {
        let p = c["prefix"].as_str().unwrap_or_default();
        let dim = |k: &str| c[k].as_u64().unwrap_or(0) as usize;
        let (m, k, n) = (dim("M"), dim("K"), dim("N"));
        let w = Nvfp4Weight::new(
            n,
            k,
            bytes(&format!("{p}w_packed"))?,
            bytes(&format!("{p}w_scale"))?,
            floats(&format!("{p}w_scale_2"))?[0],
        )?;
        let problem = Problem {
            m,
            k,
            n,
            x: floats(&format!("{p}x"))?,
            w,
            input_scale: floats(&format!("{p}input_scale"))?[0],
            label: format!("fixture {p}{m}x{k}x{n}"),
        };
        out.push((problem, floats(&format!("{p}y_w4a16"))?, floats(&format!("{p}y_w4a4"))?));
    }
    Ok(out)
}

/// Every fixture case through `backend` on `device` (f32 in and out) against the golden outputs.
pub fn check_fixtures(
    backend: Backend,
    device: &Device,
    cases: &[(Problem, Vec<f32>, Vec<f32>)],
) -> candle_core::Result<Vec<CheckResult>> {
    let mut results = Vec::new();
    for (p, y16, y4) in cases {
        for (mode, want) in [(ActMode::W4A16, y16), (ActMode::W4A4, y4)] {
            let l = p.layer(backend, mode, device)?;
            let got = p.run(&l, DType::F32, device)?;
            results.push(CheckResult::new(format!("{backend} {mode} {}", p.label), rel_max_err(&got, want), F32_TOL));
        }
    }
    Ok(results)
}

/// max |a - b| / max |b| (0 when b is all zero and a equals it).
pub fn rel_max_err(a: &[f32], b: &[f32]) -> f32 {
    let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    if m == 0.0 {
        d
    } else {
        d / m
    }
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt() as f32
    } else {
        (num / den).sqrt() as f32
    }
}

/// Tolerances of the GPU checks: f32 outputs as the CPU tests (1e-5 of max |y|); bf16 outputs add
/// bf16 rounding of the result (2^-8 relative).
pub const F32_TOL: f32 = 1e-5;
/// f32 GEMM + bias + GELU: the GEMM's F32_TOL carried through GELU (slope up to ~1.13) and the
/// bias add; a wrong bias index or activation is off by O(1). (In bf16 the reference rounds the
/// GEMM, the sum and the GELU, the fused epilogue once: TWO_ROUNDINGS_TOL.)
pub const EPILOGUE_F32_TOL: f32 = 2.0 * F32_TOL;
pub const BF16_TOL: f32 = 1e-5 + 1.0 / 256.0;
/// Variants must agree with each other to this relative L2.
pub const AGREEMENT_TOL: f32 = 1e-3;

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    pub what: String,
    pub value: f32,
    pub limit: f32,
    pub pass: bool,
}

impl CheckResult {
    pub fn new(what: String, value: f32, limit: f32) -> Self {
        Self { what, value, limit, pass: value <= limit }
    }
}

/// Checks one backend against the CPU reference on `problems`, in both modes and both output types,
/// and returns the results plus the f32 outputs (for cross-variant agreement).
/// What [`check_backend`] returns per problem and mode (W4A16, then W4A4), in this order: the
/// f32 output, the bf16 output, and the bf16 output with a bias and GELU on the features from a
/// third of N on (the GEMM epilogue's every path).
pub const BACKEND_OUTPUTS: [&str; 3] = ["f32", "bf16", "bf16 + bias, GELU from N/3"];

pub fn check_backend(
    backend: Backend,
    device: &Device,
    problems: &[Problem],
) -> candle_core::Result<(Vec<CheckResult>, Vec<Vec<f32>>)> {
    let mut results = Vec::new();
    let mut outs = Vec::new();
    for p in problems {
        for mode in [ActMode::W4A16, ActMode::W4A4] {
            let cpu = p.layer(backend, mode, &Device::Cpu)?;
            let want = p.run(&cpu, DType::F32, &Device::Cpu)?;
            let gpu = p.layer(backend, mode, device)?;
            let got = p.run(&gpu, DType::F32, device)?;
            results.push(CheckResult::new(
                format!("{backend} {mode} f32 {}", p.label),
                rel_max_err(&got, &want),
                F32_TOL,
            ));
            let got16 = p.run(&gpu, DType::BF16, device)?;
            results.push(CheckResult::new(
                format!("{backend} {mode} bf16 {}", p.label),
                rel_max_err(&got16, &want),
                BF16_TOL,
            ));
            // The same input as rows 1.. of a larger tensor: read in place when that offset keeps
            // a fresh allocation's alignment (K a multiple of 128), else copied first; either
            // way the very same bits.
            let x = Tensor::from_vec(p.x.clone(), (p.m, p.k), &Device::Cpu)?.to_dtype(DType::BF16)?;
            let wide =
                Tensor::cat(&[&Tensor::zeros((1, p.k), DType::BF16, &Device::Cpu)?, &x], 0)?.to_device(device)?;
            let shifted: Vec<f32> =
                gpu.forward(&wide.narrow(0, 1, p.m)?)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            results.push(CheckResult::new(
                format!("{backend} {mode} bf16 {} input at a row offset, vs at 0", p.label),
                rel_max_err(&shifted, &got16),
                0.0,
            ));
            // With a bias and tanh-GELU: in the GEMM's epilogue where the kernel has one (the
            // trtllm W4A16 GEMM on Hopper, M above the GEMV's), else a pass after it.
            // (Seeded by the problem's own random input: every form's run of one problem gets the
            // same bias, so their outputs compare bit for bit, and each doctor run a fresh one.)
            let seed = p.x.iter().take(16).fold(p.n as u64, |h, v| h.rotate_left(7) ^ u64::from(v.to_bits()));
            let bias_values = Rng::new(seed).normal_bf16_values(p.n, 1.0);
            let bias32 = Tensor::from_vec(bias_values, p.n, &Device::Cpu)?;
            let mut gelu_from_bf16 = Vec::new();
            for dtype in [DType::F32, DType::BF16] {
                let bias = bias32.to_dtype(dtype)?;
                let cpu_b =
                    Nvfp4Linear::new(&p.w, Some(p.input_scale), Some(bias.clone()), backend, mode, &Device::Cpu)?;
                let gpu_b =
                    Nvfp4Linear::new(&p.w, Some(p.input_scale), Some(bias.to_device(device)?), backend, mode, device)?;
                let x = Tensor::from_vec(p.x.clone(), (p.m, p.k), &Device::Cpu)?.to_dtype(dtype)?;
                let xg = x.to_device(device)?;
                let host =
                    |t: Tensor| -> candle_core::Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
                let want_b = host(cpu_b.forward_act(&x, true)?)?;
                let got_b = host(gpu_b.forward_act(&xg, true)?)?;
                let tol = if dtype == DType::F32 { EPILOGUE_F32_TOL } else { TWO_ROUNDINGS_TOL };
                results.push(CheckResult::new(
                    format!("{backend} {mode} {dtype:?} {} + bias, GELU", p.label),
                    rel_max_err(&got_b, &want_b),
                    tol,
                ));
                // GELU on the features from a third of N on (a fused q/k/v/MLP projection's MLP
                // columns): in the epilogue where there is one, a pass over those columns else.
                let from = p.n / 3;
                let want_f = host(cpu_b.forward_act_from(&x, from)?)?;
                let got_f = host(gpu_b.forward_act_from(&xg, from)?)?;
                results.push(CheckResult::new(
                    format!("{backend} {mode} {dtype:?} {} + bias, GELU from feature {from}", p.label),
                    rel_max_err(&got_f, &want_f),
                    tol,
                ));
                if dtype == DType::BF16 {
                    gelu_from_bf16.clone_from(&got_f);
                }
                // The input in two parts (the second a column slice of a wider tensor): read in
                // place by the Hopper GEMM where the split falls on a 64-wide K tile, else
                // concatenated first; either way the very bits of the whole input.
                if dtype == DType::BF16 {
                    let c = (p.k / 2) / 64 * 64;
                    let c = if c == 0 { p.k / 2 } else { c };
                    let w = p.k - c;
                    let pad = 32;
                    let wide = Tensor::cat(
                        &[
                            &Tensor::zeros((p.m, pad), DType::BF16, &Device::Cpu)?,
                            &x.narrow(1, c, w)?,
                            &x.narrow(1, 0, pad.min(p.k))?,
                        ],
                        1,
                    )?
                    .to_device(device)?;
                    let second = wide.narrow(1, pad, w)?;
                    let first = x.narrow(1, 0, c)?.contiguous()?.to_device(device)?;
                    let in_place = gpu_b.reads_parts_like(&first, c)?;
                    let got_p = host(gpu_b.forward_parts(&first, &second)?)?;
                    let whole = host(gpu_b.forward_act(&xg, false)?)?;
                    results.push(CheckResult::new(
                        format!(
                            "{backend} {mode} bf16 {} + bias, input as {c} + {w} features ({}), vs whole",
                            p.label,
                            if in_place { "read in place" } else { "concatenated" }
                        ),
                        rel_max_err(&got_p, &whole),
                        0.0,
                    ));
                }
            }
            outs.extend([got, got16, gelu_from_bf16]);
        }
    }
    Ok((results, outs))
}

/// FP8 mode on `device` against its CPU reference: the converted weight (E4M3 bytes and row
/// scales) bit for bit, the output in f32 and bf16; and the extra error of FP8 against W4A16.
pub fn check_fp8(device: &Device, problems: &[Problem]) -> candle_core::Result<Vec<CheckResult>> {
    let mut results = Vec::new();
    for p in problems {
        let cpu = p.layer(Backend::Trtllm, ActMode::Fp8, &Device::Cpu)?;
        let gpu = p.layer(Backend::Trtllm, ActMode::Fp8, device)?;
        let bytes = |l: &Nvfp4Linear| -> candle_core::Result<(Vec<u8>, Vec<f32>)> {
            let (w, s) = l.prepared();
            Ok((w.flatten_all()?.to_vec1()?, s.to_device(&Device::Cpu)?.to_vec1()?))
        };
        let (cw, cs) = bytes(&cpu)?;
        let (gw, gs) = bytes(&gpu)?;
        let diff = cw.iter().zip(&gw).filter(|(a, b)| a != b).count()
            + cs.iter().zip(&gs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        results.push(CheckResult::new(
            format!("fp8 weight conversion {} (differing values)", p.label),
            diff as f32,
            0.0,
        ));
        let want = p.run(&cpu, DType::F32, &Device::Cpu)?;
        let got = p.run(&gpu, DType::F32, device)?;
        results.push(CheckResult::new(format!("fp8 f32 {}", p.label), rel_max_err(&got, &want), FP8_ACC_TOL));
        let got16 = p.run(&gpu, DType::BF16, device)?;
        results.push(CheckResult::new(
            format!("fp8 bf16 {}", p.label),
            rel_max_err(&got16, &want),
            FP8_ACC_TOL + BF16_TOL,
        ));
        if device.is_cuda() {
            let fast = gpu.clone().with_fp8_accum(Fp8Accum::Fast);
            let got = p.run(&fast, DType::F32, device)?;
            results.push(CheckResult::new(
                format!("fp8 fastacc f32 {}", p.label),
                rel_max_err(&got, &want),
                fp8_fast_accum_tol(p.k),
            ));
        }
        // Bias and GELU in cuBLASLt's epilogue against the same GEMM followed by the fused
        // bias/GELU pass: one bf16 rounding (of the GEMM output, before the pass) apart.
        if device.is_cuda() && p.n % FP8_ROW_ALIGN_DOC == 0 {
            let bias = Tensor::randn(0f32, 1.0, p.n, device)?.to_dtype(DType::BF16)?;
            let with =
                Nvfp4Linear::new(&p.w, Some(p.input_scale), Some(bias.clone()), Backend::Trtllm, ActMode::Fp8, device)?;
            let x =
                Tensor::from_vec(p.x.clone(), (p.m, p.k), &Device::Cpu)?.to_dtype(DType::BF16)?.to_device(device)?;
            let plain = gpu.forward(&x)?;
            for gelu in [false, true] {
                let got = with.forward_act(&x, gelu)?;
                let want = crate::models::fused::bias_act(&plain, &bias, gelu)?;
                let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
                    t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()
                };
                results.push(CheckResult::new(
                    format!("fp8 epilogue bias{} {}", if gelu { "+gelu" } else { "" }, p.label),
                    rel_max_err(&host(&got)?, &host(&want)?),
                    TWO_ROUNDINGS_TOL,
                ));
            }
        }
        // Informational bound: FP8 (3 mantissa bits for weights and activations) against W4A16.
        let w16 = p.run(&p.layer(Backend::Trtllm, ActMode::W4A16, &Device::Cpu)?, DType::F32, &Device::Cpu)?;
        results.push(CheckResult::new(
            format!("fp8 vs w4a16 rel L2 {}", p.label),
            rel_l2(&want, &w16),
            FP8_VS_W4A16_TOL,
        ));
    }
    Ok(results)
}

/// fp8 layers pad N to this multiple; the epilogue runs only on unpadded layers.
const FP8_ROW_ALIGN_DOC: usize = crate::nvfp4::linear::FP8_ROW_ALIGN;

/// FP8 GEMM against its f32-accumulating CPU reference: Hopper's FP8 MMA keeps fewer mantissa bits
/// in its running sums than f32 (measured 0.7-2.7e-4 of max |y| on an H200, where every input
/// byte is identical); a wrong scale or layout is off by 1e-1 or more.
pub const FP8_ACC_TOL: f32 = 1e-3;

/// FP8 GEMM with fast accumulation (`--fp8-accum fast`) against the same f32 reference: the
/// tensor cores' accumulator keeps fewer mantissa bits and drops the rest at every K step, so the
/// error grows with K (measured on an H200, session 24: 1.0e-3 of max |y| at K = 576, 2.5e-3 at
/// 3072, 4.2e-3 at 5120); this bound is about twice that. A wrong scale or layout is off by 1e-1.
pub fn fp8_fast_accum_tol(k: usize) -> f32 {
    /// Allowed growth per unit of K.
    const PER_K: f32 = 2e-6;
    FP8_ACC_TOL + PER_K * k as f32
}

/// FP8 against W4A16 on random problems: E4M3 keeps 3 mantissa bits (2^-4 relative per value) on
/// both operands; errors average out over K, measured ~2-3e-2 rel L2 (tests/nvfp4_fp8.rs).
pub const FP8_VS_W4A16_TOL: f32 = 0.06;

/// Bit-exactness of the GPU activation quantizer (codes and swizzled scales) on `problems`.
#[cfg(feature = "cuda")]
pub fn check_activation_quantizer(device: &Device, problems: &[Problem]) -> candle_core::Result<Vec<CheckResult>> {
    use crate::nvfp4::layout::swizzle_scales;
    use crate::nvfp4::quant::quantize_activations;
    let Device::Cuda(dev) = device else { return Ok(Vec::new()) };
    let mut results = Vec::new();
    for p in problems {
        let x16: Vec<half::bf16> = p.x.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let xs = dev.cuda_stream().clone_htod(&x16).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (codes, _) = crate::cuda::quantize_activations(dev, &xs.slice(..), p.m, p.k, p.input_scale, true, false)?;
        let (packed, scales) = codes.expect("codes requested");
        let stream = dev.cuda_stream();
        let packed = stream.clone_dtoh(&packed).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let scales = stream.clone_dtoh(&scales).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (want_p, want_s) = quantize_activations(&p.x, p.m, p.k, p.input_scale);
        let want_s = swizzle_scales(&want_s, p.m, p.k / 16);
        let bad = packed.iter().zip(&want_p).filter(|(a, b)| a != b).count()
            + scales.iter().zip(&want_s).filter(|(a, b)| a != b).count();
        results.push(CheckResult::new(format!("activation quantizer {} (differing bytes)", p.label), bad as f32, 0.0));
    }
    Ok(results)
}

/// Max |diff| / max |reference| allowed for half-precision fused attention against the f32
/// reference on the same bf16 inputs (bf16 output rounding is 2^-8 relative).
pub const ATTENTION_TOL: f32 = 0.02;

/// Fused attention (whatever `ops::attention` dispatches to on `device`) against the f32 reference
/// on fresh random inputs: self- and cross-attention shapes, the strided views the models pass,
/// FLUX/Wan head dims.
pub fn check_attention(device: &Device) -> candle_core::Result<Vec<CheckResult>> {
    use crate::models::ops::{attention, attention_reference};
    // (batch, heads, q tokens, kv tokens, head dim)
    const SHAPES: [(usize, usize, usize, usize, usize); 4] =
        [(1, 4, 1000, 1000, 128), (2, 3, 777, 512, 128), (1, 2, 333, 333, 64), (1, 24, 4608, 4608, 128)];
    let mut out = Vec::new();
    for (b, h, sq, sk, d) in SHAPES {
        // [B, S, H, D] buffers viewed as [B, H, S, D], as the models produce them.
        let mk = |s: usize| -> candle_core::Result<Tensor> {
            Tensor::randn(0f32, 1.0, (b, s, h, d), device)?.to_dtype(DType::BF16)?.transpose(1, 2)
        };
        let (q, k, v) = (mk(sq)?, mk(sk)?, mk(sk)?);
        // One case with D not innermost in memory (the VAE's channel-first attention).
        let q = if d == 64 { q.transpose(2, 3)?.contiguous()?.transpose(2, 3)? } else { q };
        let got = attention(&q, &k, &v)?.to_dtype(DType::F32)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let want = attention_reference(&f(&q)?, &f(&k)?, &f(&v)?)?;
        let g: Vec<f32> = got.flatten_all()?.to_vec1()?;
        let w: Vec<f32> = want.flatten_all()?.to_vec1()?;
        out.push(CheckResult::new(
            format!("attention B{b} H{h} Sq{sq} Sk{sk} D{d}"),
            rel_max_err(&g, &w),
            ATTENTION_TOL,
        ));
    }
    Ok(out)
}

/// FP8 attention (`--attention fp8`) against exact attention, rel. L2: the E4M3 roundings of q/k
/// (through the scores), the probabilities and the output, each ~2^-4 / sqrt(3) RMS relative,
/// together ~2^-4, more where the scores spread wider (sharper attention passes the scores'
/// errors on larger): 0.058-0.069 measured at unit-variance scores, with dynamic and with fixed
/// q/k scales alike (CPU emulation). A wrong scale or layout lands far above.
pub const FP8_ATTENTION_TOL: f32 = 0.08;
/// FP8 attention on the GPU against its CPU emulation ([`crate::models::attn_fp8::reference`]),
/// rel. L2: they differ where probabilities round against the running instead of the row maximum
/// and where output values sit near an E4M3 rounding boundary — at most one rounding's RMS error.
pub const FP8_ATTENTION_EMU_TOL: f32 = 0.036;

/// FP8 attention on fresh random inputs (Hopper and newer, cudnn builds): the per-tensor E4M3
/// quantizer byte for byte against the CPU one, the attention against its CPU emulation (small
/// shapes) and against exact f32 attention (all shapes, computed on `device`).
#[cfg(feature = "cudnn")]
pub fn check_attention_fp8(device: &Device) -> candle_core::Result<Vec<CheckResult>> {
    use crate::cuda::attn_fp8;
    use crate::models::attn_fp8::{quantize_per_tensor, reference, QK_TARGET, V_TARGET};
    use crate::models::ops::attention_reference;
    // (batch, heads, q tokens, kv tokens, head dim, emulate on the CPU)
    const SHAPES: [(usize, usize, usize, usize, usize, bool); 4] = [
        (1, 2, 1024, 1024, 128, true),
        (2, 3, 777, 512, 128, true),
        (1, 2, 333, 333, 64, true),
        (1, 24, 4608, 4608, 128, false),
    ];
    let mut out = Vec::new();
    for (b, h, sq, sk, d, emulate) in SHAPES {
        let label = format!("B{b} H{h} Sq{sq} Sk{sk} D{d}");
        // [B, S, H, D] buffers viewed as [B, H, S, D], as the models produce them; v with a
        // larger spread than q, k so the three scales differ.
        let mk = |s: usize, std: f32| -> candle_core::Result<Tensor> {
            Tensor::randn(0f32, std, (b, s, h, d), device)?.to_dtype(DType::BF16)?.transpose(1, 2)
        };
        let (q, k, v) = (mk(sq, 1.0)?, mk(sk, 1.0)?, mk(sk, 4.0)?);
        // One case in [B, H, S, D] memory order (the quantizer's strided-row form; the others
        // take its flat form).
        let q = if d == 64 { q.contiguous()? } else { q };
        let qkv = attn_fp8::quantize(&q, &k, &v)?;
        let descales = qkv.descales()?;
        let mut bad = 0usize;
        for (i, (t, codes, target)) in
            [(&q, &qkv.q, QK_TARGET), (&k, &qkv.k, QK_TARGET), (&v, &qkv.v, V_TARGET)].into_iter().enumerate()
        {
            // The GPU writes [B, S, H, D]; the CPU quantizes the same values in that order.
            let x: Vec<f32> = t.transpose(1, 2)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let (want, want_descale) = quantize_per_tensor(&x, target);
            let got: Vec<u8> = codes.flatten_all()?.to_vec1()?;
            bad += got.iter().zip(&want).filter(|(a, b)| a != b).count();
            bad += usize::from(descales[i] != want_descale);
        }
        out.push(CheckResult::new(format!("fp8 attention quantizer {label} (differing bytes)"), bad as f32, 0.0));
        let got: Vec<f32> =
            attn_fp8::attention(&q, &k, &v)?.transpose(1, 2)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if emulate {
            let want: Vec<f32> = reference(&q, &k, &v)?.flatten_all()?.to_vec1()?;
            out.push(CheckResult::new(
                format!("fp8 attention {label} vs its CPU emulation (rel L2)"),
                rel_l2(&got, &want),
                FP8_ATTENTION_EMU_TOL,
            ));
        }
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let exact: Vec<f32> = attention_reference(&f(&q)?, &f(&k)?, &f(&v)?)?.flatten_all()?.to_vec1()?;
        out.push(CheckResult::new(
            format!("fp8 attention {label} vs exact (rel L2)"),
            rel_l2(&got, &exact),
            FP8_ATTENTION_TOL,
        ));
    }
    // Wan's form: q and k normalized over all heads, rotated and written as E4M3 in one pass with
    // the scale their norm's bound fixes (rms_rope_fp8), v quantized per tensor.
    {
        use crate::cuda::attn_fp8::Operand;
        use crate::models::attn_fp8::{quantize_with, reference_with};
        use crate::models::fused::{rms_bound, rms_rope, rms_rope_fp8};
        let (b, s, h, d) = (1, 1024, 2, 128);
        let c = h * d;
        let mk = |std: f32| Tensor::randn(0f32, std, (b, s, c), device)?.to_dtype(DType::BF16);
        let (xq, xk, xv) = (mk(1.0)?, mk(1.0)?, mk(4.0)?);
        let (wq, wk) = (
            (Tensor::randn(0f32, 0.5, c, device)? + 1.0)?.to_dtype(DType::BF16)?,
            mk(1.0)?.flatten_all()?.narrow(0, 0, c)?,
        );
        let ang = Tensor::randn(0f32, 3.0, (s, d / 2), device)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let rope = Some((&cos, &sin));
        let (dq, dk) = (rms_bound(&wq)? / QK_TARGET, rms_bound(&wk)? / QK_TARGET);
        let (q8, k8) = (rms_rope_fp8(&xq, &wq, 1e-6, h, rope, dq)?, rms_rope_fp8(&xk, &wk, 1e-6, h, rope, dk)?);
        let (q, k) = (rms_rope(&xq, &wq, 1e-6, h, rope)?, rms_rope(&xk, &wk, 1e-6, h, rope)?);
        let mut bad = 0usize;
        for (codes, vals, descale) in [(&q8, &q, dq), (&k8, &k, dk)] {
            let want = quantize_with(&vals.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, descale);
            let got: Vec<u8> = codes.flatten_all()?.to_vec1()?;
            bad += got.iter().zip(&want).filter(|(a, b)| a != b).count();
        }
        let label = format!("B{b} H{h} S{s} D{d}");
        out.push(CheckResult::new(format!("rms_rope to E4M3 {label} (differing bytes)"), bad as f32, 0.0));
        let heads = |t: &Tensor| crate::models::ops::heads(t, h);
        let (q, k, v) = (heads(&q)?, heads(&k)?, heads(&xv)?);
        let got = attn_fp8::attention_operands(
            Operand::Fp8 { codes: &q8, descale: dq },
            Operand::Fp8 { codes: &k8, descale: dk },
            &v,
        )?;
        let got: Vec<f32> = got.transpose(1, 2)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let want: Vec<f32> = reference_with(&q, &k, &v, Some((dq, dk)))?.flatten_all()?.to_vec1()?;
        out.push(CheckResult::new(
            format!("fp8 attention, E4M3 q/k from rms_rope, {label} vs its CPU emulation (rel L2)"),
            rel_l2(&got, &want),
            FP8_ATTENTION_EMU_TOL,
        ));
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let exact: Vec<f32> = attention_reference(&f(&q)?, &f(&k)?, &f(&v)?)?.flatten_all()?.to_vec1()?;
        out.push(CheckResult::new(
            format!("fp8 attention, E4M3 q/k from rms_rope, {label} vs exact (rel L2)"),
            rel_l2(&got, &exact),
            FP8_ATTENTION_TOL,
        ));
    }
    Ok(out)
}

/// Max |diff| / max |reference| of the fused element-wise kernels against their CPU reference on
/// the same inputs: both compute in f32, so only the final rounding and summation order differ.
pub const FUSED_TOL: f32 = 1e-2;

/// The fused element-wise kernels (kernels/fused.cu) against their CPU reference on fresh random
/// inputs, per-sample and per-token modulation, bf16 and f32 storage.
pub fn check_fused(device: &Device) -> candle_core::Result<Vec<CheckResult>> {
    use crate::models::fused::{gated_add, ln_modulate};
    let mut out = Vec::new();
    // (batch, tokens, channels, modulation rows per sample); bf16 rows of a multiple of 8 values
    // go through the register-resident kernels, 36 through the scalar one.
    for (b, s, c, per_token) in
        [(2, 333, 3072, false), (1, 4608, 3072, false), (1, 1000, 5120, true), (2, 77, 40, true), (1, 9, 36, false)]
    {
        for dtype in [DType::BF16, DType::F32] {
            let x = (Tensor::randn(0f32, 3.0, (b, s, c), device)? + 0.5)?.to_dtype(dtype)?;
            let u = Tensor::randn(0f32, 1.0, (b, s, c), device)?.to_dtype(dtype)?;
            let ms = if per_token { s } else { 1 };
            let shift = Tensor::randn(0f32, 1.0, (b, ms, c), device)?;
            let scale = Tensor::randn(0f32, 1.0, (b, ms, c), device)?;
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
            let cmp = |got: &Tensor, want: &Tensor| -> candle_core::Result<f32> {
                let g: Vec<f32> = got.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
                let w: Vec<f32> = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                Ok(rel_max_err(&g, &w))
            };
            let label = format!("B{b} S{s} C{c} {} {dtype:?}", if per_token { "per-token" } else { "per-sample" });
            let got = ln_modulate(&x, &shift, &scale, 1e-6)?;
            let want = ln_modulate(&cpu(&x)?, &cpu(&shift)?, &cpu(&scale)?, 1e-6)?;
            out.push(CheckResult::new(format!("ln_modulate {label}"), cmp(&got, &want)?, FUSED_TOL));
            let got = gated_add(&x, &u, &scale)?;
            let want = gated_add(&cpu(&x)?, &cpu(&u)?, &cpu(&scale)?)?;
            out.push(CheckResult::new(format!("gated_add {label}"), cmp(&got, &want)?, FUSED_TOL));
        }
    }
    // The VAE's channel RMS norm (+ SiLU) over [B, C, T, H, W].
    for (shape, silu) in [((1, 96, 2, 30, 52), true), ((2, 20, 3, 7, 9), false)] {
        for dtype in [DType::BF16, DType::F32] {
            let x = Tensor::randn(0f32, 2.0, shape, device)?.to_dtype(dtype)?;
            let gamma = Tensor::randn(0f32, 1.0, shape.1, device)?;
            let got = crate::models::fused::channel_rms(&x, &gamma, 1e-12, silu)?;
            let want = crate::models::fused::channel_rms(
                &x.to_device(&Device::Cpu)?,
                &gamma.to_device(&Device::Cpu)?,
                1e-12,
                silu,
            )?;
            let g: Vec<f32> = got.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            let w: Vec<f32> = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            out.push(CheckResult::new(
                format!("channel_rms {shape:?} silu={silu} {dtype:?}"),
                rel_max_err(&g, &w),
                FUSED_TOL,
            ));
        }
    }
    let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()
    };
    // Wan's q/k norm over all heads with and without RoPE per head, against the unfused ops.
    for (b, s, heads, d) in [(1, 333, 24, 128), (2, 77, 40, 128), (1, 50, 3, 16)] {
        for dtype in [DType::BF16, DType::F32] {
            let c = heads * d;
            let x = Tensor::randn(0f32, 2.0, (b, s, c), device)?.to_dtype(dtype)?;
            let w = Tensor::randn(0f32, 1.0, c, device)?.to_dtype(dtype)?;
            let ang = Tensor::randn(0f32, 3.0, (s, d / 2), device)?;
            let (cos, sin) = (ang.cos()?, ang.sin()?);
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
            for rope in [false, true] {
                let r = rope.then_some((&cos, &sin));
                let got = crate::models::fused::rms_rope(&x, &w, 1e-6, heads, r)?;
                let (cc, sc) = (cpu(&cos)?, cpu(&sin)?);
                let want =
                    crate::models::fused::rms_rope(&cpu(&x)?, &cpu(&w)?, 1e-6, heads, rope.then_some((&cc, &sc)))?;
                out.push(CheckResult::new(
                    format!("rms_rope rope={rope} B{b} S{s} H{heads} D{d} {dtype:?}"),
                    rel_max_err(&host(&got)?, &host(&want)?),
                    FUSED_TOL,
                ));
            }
        }
    }
    // Bias + optional GELU after a GEMM.
    for (rows, c) in [(4608, 3072), (77, 40)] {
        for dtype in [DType::BF16, DType::F32] {
            let x = Tensor::randn(0f32, 2.0, (1, rows, c), device)?.to_dtype(dtype)?;
            let bias = Tensor::randn(0f32, 1.0, c, device)?.to_dtype(dtype)?;
            for gelu in [false, true] {
                let got = crate::models::fused::bias_act(&x, &bias, gelu)?;
                let want =
                    crate::models::fused::bias_act(&x.to_device(&Device::Cpu)?, &bias.to_device(&Device::Cpu)?, gelu)?;
                out.push(CheckResult::new(
                    format!("bias_act gelu={gelu} {rows}x{c} {dtype:?}"),
                    rel_max_err(&host(&got)?, &host(&want)?),
                    FUSED_TOL,
                ));
            }
        }
    }
    // Dense half-precision linear with bias / tanh-GELU in cuBLASLt's epilogue (a row-offset view
    // as input, as the models pass) against f32 math on the CPU from the same bf16 values: one
    // rounding of the output apart (2^-8 of an element at most, relative to the largest).
    #[cfg(feature = "cuda")]
    for (m, k, n) in [(4096, 3072, 12288), (333, 3072, 3072), (16, 3072, 18432)] {
        let all = Tensor::randn(0f32, 1.0, (1, m + 5, k), device)?.to_dtype(DType::BF16)?;
        let x = all.narrow(1, 5, m)?;
        let w = (Tensor::randn(0f32, 1.0, (n, k), device)? / (k as f64).sqrt())?.to_dtype(DType::BF16)?;
        let bias = Tensor::randn(0f32, 1.0, n, device)?.to_dtype(DType::BF16)?;
        for gelu in [false, true] {
            let Some(got) = crate::cuda::lt::dense_linear(&x, &w, Some(&bias), gelu, None)? else {
                candle_core::bail!("cuBLASLt found no bf16 GEMM with an epilogue for {m}x{k}x{n}")
            };
            let f = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
            let y = f(&x)?.broadcast_matmul(&f(&w)?.t()?)?;
            let want = crate::models::fused::bias_act(&y, &f(&bias)?, gelu)?;
            out.push(CheckResult::new(
                format!("dense cuBLASLt epilogue bias{} {m}x{k}x{n} bf16", if gelu { "+gelu" } else { "" }),
                rel_max_err(&host(&got)?, &host(&want)?),
                ONE_ROUNDING_TOL,
            ));
        }
    }
    // A parallel block's output projection split along its inputs (the MLP part's GEMM, then the
    // attention part's accumulating onto it) against cat + one GEMM: the split rounds the MLP
    // part once more.
    #[cfg(feature = "cuda")]
    for (rows, c, w) in [(2304, 3072, 12288), (77, 64, 256)] {
        use crate::models::flux::model::OutProj;
        use crate::models::fused::MlpAct;
        let weight =
            (Tensor::randn(0f32, 1.0, (c, c + w), device)? / ((c + w) as f64).sqrt())?.to_dtype(DType::BF16)?;
        let bias = Tensor::randn(0f32, 1.0, c, device)?.to_dtype(DType::BF16)?;
        let layer = || crate::linear::Linear::Dense(candle_nn::Linear::new(weight.clone(), Some(bias.clone())));
        let split = OutProj::new(layer(), c)?;
        if !matches!(split, OutProj::Split { .. }) {
            candle_core::bail!("a bf16 dense layer on the GPU was not split");
        }
        let whole = OutProj::Whole(layer());
        let o = Tensor::randn(0f32, 1.0, (1, 2, rows, c / 2), device)?.to_dtype(DType::BF16)?;
        let m = Tensor::randn(0f32, 1.0, (1, rows, w), device)?.to_dtype(DType::BF16)?;
        let back = |o: &Tensor| crate::parallel::Returning::done(o.clone());
        // A W4A16 projection given the MLP part activated (by its producer) reads the attention
        // output and the MLP part where they lie on Hopper: the same GEMM inputs as `cat_act`
        // makes, so the very same bits.
        if device.is_cuda() {
            let p = Problem::random(1, c + w, c, 12)?;
            let q = crate::linear::Linear::Nvfp4(Nvfp4Linear::new(
                &p.w,
                None,
                Some(bias.clone()),
                Backend::Trtllm,
                ActMode::W4A16,
                device,
            )?);
            let proj = OutProj::new(q, c)?;
            let in_place = proj.wants_activated(&m, c)?;
            let activated = crate::models::fused::cat_act(None, &m, MlpAct::GeluTanh)?;
            let got = proj.forward(back(&o), &activated, MlpAct::GeluTanh, true)?;
            let want = proj.forward(back(&o), &m, MlpAct::GeluTanh, false)?;
            out.push(CheckResult::new(
                format!(
                    "w4a16 output projection {rows}x({c}+{w}), MLP part activated before ({}), vs cat_act",
                    if in_place { "read in place" } else { "concatenated" }
                ),
                rel_max_err(&host(&got)?, &host(&want)?),
                0.0,
            ));
        }
        let got = split.forward(back(&o), &m, MlpAct::GeluTanh, false)?;
        let want = whole.forward(back(&o), &m, MlpAct::GeluTanh, false)?;
        out.push(CheckResult::new(
            format!("split output projection {rows}x({c}+{w}) bf16"),
            rel_max_err(&host(&got)?, &host(&want)?),
            TWO_ROUNDINGS_TOL,
        ));
        // The same in fp8 mode (the second GEMM adds the first's output after its scales). Each
        // side quantizes its activations per token over other values (o and gelu(mlp) apart, or
        // their concatenation), so they differ by FP8 rounding, not by one bf16 ulp.
        if device.is_cuda() {
            let p = Problem::random(1, c + w, c, 11)?;
            let fp8 = || -> candle_core::Result<crate::linear::Linear> {
                Ok(crate::linear::Linear::Nvfp4(Nvfp4Linear::new(
                    &p.w,
                    None,
                    Some(bias.clone()),
                    Backend::Trtllm,
                    ActMode::Fp8,
                    device,
                )?))
            };
            let split = OutProj::new(fp8()?, c)?;
            if !matches!(split, OutProj::Split { .. }) {
                candle_core::bail!("an fp8 layer on the GPU was not split");
            }
            let got = split.forward(back(&o), &m, MlpAct::GeluTanh, false)?;
            let want = OutProj::Whole(fp8()?).forward(back(&o), &m, MlpAct::GeluTanh, false)?;
            out.push(CheckResult::new(
                format!("split output projection {rows}x({c}+{w}) fp8 (rel. L2)"),
                rel_l2(&host(&got)?, &host(&want)?),
                FP8_VS_W4A16_TOL,
            ));
            // The gated residual folded into the fp8 GEMMs (gate in the row scales and bias,
            // residual as C) against the same GEMMs followed by the fused gated add: one bf16
            // rounding of the GEMM output apart, plus the accumulation order of another algorithm.
            let gate = Tensor::randn(0f32, 1.0, (1, c), device)?;
            let residual = Tensor::randn(0f32, 1.0, (1, rows, c), device)?.to_dtype(DType::BF16)?;
            if !(split.folds_gate(&m, &gate)) {
                candle_core::bail!("a split fp8 projection on the GPU does not fold the gate");
            }
            let got = split.forward_gated(
                back(&o),
                &m,
                MlpAct::GeluTanh,
                false,
                &crate::linear::Gate::from(&gate),
                &residual,
            )?;
            let want = crate::models::fused::gated_add(
                &residual,
                &split.forward(back(&o), &m, MlpAct::GeluTanh, false)?,
                &gate,
            )?;
            out.push(CheckResult::new(
                format!("gated residual in the fp8 split projection {rows}x({c}+{w})"),
                rel_max_err(&host(&got)?, &host(&want)?),
                TWO_ROUNDINGS_TOL,
            ));
            let layer = fp8()?;
            let x = Tensor::randn(0f32, 1.0, (1, rows, c + w), device)?.to_dtype(DType::BF16)?;
            let got = layer.forward_gated(&x, &crate::linear::Gate::from(&gate), &residual)?;
            let want = crate::models::fused::gated_add(&residual, &layer.forward(&x)?, &gate)?;
            out.push(CheckResult::new(
                format!("gated residual in the fp8 GEMM {rows}x{}x{c}", c + w),
                rel_max_err(&host(&got)?, &host(&want)?),
                TWO_ROUNDINGS_TOL,
            ));
            // A block's modulation (a W4A16 projection with its bias in the GEMV's epilogue, then
            // one launch for the f32 copy and the folds of gate 1 into `layer` and both parts of
            // `split`) against the projection converted by to_dtype and each layer folding the
            // gate itself: the very same bits.
            let mp = Problem::random(1, c, 3 * c, 12)?;
            let mbias = Tensor::randn(0f32, 1.0, 3 * c, device)?.to_dtype(DType::BF16)?;
            let mod_layer = crate::linear::Linear::Nvfp4(Nvfp4Linear::new(
                &mp.w,
                None,
                Some(mbias),
                Backend::Trtllm,
                ActMode::W4A16,
                device,
            )?);
            let temb = Tensor::randn(0f32, 1.0, (1, c), device)?.to_dtype(DType::BF16)?;
            let mut gated: Vec<&crate::linear::Linear> = split.gated_layers();
            gated.push(&layer);
            let (vecs, gates) = crate::linear::modulation(&mod_layer, &temb, 3, &[(1, &gated)])?;
            if gates[0].fold_count() != gated.len() {
                candle_core::bail!("the modulation folded its gate into {} of 3 fp8 layers", gates[0].fold_count());
            }
            let plain = mod_layer.forward(&temb)?.to_dtype(DType::F32)?.chunk(3, candle_core::D::Minus1)?;
            let mut diff = 0f32;
            for (a, b) in vecs.iter().zip(&plain) {
                diff = diff.max(rel_max_err(&host(a)?, &host(b)?));
            }
            out.push(CheckResult::new(format!("modulation 1x{c} -> 3x{c} as f32, vs to_dtype"), diff, 0.0));
            let got = split.forward_gated(back(&o), &m, MlpAct::GeluTanh, false, &gates[0], &residual)?;
            let want = split.forward_gated(
                back(&o),
                &m,
                MlpAct::GeluTanh,
                false,
                &crate::linear::Gate::from(&plain[1]),
                &residual,
            )?;
            out.push(CheckResult::new(
                format!("gate folded with the modulation, split fp8 projection {rows}x({c}+{w}), vs folded there"),
                rel_max_err(&host(&got)?, &host(&want)?),
                0.0,
            ));
            let got = layer.forward_gated(&x, &gates[0], &residual)?;
            let want = layer.forward_gated(&x, &crate::linear::Gate::from(&plain[1]), &residual)?;
            out.push(CheckResult::new(
                format!("gate folded with the modulation, fp8 GEMM {rows}x{}x{c}, vs folded there", c + w),
                rel_max_err(&host(&got)?, &host(&want)?),
                0.0,
            ));
        }
    }
    // LayerNorm-modulation straight to E4M3 (fp8 mode's shared, pre-quantized layer input) against
    // ln_modulate followed by the fp8 layers' own quantization: the same bytes and row scales.
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        for (b, s, c, per_token) in [(1, 4608, 3072, false), (2, 77, 64, true)] {
            let x = Tensor::randn(0f32, 1.0, (b, s, c), device)?.to_dtype(DType::BF16)?;
            // One modulation vector per sample ([B, C]) or per token ([B, S, C]).
            let mod_shape: Vec<usize> = if per_token { vec![b, s, c] } else { vec![b, c] };
            let shift = Tensor::randn(0f32, 0.5, mod_shape.as_slice(), device)?;
            let scale = Tensor::randn(0f32, 0.5, mod_shape.as_slice(), device)?;
            let fused = crate::models::fused::ln_modulate_fp8(&x, &shift, &scale, 1e-6)?;
            let plain =
                crate::cuda::fp8::Fp8Act::quantize(&crate::models::fused::ln_modulate(&x, &shift, &scale, 1e-6)?)?;
            let bytes = |t: &Tensor| t.flatten_all()?.to_vec1::<u8>();
            let bits = |t: &Tensor| -> candle_core::Result<Vec<u32>> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
            };
            let differing = bytes(&fused.q)?.iter().zip(bytes(&plain.q)?).filter(|(a, b)| **a != *b).count()
                + bits(&fused.scale)?.iter().zip(bits(&plain.scale)?).filter(|(a, b)| **a != *b).count();
            out.push(CheckResult::new(
                format!("ln_modulate to E4M3 B{b} S{s} C{c} (differing values)"),
                differing as f32,
                0.0,
            ));
        }
    }
    // The fp8 layers' activation quantizer (register-resident vector kernels where rows fit, the
    // scalar one elsewhere) against the CPU reference, byte for byte: widths of FLUX.1 and Wan
    // inputs (3072, 5120, FFN 13824/14336, single-block 15360), short rows, one not a multiple of
    // 8 (the scalar kernel), rows of mixed magnitudes and a zero row.
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        for k in [3072, 5120, 13824, 14336, 15360, 24, 100] {
            let rows = 19;
            // Row 0 all zeros, the others scaled from e^-9 to e^8.
            let mags: Vec<f32> = (0..rows).map(|r| if r == 0 { 0.0 } else { (r as f32 - 10.0).exp() }).collect();
            let mags = Tensor::from_vec(mags, (rows, 1), &Device::Cpu)?;
            let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu)?.broadcast_mul(&mags)?.to_dtype(DType::BF16)?;
            let got = crate::cuda::fp8::Fp8Act::quantize(&x.to_device(device)?)?;
            let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let (q, sc): (Vec<u8>, Vec<f32>) = (got.q.flatten_all()?.to_vec1()?, got.scale.flatten_all()?.to_vec1()?);
            let mut differing = 0;
            let mut want = vec![0u8; k];
            for r in 0..rows {
                let want_s = crate::nvfp4::fp8::quantize_row(&xs[r * k..(r + 1) * k], &mut want);
                differing += usize::from(want_s.to_bits() != sc[r].to_bits());
                differing += want.iter().zip(&q[r * k..(r + 1) * k]).filter(|(a, b)| a != b).count();
            }
            out.push(CheckResult::new(
                format!("fp8 activation quantizer {rows}x{k} vs CPU (differing values)"),
                differing as f32,
                0.0,
            ));
        }
    }
    // Per-head RMSNorm + RoPE, reading a strided slice of a fused projection (as the models do)
    // against the unfused composition on the CPU. Head counts 24, 6 and 5 at D = 128 take 4, 2 and
    // 1 rows per row group; 16-bit slices starting at a multiple of 8 values take eight per lane
    // (the 37-token one ends in a warp whose second half has no rows), the one at 4 values four
    // per lane; D = 64 the one-row path.
    for (b, s, h, d, extra) in
        [(1, 4608, 24, 128, 2 * 3072), (2, 33, 6, 128, 8), (1, 37, 6, 128, 16), (1, 50, 5, 128, 0), (2, 77, 3, 64, 40)]
    {
        for dtype in [DType::BF16, DType::F32] {
            let wide = Tensor::randn(0f32, 1.0, (b, s, h * d + extra), device)?.to_dtype(dtype)?;
            let x = wide.narrow(2, extra / 2, h * d)?;
            let w = (Tensor::randn(0f32, 0.1, d, device)? + 1.0)?.to_dtype(dtype)?;
            let ids = Tensor::arange(0u32, (s * 3) as u32, device)?.to_dtype(DType::F32)?.reshape((s, 3))?;
            let axes = [d / 4, 3 * d / 8, 3 * d / 8];
            let (cos, sin) = crate::models::ops::rope_tables(&ids, &axes, 10_000.0, device)?;
            let got = crate::models::fused::qk_norm_rope(&x, h, &w, 1e-6, &cos, &sin)?;
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
            let want = crate::models::fused::qk_norm_rope(&cpu(&x)?, h, &cpu(&w)?, 1e-6, &cpu(&cos)?, &cpu(&sin)?)?;
            out.push(CheckResult::new(
                format!("qk_norm_rope B{b} S{s} H{h} D{d} strided {dtype:?}"),
                rel_max_err(&host(&got)?, &host(&want)?),
                if dtype == DType::F32 { FUSED_TOL } else { TWO_ROUNDINGS_TOL },
            ));
            let got = crate::models::fused::rope_heads(&x, h, &cos, &sin)?;
            let want = crate::models::fused::rope_heads(&cpu(&x)?, h, &cpu(&cos)?, &cpu(&sin)?)?;
            out.push(CheckResult::new(
                format!("rope_heads B{b} S{s} H{h} D{d} strided {dtype:?}"),
                rel_max_err(&host(&got)?, &host(&want)?),
                FUSED_TOL,
            ));
        }
    }
    // cat(o, act(m)) with m a column slice of a fused projection, and the activation alone.
    use crate::models::fused::{cat_act, MlpAct};
    for (rows, c, w, act) in
        // (The first three take the 16-byte-vector kernel in bf16; the last, rows of 8 + 20
        // values, the element loop.)
        [
            (4608, 3072, 12288, MlpAct::GeluTanh),
            (4608, 6144, 18432, MlpAct::SwiGlu),
            (77, 0, 40, MlpAct::SwiGlu),
            (33, 8, 20, MlpAct::GeluTanh),
        ]
    {
        for dtype in [DType::BF16, DType::F32] {
            let mw = if act == MlpAct::SwiGlu { 2 * w } else { w };
            let wide = Tensor::randn(0f32, 2.0, (1, rows, 3 * c + mw), device)?.to_dtype(dtype)?;
            let m = wide.narrow(2, 3 * c, mw)?;
            // No `o` when c = 0 (a zero-size device buffer is not allocatable).
            let o = (c > 0).then(|| Tensor::randn(0f32, 1.0, (1, rows, c), device)?.to_dtype(dtype)).transpose()?;
            let got = cat_act(o.as_ref(), &m, act)?;
            let oc = o.as_ref().map(|o| o.to_device(&Device::Cpu)).transpose()?;
            let want = cat_act(oc.as_ref(), &m.to_device(&Device::Cpu)?, act)?;
            out.push(CheckResult::new(
                format!("cat_act {act:?} {rows}x({c}+{w}) strided {dtype:?}"),
                rel_max_err(&host(&got)?, &host(&want)?),
                FUSED_TOL,
            ));
        }
    }
    Ok(out)
}

/// One bf16 rounding of the output (2^-8 relative to the element, less relative to the largest).
pub const ONE_ROUNDING_TOL: f32 = 4e-3;

/// bf16 ops with an intermediate rounding (the normalized value before the rotation): each side
/// may round it the other way (1 ulp = 2^-8 relative), then the output rounds again; a wrong
/// index or formula is off by O(1). The f32 checks of the same kernels hold FUSED_TOL with 1e-6.
pub const TWO_ROUNDINGS_TOL: f32 = 2e-2;

/// The sequence-parallel exchange on the GPU (q, k, v written into the send layout by
/// `qk_norm_rope`'s placement, `sp_unpack_out`; kernels/fused.cu) against the Candle composition
/// on the CPU: Ulysses attention over `n` ranks sharing the device (in-process
/// exchange, the kernels' layouts as over NCCL) with an element-wise stand-in for attention, so
/// both sides compute the very same values; pure data movement must agree exactly (limit 0).
pub fn check_exchange(device: &Device) -> candle_core::Result<Vec<CheckResult>> {
    use crate::parallel::{attend, launch, Placement, SeqParallel, DEFAULT_TIMEOUT};
    let mut out = Vec::new();
    // Ranks sharing a GPU must enqueue to one stream of their own (`parallel::launch`): on Candle's
    // per-thread default stream each rank thread would get a different stream, unordered against
    // the others (wrong outputs, docs/PERF.md sessions 12-13).
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        /// `CU_STREAM_PER_THREAD` of cuda.h.
        const PER_THREAD_STREAM: usize = 0x2;
        let streams = launch(&Placement::Shared(2, device.clone()), DEFAULT_TIMEOUT, |rank| match &rank.device {
            Device::Cuda(d) => Ok(d.cuda_stream().cu_stream() as usize),
            _ => candle_core::bail!("a rank of a run on the GPU is not on the GPU"),
        })?;
        let one = streams.iter().all(|&s| s == streams[0] && s != PER_THREAD_STREAM);
        out.push(CheckResult::new(
            "2 ranks sharing the GPU enqueue to one stream".into(),
            if one { 0.0 } else { 1.0 },
            0.0,
        ));
    }
    // (ranks, batch, heads, head size, segments, dtype, q as a transposed view, head chunks)
    let cases = [
        (2, 1, 24, 128, vec![37, 300], DType::BF16, true, 1),
        (2, 1, 24, 128, vec![37, 300], DType::BF16, true, 3),
        (4, 2, 8, 8, vec![13], DType::F32, false, 2),
        (3, 1, 6, 4, vec![5, 11], DType::BF16, true, 1),
        (2, 2, 4, 3, vec![9, 4], DType::F16, false, 2),
    ];
    for (n, b, heads, d, segments, dtype, transposed, chunks) in cases {
        let s: usize = segments.iter().sum();
        let run = |dev: &Device| -> candle_core::Result<Vec<Vec<f32>>> {
            // The same draws on both sides: made on the CPU, then moved.
            let draw = |seed: u64| -> candle_core::Result<Tensor> {
                let mut rng = crate::rng::Rng::new(seed);
                let v: Vec<f32> = (0..b * s * heads * d).map(|_| rng.normal() as f32).collect();
                Tensor::from_vec(v, (b, s, heads, d), &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)
            };
            let (q, k, v) = (draw(1)?, draw(2)?, draw(3)?);
            let outs = launch(&Placement::Shared(n, dev.clone()), DEFAULT_TIMEOUT, |rank| {
                let sp = SeqParallel::new(rank.world.clone(), &segments).with_head_chunks(chunks);
                // Onto the ranks' own device (on a GPU, the stream they share).
                let (q, k, v) = (q.to_device(&rank.device)?, k.to_device(&rank.device)?, v.to_device(&rank.device)?);
                let mine = |t: &Tensor, view: bool| -> candle_core::Result<Tensor> {
                    let mut parts = Vec::new();
                    let mut start = 0;
                    for (i, &len) in segments.iter().enumerate() {
                        let (o, l) = sp.local(i);
                        parts.push(t.narrow(1, start + o, l)?);
                        start += len;
                    }
                    // [B, S, H, D] -> [B, H, S, D]: a transposed view, or made contiguous.
                    let x = Tensor::cat(&parts, 1)?.transpose(1, 2)?;
                    if view {
                        Ok(x)
                    } else {
                        x.contiguous()
                    }
                };
                let stand_in = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
                    // Exact in every dtype: one value per output from three inputs, no sums.
                    q.maximum(k)?.minimum(v)
                };
                let o = attend(Some(&sp), &mine(&q, transposed)?, &mine(&k, false)?, &mine(&v, transposed)?, stand_in)?;
                o.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()
            })?;
            Ok(outs)
        };
        let (got, want) = (run(device)?, run(&Device::Cpu)?);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| if g.len() == w.len() { rel_max_err(g, w) } else { f32::INFINITY })
            .fold(0f32, f32::max);
        out.push(CheckResult::new(
            format!(
                "Ulysses exchange {n} ranks B{b} H{heads} D{d} S{segments:?} {dtype:?}{} in {chunks} head chunk(s)",
                if transposed { " strided" } else { "" }
            ),
            worst,
            0.0,
        ));
    }
    Ok(out)
}
