//! Wan2.2 components against `wan22_tiny/` (diffusers/transformers references in f32 from the bf16
//! weights): UMT5, the three transformers (incl. per-token timesteps), both VAEs, the schedulers,
//! and conv3d against a direct loop.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candiff::linear::{Nvfp4Options, WeightBuilder};
use candiff::models::conv3d::{conv3d_reference, Conv3d};
use candiff::models::text::umt5::{Umt5Config, Umt5Encoder};
use candiff::models::wan::scheduler::{Sampler, SchedulerConfig};
use candiff::models::wan::vae::WanVae;
use candiff::models::wan::{WanConfig, WanTrace, WanTransformer, WanVaeConfig};
use candiff::nvfp4::{Checkpoint, Overrides};
use candle_core::{DType, Device, Tensor};
use common::fixtures;

/// Tolerances of the fixture README (max |diff|).
const F32_COMPONENT: f32 = 5e-5;
const BF16_COMPONENT: f32 = 0.1;
const BF16_COMPONENT_MEAN: f32 = 0.015;
const SCHEDULER: f32 = 1e-5;

fn wan(rel: &str) -> PathBuf {
    fixtures().join("wan22_tiny").join(rel)
}

fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(wan(rel), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// (max |diff|, mean |diff|), after checking shapes.
fn diff(got: &Tensor, want: &Tensor) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims(), "shape");
    let (a, b) = (flat(got), flat(want));
    let max = common::max_diff(&a, &b);
    let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    (max, mean)
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    let (max, _) = diff(got, want);
    assert!(max <= tol, "{what}: max |diff| {max:e} > {tol:e}");
}

fn assert_bf16(got: &Tensor, want: &Tensor, what: &str) {
    let (max, mean) = diff(got, want);
    assert!(max <= BF16_COMPONENT && mean <= BF16_COMPONENT_MEAN, "{what}: max {max:e}, mean {mean:e}");
}

fn umt5(dtype: DType) -> Umt5Encoder {
    let cfg = Umt5Config::from_file(&wan("text_encoder/config.json")).unwrap();
    let files = vec![wan("text_encoder/model.safetensors")];
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, &Device::Cpu).unwrap() };
    Umt5Encoder::new(&cfg, vb).unwrap()
}

#[test]
fn umt5_matches_transformers_layer_by_layer() {
    let io = load("text_encoder_io.safetensors");
    let enc = umt5(DType::F32);
    let states = enc.forward_all(&io["input_ids"], &io["attention_mask"]).unwrap();
    let want = &io["hidden_states"];
    assert_eq!(states.len(), want.dim(0).unwrap(), "hidden state count");
    for (i, s) in states.iter().enumerate() {
        assert_close(s, &want.get(i).unwrap(), F32_COMPONENT, &format!("hidden_states[{i}]"));
    }
    assert_close(states.last().unwrap(), &io["last_hidden_state"], F32_COMPONENT, "last_hidden_state");
    let pe = enc.prompt_embeds(&io["input_ids"], &io["attention_mask"]).unwrap();
    assert_close(&pe, &io["prompt_embeds"], F32_COMPONENT, "prompt_embeds");

    let pe16 = umt5(DType::BF16).prompt_embeds(&io["input_ids"], &io["attention_mask"]).unwrap();
    assert_bf16(&pe16, &io["prompt_embeds"], "bf16 prompt_embeds");
}

fn transformer(folder: &str, dtype: DType) -> WanTransformer {
    let cfg = WanConfig::from_file(&wan(&format!("{folder}/config.json"))).unwrap();
    let ckpt = Arc::new(Checkpoint::open(&wan(folder), &Overrides::default()).unwrap());
    let wb = WeightBuilder::new(ckpt, dtype, &Device::Cpu, Nvfp4Options::default()).unwrap();
    WanTransformer::new(&cfg, &wb).unwrap()
}

const MODELS: [(&str, &str); 3] =
    [("a14b_high", "transformer_a14b_high"), ("a14b_low", "transformer_a14b_low"), ("ti2v", "transformer_ti2v")];

#[test]
fn transformers_match_diffusers_with_intermediates() {
    let io = load("io_transformers.safetensors");
    let ctx = &io["encoder_hidden_states"];
    for (key, folder) in MODELS {
        let m = transformer(folder, DType::F32);
        let g = |n: &str| io[&format!("{key}/{n}")].clone();
        let mut tr = WanTrace::default();
        let out = m.forward_traced(&g("hidden_states"), &g("timestep"), ctx, DType::F32, Some(&mut tr)).unwrap();
        assert_close(tr.temb.as_ref().unwrap(), &g("temb"), F32_COMPONENT, &format!("{key} temb"));
        assert_close(tr.timestep_proj.as_ref().unwrap(), &g("timestep_proj"), F32_COMPONENT, &format!("{key} tproj"));
        assert_close(tr.text_embeds.as_ref().unwrap(), &g("text_embeds"), F32_COMPONENT, &format!("{key} text"));
        let blocks = g("block_outputs");
        assert_eq!(tr.block_outputs.len(), blocks.dim(0).unwrap());
        for (i, b) in tr.block_outputs.iter().enumerate() {
            assert_close(b, &blocks.get(i).unwrap(), F32_COMPONENT, &format!("{key} block {i}"));
        }
        assert_close(&out, &g("output"), F32_COMPONENT, &format!("{key} output"));

        let out16 = transformer(folder, DType::BF16).forward(&g("hidden_states"), &g("timestep"), ctx, DType::BF16);
        assert_bf16(&out16.unwrap(), &g("output"), &format!("{key} bf16 output"));
    }
}

