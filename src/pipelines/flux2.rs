//! FLUX.2 text-to-image (dev: Mistral-Small-3.2 conditioning, guidance embedded; klein: Qwen3
//! conditioning, true CFG for the base models, none for the distilled ones) from a diffusers-layout
//! repository, with an optional transformer override (e.g. the official BFL NVFP4 single file).
//!
//! Memory: the text encoder is loaded, run and dropped before the transformer loads. The 24B
//! Mistral encoder can be quantized to NVFP4 while loading (~14 GB instead of ~48 GB) or run on
//! the CPU; which one ran is reported.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};

pub use super::RunStats;
use super::{tokenizer, RunOptions};
use crate::error::CandiffError;
use crate::linear::{LoadHooks, Nvfp4Options, QuantizeSpec, WeightBuilder};
use crate::models::flux::sampling::{euler_step, initial_noise, SchedulerConfig};
use crate::models::flux2::sampling::{empirical_mu, image_ids, model_timestep, pack, text_ids, unpack};
use crate::models::flux2::vae::{Flux2Vae, Flux2VaeConfig};
use crate::models::flux2::{Flux2Config, Flux2Transformer};
use crate::models::text::llm::{detect_prefix, LlmConfig, LlmEncoder, MISTRAL_LAYERS, QWEN3_LAYERS};
use crate::nvfp4::{Checkpoint, Overrides};
use crate::parallel::Plan;

/// FLUX.2-dev's system message for the Mistral chat template (from the reference pipeline).
const MISTRAL_SYSTEM_MESSAGE: &str = "You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships, object attribution and actions without speculation.";

/// Which text encoder family conditions the transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// FLUX.2-dev: Mistral-Small-3.2, layers 10/20/30, left padding, system message.
    Mistral,
    /// FLUX.2-klein: Qwen3, layers 9/18/27, right padding, no thinking.
    Qwen3,
}

impl TextEncoderKind {
    /// From the encoder's `config.json` `model_type` (`mistral3` / `mistral` / `qwen3`).
    pub fn detect(cfg_path: &Path) -> Result<Self> {
        let v: serde_json::Value = crate::error::read_json_config(cfg_path, "text encoder config.json")?;
        let ty = v.get("model_type").and_then(|t| t.as_str()).unwrap_or_default();
        match ty {
            "mistral3" | "mistral" => Ok(Self::Mistral),
            "qwen3" => Ok(Self::Qwen3),
            other => Err(CandiffError::bad_config(
                cfg_path.display(),
                format!("text encoder model_type `{other}`; FLUX.2 uses `mistral3` (dev) or `qwen3` (klein)"),
                "Point at a FLUX.2 repository.",
            )
            .into()),
        }
    }

    pub fn layers(self) -> &'static [usize] {
        match self {
            Self::Mistral => &MISTRAL_LAYERS,
            Self::Qwen3 => &QWEN3_LAYERS,
        }
    }

    /// The prompt in the model's chat template (as `apply_chat_template` renders it).
    pub fn chat(self, prompt: &str) -> String {
        match self {
            // The reference strips image placeholders before templating.
            Self::Mistral => format!(
                "<s>[SYSTEM_PROMPT]{MISTRAL_SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{}[/INST]",
                prompt.replace("[IMG]", "")
            ),
            Self::Qwen3 => {
                format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
            }
        }
    }

    fn default_left_padding(self) -> bool {
        self == Self::Mistral
    }

    fn pad_candidates(self) -> &'static [&'static str] {
        match self {
            Self::Mistral => &["<pad>"],
            Self::Qwen3 => &["<|endoftext|>"],
        }
    }
}

/// Where and how the text encoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncoderMode {
    /// The run's dtype on the run's device.
    #[default]
    Native,
    /// Decoder linears quantized to NVFP4 while loading (W4A16), on the run's device.
    Nvfp4,
    /// f32 on the CPU (slow, needs no GPU memory).
    Cpu,
}

impl std::fmt::Display for EncoderMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EncoderMode::Native => "native",
            EncoderMode::Nvfp4 => "nvfp4",
            EncoderMode::Cpu => "cpu",
        })
    }
}

impl std::str::FromStr for EncoderMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "native" | "bf16" => Ok(Self::Native),
            "nvfp4" => Ok(Self::Nvfp4),
            "cpu" => Ok(Self::Cpu),
            other => Err(format!("unknown text encoder mode `{other}` (expected native, nvfp4 or cpu)")),
        }
    }
}

/// Where each component lives.
#[derive(Debug, Clone)]
pub struct Flux2Files {
    pub root: PathBuf,
    /// Transformer folder (with config.json) or single `.safetensors` file.
    pub transformer: PathBuf,
    pub transformer_config: PathBuf,
}

