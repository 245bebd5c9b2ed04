//! NVFP4 formats, layouts and the linear op against `nvfp4/gemm_cases` (FlashInfer / ModelOpt
//! conventions). Every size comes from `gemm_cases.json` and the tensor shapes.

mod common;

use candiff::nvfp4::format::swap_nibbles;
use candiff::nvfp4::layout::{swizzle_scales, unswizzle_scales, LayoutKind, Nvfp4Weight, PreparedLayout};
use candiff::nvfp4::quant::{fake_quantize_row, quantize_activations, quantize_weight};
use candiff::nvfp4::{ActMode, Backend, Nvfp4Linear};
use candle_core::{Device, Module, Tensor};
use common::*;

struct Case {
    p: String,
    m: usize,
    k: usize,
    n: usize,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("nvfp4/gemm_cases.json")).expect("gemm_cases.json");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<Case> = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            p: c["prefix"].as_str().unwrap().to_string(),
            m: c["M"].as_u64().unwrap() as usize,
            k: c["K"].as_u64().unwrap() as usize,
            n: c["N"].as_u64().unwrap() as usize,
        })
        .collect();
    assert!(!cases.is_empty());
    cases
}

fn canonical(f: &candiff::safetensors::MappedFile, c: &Case) -> Nvfp4Weight {
    Nvfp4Weight::new(
        c.n,
        c.k,
        raw(f, &format!("{}w_packed", c.p)),
        raw(f, &format!("{}w_scale", c.p)),
        scalar(f, &format!("{}w_scale_2", c.p)),
    )
    .unwrap()
}

#[test]
fn weight_quantization_matches_the_export_bit_for_bit() {
    let f = open("nvfp4/gemm_cases.safetensors");
    for c in cases() {
        let w = f32s(&f, &format!("{}w", c.p));
        let q = quantize_weight(&w, c.n, c.k).unwrap();
        assert_bytes_eq(&q.packed, &raw(&f, &format!("{}w_packed", c.p)), &format!("{}w_packed", c.p));
        assert_bytes_eq(&q.scales, &raw(&f, &format!("{}w_scale", c.p)), &format!("{}w_scale", c.p));
        assert_eq!(q.weight_scale_2.to_bits(), scalar(&f, &format!("{}w_scale_2", c.p)).to_bits(), "{}w_scale_2", c.p);
    }
}

#[test]
fn nibble_orders_and_dequantization_are_exact() {
    let f = open("nvfp4/gemm_cases.safetensors");
    for c in cases() {
        let mut hi = raw(&f, &format!("{}w_packed", c.p));
        swap_nibbles(&mut hi);
        assert_bytes_eq(&hi, &raw(&f, &format!("{}w_packed_hi", c.p)), "w_packed_hi");
        let deq = canonical(&f, &c).dequantize();
        let want = f32s(&f, &format!("{}w_deq", c.p));
        for (i, (a, b)) in deq.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{}w_deq[{i}]: {a} vs {b}", c.p);
        }
    }
}

#[test]
fn layouts_are_bit_exact_both_ways() {
    let f = open("nvfp4/gemm_cases.safetensors");
    for c in cases() {
        let w = canonical(&f, &c);
        let kb = c.k / 16;
        // 128x4 scales.
        let sw = raw(&f, &format!("{}w_scale_swizzled", c.p));
        assert_eq!(shape(&f, &format!("{}w_scale_swizzled", c.p)), vec![c.n.div_ceil(128) * 128, kb.div_ceil(4) * 4]);
        assert_bytes_eq(&swizzle_scales(&w.scales, c.n, kb), &sw, &format!("{}w_scale_swizzled", c.p));
        assert_bytes_eq(&unswizzle_scales(&sw, c.n, kb).unwrap(), &w.scales, "unswizzle");
        // trtllm.
        let t = PreparedLayout::prepare(&w, LayoutKind::Trtllm);
        assert_eq!([t.weight_rows, t.weight_row_bytes].to_vec(), shape(&f, &format!("{}trtllm_weight", c.p)));
        assert_bytes_eq(&t.weight, &raw(&f, &format!("{}trtllm_weight", c.p)), &format!("{}trtllm_weight", c.p));
        assert_bytes_eq(&t.scale, &raw(&f, &format!("{}trtllm_scale", c.p)), &format!("{}trtllm_scale", c.p));
        assert_eq!(t.to_canonical(w.weight_scale_2).unwrap(), w);
        // trtllm on Hopper: the same rows and scales, codes in the Hopper kernels' order.
        let h = PreparedLayout::prepare(&w, LayoutKind::TrtllmSm90);
        assert_eq!((h.weight_rows, h.weight_row_bytes), (t.weight_rows, t.weight_row_bytes));
        assert_bytes_eq(&h.scale, &t.scale, "trtllm sm90 scales");
        assert_eq!(h.to_canonical(w.weight_scale_2).unwrap(), w);
        // cutlass / cudnn.
        let u = PreparedLayout::prepare(&w, LayoutKind::Cutlass);
        assert_eq!([u.weight_rows, u.weight_row_bytes].to_vec(), shape(&f, &format!("{}cutlass_weight", c.p)));
        assert_bytes_eq(&u.weight, &raw(&f, &format!("{}cutlass_weight", c.p)), &format!("{}cutlass_weight", c.p));
        assert_bytes_eq(&u.scale, &sw, "cutlass scales");
        assert_eq!(u.to_canonical(w.weight_scale_2).unwrap(), w);
        // cuDNN without FP4 tensor cores: cutlass weight padding, linear scales.
        let l = PreparedLayout::prepare(&w, LayoutKind::CutlassLinearScales);
        assert_bytes_eq(&l.weight, &raw(&f, &format!("{}cutlass_weight", c.p)), "cudnn weight");
        assert_bytes_eq(&l.scale, &w.scales, "cudnn linear scales");
        assert_eq!(l.to_canonical(w.weight_scale_2).unwrap(), w);
    }
}