#[test]
fn ti2v_per_token_timesteps_match() {
    let io = load("io_transformers.safetensors");
    let m = transformer("transformer_ti2v", DType::F32);
    let out =
        m.forward(&io["ti2v/hidden_states"], &io["ti2v/timestep_tokens"], &io["encoder_hidden_states"], DType::F32);
    assert_close(&out.unwrap(), &io["ti2v/output_tokens"], F32_COMPONENT, "ti2v output_tokens");
    // The per-token form with every token at the sample's t is the per-sample model exactly.
    let t = &io["ti2v/timestep"];
    let tokens = io["ti2v/timestep_tokens"].dim(1).unwrap();
    let uniform = t.unsqueeze(1).unwrap().repeat((1, tokens)).unwrap();
    let a = m.forward(&io["ti2v/hidden_states"], &uniform, &io["encoder_hidden_states"], DType::F32).unwrap();
    assert_close(&a, &io["ti2v/output"], F32_COMPONENT, "ti2v uniform per-token");
}

/// The VAE runs in f32 on the CPU (Candle's CPU convolutions have no bf16 path).
fn vae(folder: &str, dtype: DType) -> WanVae {
    let cfg = WanVaeConfig::from_file(&wan(&format!("{folder}/config.json"))).unwrap();
    let files = vec![wan(&format!("{folder}/diffusion_pytorch_model.safetensors"))];
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, &Device::Cpu).unwrap() };
    WanVae::new(&cfg, vb, true).unwrap()
}

#[test]
fn vaes_decode_and_encode_like_diffusers() {
    for name in ["vae21", "vae22"] {
        let io = load(&format!("{name}_io.safetensors"));
        let v = vae(name, DType::F32);
        let mut chunks = 0;
        let video = v.decode(&io["decode/latent"], |_, _| chunks += 1).unwrap();
        assert_eq!(chunks, io["decode/latent"].dim(2).unwrap());
        assert_close(&video, &io["decode/video"], F32_COMPONENT, &format!("{name} decode"));
        let mean = v.encode(&io["encode/video"]).unwrap();
        assert_close(&mean, &io["encode/mean"], F32_COMPONENT, &format!("{name} encode"));
    }
}

/// Step counts present in the trace file for one scheduler.
fn trace_steps(t: &HashMap<String, Tensor>, sched: &str) -> Vec<usize> {
    let mut n: Vec<usize> =
        t.keys().filter_map(|k| k.strip_prefix(&format!("{sched}/n"))?.split('/').next()?.parse().ok()).collect();
    n.sort();
    n.dedup();
    n
}

#[test]
fn schedulers_reproduce_the_traces() {
    let t = load("scheduler_traces.safetensors");
    for (sched, folder) in
        [("unipc_a14b", "scheduler_a14b"), ("unipc_ti2v", "scheduler_ti2v"), ("flow_euler", "scheduler_flow_euler")]
    {
        let cfg = SchedulerConfig::from_file(&wan(&format!("{folder}/scheduler_config.json"))).unwrap();
        let steps = trace_steps(&t, sched);
        assert!(!steps.is_empty(), "{sched}: no traces");
        for n in steps {
            let g = |k: &str| t[&format!("{sched}/n{n}/{k}")].clone();
            let mut s = Sampler::new(&cfg, n, None).unwrap();
            assert_eq!(s.timesteps(), flat(&g("timesteps")).as_slice(), "{sched} n{n} timesteps");
            let sig = Tensor::new(s.sigmas(), &Device::Cpu).unwrap();
            assert_close(&sig, &g("sigmas"), SCHEDULER, &format!("{sched} n{n} sigmas"));
            let mut x = g("sample");
            let (outs, prevs) = (g("model_outputs"), g("prev_samples"));
            for i in 0..n {
                x = s.step(&outs.get(i).unwrap(), &x).unwrap();
                assert_close(&x, &prevs.get(i).unwrap(), SCHEDULER, &format!("{sched} n{n} step {i}"));
            }
        }
    }
}

#[test]
fn conv3d_matches_a_direct_loop() {
    let dev = Device::Cpu;
    for (stride, pad, kt) in [((1, 1), 1, 3), ((2, 1), 0, 3), ((1, 2), 1, 3), ((1, 1), 0, 1)] {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 7, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 3, kt, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let got = Conv3d::new(&w, Some(b.clone()), stride, pad).unwrap().forward(&x).unwrap();
        let want = conv3d_reference(&x, &w, Some(&b), stride, pad).unwrap();
        assert_close(&got, &want, 1e-4, &format!("conv3d stride {stride:?} pad {pad} kt {kt}"));
    }
}