impl Flux2Files {
    pub fn new(root: &Path, transformer: Option<&Path>) -> Self {
        let base_tr = root.join("transformer");
        let transformer = transformer.map(Path::to_path_buf).unwrap_or_else(|| base_tr.clone());
        let own = if transformer.is_dir() { transformer.join("config.json") } else { PathBuf::new() };
        let transformer_config = if own.is_file() { own } else { base_tr.join("config.json") };
        Self { root: root.to_path_buf(), transformer, transformer_config }
    }
}

/// Token ids and mask `[n, len]` for `texts` in the encoder's chat template, truncated to `len`
/// and padded on the tokenizer's side.
pub fn tokenize(
    files: &Flux2Files,
    kind: TextEncoderKind,
    texts: &[&str],
    len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let dir = files.root.join("tokenizer");
    let tok = tokenizer(&dir.join("tokenizer.json"))?;
    let tok_cfg: Option<serde_json::Value> =
        std::fs::read_to_string(dir.join("tokenizer_config.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let left = match tok_cfg.as_ref().and_then(|c| c.get("padding_side")).and_then(|s| s.as_str()) {
        Some(side) => side == "left",
        None => kind.default_left_padding(),
    };
    let enc_cfg = LlmConfig::from_file(&files.root.join("text_encoder/config.json"))?;
    let pad = match enc_cfg.pad_token_id {
        Some(p) => p,
        None => kind.pad_candidates().iter().find_map(|t| tok.token_to_id(t)).ok_or_else(|| {
            candle_core::Error::Msg(format!("the tokenizer has none of the padding tokens {:?}", kind.pad_candidates()))
        })?,
    };
    let (mut ids, mut mask): (Vec<i64>, Vec<i64>) =
        (Vec::with_capacity(texts.len() * len), Vec::with_capacity(texts.len() * len));
    for text in texts {
        // The template already holds the special tokens.
        let enc = tok.encode(kind.chat(text), false).map_err(|e| candle_core::Error::Msg(format!("tokenizer: {e}")))?;
        let mut t: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        t.truncate(len);
        let padding = vec![pad as i64; len - t.len()];
        let (valid, pads) = (vec![1i64; t.len()], vec![0i64; len - t.len()]);
        if left {
            ids.extend(padding.iter().chain(&t));
            mask.extend(pads.iter().chain(&valid));
        } else {
            ids.extend(t.iter().chain(&padding));
            mask.extend(valid.iter().chain(&pads));
        }
    }
    let n = texts.len();
    Ok((Tensor::from_vec(ids, (n, len), device)?, Tensor::from_vec(mask, (n, len), device)?))
}

/// Prompt embeddings `[n, len, 3 * hidden]` for `texts`, the encoder freed afterwards. Returns the
/// embeddings (on `device`, in `dtype`) and a description of how the encoder ran.
pub fn encode_prompts(
    files: &Flux2Files,
    texts: &[&str],
    len: usize,
    mode: EncoderMode,
    dtype: DType,
    device: &Device,
    nvfp4: Nvfp4Options,
) -> Result<(Tensor, String)> {
    let dir = files.root.join("text_encoder");
    let kind = TextEncoderKind::detect(&dir.join("config.json"))?;
    let cfg = LlmConfig::from_file(&dir.join("config.json"))?;
    let (enc_device, enc_dtype) = match mode {
        EncoderMode::Cpu => (Device::Cpu, DType::F32),
        _ => (device.clone(), dtype),
    };
    let (ids, mask) = tokenize(files, kind, texts, len, &enc_device)?;
    let ckpt = Arc::new(Checkpoint::open(&dir, &Overrides::default())?);
    let prefix = detect_prefix(ckpt.files.iter().flat_map(|f| f.header.tensors.keys())).ok_or_else(|| {
        CandiffError::bad_config(
            dir.display(),
            "no `embed_tokens.weight` under a known prefix",
            "Re-download the text encoder.",
        )
    })?;
    let mut hooks = LoadHooks::default();
    if mode == EncoderMode::Nvfp4 {
        hooks.quantize = Some(Arc::new(QuantizeSpec { include: vec!["layers.".into()], ..Default::default() }));
    }
    let opts = Nvfp4Options { mode: crate::nvfp4::ActMode::W4A16, ..nvfp4 };
    let wb = WeightBuilder::new(ckpt, enc_dtype, &enc_device, opts)?.with_hooks(hooks);
    let wb = prefix.split('.').filter(|s| !s.is_empty()).fold(wb, |w, s| w.pp(s));
    let layers = kind.layers();
    let enc = LlmEncoder::new(&cfg, &wb, layers.iter().copied().max().unwrap_or(0))?;
    let out = enc.hidden_states(&ids, &mask, layers, enc_dtype)?;
    let what = format!(
        "{} ({} layers of {}) {}",
        match kind {
            TextEncoderKind::Mistral => "Mistral",
            TextEncoderKind::Qwen3 => "Qwen3",
        },
        layers.iter().max().unwrap_or(&0),
        cfg.num_hidden_layers,
        match mode {
            EncoderMode::Native => format!("in {dtype:?} on {}", if device.is_cuda() { "the GPU" } else { "the CPU" }),
            EncoderMode::Nvfp4 => "quantized to NVFP4 at load (W4A16)".into(),
            EncoderMode::Cpu => "in f32 on the CPU".into(),
        }
    );
    drop(enc);
    Ok((out.to_device(device)?.to_dtype(dtype)?, what))
}

/// How the two conditionings combine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guidance {
    /// Guidance-distilled dev: the scale goes into the transformer.
    Embedded(f32),
    /// klein base: `v_u + g (v_c - v_u)` with the negative prompt.
    Cfg(f32),
    /// Distilled klein: one conditional pass.
    None,
}