#[test]
fn activation_quantization_is_bit_exact() {
    let f = open("nvfp4/gemm_cases.safetensors");
    for c in cases() {
        let x = f32s(&f, &format!("{}x", c.p));
        let input_scale = scalar(&f, &format!("{}input_scale", c.p));
        let (packed, scales) = quantize_activations(&x, c.m, c.k, input_scale);
        assert_bytes_eq(&packed, &raw(&f, &format!("{}x_packed", c.p)), &format!("{}x_packed", c.p));
        assert_bytes_eq(&scales, &raw(&f, &format!("{}x_scale", c.p)), &format!("{}x_scale", c.p));
        assert_bytes_eq(
            &swizzle_scales(&scales, c.m, c.k / 16),
            &raw(&f, &format!("{}x_scale_swizzled", c.p)),
            &format!("{}x_scale_swizzled", c.p),
        );
        let mut fq = x.clone();
        for row in fq.chunks_exact_mut(c.k) {
            fake_quantize_row(row, input_scale);
        }
        let want = f32s(&f, &format!("{}x_fq", c.p));
        for (i, (a, b)) in fq.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{}x_fq[{i}]: {a} vs {b}", c.p);
        }
    }
}

#[test]
fn gemm_matches_references_for_every_backend_and_mode() {
    let f = open("nvfp4/gemm_cases.safetensors");
    for c in cases() {
        let w = canonical(&f, &c);
        let input_scale = scalar(&f, &format!("{}input_scale", c.p));
        let alpha = scalar(&f, &format!("{}alpha", c.p));
        assert_eq!(alpha.to_bits(), (input_scale * w.weight_scale_2).to_bits(), "{}alpha", c.p);
        let x = Tensor::from_vec(f32s(&f, &format!("{}x", c.p)), (c.m, c.k), &Device::Cpu).unwrap();
        for mode in [ActMode::W4A16, ActMode::W4A4] {
            let want = f32s(&f, &format!("{}y_{mode}", c.p));
            let tol = 1e-5 * max_abs(&want);
            let mut outs = Vec::new();
            for backend in Backend::ALL {
                let l = Nvfp4Linear::new(&w, Some(input_scale), None, backend, mode, &Device::Cpu).unwrap();
                let y: Vec<f32> = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let d = max_diff(&y, &want);
                assert!(d <= tol, "{} {backend} {mode}: max diff {d} > {tol}", c.p);
                outs.push(y);
            }
            // The layouts chosen on some GPUs: cudnn's without FP4 tensor cores, trtllm's on Hopper.
            for (backend, kind) in
                [(Backend::Cudnn, LayoutKind::CutlassLinearScales), (Backend::Trtllm, LayoutKind::TrtllmSm90)]
            {
                let l =
                    Nvfp4Linear::with_layout(&w, Some(input_scale), None, backend, kind, mode, &Device::Cpu).unwrap();
                let y: Vec<f32> = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert!(max_diff(&y, &want) <= tol, "{} {kind:?} {mode}", c.p);
                outs.push(y);
            }
            // Every layout holds the same numbers, so the reference gives identical outputs.
            for (i, o) in outs.iter().enumerate().skip(1) {
                assert_eq!(&outs[0], o, "{} {mode}: layout {i} differs from trtllm", c.p);
            }
        }
    }
}

#[test]
fn gemm_handles_batched_inputs_and_bias() {
    let f = open("nvfp4/gemm_cases.safetensors");
    let c = cases().into_iter().find(|c| c.m > 1).expect("a case with M > 1");
    let w = canonical(&f, &c);
    let x = Tensor::from_vec(f32s(&f, &format!("{}x", c.p)), (1, c.m, c.k), &Device::Cpu).unwrap();
    let bias = Tensor::arange(0f32, c.n as f32, &Device::Cpu).unwrap();
    let l = Nvfp4Linear::new(&w, None, Some(bias), Backend::Trtllm, ActMode::W4A16, &Device::Cpu).unwrap();
    let y = l.forward(&x).unwrap();
    assert_eq!(y.dims(), &[1, c.m, c.n]);
    let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> =
        f32s(&f, &format!("{}y_w4a16", c.p)).iter().enumerate().map(|(i, v)| v + (i % c.n) as f32).collect();
    assert!(max_diff(&y, &want) <= 1e-5 * max_abs(&want));
    // bf16 input gives bf16 output within bf16 rounding.
    let yb = l.forward(&x.to_dtype(candle_core::DType::BF16).unwrap()).unwrap();
    assert_eq!(yb.dtype(), candle_core::DType::BF16);
    let yb: Vec<f32> = yb.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(max_diff(&yb, &want) <= 2f32.powi(-8) * max_abs(&want));
}

