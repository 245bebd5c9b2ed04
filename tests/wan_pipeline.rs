//! The Wan2.2 pipelines against `wan22_tiny/pipeline_{a14b,ti2v}.safetensors` (diffusers'
//! `WanPipeline` with fixed embeddings and initial latents): timesteps, expert choice and
//! guidance per step, conditional/unconditional noise predictions, latents after every step, and
//! the decoded frames. A14B: two experts, UniPC shift 12, Wan2.1 VAE; TI2V: expand_timesteps,
//! shift 5, Wan2.2 VAE.

mod common;

use candiff::linear::Nvfp4Options;
use candiff::nvfp4::Overrides;
use candiff::pipelines::wan::{RunStats, WanFiles, WanRun};
use candiff::pipelines::RunOptions;
use candle_core::{DType, Device, Tensor};
use common::fixtures;

/// Fixture README tolerances (max |diff|) for f32 compute.
const F32_LATENTS: f32 = 1e-4;
const F32_FRAMES: f32 = 5e-5;
/// bf16 weights and activations (f32 scheduler): max and mean |diff|.
const BF16_LATENTS: (f32, f32) = (0.5, 0.03);
const BF16_FRAMES: (f32, f32) = (0.06, 0.006);

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn diff(got: &Tensor, want: &Tensor) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims(), "shape");
    let (a, b) = (flat(got), flat(want));
    let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    (common::max_diff(&a, &b), mean)
}

fn check(name: &str, dtype: DType) {
    let root = fixtures().join(format!("wan22_tiny/{name}"));
    let (req, r, _) = common::wan_fixture(name);
    let files = WanFiles::new(&root, None, None).unwrap();
    let run = WanRun {
        files: &files,
        opts: RunOptions {
            dtype,
            device: &Device::Cpu,
            nvfp4: Nvfp4Options::default(),
            nvfp4_overrides: Overrides::default(),
            hooks: Default::default(),
            world: None,
        },
    };
    let g = run.geometry(&req).unwrap();
    assert_eq!(g.frames, r["latents_init"].dim(2).unwrap(), "latent frames");

    let (lat_tol, frame_tol) =
        if dtype == DType::F32 { ((F32_LATENTS, 1.0), (F32_FRAMES, 1.0)) } else { (BF16_LATENTS, BF16_FRAMES) };
    let mut stats = RunStats::default();
    let want_t = flat(&r["timesteps"]);
    let expert: Vec<i64> = r["expert"].to_vec1().unwrap();
    let gs = flat(&r["guidance_scale"]);
    let mut steps = 0;
    let x = run
        .denoise(
            &req,
            &r["prompt_embeds"],
            Some(&r["negative_prompt_embeds"]),
            r["latents_init"].clone(),
            &mut stats,
            |s| {
                let i = s.index;
                assert_eq!(s.timestep, want_t[i], "{name} timestep {i}");
                assert_eq!(s.expert as i64, expert[i], "{name} expert at step {i}");
                assert_eq!(s.guidance as f32, gs[i], "{name} guidance at step {i}");
                for (what, got, key) in [
                    ("cond", s.cond, "noise_pred_cond"),
                    ("uncond", s.uncond.unwrap(), "noise_pred_uncond"),
                    ("latents", s.latents, "latents"),
                ] {
                    let (max, mean) = diff(got, &r[key].get(i).unwrap());
                    assert!(
                        max <= lat_tol.0 && mean <= lat_tol.1,
                        "{name} {dtype:?} step {i} {what}: max {max:e} mean {mean:e}"
                    );
                }
                steps += 1;
            },
        )
        .unwrap();
    assert_eq!(steps, want_t.len());
    let frames = run.decode(&x, |_, _| {}).unwrap();
    let (max, mean) = diff(&frames, &r["frames"]);
    assert!(max <= frame_tol.0 && mean <= frame_tol.1, "{name} {dtype:?} frames: max {max:e} mean {mean:e}");
}

#[test]
fn a14b_two_expert_pipeline_f32() {
    check("pipeline_a14b", DType::F32);
}

#[test]
fn ti2v_pipeline_f32() {
    check("pipeline_ti2v", DType::F32);
}

#[test]
fn a14b_two_expert_pipeline_bf16() {
    check("pipeline_a14b", DType::BF16);
}

#[test]
fn ti2v_pipeline_bf16() {
    check("pipeline_ti2v", DType::BF16);
}