/// What each step reports.
pub struct StepOut<'a> {
    pub index: usize,
    pub steps: usize,
    pub cond: &'a Tensor,
    pub uncond: Option<&'a Tensor>,
    pub latents: &'a Tensor,
}

/// The sigma schedule for `steps` steps over `image_tokens` tokens: (mu, sigmas + final 0,
/// timesteps = 1000 sigma).
pub fn schedule(sched: &SchedulerConfig, image_tokens: usize, steps: usize) -> (f64, Vec<f32>, Vec<f32>) {
    let mu = empirical_mu(image_tokens, steps);
    let (sigmas, timesteps) = sched.schedule(steps, Some(mu));
    (mu, sigmas, timesteps)
}

/// Euler sampling of packed latents `x` `[B, S, C]` (f32) from `embeds` (and `negative` for CFG).
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &Flux2Transformer,
    mut x: Tensor,
    embeds: &Tensor,
    negative: Option<&Tensor>,
    img_ids: &Tensor,
    sigmas: &[f32],
    timesteps: &[f32],
    guidance: Guidance,
    dtype: DType,
    plan: &Plan,
    mut on_step: impl FnMut(StepOut),
) -> Result<Tensor> {
    let (b, device) = (x.dim(0)?, x.device().clone());
    let txt_ids = text_ids(embeds.dim(1)?, &device)?;
    let g = match guidance {
        Guidance::Embedded(g) => Some(Tensor::full(g, b, &device)?),
        _ => None,
    };
    let neg_ids = negative.map(|n| text_ids(n.dim(1).unwrap_or(0), &device)).transpose()?;
    for (i, &ts) in timesteps.iter().enumerate() {
        let t = model_timestep(ts, b, &device)?;
        let with_cfg = matches!(guidance, Guidance::Cfg(_));
        if with_cfg && (negative.is_none() || neg_ids.is_none()) {
            candle_core::bail!("CFG needs negative prompt embeddings");
        }
        // The unconditional branch runs without embedded guidance, on its own text.
        let (cond, uncond) = plan.guided(with_cfg, |branch| {
            let sp = plan.sp.as_ref();
            let y = match (branch, negative, &neg_ids) {
                (1, Some(neg), Some(nids)) => model.forward_sharded(&x, neg, &t, None, img_ids, nids, dtype, sp)?,
                _ => model.forward_sharded(&x, embeds, &t, g.as_ref(), img_ids, &txt_ids, dtype, sp)?,
            };
            y.to_dtype(DType::F32)
        })?;
        let v = match (&uncond, guidance) {
            (Some(u), Guidance::Cfg(scale)) => (u + ((&cond - u)? * scale as f64)?)?,
            _ => cond.clone(),
        };
        plan.fence()?;
        x = euler_step(&x, &v, sigmas[i], sigmas[i + 1])?;
        on_step(StepOut { index: i + 1, steps: timesteps.len(), cond: &cond, uncond: uncond.as_ref(), latents: &x });
    }
    Ok(x)
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Flux2Request {
    pub prompt: String,
    /// klein base models: the CFG negative (empty string by default).
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub batch: usize,
    pub max_sequence_length: usize,
}

#[derive(Clone)]
pub struct Flux2Run<'a> {
    pub files: &'a Flux2Files,
    pub opts: RunOptions<'a>,
    pub encoder: EncoderMode,
    /// Guidance-distilled klein: no CFG.
    pub distilled: bool,
}

