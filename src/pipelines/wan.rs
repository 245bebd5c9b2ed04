//! Wan2.2 text-to-video from a diffusers-layout repository: UMT5 prompt embeddings, one or two
//! transformer experts (A14B: high-noise expert for t >= boundary * 1000, low-noise below, each
//! with its own guidance), UniPC or flow-Euler sampling with CFG, chunked causal-VAE decode.
//!
//! Memory: the text encoder is dropped before any transformer loads. The schedule's timesteps
//! only decrease, so an expert is never needed again once the next one takes over: each expert
//! is loaded when first needed and dropped when the other takes over; one resides at a time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

pub use super::RunStats;
use super::{gpu_used, tokenizer, vb, RunOptions};
use crate::error::CandiffError;
use crate::models::text::umt5::{Umt5Config, Umt5Encoder};
use crate::models::wan::scheduler::{Sampler, SchedulerConfig};
use crate::models::wan::vae::WanVae;
use crate::models::wan::{WanConfig, WanTransformer, WanVaeConfig};
use crate::parallel::Plan;

/// Frames per latent frame after the first (both Wan VAEs).
pub const FRAMES_PER_LATENT: usize = 4;

#[derive(Debug, Clone, Deserialize, Default)]
struct ModelIndex {
    #[serde(default)]
    boundary_ratio: Option<f64>,
    #[serde(default)]
    expand_timesteps: bool,
    #[serde(default)]
    transformer_2: Option<(Option<String>, Option<String>)>,
}

/// Where each component lives.
#[derive(Debug, Clone)]
pub struct WanFiles {
    pub root: PathBuf,
    pub text_encoder: PathBuf,
    /// `tokenizer.json` (absent in test fixtures that feed embeddings directly).
    pub tokenizer: PathBuf,
    pub transformer: PathBuf,
    /// The low-noise expert of a two-expert (A14B) model.
    pub transformer_2: Option<PathBuf>,
    pub vae: PathBuf,
    pub scheduler: PathBuf,
    pub boundary_ratio: Option<f64>,
    /// TI2V: per-token timesteps.
    pub expand_timesteps: bool,
    /// Random weights for every component (configs and the tokenizer only are read).
    pub random_weights: bool,
}

/// A component folder; tolerates a plain file holding a relative link target (symlinks
/// flattened by a copy tool), which is how some mirrors store them.
fn component(root: &Path, name: &str) -> PathBuf {
    let p = root.join(name);
    if p.is_file() {
        if let Ok(target) = std::fs::read_to_string(&p) {
            let target = target.trim();
            if !target.is_empty() && target.len() < 256 && !target.contains('\n') {
                let q = root.join(target);
                if q.is_dir() {
                    return q;
                }
            }
        }
    }
    p
}

impl WanFiles {
    /// Components of a diffusers root; `transformer` / `transformer_2` replace the experts.
    pub fn new(root: &Path, transformer: Option<&Path>, transformer_2: Option<&Path>) -> Result<Self> {
        let index_path = root.join("model_index.json");
        let index: ModelIndex = if index_path.is_file() {
            crate::error::read_json_config(&index_path, "model_index.json")?
        } else {
            ModelIndex::default()
        };
        let has_second = matches!(&index.transformer_2, Some((Some(_), Some(_)))) || transformer_2.is_some();
        Ok(Self {
            root: root.to_path_buf(),
            text_encoder: component(root, "text_encoder"),
            tokenizer: component(root, "tokenizer").join("tokenizer.json"),
            transformer: transformer.map(Path::to_path_buf).unwrap_or_else(|| component(root, "transformer")),
            transformer_2: has_second
                .then(|| transformer_2.map(Path::to_path_buf).unwrap_or_else(|| component(root, "transformer_2"))),
            vae: component(root, "vae"),
            scheduler: component(root, "scheduler").join("scheduler_config.json"),
            boundary_ratio: index.boundary_ratio,
            expand_timesteps: index.expand_timesteps,
            random_weights: false,
        })
    }

