//! FLUX.2 against `flux2_tiny/` (diffusers 0.42.1 / transformers 5.24.0, f32 references from the
//! bf16 weights): the transformer in diffusers and BFL names (dev and klein), the official-layout
//! NVFP4 single files (full and `-mixed`) with every backend, the Mistral3 / Qwen3 prompt
//! embeddings, and both 3-step pipelines with the VAE decode.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candiff::linear::{Linear, Nvfp4Options, WeightBuilder};
use candiff::models::flux::Naming;
use candiff::models::flux2::{Flux2Config, Flux2Transformer};
use candiff::models::text::llm::{detect_prefix, LlmConfig, LlmEncoder, MISTRAL_LAYERS, QWEN3_LAYERS};
use candiff::nvfp4::quant::fake_quantize_row;
use candiff::nvfp4::{ActMode, Backend, Checkpoint, NibbleOrder, Overrides, ScaleLayout};
use candiff::safetensors::MappedFile;
use candle_core::{DType, Device, Module, Tensor};
use common::fixtures;

fn dir() -> PathBuf {
    fixtures().join("flux2_tiny")
}

fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(rel), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes");
    candiff::doctor::rel_l2(&flat(a), &flat(b))
}

fn model_with(
    cfg_dir: &str,
    weights: &Path,
    dtype: DType,
    opts: Nvfp4Options,
    borrow: Option<&Path>,
) -> Flux2Transformer {
    let cfg = Flux2Config::from_file(&dir().join(cfg_dir).join("config.json")).unwrap();
    let ckpt = Arc::new(Checkpoint::open(weights, &Overrides::default()).unwrap());
    let naming = Naming::detect(ckpt.files.iter().flat_map(|f| f.header.tensors.keys()));
    let mut wb = WeightBuilder::new(ckpt, dtype, &Device::Cpu, opts).unwrap();
    if let Some(b) = borrow {
        wb = wb.with_borrowed_scales(Arc::new(MappedFile::open(b).unwrap()));
    }
    Flux2Transformer::new(&cfg, &wb, naming).unwrap()
}

/// Runs batch `b` of an io file; the trace collects intermediate tensors.
fn run(
    m: &Flux2Transformer,
    io: &HashMap<String, Tensor>,
    b: usize,
    dtype: DType,
) -> (Tensor, HashMap<String, Tensor>) {
    let g = |k: &str| io[&format!("b{b}.{k}")].clone();
    // Only row 0 of the ids is used (as in the reference).
    let ids = |k: &str| g(k).get(0).unwrap().to_dtype(DType::F32).unwrap();
    let guidance = io.get(&format!("b{b}.guidance")).cloned();
    let mut trace = HashMap::new();
    let out = m
        .forward_traced(
            &g("hidden_states"),
            &g("encoder_hidden_states"),
            &g("timestep"),
            guidance.as_ref(),
            &ids("img_ids"),
            &ids("txt_ids"),
            dtype,
            &mut |k, t| {
                trace.insert(k.to_string(), t.clone());
            },
        )
        .unwrap();
    (out, trace)
}

/// The fixture README's f32 tolerance for the transformer (f32 vs f64 of the model: 2e-7).
const TRANSFORMER_TOL: f32 = 1e-4;

#[test]
fn transformer_matches_diffusers_in_both_namings_dev_and_klein() {
    let cases = [
        ("transformer", "flux2_tiny_bfl.safetensors", "io.safetensors"),
        ("transformer_klein", "flux2_klein_tiny_bfl.safetensors", "io_klein.safetensors"),
    ];
    for (folder, bfl, io_name) in cases {
        let io = load(io_name);
        for weights in [dir().join(folder), dir().join(bfl)] {
            let m = model_with(folder, &weights, DType::F32, Nvfp4Options::default(), None);
            for b in [1, 2] {
                let (out, trace) = run(&m, &io, b, DType::F32);
                let r = rel_l2(&out, &io[&format!("b{b}.out")]);
                assert!(r <= TRANSFORMER_TOL, "{} b{b}: out rel L2 {r}", weights.display());
                let mut checked = 0;
                for (k, want) in io.iter().filter(|(k, _)| k.starts_with(&format!("b{b}.inter."))) {
                    let name = k.trim_start_matches(&format!("b{b}.inter."));
                    let Some(got) = trace.get(name) else { continue };
                    let r = rel_l2(got, want);
                    assert!(r <= TRANSFORMER_TOL, "{} b{b} {name}: rel L2 {r}", weights.display());
                    checked += 1;
                }
                let cfg = m.config();
                assert_eq!(checked, 1 + 2 * cfg.num_layers + cfg.num_single_layers, "{io_name} b{b}: traces checked");
            }
        }
    }
}