impl Flux2Run<'_> {
    /// Generates `req.batch` images `[B, H, W, 3]` in [0, 1]; `on_step(i, n, packed latents)`. In a
    /// run of several ranks only rank 0 decodes: the others return no images (`[0, H, W, 3]`).
    pub fn generate(
        &self,
        req: &Flux2Request,
        mut on_step: impl FnMut(usize, usize, &Tensor),
    ) -> Result<(Tensor, RunStats)> {
        let t0 = Instant::now();
        let mut stats = RunStats::default();
        let mut peak = super::PeakMemory::start(self.opts.device);
        let root = &self.files.root;
        let vae_cfg = Flux2VaeConfig::from_file(&root.join("vae/config.json"))?;
        let cfg = Flux2Config::from_file(&self.files.transformer_config)?;
        let tok = vae_cfg.token_size();
        super::check_size(req.width, req.height, tok)?;
        let guidance = if cfg.guidance_embeds {
            Guidance::Embedded(req.guidance as f32)
        } else if self.distilled || req.guidance <= 1.0 {
            Guidance::None
        } else {
            Guidance::Cfg(req.guidance as f32)
        };
        // How the ranks split the work, checked before anything loads.
        let plan = Plan::of(self.opts.world, cfg.num_attention_heads, matches!(guidance, Guidance::Cfg(_)))?;
        // Rank 0's values everywhere (see `from_root`).
        let agree = |t: Tensor| crate::parallel::from_root(self.opts.world, t);
        let mut texts = vec![req.prompt.as_str()];
        if matches!(guidance, Guidance::Cfg(_)) {
            texts.push(req.negative_prompt.as_deref().unwrap_or(""));
        }
        let (embeds, how) = encode_prompts(
            self.files,
            &texts,
            req.max_sequence_length,
            self.encoder,
            self.opts.dtype,
            self.opts.device,
            self.opts.nvfp4,
        )?;
        let embeds = agree(embeds)?;
        log::info!("text encoder: {how}");
        stats.text_encoder = Some(how);
        peak.sample(self.opts.device);
        stats.encode_s = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let (wb, naming) = self.opts.transformer_weights(&self.files.transformer)?;
        let model = Flux2Transformer::new(&cfg, &wb, naming)?;
        peak.sample(self.opts.device);
        stats.load_s = t1.elapsed().as_secs_f64();

        let sched = SchedulerConfig::from_file(&root.join("scheduler/scheduler_config.json"))?;
        let (lh, lw) = (req.height / tok, req.width / tok);
        let b = req.batch.max(1);
        let x = agree(pack(&initial_noise(req.seed, (b, cfg.in_channels, lh, lw), self.opts.device)?)?)?;
        let ids = image_ids(lh, lw, self.opts.device)?;
        let (_, sigmas, timesteps) = schedule(&sched, lh * lw, req.steps);
        let cond = embeds.narrow(0, 0, 1)?.repeat((b, 1, 1))?;
        let neg = if embeds.dim(0)? > 1 { Some(embeds.narrow(0, 1, 1)?.repeat((b, 1, 1))?) } else { None };
        let mut t_step = Instant::now();
        let x =
            sample(&model, x, &cond, neg.as_ref(), &ids, &sigmas, &timesteps, guidance, self.opts.dtype, &plan, |s| {
                let _ = self.opts.device.synchronize();
                peak.sample(self.opts.device);
                stats.step_s.push(t_step.elapsed().as_secs_f64());
                t_step = Instant::now();
                on_step(s.index, s.steps, s.latents);
            })?;
        drop(model);
        // Only rank 0 decodes and writes.
        if let Some(none) = crate::parallel::no_output(self.opts.world, req.height, req.width)? {
            stats.total_s = t0.elapsed().as_secs_f64();
            stats.peak_gpu_bytes = peak.get();
            return Ok((none, stats));
        }

        let t2 = Instant::now();
        let vae_dtype = crate::models::flux::vae::FluxVae::dtype_on(self.opts.device, self.opts.dtype);
        let vae = Flux2Vae::new(&vae_cfg, super::vb(&root.join("vae"), vae_dtype, self.opts.device)?)?;
        let decoded = vae.decode(&unpack(&x, lh, lw)?, vae_dtype)?;
        let images = crate::models::flux::vae::to_unit_images(&decoded)?;
        peak.sample(self.opts.device);
        stats.decode_s = t2.elapsed().as_secs_f64();
        stats.total_s = t0.elapsed().as_secs_f64();
        stats.peak_gpu_bytes = peak.get();
        Ok((images, stats))
    }
}