    /// The transformer config: the expert's own, else the base repository's.
    fn transformer_config(&self, dir: &Path) -> PathBuf {
        let own = dir.join("config.json");
        if own.is_file() {
            own
        } else {
            self.root.join("transformer/config.json")
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct T2vRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub steps: usize,
    /// Guidance of the (high-noise) first expert.
    pub guidance: f64,
    /// Guidance of the low-noise expert (defaults to `guidance`).
    pub guidance_2: Option<f64>,
    /// Overrides the repository's `boundary_ratio`.
    pub boundary: Option<f64>,
    /// Overrides the scheduler's shift.
    pub flow_shift: Option<f64>,
    pub seed: u64,
    pub max_sequence_length: usize,
}

/// Latent geometry of a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub channels: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

/// What the caller sees after each step.
pub struct StepReport<'a> {
    pub index: usize,
    pub steps: usize,
    pub timestep: f32,
    /// 0 = first (high-noise) expert, 1 = second.
    pub expert: usize,
    pub guidance: f64,
    pub cond: &'a Tensor,
    pub uncond: Option<&'a Tensor>,
    pub latents: &'a Tensor,
}

#[derive(Clone)]
pub struct WanRun<'a> {
    pub files: &'a WanFiles,
    pub opts: RunOptions<'a>,
}

