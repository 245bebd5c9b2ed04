//! The Wan transformer body with NVFP4 linears. No diffusers golden exists for a Wan NVFP4 export, so
//! the tiny A14B expert is quantized here in the layout of NVIDIA's Wan2.2 NVFP4 export (ModelOpt:
//! separate q/k/v, linear [N, K/16] scales, low-first nibbles, condition embedder / patch embedding /
//! head kept bf16) and checked against the same body running the dequantized weights densely. This
//! catches any Wan linear that is not routed through the NVFP4 path correctly (a swapped nibble
//! order moves the output by rel L2 ~1, a misread scale layout by ~0.9).

mod common;

use std::sync::Arc;

use candiff::linear::{Nvfp4Options, WeightBuilder};
use candiff::models::wan::{WanConfig, WanTransformer};
use candiff::nvfp4::quant::quantize_weight;
use candiff::nvfp4::{ActMode, Checkpoint, NibbleOrder, Overrides};
use candiff::safetensors::{serialize, Dtype, MappedFile};
use candle_core::{DType, Device, Tensor};

/// W4A16 rounds each quantized linear's input to bf16; the dense reference does not. Measured
/// on the tiny model: ~1e-3; a wrong layout gives ~1.
const W4A16_REL_L2: f32 = 1e-2;
/// W4A4 against the dense model (activation quantization noise): gross errors only.
const W4A4_REL_L2: f32 = 0.3;

fn bf16_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn quantized(name: &str) -> bool {
    name.starts_with("blocks.") && name.ends_with(".weight") && !name.contains("norm") && !name.contains("scale")
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn nvfp4_wan_expert_matches_its_dequantized_dense_twin() {
    let src = common::fixtures().join("wan22_tiny/transformer_a14b_high");
    let f = MappedFile::open(&src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut q_tensors: Vec<(String, String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut d_tensors = q_tensors.clone();
    let mut n_quant = 0;
    let mut names: Vec<&String> = f.header.tensors.keys().collect();
    names.sort();
    for name in names {
        let info = &f.header.tensors[name];
        let bytes = f.bytes(name).unwrap().to_vec();
        assert_eq!(info.dtype, Dtype::BF16, "{name}");
        if quantized(name) && info.shape.len() == 2 {
            let (n, k) = (info.shape[0], info.shape[1]);
            let w = quantize_weight(&bf16_to_f32(&bytes), n, k).unwrap();
            let module = name.trim_end_matches(".weight");
            d_tensors.push((name.clone(), "F32".into(), vec![n, k], f32_bytes(&w.dequantize())));
            q_tensors.push((name.clone(), "U8".into(), vec![n, k / 2], w.packed.clone()));
            q_tensors.push((format!("{module}.weight_scale"), "F8_E4M3".into(), vec![n, k / 16], w.scales.clone()));
            q_tensors.push((format!("{module}.weight_scale_2"), "F32".into(), vec![], f32_bytes(&[w.weight_scale_2])));
            // A calibration-like activation range for the W4A4 mode.
            q_tensors.push((format!("{module}.input_scale"), "F32".into(), vec![], f32_bytes(&[8.0 / 2688.0])));
            n_quant += 1;
        } else {
            q_tensors.push((name.clone(), "BF16".into(), info.shape.clone(), bytes.clone()));
            d_tensors.push((name.clone(), "BF16".into(), info.shape.clone(), bytes));
        }
    }
    let cfg_text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let cfg = WanConfig::from_file(&src.join("config.json")).unwrap();
    // q, k, v, out of both attentions and the two FFN linears, per block.
    assert_eq!(n_quant, cfg.num_layers * 10);

    let dir = std::env::temp_dir().join(format!("candiff-wan-nvfp4-{}", std::process::id()));
    let (qdir, ddir) = (dir.join("nvfp4"), dir.join("dense"));
    for (d, tensors) in [(&qdir, &q_tensors), (&ddir, &d_tensors)] {
        std::fs::create_dir_all(d).unwrap();
        let t: Vec<(&str, &str, Vec<usize>, Vec<u8>)> =
            tensors.iter().map(|(a, b, c, e)| (a.as_str(), b.as_str(), c.clone(), e.clone())).collect();
        std::fs::write(d.join("diffusion_pytorch_model.safetensors"), serialize(&t, None)).unwrap();
    }
    let mut qcfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    qcfg["quantization_config"] = serde_json::json!({
        "quant_method": "modelopt", "quant_algo": "NVFP4", "producer": {"name": "modelopt", "version": "test"},
        "config_groups": {"group_0": {
            "weights": {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": false},
            "input_activations": {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": false},
            "targets": ["Linear"]}},
        "ignore": ["condition_embedder*", "patch_embedding", "proj_out"],
    });
    std::fs::write(qdir.join("config.json"), serde_json::to_string_pretty(&qcfg).unwrap()).unwrap();
    std::fs::write(ddir.join("config.json"), &cfg_text).unwrap();

    let io =
        candle_core::safetensors::load(common::fixtures().join("wan22_tiny/io_transformers.safetensors"), &Device::Cpu)
            .unwrap();
    let run_with = |dir: &std::path::Path, mode: ActMode, ov: &Overrides| -> Tensor {
        let ckpt = Arc::new(Checkpoint::open(dir, ov).unwrap());
        let opts = Nvfp4Options { mode, ..Default::default() };
        let wb = WeightBuilder::new(ckpt, DType::F32, &Device::Cpu, opts).unwrap();
        let m = WanTransformer::new(&cfg, &wb).unwrap();
        m.forward(&io["a14b_high/hidden_states"], &io["a14b_high/timestep"], &io["encoder_hidden_states"], DType::F32)
            .unwrap()
    };
    let run = |dir: &std::path::Path, mode: ActMode| run_with(dir, mode, &Overrides::default());
    let dense = run(&ddir, ActMode::W4A16);
    let plan_quantized = Checkpoint::open(&qdir, &Overrides::default()).unwrap().plan.unwrap();
    assert!(plan_quantized.is_quantized("blocks.0.attn1.to_q") && plan_quantized.is_quantized("blocks.1.ffn.net.2"));
    assert!(!plan_quantized.is_quantized("condition_embedder.time_proj") && !plan_quantized.is_quantized("proj_out"));
    let w4a16 = run(&qdir, ActMode::W4A16);
    let e = rel_l2(&w4a16, &dense);
    assert!(e < W4A16_REL_L2, "W4A16 vs dequantized dense: rel L2 {e}");
    let w4a4 = run(&qdir, ActMode::W4A4);
    let e4 = rel_l2(&w4a4, &dense);
    assert!(e4 < W4A4_REL_L2 && e4 > 0.0, "W4A4 vs dense: rel L2 {e4}");
    // The check has teeth: reading the same file with the wrong nibble order is far off.
    let swapped =
        run_with(&qdir, ActMode::W4A16, &Overrides { nibbles: Some(NibbleOrder::High), ..Default::default() });
    let es = rel_l2(&swapped, &dense);
    assert!(es > 0.3, "nibble-swapped read: rel L2 {es}");
    eprintln!("rel L2 vs dense: w4a16 {e:.2e}, w4a4 {e4:.2e}, nibble-swapped {es:.2}");
    // The quantized model differs from the original bf16 one (it is not silently dense).
    assert!(rel_l2(&w4a16, &io["a14b_high/output"]) > 1e-3);
    let _ = std::fs::remove_dir_all(&dir);
}