#[test]
fn rope_tables_match_the_reference() {
    let io = load("io.safetensors");
    let cfg = Flux2Config::from_file(&dir().join("transformer/config.json")).unwrap();
    let ids = Tensor::cat(&[io["b1.txt_ids"].get(0).unwrap(), io["b1.img_ids"].get(0).unwrap()], 0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let (cos, sin) =
        candiff::models::ops::rope_tables(&ids, &cfg.axes_dims_rope, cfg.rope_theta, &Device::Cpu).unwrap();
    // The reference repeats each frequency twice (interleaved pairs); ours holds one per pair.
    let rep = |t: &Tensor| t.unsqueeze(2).unwrap().repeat((1, 1, 2)).unwrap().flatten_from(1).unwrap();
    for (got, key) in [(rep(&cos), "b1.inter.rope_cos"), (rep(&sin), "b1.inter.rope_sin")] {
        let d = common::max_diff(&flat(&got), &flat(&io[key]));
        assert!(d <= 1e-6, "{key}: max diff {d}");
    }
}

#[test]
fn transformer_bf16_within_the_bf16_tolerance() {
    // We keep t and g in f32 for the sinusoids (diffusers rounds them to bf16 first), so `out`
    // (f32) is the reference; the fixture measures careful bf16 at rel L2 7e-3.
    let io = load("io.safetensors");
    let m = model_with("transformer", &dir().join("transformer"), DType::BF16, Nvfp4Options::default(), None);
    for b in [1, 2] {
        let (out, _) = run(&m, &io, b, DType::BF16);
        let r = rel_l2(&out, &io[&format!("b{b}.out")]);
        assert!(r <= 2e-2, "b{b}: rel L2 {r}");
    }
}

fn nvfp4_full() -> PathBuf {
    dir().join("flux2_tiny_nvfp4.safetensors")
}
fn nvfp4_mixed() -> PathBuf {
    dir().join("flux2_tiny_nvfp4_mixed.safetensors")
}

#[test]
fn nvfp4_files_are_read_with_the_inferred_layout() {
    for p in [nvfp4_full(), nvfp4_mixed()] {
        let ckpt = Checkpoint::open(&p, &Overrides::default()).unwrap();
        let plan = ckpt.plan.as_ref().expect("an NVFP4 plan");
        assert_eq!(plan.nibbles, NibbleOrder::High, "{}", p.display());
        assert_eq!(plan.scale_layout, ScaleLayout::Swizzled, "{}", p.display());
        // Every U8 weight with a scale is an NVFP4 layer; nothing else is.
        let f = &ckpt.files[0];
        let want: Vec<String> = f
            .header
            .tensors
            .keys()
            .filter(|k| k.ends_with(".weight_scale"))
            .map(|k| k.trim_end_matches(".weight_scale").to_string())
            .collect();
        let got: Vec<String> = plan.modules.keys().cloned().collect();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(got, want_sorted, "{}", p.display());
    }
    // The mixed file lacks some input scales, and the plan says so.
    let mixed = Checkpoint::open(&nvfp4_mixed(), &Overrides::default()).unwrap();
    let warnings = mixed.plan.as_ref().unwrap().warnings.join("\n");
    assert!(warnings.contains("input_scale"), "{warnings}");
}

#[test]
fn nvfp4_layers_match_the_per_layer_references_bit_for_bit_inputs() {
    let io = load("io_nvfp4.safetensors");
    let ckpt = Arc::new(Checkpoint::open(&nvfp4_full(), &Overrides::default()).unwrap());
    let modules: Vec<String> = ckpt.plan.as_ref().unwrap().modules.keys().cloned().collect();
    let mut checked = 0;
    for backend in Backend::ALL {
        for mode in [ActMode::W4A16, ActMode::W4A4] {
            let wb = WeightBuilder::new(
                ckpt.clone(),
                DType::F32,
                &Device::Cpu,
                Nvfp4Options { backend, mode, ..Default::default() },
            )
            .unwrap();
            for m in &modules {
                let key = |s: &str| format!("b1.layer.{m}.{s}");
                let x = &io[&key("x")];
                let want = &io[&key(if mode == ActMode::W4A4 { "y_w4a4" } else { "y_w4a16" })];
                let (k, n) = (x.dim(2).unwrap(), want.dim(2).unwrap());
                let mut wbm = wb.clone();
                for part in m.split('.') {
                    wbm = wbm.pp(part);
                }
                let lin = wbm.linear(k, n, false).unwrap();
                assert!(matches!(lin, Linear::Nvfp4(_)), "{m}");
                // The reference linear rounds its input to bf16 first.
                let xb = x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
                let y = lin.forward(&xb).unwrap();
                let r = rel_l2(&y, want);
                assert!(r <= 1e-5, "{m} {backend} {mode:?}: rel L2 {r}");
                if mode == ActMode::W4A4 && backend == Backend::Trtllm {
                    // The activation fake quantization is bit-exact.
                    let is = ckpt.load_nvfp4(m, None).unwrap().1.unwrap();
                    let mut fq = flat(&xb);
                    for row in fq.chunks_exact_mut(k) {
                        fake_quantize_row(row, is);
                    }
                    let want_fq = flat(&io[&key("x_fq")]);
                    assert!(fq.iter().zip(&want_fq).all(|(a, b)| a.to_bits() == b.to_bits()), "{m}: x_fq");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, modules.len() * Backend::ALL.len() * 2);
}

#[test]
fn nvfp4_transformer_matches_w4a16_and_w4a4_for_every_backend() {
    let io = load("io.safetensors");
    let q = load("io_nvfp4.safetensors");
    // The mixed file borrows its missing input scales from the full one (the reference assumes so).
    let files: [(PathBuf, Option<PathBuf>); 2] = [(nvfp4_full(), None), (nvfp4_mixed(), Some(nvfp4_full()))];
    for (file, borrow) in &files {
        for backend in Backend::ALL {
            for (mode, key, tol) in [(ActMode::W4A16, "out_w4a16", 1e-3), (ActMode::W4A4, "out_w4a4", 2e-2)] {
                let m = model_with(
                    "transformer",
                    file,
                    DType::F32,
                    Nvfp4Options { backend, mode, ..Default::default() },
                    borrow.as_deref(),
                );
                for b in [1, 2] {
                    let (out, _) = run(&m, &io, b, DType::F32);
                    let r = rel_l2(&out, &q[&format!("b{b}.{key}")]);
                    assert!(r <= tol, "{} {backend} {mode:?} b{b}: rel L2 {r}", file.display());
                }
            }
        }
    }
    // Without the borrowed scales the mixed file's W4A4 falls back to input_scale 1.0 for those
    // layers (with a warning) and lands visibly off the reference.
    let m = model_with(
        "transformer",
        &nvfp4_mixed(),
        DType::F32,
        Nvfp4Options { backend: Backend::Trtllm, mode: ActMode::W4A4, ..Default::default() },
        None,
    );
    let (out, _) = run(&m, &io, 1, DType::F32);
    let r = rel_l2(&out, &q["b1.out_w4a4"]);
    assert!(r > 2e-2, "mixed file without borrowed scales: rel L2 {r} (expected the fallback to show)");
}

fn encoder(folder: &str, layers: &[usize]) -> LlmEncoder {
    let p = dir().join(folder);
    let cfg = LlmConfig::from_file(&p.join("config.json")).unwrap();
    let ckpt = Arc::new(Checkpoint::open(&p, &Overrides::default()).unwrap());
    let prefix = detect_prefix(ckpt.files.iter().flat_map(|f| f.header.tensors.keys())).expect("decoder prefix");
    let wb = WeightBuilder::new(ckpt, DType::F32, &Device::Cpu, Nvfp4Options::default()).unwrap();
    let wb = prefix.trim_end_matches('.').split('.').filter(|s| !s.is_empty()).fold(wb, |w, s| w.pp(s));
    LlmEncoder::new(&cfg, &wb, layers.iter().copied().max().unwrap()).unwrap()
}

#[test]
fn prompt_embeddings_stack_the_right_layers() {
    let io = load("text_encoder_io.safetensors");
    for (folder, name, layers) in
        [("text_encoder_mistral3", "mistral3", &MISTRAL_LAYERS), ("text_encoder_qwen3", "qwen3", &QWEN3_LAYERS)]
    {
        let enc = encoder(folder, layers);
        let got = enc
            .hidden_states(
                &io[&format!("{name}.input_ids")],
                &io[&format!("{name}.attention_mask")],
                layers,
                DType::F32,
            )
            .unwrap();
        let r = rel_l2(&got, &io[&format!("{name}.prompt_embeds")]);
        assert!(r <= 1e-5, "{name}: rel L2 {r}");
    }
}

use candiff::models::flux::sampling::SchedulerConfig;
use candiff::models::flux2::sampling::{image_ids, pack, unpack};
use candiff::models::flux2::vae::{Flux2Vae, Flux2VaeConfig};
use candiff::pipelines::flux2::{sample, schedule, Guidance};

/// The fixture README's pipeline tolerance (latents, noise predictions, images).
const PIPELINE_TOL: f32 = 1e-4;

#[test]
fn pipelines_match_step_by_step_dev_and_klein() {
    let sched = SchedulerConfig::from_file(&dir().join("scheduler/scheduler_config.json")).unwrap();
    let vae_cfg = Flux2VaeConfig::from_file(&dir().join("vae/config.json")).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir().join("vae/diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let vae = Flux2Vae::new(&vae_cfg, vb).unwrap();
    for (folder, file, klein) in
        [("transformer", "pipeline.safetensors", false), ("transformer_klein", "pipeline_klein.safetensors", true)]
    {
        let p = load(file);
        let m = model_with(folder, &dir().join(folder), DType::F32, Nvfp4Options::default(), None);
        let lat_in = &p["latents_in"];
        let (_, _, lh, lw) = lat_in.dims4().unwrap();
        let x0 = pack(lat_in).unwrap();
        assert!(rel_l2(&x0, &p["latents.0"]) == 0.0, "{file}: packing");
        let ids = image_ids(lh, lw, &Device::Cpu).unwrap();
        let want_ids = p["latent_ids"].get(0).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(flat(&ids), flat(&want_ids), "{file}: latent ids");

        let steps = p["timesteps"].dim(0).unwrap();
        let (mu, sigmas, timesteps) = schedule(&sched, lh * lw, steps);
        let want_mu = p["mu"].to_vec1::<f64>().unwrap()[0];
        assert!((mu - want_mu).abs() <= 1e-12, "{file}: mu {mu} vs {want_mu}");
        let ulps = |a: &[f32], b: &[f32]| {
            a.iter().zip(b).map(|(x, y)| (x.to_bits() as i64 - y.to_bits() as i64).abs()).max().unwrap()
        };
        assert!(ulps(&sigmas, &flat(&p["sigmas"])) <= 1, "{file}: sigmas {sigmas:?}");
        assert!(ulps(&timesteps, &flat(&p["timesteps"])) <= 1, "{file}: timesteps {timesteps:?}");

        let g = p["guidance_scale"].to_vec1::<f32>().unwrap()[0];
        let (guidance, negative) = if klein {
            (Guidance::Cfg(g), Some(p["negative_prompt_embeds"].clone()))
        } else {
            (Guidance::Embedded(g), None)
        };
        let mut seen = 0;
        let x = sample(
            &m,
            x0,
            &p["prompt_embeds"],
            negative.as_ref(),
            &ids,
            &sigmas,
            &timesteps,
            guidance,
            DType::F32,
            &candiff::parallel::Plan::single(),
            |s| {
                let i = s.index - 1;
                let check = |got: &Tensor, key: &str| {
                    let r = rel_l2(got, &p[key]);
                    assert!(r <= PIPELINE_TOL, "{file} {key}: rel L2 {r}");
                };
                if klein {
                    check(s.cond, &format!("noise_pred_cond.{i}"));
                    check(s.uncond.expect("CFG"), &format!("noise_pred_uncond.{i}"));
                } else {
                    check(s.cond, &format!("noise_pred.{i}"));
                }
                check(s.latents, &format!("latents.{}", i + 1));
                seen += 1;
            },
        )
        .unwrap();
        assert_eq!(seen, steps);
        // Decode: the sampler's output through BN de-normalization, unpatchify and the decoder.
        let raw = vae.decode(&unpack(&x, lh, lw).unwrap(), DType::F32).unwrap();
        let r = rel_l2(&raw, &p["image_raw"]);
        assert!(r <= PIPELINE_TOL, "{file} image_raw: rel L2 {r}");
        let img = candiff::models::flux::vae::to_unit_images(&raw).unwrap().permute((0, 3, 1, 2)).unwrap();
        let r = rel_l2(&img, &p["image"]);
        assert!(r <= PIPELINE_TOL, "{file} image: rel L2 {r}");
    }
}