/// The fused-projection forms against the plain layer on the fixture: GELU on the features from
/// `from` on only (the others untouched), and the input given in two parts (the second a column
/// slice of a wider tensor) as the concatenation. (On Hopper the GEMM does both itself; `candiff
/// doctor` checks it against these.)
#[test]
fn gelu_from_a_feature_and_two_part_inputs_match_the_plain_layer() {
    let f = open("nvfp4/gemm_cases.safetensors");
    let c = cases().into_iter().find(|c| c.m > 1 && c.k >= 32).expect("a case with M > 1, K >= 32");
    let w = canonical(&f, &c);
    let x = Tensor::from_vec(f32s(&f, &format!("{}x", c.p)), (1, c.m, c.k), &Device::Cpu).unwrap();
    let bias = Tensor::arange(0f32, c.n as f32, &Device::Cpu).unwrap();
    let l = Nvfp4Linear::new(&w, None, Some(bias), Backend::Trtllm, ActMode::W4A16, &Device::Cpu).unwrap();
    let rows = |t: Tensor| -> Vec<Vec<f32>> { t.squeeze(0).unwrap().to_vec2().unwrap() };
    let plain = rows(l.forward(&x).unwrap());
    let from = c.n / 3;
    let got = rows(l.forward_act_from(&x, from).unwrap());
    let gelu = |v: f32| 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044_715 * v * v * v)).tanh());
    for (g, p) in got.iter().zip(&plain) {
        assert_eq!(&g[..from], &p[..from], "features below {from} must not be activated");
        for (a, b) in g[from..].iter().zip(&p[from..]) {
            assert!((a - gelu(*b)).abs() <= 1e-5 * (1.0 + b.abs()), "GELU({b}) = {a}");
        }
    }
    assert_eq!(rows(l.forward_act_from(&x, 0).unwrap()), rows(l.forward_act(&x, true).unwrap()));
    // Two parts: the first `k / 2` features, then the rest read from the middle of a wider tensor.
    let k1 = c.k / 2;
    let rest = x.narrow(2, k1, c.k - k1).unwrap();
    let wide = Tensor::cat(&[&rest, &rest], 2).unwrap();
    let second = wide.narrow(2, 0, c.k - k1).unwrap();
    assert_eq!(rows(l.forward_parts(&x.narrow(2, 0, k1).unwrap(), &second).unwrap()), plain);
}

/// The Hopper kernel (kernels/nvfp4_sm90.cu) dequantizes without a lookup table: a byte's two
/// E2M1 codes are placed into bf16 bits (magnitude to bits 8:6, sign to 15: the code's value times
/// 2^-126, the 0.5 code a subnormal) and multiplied by bf16(scale x 2^119). This mirrors that bit
/// placement for every code byte and every finite E4M3 scale and checks that the product is
/// exactly code x scale x 2^-7 and representable in bf16, so the kernel's bf16 multiply rounds
/// nothing (the GPU side is checked against the CPU reference by `candiff doctor`).
#[test]
fn hopper_register_dequantization_is_exact() {
    use candiff::nvfp4::format::{e2m1_decode, e4m3_decode};
    use half::bf16;
    const MAG_MUL: u32 = (1 << 6) | (1 << 18);
    const SIGN_MUL: u32 = 0x0100_1000;
    const KEEP: u32 = (7 << 6) | (7 << 22) | 0x8000_8000;
    let place = |b: u32| (((b & 0x77) * MAG_MUL) | ((b & 0x88) * SIGN_MUL)) & KEEP;
    let (bias, unbias) = (2f32.powi(119), 2f32.powi(-7));
    for scale_bits in 0..=255u8 {
        if scale_bits & 0x7F == 0x7F {
            continue; // E4M3 NaN: never a block scale
        }
        let s = e4m3_decode(scale_bits);
        let s2 = bf16::from_f32(s * bias);
        assert_eq!(s2.to_f32(), s * bias, "scale {scale_bits:#x} x 2^119 must be exact in bf16");
        for byte in 0..=255u32 {
            let raw = place(byte);
            for (half, code) in [(raw as u16, byte & 0xF), ((raw >> 16) as u16, byte >> 4)] {
                let got = bf16::from_bits(half).to_f32() * s2.to_f32();
                let want = e2m1_decode(code as u8) * s * unbias;
                assert_eq!(got, want, "code {code:#x}, scale {scale_bits:#x}");
                assert_eq!(bf16::from_f32(got).to_f32(), got, "code {code:#x}, scale {scale_bits:#x}: not a bf16");
            }
        }
    }
}
