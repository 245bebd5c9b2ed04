//! The 3-step FluxPipeline run of `flux1_tiny/pipeline.safetensors`: schedule, every noise
//! prediction and latent, the VAE input, decode and final image.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candiff::linear::{Nvfp4Options, WeightBuilder};
use candiff::models::flux::sampling::{euler_step, image_ids, pack_latents, unpack_latents, SchedulerConfig};
use candiff::models::flux::vae::{to_unit_images, FluxVae, VaeConfig};
use candiff::models::flux::{FluxConfig, FluxTransformer, Naming};
use candiff::nvfp4::{Checkpoint, Overrides};
use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_diff};

/// As in flux_transformer.rs: the reference's CPU `exp` rounds 3 sinusoid frequencies one ulp away
/// from the correctly rounded value, which the guidance sinusoid (3500 rad here) amplifies to 2e-5;
/// with those three values the pipeline matches within 1e-5.
const F32_TOL: f32 = 3e-5;

fn v(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn schedule_matches_the_scheduler() {
    let p = candle_core::safetensors::load(fixtures().join("flux1_tiny/pipeline.safetensors"), &Device::Cpu).unwrap();
    let cfg = SchedulerConfig::from_file(&fixtures().join("flux1_tiny/scheduler/scheduler_config.json")).unwrap();
    let tokens = p["img_ids"].dim(0).unwrap();
    let mu = cfg.mu(tokens);
    let want_mu: f32 = p["mu"].to_scalar().unwrap();
    assert!((mu as f32 - want_mu).abs() <= 1e-6, "mu {mu} vs {want_mu}");
    let steps = p["timesteps"].dim(0).unwrap();
    let (sigmas, timesteps) = cfg.schedule(steps, Some(mu));
    assert!(max_diff(&sigmas, &v(&p["sigmas"])) <= 1e-6, "{sigmas:?}");
    assert!(max_diff(&timesteps, &v(&p["timesteps"])) <= 1e-3, "{timesteps:?}");
    // Position ids of the packed latent grid.
    let (h, w) = (p["vae_latents"].dim(2).unwrap(), p["vae_latents"].dim(3).unwrap());
    assert_eq!(v(&image_ids(h, w, &Device::Cpu).unwrap()), v(&p["img_ids"]));
}

/// Runs the fixture's sampling loop in `dtype`: (noise prediction, latents) after every step.
fn denoise(p: &HashMap<String, Tensor>, dtype: DType) -> Vec<(Tensor, Tensor)> {
    let f = fixtures().join("flux1_tiny");
    let cfg = FluxConfig::from_file(&f.join("transformer/config.json")).unwrap();
    let ckpt = Arc::new(Checkpoint::open(&f.join("transformer"), &Overrides::default()).unwrap());
    let wb = WeightBuilder::new(ckpt, dtype, &Device::Cpu, Nvfp4Options::default()).unwrap();
    let model = FluxTransformer::new(&cfg, &wb, Naming::Diffusers).unwrap();
    let sched = SchedulerConfig::from_file(&f.join("scheduler/scheduler_config.json")).unwrap();
    let steps = p["timesteps"].dim(0).unwrap();
    let (sigmas, timesteps) = sched.schedule(steps, Some(sched.mu(p["img_ids"].dim(0).unwrap())));
    let mut x = p["latents_init"].clone();
    let mut out = Vec::new();
    for i in 0..steps {
        let t = Tensor::new(&[timesteps[i] / 1000.0], &Device::Cpu).unwrap();
        let (e, pooled, g) = (&p["prompt_embeds"], &p["pooled_prompt_embeds"], &p["guidance"]);
        let pred = model.forward(&x, e, pooled, &t, Some(g), &p["img_ids"], &p["txt_ids"], dtype).unwrap();
        x = euler_step(&x, &pred, sigmas[i], sigmas[i + 1]).unwrap();
        out.push((pred, x.clone()));
    }
    out
}

#[test]
fn three_steps_then_decode_match_the_pipeline() {
    let f = fixtures().join("flux1_tiny");
    let p = candle_core::safetensors::load(f.join("pipeline.safetensors"), &Device::Cpu).unwrap();
    let (h, w) = (p["vae_latents"].dim(2).unwrap(), p["vae_latents"].dim(3).unwrap());
    let trace = denoise(&p, DType::F32);
    for (i, (pred, x)) in trace.iter().enumerate() {
        let d = max_diff(&v(pred), &v(&p["noise_pred"].get(i).unwrap()));
        assert!(d <= F32_TOL, "step {i} noise_pred: {d}");
        let d = max_diff(&v(x), &v(&p["latents_steps"].get(i).unwrap()));
        assert!(d <= F32_TOL, "step {i} latents: {d}");
    }
    let x = trace.last().unwrap().1.clone();
    let vae_cfg = VaeConfig::from_file(&f.join("vae/config.json")).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[f.join("vae/diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let vae = FluxVae::new(&vae_cfg, vb).unwrap();
    let z = vae.denormalize(&unpack_latents(&x, h, w).unwrap()).unwrap();
    let d = max_diff(&v(&z), &v(&p["vae_latents"]));
    assert!(d <= F32_TOL / vae_cfg.scaling_factor as f32, "vae_latents: {d}");
    // Packing round-trips.
    assert_eq!(v(&pack_latents(&unpack_latents(&x, h, w).unwrap()).unwrap()), v(&x));
    // Decode the reference latents so the VAE is judged on its own.
    let decoded = vae.decode(&p["vae_latents"], DType::F32).unwrap();
    let d = max_diff(&v(&decoded), &v(&p["vae_decoded"]));
    assert!(d <= 1e-5, "vae_decoded: {d}");
    let img = to_unit_images(&decoded).unwrap().squeeze(0).unwrap();
    let d = max_diff(&v(&img), &v(&p["image"]));
    assert!(d <= 1e-5, "image: {d}");
}

#[test]
fn bf16_pipeline_within_the_bf16_tolerances() {
    // The bf16 column of the fixtures: latents 0.1, image 0.03 (f32 scheduler, f32 time embedding).
    let f = fixtures().join("flux1_tiny");
    let p = candle_core::safetensors::load(f.join("pipeline.safetensors"), &Device::Cpu).unwrap();
    let (h, w) = (p["vae_latents"].dim(2).unwrap(), p["vae_latents"].dim(3).unwrap());
    let trace = denoise(&p, DType::BF16);
    for (i, (_, x)) in trace.iter().enumerate() {
        let d = max_diff(&v(x), &v(&p["latents_steps"].get(i).unwrap()));
        assert!(d <= 0.1, "step {i} latents: {d}");
    }
    let x = trace.last().unwrap().1.clone();
    // Candle has no bf16 CPU matmul for the VAE: it decodes in f32 on the CPU, as the pipeline does.
    const VAE_DTYPE: DType = DType::F32;
    assert_eq!(FluxVae::dtype_on(&Device::Cpu, DType::BF16), VAE_DTYPE);
    let vae_cfg = VaeConfig::from_file(&f.join("vae/config.json")).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[f.join("vae/diffusion_pytorch_model.safetensors")],
            VAE_DTYPE,
            &Device::Cpu,
        )
        .unwrap()
    };
    let vae = FluxVae::new(&vae_cfg, vb).unwrap();
    let z = vae.denormalize(&unpack_latents(&x, h, w).unwrap()).unwrap();
    let img = to_unit_images(&vae.decode(&z, VAE_DTYPE).unwrap()).unwrap().squeeze(0).unwrap();
    let d = max_diff(&v(&img), &v(&p["image"]));
    assert!(d <= 0.03, "image: {d}");
}
