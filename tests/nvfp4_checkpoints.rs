//! Recognizing the tiny NVFP4 FLUX.1 checkpoints (ModelOpt, compressed-tensors, BFL/Comfy),
//! loading them to identical canonical weights, and the loader's errors.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candiff::linear::{Linear, Nvfp4Options, WeightBuilder};
use candiff::nvfp4::config::{CheckpointFormat, Source};
use candiff::nvfp4::quant::{concat_rows, fake_quantize_row, ShardMerge};
use candiff::nvfp4::{ActMode, Backend, Checkpoint, NibbleOrder, Overrides, ScaleLayout};
use candiff::safetensors::{serialize, MappedFile};
use candle_core::{DType, Device, Module, Tensor};
use common::*;

fn modelopt() -> PathBuf {
    fixtures().join("flux1_tiny/transformer_nvfp4_modelopt")
}
fn ct() -> PathBuf {
    fixtures().join("flux1_tiny/transformer_nvfp4_ct")
}
fn bfl() -> PathBuf {
    fixtures().join("flux1_tiny/flux1_tiny_nvfp4_bfl.safetensors")
}

fn open_ckpt(p: &Path) -> Checkpoint {
    Checkpoint::open(p, &Overrides::default()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn declared_ignore(p: &Path) -> BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap();
    v["quantization_config"]["ignore"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// diffusers module name -> BFL name, for the modules kept in bf16.
fn bfl_name_of_excluded(d: &str) -> String {
    let map = [
        ("x_embedder", "img_in"),
        ("context_embedder", "txt_in"),
        ("proj_out", "final_layer.linear"),
        ("norm_out.linear", "final_layer.adaLN_modulation.1"),
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ];
    map.iter().find(|(a, _)| *a == d).unwrap_or_else(|| panic!("no BFL name for {d}")).1.to_string()
}

#[test]
fn modelopt_and_compressed_tensors_are_recognized() {
    for (path, format) in [(modelopt(), CheckpointFormat::ModelOpt), (ct(), CheckpointFormat::CompressedTensors)] {
        let c = open_ckpt(&path);
        let plan = c.plan.as_ref().expect("NVFP4 plan");
        assert_eq!(plan.format, format, "{}", path.display());
        assert_eq!(plan.scale_layout, ScaleLayout::Linear);
        assert_eq!(plan.nibbles, NibbleOrder::Low);
        assert_eq!(plan.group_size, 16);
        let excluded: BTreeSet<String> = plan.excluded.keys().cloned().collect();
        assert_eq!(excluded, declared_ignore(&path), "{}", path.display());
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert!(plan.modules.keys().any(|m| m.ends_with("attn.to_q")));
    }
}

#[test]
fn bfl_file_is_recognized_from_its_headers() {
    let c = open_ckpt(&bfl());
    let plan = c.plan.as_ref().expect("NVFP4 plan");
    assert_eq!(plan.format, CheckpointFormat::BflComfy);
    assert_eq!(plan.scale_layout, ScaleLayout::Swizzled);
    assert_eq!(plan.nibbles, NibbleOrder::High);
    assert_eq!(plan.group_size, 16);
    let want: BTreeSet<String> = declared_ignore(&modelopt()).iter().map(|d| bfl_name_of_excluded(d)).collect();
    let got: BTreeSet<String> = plan.excluded.keys().cloned().collect();
    assert_eq!(got, want);
    let layout = plan.decisions.iter().find(|d| d.what == "scale layout").unwrap();
    assert_eq!(layout.source, Source::Inferred);
    assert!(c.inferred.packed_qkv.iter().any(|m| m.ends_with("qkv") || m.ends_with("linear1")));
}

#[test]
fn all_three_load_to_identical_canonical_weights() {
    let mo = open_ckpt(&modelopt());
    let ctk = open_ckpt(&ct());
    let bf = open_ckpt(&bfl());
    let plan = mo.plan.as_ref().unwrap();
    assert_eq!(plan.modules.keys().collect::<Vec<_>>(), ctk.plan.as_ref().unwrap().modules.keys().collect::<Vec<_>>());
    let ulp = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
    for m in plan.modules.keys() {
        let (a, ia) = mo.load_nvfp4(m, None).unwrap();
        let (b, ib) = ctk.load_nvfp4(m, None).unwrap();
        assert_eq!(a.packed, b.packed, "{m}");
        assert_eq!(a.scales, b.scales, "{m}");
        // compressed-tensors stores the encode scale; its reciprocal may be 1 ulp off.
        assert!(ulp(a.weight_scale_2, b.weight_scale_2) <= 1, "{m}: {} vs {}", a.weight_scale_2, b.weight_scale_2);
        assert!(ulp(ia.unwrap(), ib.unwrap()) <= 1, "{m}");
    }
    let n_double =
        plan.modules.keys().filter(|m| m.starts_with("transformer_blocks.") && m.ends_with("attn.to_q")).count();
    let n_single =
        plan.modules.keys().filter(|m| m.starts_with("single_transformer_blocks.") && m.ends_with("proj_out")).count();
    assert!(n_double > 0 && n_single > 0);
    let same = |bfl_name: &str, parts: &[String]| {
        let ws: Vec<_> = parts.iter().map(|p| mo.load_nvfp4(p, None).unwrap()).collect();
        let (fused, rescaled) =
            concat_rows(&ws.iter().map(|w| w.0.clone()).collect::<Vec<_>>(), ShardMerge::RequireEqualScale).unwrap();
        assert!(!rescaled);
        let (b, ib) = bf.load_nvfp4(bfl_name, None).unwrap();
        assert_eq!(b, fused, "{bfl_name} vs {parts:?}");
        assert_eq!(ib, ws[0].1, "{bfl_name} input_scale");
    };
    for i in 0..n_double {
        let t = |s: &str| format!("transformer_blocks.{i}.{s}");
        same(&format!("double_blocks.{i}.img_attn.qkv"), &[t("attn.to_q"), t("attn.to_k"), t("attn.to_v")]);
        same(
            &format!("double_blocks.{i}.txt_attn.qkv"),
            &[t("attn.add_q_proj"), t("attn.add_k_proj"), t("attn.add_v_proj")],
        );
        same(&format!("double_blocks.{i}.img_attn.proj"), &[t("attn.to_out.0")]);
        same(&format!("double_blocks.{i}.txt_attn.proj"), &[t("attn.to_add_out")]);
        same(&format!("double_blocks.{i}.img_mlp.0"), &[t("ff.net.0.proj")]);
        same(&format!("double_blocks.{i}.img_mlp.2"), &[t("ff.net.2")]);
        same(&format!("double_blocks.{i}.txt_mlp.0"), &[t("ff_context.net.0.proj")]);
        same(&format!("double_blocks.{i}.txt_mlp.2"), &[t("ff_context.net.2")]);
        same(&format!("double_blocks.{i}.img_mod.lin"), &[t("norm1.linear")]);
        same(&format!("double_blocks.{i}.txt_mod.lin"), &[t("norm1_context.linear")]);
    }
    for i in 0..n_single {
        let t = |s: &str| format!("single_transformer_blocks.{i}.{s}");
        same(&format!("single_blocks.{i}.linear2"), &[t("proj_out")]);
        same(&format!("single_blocks.{i}.modulation.lin"), &[t("norm.linear")]);
        // linear1 = cat(q, k, v, proj_mlp) quantized as one matrix with one global scale: the
        // same codes cannot be expected, but the values must agree to quantization precision.
        let (b, _) = bf.load_nvfp4(&format!("single_blocks.{i}.linear1"), None).unwrap();
        let parts: Vec<f32> = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
            .iter()
            .flat_map(|p| mo.load_nvfp4(&t(p), None).unwrap().0.dequantize())
            .collect();
        let d = b.dequantize();
        let err = max_diff(&d, &parts) / max_abs(&parts);
        assert!(err < 0.2, "single_blocks.{i}.linear1 relative max error {err}");
    }
}

#[test]
fn probes_through_the_linear_abstraction() {
    let io = open("flux1_tiny/io_nvfp4.safetensors");
    for path in [modelopt(), ct()] {
        let ckpt = Arc::new(open_ckpt(&path));
        let modules: Vec<String> = ckpt.plan.as_ref().unwrap().modules.keys().cloned().collect();
        let mut probed = 0;
        for backend in Backend::ALL {
            let wb = WeightBuilder::new(
                ckpt.clone(),
                DType::F32,
                &Device::Cpu,
                Nvfp4Options { backend, mode: ActMode::W4A4, ..Default::default() },
            )
            .unwrap();
            for m in &modules {
                let key = format!("probe_{}", m.replace('.', "_"));
                let Some(xi) = io.info(&format!("{key}_x")) else { continue };
                let xs = f32s(&io, &format!("{key}_x"));
                let want = f32s(&io, &format!("{key}_y"));
                let k = *xi.shape.last().unwrap();
                let n = want.len() / (xs.len() / k);
                // The quantizer sees the bf16 activation.
                let mut fq: Vec<f32> = xs.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
                let is = ckpt.load_nvfp4(m, None).unwrap().1.unwrap();
                for row in fq.chunks_exact_mut(k) {
                    fake_quantize_row(row, is);
                }
                let want_fq = f32s(&io, &format!("{key}_x_fq"));
                assert!(fq.iter().zip(&want_fq).all(|(a, b)| a.to_bits() == b.to_bits()), "{m}: x_fq");
                let mut wbm = wb.clone();
                for part in m.split('.') {
                    wbm = wbm.pp(part);
                }
                let lin = wbm.linear(k, n, true).unwrap();
                assert!(matches!(lin, Linear::Nvfp4(_)));
                let x = Tensor::from_vec(xs, xi.shape.clone(), &Device::Cpu).unwrap();
                let y: Vec<f32> = lin.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let tol = 1e-5 * max_abs(&want);
                assert!(
                    max_diff(&y, &want) <= tol,
                    "{} {m} {backend}: {} > {tol}",
                    path.display(),
                    max_diff(&y, &want)
                );
                probed += 1;
            }
        }
        assert!(probed >= 3 * 3, "only {probed} probes ran");
        // A kept-bf16 module comes back dense.
        let wb = WeightBuilder::new(ckpt.clone(), DType::F32, &Device::Cpu, Nvfp4Options::default()).unwrap();
        let cfg = ckpt.config.as_ref().unwrap();
        let inner = cfg["num_attention_heads"].as_u64().unwrap() * cfg["attention_head_dim"].as_u64().unwrap();
        let l =
            wb.pp("x_embedder").linear(cfg["in_channels"].as_u64().unwrap() as usize, inner as usize, true).unwrap();
        assert!(matches!(l, Linear::Dense(_)));
    }
}

// ---- derived checkpoints for overrides and errors ----

struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("candiff-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rewrites a fixture file keeping the tensors `keep` accepts, with `edit` applied to bytes.
fn derive(src: &Path, dst: &Path, keep: impl Fn(&str) -> bool, edit: impl Fn(&str, &mut Vec<u8>)) {
    let f = MappedFile::open(src).unwrap();
    let mut owned: Vec<(String, String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, info) in &f.header.tensors {
        if !keep(name) {
            continue;
        }
        let mut b = f.bytes(name).unwrap().to_vec();
        edit(name, &mut b);
        owned.push((name.clone(), info.dtype.to_string(), info.shape.clone(), b));
    }
    let t: Vec<(&str, &str, Vec<usize>, Vec<u8>)> =
        owned.iter().map(|(a, b, c, d)| (a.as_str(), b.as_str(), c.clone(), d.clone())).collect();
    std::fs::write(dst, serialize(&t, None)).unwrap();
}

#[test]
fn user_overrides_win_but_cannot_read_impossible_shapes() {
    let c = Checkpoint::open(&bfl(), &Overrides { nibbles: Some(NibbleOrder::Low), ..Default::default() }).unwrap();
    let plan = c.plan.as_ref().unwrap();
    assert_eq!(plan.nibbles, NibbleOrder::Low);
    assert_eq!(plan.decisions.iter().find(|d| d.what == "nibble order").unwrap().source, Source::Override);
    let m = plan.modules.keys().next().unwrap().clone();
    let (low, _) = c.load_nvfp4(&m, None).unwrap();
    let (high, _) = open_ckpt(&bfl()).load_nvfp4(&m, None).unwrap();
    assert_ne!(low.packed, high.packed);
    let e = Checkpoint::open(&bfl(), &Overrides { scale_layout: Some(ScaleLayout::Linear), ..Default::default() })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("weight_scale") && e.contains("swizzled"), "{e}");
}

#[test]
fn missing_scales_default_to_one_and_can_be_borrowed() {
    let tmp = Tmp::new("missing");
    let mixed = tmp.0.join("mixed.safetensors");
    derive(
        &bfl(),
        &mixed,
        |n| !(n.starts_with("double_blocks.0.") && (n.ends_with("input_scale") || n.ends_with("weight_scale_2"))),
        |_, _| {},
    );
    let c = open_ckpt(&mixed);
    let plan = c.plan.as_ref().unwrap();
    let (inp, ws2) = plan.missing_scales();
    assert!(!inp.is_empty() && inp.len() == ws2.len());
    assert!(plan.warnings.iter().any(|w| w.contains("no input_scale") && w.contains(inp[0])), "{:?}", plan.warnings);
    let (w, is) = c.load_nvfp4(inp[0], None).unwrap();
    assert_eq!((w.weight_scale_2, is), (1.0, None));
    let full = MappedFile::open(&bfl()).unwrap();
    let (wb, isb) = c.load_nvfp4(inp[0], Some(&full)).unwrap();
    let (want, want_is) = open_ckpt(&bfl()).load_nvfp4(inp[0], None).unwrap();
    assert_eq!((wb, isb), (want, want_is));
}

fn write_config(dir: &Path, quant: serde_json::Value) {
    std::fs::write(dir.join("config.json"), serde_json::json!({"quantization_config": quant}).to_string()).unwrap();
}

fn open_err(p: &Path) -> String {
    match Checkpoint::open(p, &Overrides::default()) {
        Ok(c) => {
            let m = c.plan.as_ref().map(|p| p.modules.keys().next().unwrap().clone());
            match m.map(|m| c.load_nvfp4(&m, None)) {
                Some(Err(e)) => e.to_string(),
                _ => panic!("{} opened and loaded without error", p.display()),
            }
        }
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_get_errors_naming_file_and_tensor() {
    let u8w = |n: usize, kh: usize| vec![0u8; n * kh];
    let tmp = Tmp::new("bad");
    let write = |name: &str, t: &[(&str, &str, Vec<usize>, Vec<u8>)]| {
        let d = tmp.0.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("model.safetensors"), serialize(t, None)).unwrap();
        d
    };
    let scalar = 1f32.to_le_bytes().to_vec();
    // K not a multiple of 16 (weight [4, 5] -> K = 10).
    let d = write(
        "k10",
        &[("l.weight", "U8", vec![4, 5], u8w(4, 5)), ("l.weight_scale", "F8_E4M3", vec![4, 1], vec![0x38; 4])],
    );
    let e = open_err(&d);
    assert!(e.contains("model.safetensors") && e.contains("l.weight_scale") && e.contains("multiple of 16"), "{e}");
    // Scale shape that fits neither layout.
    let d = write(
        "shape",
        &[("l.weight", "U8", vec![4, 16], u8w(4, 16)), ("l.weight_scale", "F8_E4M3", vec![3, 2], vec![0x38; 6])],
    );
    let e = open_err(&d);
    assert!(e.contains("l.weight_scale") && e.contains("[3, 2]"), "{e}");
    // Group size other than 16.
    let d = write(
        "group",
        &[("l.weight", "U8", vec![4, 16], u8w(4, 16)), ("l.weight_scale", "F8_E4M3", vec![4, 1], vec![0x38; 4])],
    );
    let e = open_err(&d);
    assert!(e.contains("group size 32"), "{e}");
    // NaN and negative block scales.
    for (tag, bad) in [("nan", 0x7Fu8), ("neg", 0xB8)] {
        let mut s = vec![0x38u8; 8];
        s[5] = bad;
        let d = write(
            tag,
            &[
                ("l.weight", "U8", vec![4, 16], u8w(4, 16)),
                ("l.weight_scale", "F8_E4M3", vec![4, 2], s),
                ("l.weight_scale_2", "F32", vec![], scalar.clone()),
            ],
        );
        let e = open_err(&d);
        assert!(e.contains("l.weight_scale") && e.contains("row 2, block 1"), "{tag}: {e}");
    }
    // Negative global scale.
    let d = write(
        "ws2",
        &[
            ("l.weight", "U8", vec![4, 16], u8w(4, 16)),
            ("l.weight_scale", "F8_E4M3", vec![4, 2], vec![0x38; 8]),
            ("l.weight_scale_2", "F32", vec![], (-1f32).to_le_bytes().to_vec()),
        ],
    );
    let e = open_err(&d);
    assert!(e.contains("l.weight_scale_2") && e.contains("positive"), "{e}");
    // Unknown quant_algo.
    let d = write(
        "algo",
        &[("l.weight", "U8", vec![4, 16], u8w(4, 16)), ("l.weight_scale", "F8_E4M3", vec![4, 2], vec![0x38; 8])],
    );
    write_config(&d, serde_json::json!({"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}));
    let e = open_err(&d);
    assert!(e.contains("config.json") && e.contains("W4A8_AWQ"), "{e}");
    // Declared swizzled, but [150, 5] scales can only be linear.
    let d = write(
        "conflict",
        &[
            ("l.weight", "U8", vec![150, 40], u8w(150, 40)),
            ("l.weight_scale", "F8_E4M3", vec![150, 5], vec![0x38; 750]),
        ],
    );
    write_config(
        &d,
        serde_json::json!({"quant_method": "modelopt", "quant_algo": "NVFP4", "checkpoint_weight_scale_layout": "swizzled"}),
    );
    let e = open_err(&d);
    assert!(
        e.contains("config.json")
            && e.contains("l.weight_scale")
            && e.contains("[150, 5]")
            && e.contains("declared `swizzled`"),
        "{e}"
    );
    // Truncated file.
    let src = std::fs::read(modelopt().join("diffusion_pytorch_model.safetensors")).unwrap();
    let d = tmp.0.join("trunc");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("model.safetensors"), &src[..src.len() / 2]).unwrap();
    let e = open_err(&d);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    std::fs::write(d.join("model.safetensors"), &src[..20]).unwrap();
    let e = open_err(&d);
    assert!(e.contains("truncated header") || e.contains("ends inside"), "{e}");
    // A config that declares NVFP4 over dense weights.
    let d = write("dense", &[("l.weight", "BF16", vec![4, 16], vec![0; 128])]);
    write_config(&d, serde_json::json!({"quant_method": "modelopt", "quant_algo": "NVFP4"}));
    let e = open_err(&d);
    assert!(e.contains("no tensor in the checkpoint is NVFP4"), "{e}");
}
