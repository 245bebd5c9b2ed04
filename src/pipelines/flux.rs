//! FLUX.1 text-to-image from a diffusers-layout repository (local folder or Hub snapshot), with an
//! optional transformer override (folder or single file, diffusers or BFL names, bf16 or NVFP4).
//!
//! Memory: each text encoder is loaded, run and dropped before the transformer loads.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};

pub use super::RunStats;
use super::{tokenizer, vb, RunOptions};
use crate::models::flux::sampling::{
    euler_step, image_ids, initial_noise, pack_latents, unpack_latents, SchedulerConfig,
};
use crate::models::flux::vae::{to_unit_images, FluxVae, VaeConfig};
use crate::models::flux::{FluxConfig, FluxTransformer};
use crate::models::text::clip::{ClipConfig, ClipText};
use crate::models::text::t5::{T5Config, T5Encoder};
use crate::parallel::Plan;

/// CLIP's context length in every FLUX.1 release (the position table may be smaller in toy models).
const CLIP_MAX_TOKENS: usize = 77;

/// Where each component lives.
#[derive(Debug, Clone)]
pub struct FluxFiles {
    pub root: PathBuf,
    /// Transformer folder (with config.json) or single `.safetensors` file.
    pub transformer: PathBuf,
    /// The transformer's config (from the base repository when the override has none).
    pub transformer_config: PathBuf,
    /// CLIP's tokenizer.json.
    pub clip_tokenizer: PathBuf,
    /// Random weights for every component (configs and tokenizers only are read).
    pub random_weights: bool,
    /// With random weights: the transformer linears made random NVFP4 layers (names containing one
    /// of these; the manifest's `random_nvfp4`).
    pub random_nvfp4: Vec<String>,
}

impl FluxFiles {
    pub fn new(root: &Path, transformer: Option<&Path>) -> Self {
        let base_tr = root.join("transformer");
        let transformer = transformer.map(Path::to_path_buf).unwrap_or_else(|| base_tr.clone());
        let own = if transformer.is_dir() { transformer.join("config.json") } else { PathBuf::new() };
        let transformer_config = if own.is_file() { own } else { base_tr.join("config.json") };
        let clip_tokenizer = root.join("tokenizer/tokenizer.json");
        Self {
            root: root.to_path_buf(),
            transformer,
            transformer_config,
            clip_tokenizer,
            random_weights: false,
            random_nvfp4: Vec::new(),
        }
    }

    /// The weights of component `dir` (`text_encoder`, `vae`, ...).
    fn weights<'a>(&self, dir: &str, dtype: DType, device: &Device) -> Result<candle_nn::VarBuilder<'a>> {
        if self.random_weights {
            return Ok(crate::linear::random_var_builder(dtype, device));
        }
        vb(&self.root.join(dir), dtype, device)
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct T2iRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// True classifier-free guidance scale (used with a negative prompt; 1 disables it).
    pub true_cfg: f64,
    pub seed: u64,
    pub batch: usize,
    pub max_sequence_length: usize,
}

/// Token ids `[1, len]`: the tokenizer's own special tokens, truncated to `len` (keeping the
/// final EOS), padded with `pad`.
fn encode(tok: &tokenizers::Tokenizer, text: &str, len: usize, pad: u32, device: &Device) -> Result<Tensor> {
    let enc = tok.encode(text, true).map_err(|e| candle_core::Error::Msg(format!("tokenizer: {e}")))?;
    let mut ids: Vec<u32> = enc.get_ids().to_vec();
    if ids.len() > len {
        let last = *ids.last().expect("non-empty");
        ids.truncate(len);
        ids[len - 1] = last;
    }
    ids.resize(len, pad);
    Tensor::new(ids, device)?.unsqueeze(0)
}

fn pad_id(tok: &tokenizers::Tokenizer, candidates: &[&str]) -> Result<u32> {
    candidates
        .iter()
        .find_map(|t| tok.token_to_id(t))
        .ok_or_else(|| candle_core::Error::Msg(format!("the tokenizer has none of the padding tokens {candidates:?}")))
}

fn json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    Ok(crate::error::read_json_config(path, "config.json")?)
}

/// Prompt embeddings: (T5 `[1, L, 4096]`, CLIP pooled `[1, 768]`), each encoder freed after use.
pub fn encode_prompt(
    files: &FluxFiles,
    prompt: &str,
    max_len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let root = &files.root;
    let clip_cfg: ClipConfig = json(&root.join("text_encoder/config.json"))?;
    let pooled = {
        let tok = tokenizer(&files.clip_tokenizer)?;
        let pad = pad_id(&tok, &["<|endoftext|>"])?;
        let ids = encode(&tok, prompt, CLIP_MAX_TOKENS.min(clip_cfg.max_position_embeddings), pad, device)?;
        let clip = ClipText::new(&clip_cfg, files.weights("text_encoder", dtype, device)?)?;
        clip.forward(&ids)?.1
    };
    let t5_dtype = if dtype == DType::F16 { DType::BF16 } else { dtype };
    let embeds = {
        let tok = tokenizer(&root.join("tokenizer_2/tokenizer.json"))?;
        let pad = pad_id(&tok, &["<pad>"])?;
        let ids = encode(&tok, prompt, max_len, pad, device)?;
        let cfg: T5Config = json(&root.join("text_encoder_2/config.json"))?;
        let mut t5 = T5Encoder::new(&cfg, files.weights("text_encoder_2", t5_dtype, device)?)?;
        t5.forward(&ids)?
    };
    Ok((embeds, pooled))
}

#[derive(Clone)]
pub struct FluxRun<'a> {
    pub files: &'a FluxFiles,
    pub opts: RunOptions<'a>,
}