/// Whitespace cleanup of the reference's prompt cleaning.
fn clean(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl WanRun<'_> {
    /// Validates the request against the model's configs (cheap: reads only JSON files).
    pub fn geometry(&self, req: &T2vRequest) -> Result<Geometry> {
        let vae = WanVaeConfig::from_file(&self.files.vae.join("config.json"))?;
        let tcfg = WanConfig::from_file(&self.files.transformer_config(&self.files.transformer))?;
        let s = vae.spatial_factor();
        let [_, ph, pw] = tcfg.patch_size;
        let (mh, mw) = (s * ph, s * pw);
        if req.height == 0 || req.width == 0 || !req.height.is_multiple_of(mh) || !req.width.is_multiple_of(mw) {
            return Err(CandiffError::Unsupported(format!(
                "height and width must be positive multiples of {mh} and {mw} for this model (VAE x{s} times patch {ph}x{pw}), found {}x{}",
                req.width, req.height
            ))
            .into());
        }
        if req.frames == 0 || !(req.frames - 1).is_multiple_of(FRAMES_PER_LATENT) {
            let lo = (req.frames.saturating_sub(1) / FRAMES_PER_LATENT) * FRAMES_PER_LATENT + 1;
            return Err(CandiffError::Unsupported(format!(
                "frames must be {FRAMES_PER_LATENT}k+1 (e.g. {lo} or {}), found {}",
                lo + FRAMES_PER_LATENT,
                req.frames
            ))
            .into());
        }
        if vae.z_dim != tcfg.in_channels {
            return Err(CandiffError::Unsupported(format!(
                "the VAE's latent has {} channels, the transformer takes {}: mismatched components",
                vae.z_dim, tcfg.in_channels
            ))
            .into());
        }
        Ok(Geometry {
            channels: vae.z_dim,
            frames: (req.frames - 1) / FRAMES_PER_LATENT + 1,
            height: req.height / s,
            width: req.width / s,
        })
    }

    /// UMT5 embeddings `[1, max_len, d]` of each text (rows past the prompt zeroed); the encoder
    /// is freed before returning.
    pub fn encode(&self, texts: &[&str], max_len: usize) -> Result<Vec<Tensor>> {
        let dir = &self.files.text_encoder;
        let cfg = Umt5Config::from_file(&dir.join("config.json"))?;
        let dtype = if self.opts.dtype == DType::F16 { DType::BF16 } else { self.opts.dtype };
        let tok = tokenizer(&self.files.tokenizer)?;
        let enc = Umt5Encoder::new(&cfg, self.weights(dir, dtype)?)?;
        texts
            .iter()
            .map(|t| {
                let e = tok.encode(clean(t), true).map_err(|e| candle_core::Error::Msg(format!("tokenizer: {e}")))?;
                let mut ids: Vec<u32> = e.get_ids().to_vec();
                ids.truncate(max_len);
                let n = ids.len();
                ids.resize(max_len, 0);
                let mask: Vec<u32> = (0..max_len).map(|i| (i < n) as u32).collect();
                let ids = Tensor::new(ids, self.opts.device)?.unsqueeze(0)?;
                let mask = Tensor::new(mask, self.opts.device)?.unsqueeze(0)?;
                enc.prompt_embeds(&ids, &mask)
            })
            .collect()
    }

    /// A component's weights: its folder's, or random ones.
    fn weights<'a>(&self, dir: &Path, dtype: DType) -> Result<candle_nn::VarBuilder<'a>> {
        if self.files.random_weights {
            return Ok(crate::linear::random_var_builder(dtype, self.opts.device));
        }
        vb(dir, dtype, self.opts.device)
    }

    fn load_expert(&self, dir: &Path) -> Result<WanTransformer> {
        let cfg = WanConfig::from_file(&self.files.transformer_config(dir))?;
        let wb = if self.files.random_weights {
            // Under the expert's folder name: the two experts share module names, and random
            // weights are drawn per name.
            let expert = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            self.opts.random_weights(Vec::new()).pp(expert)
        } else {
            self.opts.transformer_weights(dir)?.0
        };
        WanTransformer::new(&cfg, &wb)
    }

    /// The sampling loop from `latents` (`[1, C, F, h, w]` f32). `cond`/`uncond`: prompt and
    /// negative embeddings (`uncond` is required when guidance > 1).
    pub fn denoise(
        &self,
        req: &T2vRequest,
        cond: &Tensor,
        uncond: Option<&Tensor>,
        latents: Tensor,
        stats: &mut RunStats,
        mut on_step: impl FnMut(&StepReport),
    ) -> Result<Tensor> {
        let sched_cfg = SchedulerConfig::from_file(&self.files.scheduler)?;
        let mut sampler = Sampler::new(&sched_cfg, req.steps, req.flow_shift)?;
        let boundary = req.boundary.or(self.files.boundary_ratio).filter(|_| self.files.transformer_2.is_some());
        let boundary_t = boundary.map(|b| b * sched_cfg.num_train_timesteps as f64);
        let do_cfg = req.guidance > 1.0;
        if do_cfg && uncond.is_none() {
            candle_core::bail!("guidance > 1 needs negative-prompt embeddings");
        }
        let heads = WanConfig::from_file(&self.files.transformer_config(&self.files.transformer))?.num_attention_heads;
        let plan = Plan::of(self.opts.world, heads, do_cfg)?;
        let timesteps = sampler.timesteps().to_vec();
        let mut x = latents.to_dtype(DType::F32)?;
        let mut loaded: Option<(usize, WanTransformer)> = None;
        let mut peak = gpu_used(self.opts.device);
        for (i, &t) in timesteps.iter().enumerate() {
            let ts = Instant::now();
            let expert = match boundary_t {
                Some(bt) if (t as f64) < bt => 1,
                _ => 0,
            };
            let guidance = if expert == 1 { req.guidance_2.unwrap_or(req.guidance) } else { req.guidance };
            if loaded.as_ref().map(|(e, _)| *e) != Some(expert) {
                // Free the previous expert first: it is never needed again.
                drop(loaded.take());
                let tl = Instant::now();
                let dir =
                    if expert == 0 { &self.files.transformer } else { self.files.transformer_2.as_ref().expect("set") };
                loaded = Some((expert, self.load_expert(dir)?));
                stats.load_s += tl.elapsed().as_secs_f64();
                stats.experts.push(expert);
            }
            let model = &loaded.as_ref().expect("loaded").1;
            // TI2V's per-token timesteps are all `t` in text-to-video: the per-sample form is
            // the same computation.
            let tt = Tensor::new(&[t], self.opts.device)?;
            let (cond_v, uncond_v) = plan.guided(do_cfg, |branch| {
                let ctx = if branch == 1 { uncond.expect("checked") } else { cond };
                model.forward_sharded(&x, &tt, ctx, self.opts.dtype, plan.sp.as_ref())
            })?;
            let v = match &uncond_v {
                Some(u) => (u + ((&cond_v - u)? * guidance)?)?,
                None => cond_v.clone(),
            };
            plan.fence()?;
            x = sampler.step(&v, &x)?;
            self.opts.device.synchronize()?;
            if let (Some(p), Some(now)) = (peak.as_mut(), gpu_used(self.opts.device)) {
                *p = (*p).max(now);
            }
            stats.step_s.push(ts.elapsed().as_secs_f64());
            on_step(&StepReport {
                index: i,
                steps: timesteps.len(),
                timestep: t,
                expert,
                guidance,
                cond: &cond_v,
                uncond: uncond_v.as_ref(),
                latents: &x,
            });
        }
        stats.peak_gpu_bytes = match (stats.peak_gpu_bytes, peak) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(x)
    }

    /// Latents -> frames `[F, H, W, 3]` in [0, 1] (f32, on the CPU); `on_chunk(i, n)` per latent frame.
    pub fn decode(&self, latents: &Tensor, on_chunk: impl FnMut(usize, usize)) -> Result<Tensor> {
        let cfg = WanVaeConfig::from_file(&self.files.vae.join("config.json"))?;
        let dtype = vae_dtype(self.opts.device, self.opts.dtype);
        let vae = WanVae::new(&cfg, self.weights(&self.files.vae, dtype)?, false)?;
        let z = vae.denormalize(latents)?.to_dtype(dtype)?;
        let video = vae.decode(&z, on_chunk)?;
        // [1, 3, F, H, W] -> [F, H, W, 3], (v + 1) / 2 clamped.
        let video = ((video.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        video.squeeze(0)?.permute((1, 2, 3, 0))?.to_device(&Device::Cpu)?.contiguous()
    }

    /// Text to frames `[F, H, W, 3]` in [0, 1] (in a run of several ranks, on rank 0; the others
    /// return no frames).
    pub fn generate(
        &self,
        req: &T2vRequest,
        on_step: impl FnMut(&StepReport),
        on_chunk: impl FnMut(usize, usize),
    ) -> Result<(Tensor, RunStats)> {
        let t0 = Instant::now();
        let g = self.geometry(req)?;
        let mut stats = RunStats::default();
        let texts: Vec<&str> =
            if req.guidance > 1.0 { vec![&req.prompt, &req.negative_prompt] } else { vec![&req.prompt] };
        // Rank 0's values everywhere (see `from_root`).
        let agree = |t: Tensor| crate::parallel::from_root(self.opts.world, t);
        let mut embeds = self.encode(&texts, req.max_sequence_length)?.into_iter();
        let cond = agree(embeds.next().expect("one prompt"))?;
        let uncond = embeds.next().map(agree).transpose()?;
        stats.encode_s = t0.elapsed().as_secs_f64();
        stats.peak_gpu_bytes = gpu_used(self.opts.device);

        let latents = agree(initial_latents(req.seed, g, self.opts.device)?)?;
        let x = self.denoise(req, &cond, uncond.as_ref(), latents, &mut stats, on_step)?;
        drop((cond, uncond));
        // Only rank 0 decodes and writes.
        if let Some(none) = crate::parallel::no_output(self.opts.world, req.height, req.width)? {
            stats.total_s = t0.elapsed().as_secs_f64();
            return Ok((none, stats));
        }

        let t2 = Instant::now();
        let frames = self.decode(&x, on_chunk)?;
        stats.decode_s = t2.elapsed().as_secs_f64();
        if let (Some(p), Some(now)) = (stats.peak_gpu_bytes.as_mut(), gpu_used(self.opts.device)) {
            *p = (*p).max(now);
        }
        stats.total_s = t0.elapsed().as_secs_f64();
        Ok((frames, stats))
    }
}

/// The VAE's dtype: the run's on the GPU, f32 on the CPU (Candle's CPU convolutions are f32).
pub fn vae_dtype(device: &Device, dtype: DType) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        dtype
    }
}

/// Standard normal latents `[1, C, F, h, w]` from the seed, drawn on the CPU so every device
/// starts from the same noise.
pub fn initial_latents(seed: u64, g: Geometry, device: &Device) -> Result<Tensor> {
    let mut rng = crate::rng::Rng::new(seed);
    let n = g.channels * g.frames * g.height * g.width;
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, (1, g.channels, g.frames, g.height, g.width), &Device::Cpu)?.to_device(device)
}