impl FluxRun<'_> {
    /// Generates `req.batch` images `[B, H, W, 3]` in [0, 1]; `on_step(i, n, packed latents)` after
    /// every step. In a run of several ranks only rank 0 decodes: the others return no images
    /// (`[0, H, W, 3]`).
    pub fn generate(
        &self,
        req: &T2iRequest,
        mut on_step: impl FnMut(usize, usize, &Tensor),
    ) -> Result<(Tensor, RunStats)> {
        let t0 = Instant::now();
        let mut stats = RunStats::default();
        let mut peak = super::PeakMemory::start(self.opts.device);
        let root = &self.files.root;
        let vae_cfg = VaeConfig::from_file(&root.join("vae/config.json"))?;
        // VAE downscale, then 2x2 packing.
        super::check_size(req.width, req.height, vae_cfg.downscale() * 2)?;
        let cfg = FluxConfig::from_file(&self.files.transformer_config)?;
        let with_cfg = req.negative_prompt.is_some() && req.true_cfg > 1.0;
        // How the ranks split the work, checked before anything loads.
        let plan = Plan::of(self.opts.world, cfg.num_attention_heads, with_cfg)?;
        // Rank 0's values everywhere (see `from_root`).
        let agree = |t: Tensor| crate::parallel::from_root(self.opts.world, t);
        let (embeds, pooled) =
            encode_prompt(self.files, &req.prompt, req.max_sequence_length, self.opts.dtype, self.opts.device)?;
        let (embeds, pooled) = (agree(embeds)?, agree(pooled)?);
        let negative = match (&req.negative_prompt, with_cfg) {
            (Some(n), true) => {
                let (e, p) = encode_prompt(self.files, n, req.max_sequence_length, self.opts.dtype, self.opts.device)?;
                Some((agree(e)?, agree(p)?))
            }
            _ => None,
        };
        peak.sample(self.opts.device);
        stats.encode_s = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let (wb, naming) = if self.files.random_weights {
            (self.opts.random_weights(self.files.random_nvfp4.clone()), crate::models::flux::Naming::Diffusers)
        } else {
            self.opts.transformer_weights(&self.files.transformer)?
        };
        let model = FluxTransformer::new(&cfg, &wb, naming)?;
        peak.sample(self.opts.device);
        stats.load_s = t1.elapsed().as_secs_f64();

        let sched = SchedulerConfig::from_file(&root.join("scheduler/scheduler_config.json"))?;
        let (lh, lw) = (req.height / vae_cfg.downscale(), req.width / vae_cfg.downscale());
        let channels = cfg.in_channels / 4;
        let b = req.batch.max(1);
        let mut x = agree(pack_latents(&initial_noise(req.seed, (b, channels, lh, lw), self.opts.device)?)?)?;
        let ids = image_ids(lh, lw, self.opts.device)?;
        let txt_ids = Tensor::zeros((embeds.dim(1)?, 3), DType::F32, self.opts.device)?;
        let mu = sched.use_dynamic_shifting.then(|| sched.mu(ids.dim(0).unwrap_or(0)));
        let (sigmas, timesteps) = sched.schedule(req.steps, mu);
        let rep = |t: &Tensor| t.repeat((b, 1, 1));
        let (embeds, pooled) = (rep(&embeds)?, pooled.repeat((b, 1))?);
        let negative = match negative {
            Some((e, p)) => Some((rep(&e)?, p.repeat((b, 1))?)),
            None => None,
        };
        let guidance =
            cfg.guidance_embeds.then(|| Tensor::full(req.guidance as f32, b, self.opts.device)).transpose()?;
        for i in 0..timesteps.len() {
            let ts = Instant::now();
            let t = Tensor::full(timesteps[i] / 1000.0, b, self.opts.device)?;
            let (v, nv) = plan.guided(negative.is_some(), |branch| {
                let (e, p) = match (branch, &negative) {
                    (1, Some((ne, np))) => (ne, np),
                    _ => (&embeds, &pooled),
                };
                let sp = plan.sp.as_ref();
                model.forward_sharded(&x, e, p, &t, guidance.as_ref(), &ids, &txt_ids, self.opts.dtype, sp)
            })?;
            let v = match nv {
                Some(nv) => (&nv + ((v - &nv)? * req.true_cfg)?)?,
                None => v,
            };
            plan.fence()?;
            x = euler_step(&x, &v, sigmas[i], sigmas[i + 1])?;
            self.opts.device.synchronize()?;
            peak.sample(self.opts.device);
            stats.step_s.push(ts.elapsed().as_secs_f64());
            on_step(i + 1, timesteps.len(), &x);
        }
        drop(model);
        // Only rank 0 decodes and writes.
        if let Some(none) = crate::parallel::no_output(self.opts.world, req.height, req.width)? {
            stats.total_s = t0.elapsed().as_secs_f64();
            stats.peak_gpu_bytes = peak.get();
            return Ok((none, stats));
        }

        let t2 = Instant::now();
        let vae_dtype = FluxVae::dtype_on(self.opts.device, self.opts.dtype);
        let vae = FluxVae::new(&vae_cfg, self.files.weights("vae", vae_dtype, self.opts.device)?)?;
        let z = vae.denormalize(&unpack_latents(&x, lh, lw)?)?;
        let images = to_unit_images(&vae.decode(&z, vae_dtype)?)?;
        peak.sample(self.opts.device);
        stats.decode_s = t2.elapsed().as_secs_f64();
        stats.total_s = t0.elapsed().as_secs_f64();
        stats.peak_gpu_bytes = peak.get();
        Ok((images, stats))
    }
}
