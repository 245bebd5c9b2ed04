//! The comparison run: the reference variant first (it also calibrates the NVFP4 activation
//! ranges), then every other variant on the same prompts, seeds, steps and sizes. Each finished
//! (variant, prompt, seed) is stored on disk at once, so an interrupted run resumes where it
//! stopped.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::learned::{clip_score, cosine as cosine_t, Clip, Lpips, Rgb8};
use super::metrics::{cosine, mean_std, psnr, ssim, Image};
use crate::error::{CResult, CandiffError};
use crate::linear::{LayerStats, LoadHooks, Nvfp4Options, Probe, QuantCache, QuantizeSpec};
use crate::nvfp4::fp8::Fp8Accum;
use crate::nvfp4::{ActMode, Backend, Overrides};
use crate::pipelines::flux::{FluxFiles, FluxRun, T2iRequest};
use crate::pipelines::flux2::{EncoderMode, Flux2Files, Flux2Request, Flux2Run};
use crate::pipelines::wan::{T2vRequest, WanFiles, WanRun};
use crate::pipelines::RunOptions;
use crate::video::Video;

/// Layers listed per variant in the reports (the full list is in its JSON file).
const REPORT_TOP_LAYERS: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VariantKind {
    /// The checkpoint's dense weights in bf16.
    Bf16,
    /// The dense weights quantized to NVFP4 at load (ModelOpt rule), run by `backend` in `mode`.
    Nvfp4 {
        #[serde(serialize_with = "as_str")]
        backend: Backend,
        #[serde(serialize_with = "as_str")]
        mode: ActMode,
    },
}

fn as_str<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variant {
    pub label: String,
    pub kind: VariantKind,
    /// FP8 attention for this variant (`+fp8attn`); otherwise the process's choice.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fp8_attention: bool,
    /// fp8 mode's GEMMs with fast accumulation (`+fastacc`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fast_accum: bool,
}

/// The variant suffix that runs its transformer attention in FP8 (`--attention fp8`).
pub const FP8_ATTENTION_SUFFIX: &str = "+fp8attn";
/// The variant suffix that runs an fp8-mode variant's GEMMs with fast accumulation
/// (`--fp8-accum fast`).
pub const FAST_ACCUM_SUFFIX: &str = "+fastacc";

impl Variant {
    /// `bf16` or `nvfp4:<trtllm|cutlass|cudnn>:<w4a16|w4a4|fp8>`, optionally followed by
    /// `+fp8attn` (FP8 attention) and, for fp8 mode, `+fastacc` (fast accumulation), in either
    /// order.
    pub fn parse(s: &str) -> CResult<Self> {
        let bad = |why: String| {
            CandiffError::Unsupported(format!(
                "variant `{s}`: {why}; use bf16 or nvfp4:<trtllm|cutlass|cudnn>:<w4a16|w4a4|fp8>, optionally with {FP8_ATTENTION_SUFFIX} and (fp8) {FAST_ACCUM_SUFFIX}"
            ))
        };
        let (mut base, mut fp8_attention, mut fast_accum) = (s, false, false);
        loop {
            if let Some(b) = base.strip_suffix(FP8_ATTENTION_SUFFIX).filter(|_| !fp8_attention) {
                (base, fp8_attention) = (b, true);
            } else if let Some(b) = base.strip_suffix(FAST_ACCUM_SUFFIX).filter(|_| !fast_accum) {
                (base, fast_accum) = (b, true);
            } else {
                break;
            }
        }
        let kind = match base.split(':').collect::<Vec<_>>()[..] {
            ["bf16"] => VariantKind::Bf16,
            ["nvfp4", b, m] => VariantKind::Nvfp4 {
                backend: Backend::from_name(b).ok_or_else(|| bad(format!("unknown backend `{b}`")))?,
                mode: m.parse().map_err(bad)?,
            },
            _ => return Err(bad("unrecognized form".into())),
        };
        if fast_accum && !matches!(kind, VariantKind::Nvfp4 { mode: ActMode::Fp8, .. }) {
            return Err(bad(format!("{FAST_ACCUM_SUFFIX} applies to fp8 mode only")));
        }
        Ok(Self { label: s.replace(':', "-"), kind, fp8_attention, fast_accum })
    }

    /// How this variant's NVFP4 layers execute.
    pub fn nvfp4_options(&self) -> Nvfp4Options {
        match self.kind {
            VariantKind::Nvfp4 { backend, mode } => {
                let fp8_accum = if self.fast_accum { Fp8Accum::Fast } else { Fp8Accum::F32 };
                Nvfp4Options { backend, mode, fp8_accum }
            }
            VariantKind::Bf16 => Nvfp4Options::default(),
        }
    }
}

/// One prompt of the set, with its seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSpec {
    pub prompt: String,
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
}

/// Reads a prompt file: one prompt per line (`#` comments and blank lines ignored), or JSONL
/// objects `{"prompt": "...", "seeds": [..]}` (seeds optional).
pub fn parse_prompts(text: &str, file: &str) -> CResult<Vec<PromptSpec>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let p = if l.starts_with('{') {
            serde_json::from_str::<PromptSpec>(l).map_err(|e| {
                CandiffError::bad_config(
                    file,
                    format!("line {}: not a prompt object: {e}", i + 1),
                    "Write {\"prompt\": \"...\", \"seeds\": [0, 1]} or a plain line.",
                )
            })?
        } else {
            PromptSpec { prompt: l.to_string(), seeds: None }
        };
        if p.prompt.trim().is_empty() {
            return Err(CandiffError::bad_config(
                file,
                format!("line {}: empty prompt", i + 1),
                "Remove the line or write a prompt.",
            ));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(CandiffError::bad_config(file, "holds no prompts", "Write one prompt per line (or JSONL)."));
    }
    Ok(out)
}

/// The built-in prompt set (assets/prompts.txt).
pub const BUILTIN_PROMPTS: &str = include_str!("../../assets/prompts.txt");

/// What a run generates with, per family.
pub enum Engine {
    Flux {
        files: FluxFiles,
        guidance: f64,
        max_seq: usize,
    },
    /// FLUX.2: `distilled` klein models run without CFG.
    Flux2 {
        files: Flux2Files,
        guidance: f64,
        distilled: bool,
        max_seq: usize,
    },
    Wan {
        files: WanFiles,
        guidance: f64,
        guidance_2: Option<f64>,
        frames: usize,
        fps: u32,
        max_seq: usize,
    },
}

impl Engine {
    /// Module paths of the transformer blocks (what NVFP4 exports quantize).
    fn block_patterns(&self) -> Vec<String> {
        match self {
            Engine::Flux { .. } | Engine::Flux2 { .. } => {
                ["transformer_blocks.", "single_transformer_blocks.", "double_blocks.", "single_blocks."]
            }
            Engine::Wan { .. } => ["blocks.", "", "", ""],
        }
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| p.to_string())
        .collect()
    }
}

/// The settings every variant shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub model: String,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    /// Video only.
    pub frames: Option<usize>,
    pub items: Vec<(String, u64)>,
    pub exclude: Vec<String>,
    /// Every weight random (see `Manifest::random_weights`).
    #[serde(default)]
    pub random_weights: bool,
}

/// One generated output and its measurements against the reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    /// Index into the run's (prompt, seed) items.
    pub item: usize,
    pub seed: u64,
    pub file: String,
    /// The whole generation: encoders, loading (and quantizing), steps, decoding.
    pub seconds: f64,
    /// Median transformer step time.
    #[serde(default)]
    pub step_ms: Option<f64>,
    pub peak_gpu_bytes: Option<usize>,
    /// The per-layer diagnosis ran with this output (dense twins in memory: its time and
    /// memory are not the variant's).
    #[serde(default)]
    pub diagnosed: bool,
    /// Against the reference (absent for the reference itself). Video: means over frames.
    pub psnr: Option<f64>,
    pub ssim: Option<f64>,
    /// Video: spread (std) of per-frame PSNR / SSIM.
    pub psnr_std: Option<f64>,
    pub ssim_std: Option<f64>,
    /// Cosine similarity of the latents to the reference's after every step.
    pub latent_cosine: Vec<f64>,
    /// LPIPS against the reference (video: mean over frames).
    #[serde(default)]
    pub lpips: Option<f64>,
    /// CLIP score of the output against its prompt (video: mean over frames).
    #[serde(default)]
    pub clip_score: Option<f64>,
    /// Cosine similarity of the output's CLIP image embedding to the reference's.
    #[serde(default)]
    pub clip_image_sim: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantReport {
    pub variant: Variant,
    /// `ok`, or why it could not run here.
    pub status: String,
    pub items: Vec<ItemResult>,
    pub mean_psnr: Option<f64>,
    pub worst_psnr: Option<f64>,
    pub mean_ssim: Option<f64>,
    pub worst_ssim: Option<f64>,
    pub mean_final_latent_cosine: Option<f64>,
    pub mean_lpips: Option<f64>,
    pub worst_lpips: Option<f64>,
    pub mean_clip_score: Option<f64>,
    pub mean_clip_image_sim: Option<f64>,
    pub worst_clip_image_sim: Option<f64>,
    /// Over the outputs generated without the per-layer diagnosis, where there are any.
    pub mean_seconds: Option<f64>,
    pub mean_step_ms: Option<f64>,
    pub max_peak_gpu_bytes: Option<usize>,
    /// Worst layers by output error against their dense twin (first item), worst first.
    pub worst_layers: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub settings: Settings,
    pub reference: String,
    pub device: String,
    pub variants: Vec<VariantReport>,
    /// Which learned metrics ran (and with what), or why not.
    pub learned_metrics: Vec<String>,
}

/// Generated pixels `[F, H, W, 3]` as u8, and the per-step latents.
struct Output {
    video: Video,
    latents: Vec<Vec<f32>>,
    seconds: f64,
    step_ms: Option<f64>,
    peak: Option<usize>,
}

/// The median step time in ms (the first steps carry one-time warm-up).
fn median_ms(steps: &[f64]) -> Option<f64> {
    let mut v = steps.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).map(|s| s * 1e3)
}

fn to_u8(frames: &Tensor) -> candle_core::Result<Vec<u8>> {
    (frames * 255.0)?.round()?.clamp(0f32, 255f32)?.to_dtype(DType::U8)?.flatten_all()?.to_vec1()
}

/// The learned metric models of a run, and what the report says about them.
pub struct Learned {
    /// A CLIP folder (see [`Clip::load`]), loaded onto the run's device after generation.
    pub clip: Option<PathBuf>,
    /// LPIPS weights (see [`Lpips::load`]).
    pub lpips: Option<PathBuf>,
    /// One line per metric: the model used, or why it did not run.
    pub notes: Vec<String>,
}

pub struct Runner<'a> {
    pub engine: &'a Engine,
    /// LPIPS / CLIP, computed after generation; `None`: not at all.
    pub learned: Option<&'a Learned>,
    pub settings: Settings,
    pub device: &'a Device,
    pub out: PathBuf,
    /// Write the reports from what is on disk; generate nothing.
    pub report_only: bool,
}

/// `run.json`: the shared settings and the device the comparison runs on.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunFile {
    settings: Settings,
    device: String,
}

impl Runner<'_> {
    fn generate(&self, variant: &Variant, hooks: LoadHooks, prompt: &str, seed: u64) -> candle_core::Result<Output> {
        let choice = variant.fp8_attention.then_some(crate::models::ops::AttentionImpl::Fp8);
        crate::models::ops::with_attention(choice, || self.generate_with(variant, hooks, prompt, seed))
    }

    fn generate_with(
        &self,
        variant: &Variant,
        hooks: LoadHooks,
        prompt: &str,
        seed: u64,
    ) -> candle_core::Result<Output> {
        let nvfp4 = variant.nvfp4_options();
        let mut latents = Vec::new();
        let t0 = Instant::now();
        let s = &self.settings;
        let opts = RunOptions {
            dtype: DType::BF16,
            device: self.device,
            nvfp4,
            nvfp4_overrides: Overrides::default(),
            hooks,
            world: None,
        };
        let (frames, stats, fps) = match self.engine {
            Engine::Flux { files, guidance, max_seq } => {
                let run = FluxRun { files, opts };
                let req = T2iRequest {
                    prompt: prompt.into(),
                    negative_prompt: None,
                    width: s.width,
                    height: s.height,
                    steps: s.steps,
                    guidance: *guidance,
                    true_cfg: 1.0,
                    seed,
                    batch: 1,
                    max_sequence_length: *max_seq,
                };
                let (img, stats) = run.generate(&req, |_, _, x| {
                    if let Ok(v) = x.to_dtype(DType::F32).and_then(|x| x.flatten_all()?.to_vec1()) {
                        latents.push(v);
                    }
                })?;
                (img, stats, 1)
            }
            Engine::Flux2 { files, guidance, distilled, max_seq } => {
                let run = Flux2Run { files, opts, encoder: EncoderMode::Native, distilled: *distilled };
                let req = Flux2Request {
                    prompt: prompt.into(),
                    negative_prompt: None,
                    width: s.width,
                    height: s.height,
                    steps: s.steps,
                    guidance: *guidance,
                    seed,
                    batch: 1,
                    max_sequence_length: *max_seq,
                };
                let (img, stats) = run.generate(&req, |_, _, x| {
                    if let Ok(v) = x.to_dtype(DType::F32).and_then(|x| x.flatten_all()?.to_vec1()) {
                        latents.push(v);
                    }
                })?;
                (img, stats, 1)
            }
            Engine::Wan { files, guidance, guidance_2, frames, fps, max_seq } => {
                let run = WanRun { files, opts };
                let req = T2vRequest {
                    prompt: prompt.into(),
                    negative_prompt: String::new(),
                    width: s.width,
                    height: s.height,
                    frames: *frames,
                    steps: s.steps,
                    guidance: *guidance,
                    guidance_2: *guidance_2,
                    boundary: None,
                    flow_shift: None,
                    seed,
                    max_sequence_length: *max_seq,
                };
                let (f, stats) = run.generate(
                    &req,
                    |r| {
                        if let Ok(v) = r.latents.to_dtype(DType::F32).and_then(|x| x.flatten_all()?.to_vec1()) {
                            latents.push(v);
                        }
                    },
                    |_, _| {},
                )?;
                (f, stats, *fps)
            }
        };
        // Images [1, H, W, 3], videos [F, H, W, 3].
        let (h, w) = (frames.dim(1)?, frames.dim(2)?);
        Ok(Output {
            video: Video { width: w, height: h, fps, rgb: to_u8(&frames)? },
            latents,
            seconds: t0.elapsed().as_secs_f64(),
            step_ms: median_ms(&stats.step_s),
            peak: stats.peak_gpu_bytes,
        })
    }

    fn stem(&self, i: usize) -> String {
        format!("item{i:03}_s{}", self.settings.items[i].1)
    }

    fn is_video(&self) -> bool {
        matches!(self.engine, Engine::Wan { .. })
    }

    /// The reference's pixels (u8, read back from its lossless files) of item `i`.
    fn load_pixels(&self, dir: &Path, stem: &str) -> candle_core::Result<Vec<Vec<u8>>> {
        let read = |p: &Path| -> CResult<Vec<u8>> {
            let f = std::fs::File::open(p).map_err(|e| CandiffError::io(p, e))?;
            let mut r = png::Decoder::new(std::io::BufReader::new(f))
                .read_info()
                .map_err(|e| CandiffError::bad_config(p.display(), e.to_string(), "Delete it to regenerate."))?;
            let mut buf = vec![0; r.output_buffer_size()];
            let info = r
                .next_frame(&mut buf)
                .map_err(|e| CandiffError::bad_config(p.display(), e.to_string(), "Delete it to regenerate."))?;
            buf.truncate(info.buffer_size());
            Ok(buf)
        };
        if self.is_video() {
            let mut frames = Vec::new();
            for i in 0.. {
                let p = dir.join(format!("{stem}-{i:05}.png"));
                if !p.exists() {
                    break;
                }
                frames.push(read(&p)?);
            }
            Ok(frames)
        } else {
            Ok(vec![read(&dir.join(format!("{stem}.png")))?])
        }
    }

    fn save(&self, dir: &Path, stem: &str, out: &Output, meta: &[(&str, String)]) -> candle_core::Result<String> {
        if self.is_video() {
            crate::video::write(&dir.join(format!("{stem}.png")), &out.video, meta)?;
            crate::video::write(&dir.join(format!("{stem}.gif")), &out.video, meta)?;
            Ok(format!("{stem}.gif"))
        } else {
            crate::video::write(&dir.join(format!("{stem}.png")), &out.video, meta)?;
            // A single frame is written as `<stem>-00000.png`: give it the plain name.
            let one = dir.join(format!("{stem}-00000.png"));
            std::fs::rename(&one, dir.join(format!("{stem}.png"))).map_err(|e| CandiffError::io(&one, e))?;
            Ok(format!("{stem}.png"))
        }
    }

    fn latents_path(&self, ref_dir: &Path, stem: &str) -> PathBuf {
        ref_dir.join(format!("{stem}.latents.safetensors"))
    }

    /// Runs (or resumes) every variant; `progress(message)` for each generated output.
    pub fn run(
        &self,
        variants: &[Variant],
        reference: usize,
        diagnose: bool,
        mut progress: impl FnMut(&str),
    ) -> candle_core::Result<Report> {
        std::fs::create_dir_all(&self.out).map_err(|e| CandiffError::io(&self.out, e))?;
        let settings_path = self.out.join("run.json");
        let mut device = device_name(self.device);
        if settings_path.exists() {
            let prev: RunFile = crate::error::read_json_config(&settings_path, "run.json")?;
            if prev.settings != self.settings {
                return Err(CandiffError::Unsupported(format!(
                    "{} holds a comparison with other settings (model, steps, sizes, prompts, seeds or exclusions); pass another --out or delete it",
                    self.out.display()
                ))
                .into());
            }
            if prev.device != device && !self.report_only {
                progress(&format!(
                    "warning: {} was started on {}; outputs added now come from {device} (timings are per device)",
                    self.out.display(),
                    prev.device
                ));
            }
            device = prev.device;
        }
        let run_file = RunFile { settings: self.settings.clone(), device: device.clone() };
        std::fs::write(&settings_path, serde_json::to_string_pretty(&run_file).expect("serializable"))
            .map_err(|e| CandiffError::io(&settings_path, e))?;

        let refv = &variants[reference];
        let ref_dir = self.out.join(&refv.label);
        let calib_path = self.out.join("calibration.json");
        let mut calib: BTreeMap<String, f32> = if calib_path.exists() {
            crate::error::read_json_config(&calib_path, "calibration.json")?
        } else {
            BTreeMap::new()
        };
        let quant_cache = QuantCache::default();
        let mut order: Vec<usize> = vec![reference];
        order.extend((0..variants.len()).filter(|i| *i != reference));
        let mut reports = Vec::new();
        for vi in order {
            let v = &variants[vi];
            let dir = self.out.join(&v.label);
            std::fs::create_dir_all(&dir).map_err(|e| CandiffError::io(&dir, e))?;
            if let VariantKind::Nvfp4 { backend, .. } = v.kind {
                if let Err(e) = crate::cuda_support::check_backend(backend, self.device) {
                    progress(&format!("{}: cannot run here: {e}", v.label));
                    reports.push(summarize(v, format!("unavailable: {e}"), Vec::new(), Vec::new()));
                    continue;
                }
            }
            let mut items = Vec::new();
            let mut worst_layers = Vec::new();
            for (i, (pi_prompt, seed)) in self.settings.items.iter().enumerate() {
                let stem = self.stem(i);
                let json = dir.join(format!("{stem}.json"));
                if json.exists() {
                    items.push(crate::error::read_json_config(&json, "item result")?);
                    continue;
                }
                if self.report_only {
                    continue;
                }
                progress(&format!("{}: {} (seed {seed})", v.label, pi_prompt));
                let is_ref = vi == reference;
                let probe = Arc::new(Probe::default());
                let twin = diagnose && i == 0 && matches!(v.kind, VariantKind::Nvfp4 { .. });
                let quantize = match v.kind {
                    VariantKind::Nvfp4 { .. } => Some(Arc::new(QuantizeSpec {
                        include: self.engine.block_patterns(),
                        exclude: self.settings.exclude.clone(),
                        input_amax: calib.clone(),
                        keep_dense_twin: twin,
                        cache: quant_cache.clone(),
                    })),
                    VariantKind::Bf16 => None,
                };
                let hooks =
                    LoadHooks { quantize, probe: (is_ref || twin).then(|| probe.clone()), ..Default::default() };
                let out = self.generate(v, hooks, pi_prompt, *seed)?;
                let meta = [("prompt", pi_prompt.clone()), ("seed", seed.to_string()), ("variant", v.label.clone())];
                let file = self.save(&dir, &stem, &out, &meta)?;
                let layers = probe.stats()?;
                if is_ref {
                    for (name, s) in &layers {
                        let e = calib.entry(name.clone()).or_insert(0.0);
                        *e = e.max(s.input_amax);
                    }
                    std::fs::write(&calib_path, serde_json::to_string_pretty(&calib).expect("serializable"))
                        .map_err(|e| CandiffError::io(&calib_path, e))?;
                    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = out
                        .latents
                        .iter()
                        .enumerate()
                        .map(|(k, l)| {
                            (format!("step_{k}"), vec![l.len()], l.iter().flat_map(|v| v.to_le_bytes()).collect())
                        })
                        .collect();
                    let t: Vec<(&str, &str, Vec<usize>, Vec<u8>)> =
                        tensors.iter().map(|(n, s, b)| (n.as_str(), "F32", s.clone(), b.clone())).collect();
                    let lp = self.latents_path(&ref_dir, &stem);
                    std::fs::write(&lp, crate::safetensors::serialize(&t, None))
                        .map_err(|e| CandiffError::io(&lp, e))?;
                }
                if twin {
                    let mut ranked: Vec<(String, f64)> = layers
                        .iter()
                        .filter_map(|(n, s): (&String, &LayerStats)| Some((n.clone(), s.rel_l2()?)))
                        .collect();
                    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                    let lp = self.out.join(format!("layers-{}.json", v.label));
                    std::fs::write(&lp, serde_json::to_string_pretty(&ranked).expect("serializable"))
                        .map_err(|e| CandiffError::io(&lp, e))?;
                    worst_layers = ranked;
                }
                let mut r = ItemResult {
                    item: i,
                    seed: *seed,
                    file,
                    seconds: out.seconds,
                    step_ms: out.step_ms,
                    peak_gpu_bytes: out.peak,
                    diagnosed: twin,
                    psnr: None,
                    ssim: None,
                    psnr_std: None,
                    ssim_std: None,
                    latent_cosine: Vec::new(),
                    lpips: None,
                    clip_score: None,
                    clip_image_sim: None,
                };
                if !is_ref {
                    self.score(&mut r, &ref_dir, &stem, &out)?;
                }
                std::fs::write(&json, serde_json::to_string_pretty(&r).expect("serializable"))
                    .map_err(|e| CandiffError::io(&json, e))?;
                items.push(r);
            }
            if worst_layers.is_empty() {
                let lp = self.out.join(format!("layers-{}.json", v.label));
                if lp.exists() {
                    worst_layers = crate::error::read_json_config(&lp, "layer diagnosis")?;
                }
            }
            reports.push(summarize(v, "ok".into(), items, worst_layers));
        }
        // Report order = the order the user gave.
        reports.sort_by_key(|r| variants.iter().position(|v| v.label == r.variant.label));
        // What the last metric pass used, kept for `--report-only`.
        let notes_path = self.out.join("learned.json");
        let learned_metrics = match self.learned {
            _ if self.report_only && notes_path.exists() => {
                crate::error::read_json_config(&notes_path, "learned.json")?
            }
            Some(l) => {
                if !self.report_only {
                    self.learned_pass(l, &mut reports, &refv.label, &mut progress)?;
                    std::fs::write(&notes_path, serde_json::to_string_pretty(&l.notes).expect("serializable"))
                        .map_err(|e| CandiffError::io(&notes_path, e))?;
                }
                l.notes.clone()
            }
            None => vec!["learned metrics: not computed in this run".into()],
        };
        Ok(Report {
            settings: self.settings.clone(),
            reference: refv.label.clone(),
            device,
            variants: reports,
            learned_metrics,
        })
    }

    /// LPIPS and CLIP for every finished output that lacks them, from the saved files (after
    /// generation, so the metric models never share the GPU with a variant being measured).
    fn learned_pass(
        &self,
        l: &Learned,
        reports: &mut [VariantReport],
        reference: &str,
        progress: &mut impl FnMut(&str),
    ) -> candle_core::Result<()> {
        // An output lacks a metric this run can compute (the reference has no LPIPS or image sim.).
        let lacks = |it: &ItemResult, is_ref: bool| {
            (l.clip.is_some() && (it.clip_score.is_none() || (!is_ref && it.clip_image_sim.is_none())))
                || (l.lpips.is_some() && !is_ref && it.lpips.is_none())
        };
        if !reports.iter().any(|v| v.items.iter().any(|it| lacks(it, v.variant.label == reference))) {
            return Ok(());
        }
        let clip = l.clip.as_deref().map(|d| Clip::load(d, self.device)).transpose()?;
        let lpips = l.lpips.as_deref().map(|p| Lpips::load(p, self.device)).transpose()?;
        let ref_dir = self.out.join(reference);
        let mut texts: BTreeMap<usize, Tensor> = BTreeMap::new();
        let mut ref_embeds: BTreeMap<usize, Vec<Tensor>> = BTreeMap::new();
        let mut ref_pixels: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
        let (w, h) = (self.settings.width, self.settings.height);
        for v in reports.iter_mut() {
            let is_ref = v.variant.label == reference;
            let dir = self.out.join(&v.variant.label);
            let mut changed = false;
            for it in v.items.iter_mut() {
                if !lacks(it, is_ref) {
                    continue;
                }
                progress(&format!("{}: learned metrics of output {}", v.variant.label, it.item));
                let stem = self.stem(it.item);
                let frames = self.load_pixels(&dir, &stem)?;
                // The reference's frames and embeddings and the prompt's, once per output.
                let refs = match ref_pixels.entry(it.item) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(self.load_pixels(&ref_dir, &stem)?),
                };
                if let Some(clip) = &clip {
                    let text = match texts.entry(it.item) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => e.insert(clip.text_embeds(&self.settings.items[it.item].0)?),
                    };
                    let ref_e = match ref_embeds.entry(it.item) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => e.insert(
                            refs.iter()
                                .map(|f| clip.image_embeds(&Rgb8 { width: w, height: h, px: f }))
                                .collect::<candle_core::Result<_>>()?,
                        ),
                    };
                    let (mut score, mut sim) = (Vec::new(), Vec::new());
                    for (k, f) in frames.iter().enumerate() {
                        let e = clip.image_embeds(&Rgb8 { width: w, height: h, px: f })?;
                        score.push(clip_score(&e, text)?);
                        sim.push(cosine_t(&e, &ref_e[k])?);
                    }
                    it.clip_score = Some(mean_std(&score).0);
                    if !is_ref {
                        it.clip_image_sim = Some(mean_std(&sim).0);
                    }
                }
                if let (Some(lp), false) = (&lpips, is_ref) {
                    let d: Vec<f64> = frames
                        .iter()
                        .zip(refs)
                        .map(|(f, r)| {
                            lp.distance(&Rgb8 { width: w, height: h, px: f }, &Rgb8 { width: w, height: h, px: r })
                        })
                        .collect::<candle_core::Result<_>>()?;
                    it.lpips = Some(mean_std(&d).0);
                }
                let json = dir.join(format!("{stem}.json"));
                std::fs::write(&json, serde_json::to_string_pretty(&*it).expect("serializable"))
                    .map_err(|e| CandiffError::io(&json, e))?;
                changed = true;
            }
            if changed {
                *v = summarize(&v.variant, v.status.clone(), std::mem::take(&mut v.items), v.worst_layers.clone());
            }
        }
        Ok(())
    }

    fn score(&self, r: &mut ItemResult, ref_dir: &Path, stem: &str, out: &Output) -> candle_core::Result<()> {
        let refs = self.load_pixels(ref_dir, stem)?;
        let (w, h) = (out.video.width, out.video.height);
        if refs.len() != out.video.frames() {
            return Err(CandiffError::Unsupported(format!(
                "{stem}: the reference has {} frames, this variant {}",
                refs.len(),
                out.video.frames()
            ))
            .into());
        }
        let f32s = |b: &[u8]| -> Vec<f32> { b.iter().map(|v| *v as f32 / 255.0).collect() };
        let (mut ps, mut ss) = (Vec::new(), Vec::new());
        for (k, rf) in refs.iter().enumerate() {
            let (a, b) = (f32s(rf), f32s(out.video.frame(k)));
            let (ia, ib) = (Image { h, w, c: 3, px: &a }, Image { h, w, c: 3, px: &b });
            ps.push(psnr(&ia, &ib));
            ss.push(ssim(&ia, &ib));
        }
        let finite: Vec<f64> = ps.iter().copied().filter(|p| p.is_finite()).collect();
        let (pm, psd) = if finite.len() == ps.len() { mean_std(&ps) } else { (f64::INFINITY, 0.0) };
        let (sm, ssd) = mean_std(&ss);
        r.psnr = Some(pm);
        r.ssim = Some(sm);
        if self.is_video() {
            r.psnr_std = Some(psd);
            r.ssim_std = Some(ssd);
        }
        let lp = self.latents_path(ref_dir, stem);
        let f = crate::safetensors::MappedFile::open(&lp)?;
        for (k, l) in out.latents.iter().enumerate() {
            if let Some(b) = f.bytes(&format!("step_{k}")) {
                let rl: Vec<f32> =
                    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
                r.latent_cosine.push(cosine(l, &rl));
            }
        }
        Ok(())
    }
}

fn summarize(v: &Variant, status: String, items: Vec<ItemResult>, layers: Vec<(String, f64)>) -> VariantReport {
    let ps: Vec<f64> = items.iter().filter_map(|i| i.psnr).collect();
    let ss: Vec<f64> = items.iter().filter_map(|i| i.ssim).collect();
    let fc: Vec<f64> = items.iter().filter_map(|i| i.latent_cosine.last().copied()).collect();
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let min = |v: &[f64]| v.iter().copied().reduce(f64::min);
    let max = |v: &[f64]| v.iter().copied().reduce(f64::max);
    // Time and memory of the outputs made without the diagnosis's dense twins, where any.
    let plain: Vec<&ItemResult> = if items.iter().any(|i| !i.diagnosed) {
        items.iter().filter(|i| !i.diagnosed).collect()
    } else {
        items.iter().collect()
    };
    let secs: Vec<f64> = plain.iter().map(|i| i.seconds).collect();
    let step: Vec<f64> = plain.iter().filter_map(|i| i.step_ms).collect();
    let lp: Vec<f64> = items.iter().filter_map(|i| i.lpips).collect();
    let cs: Vec<f64> = items.iter().filter_map(|i| i.clip_score).collect();
    let ci: Vec<f64> = items.iter().filter_map(|i| i.clip_image_sim).collect();
    VariantReport {
        variant: v.clone(),
        status,
        mean_psnr: mean(&ps),
        worst_psnr: min(&ps),
        mean_ssim: mean(&ss),
        worst_ssim: min(&ss),
        mean_final_latent_cosine: mean(&fc),
        mean_lpips: mean(&lp),
        worst_lpips: max(&lp),
        mean_clip_score: mean(&cs),
        mean_clip_image_sim: mean(&ci),
        worst_clip_image_sim: min(&ci),
        mean_seconds: mean(&secs),
        mean_step_ms: mean(&step),
        max_peak_gpu_bytes: plain.iter().filter_map(|i| i.peak_gpu_bytes).max(),
        worst_layers: layers.into_iter().take(REPORT_TOP_LAYERS).collect(),
        items,
    }
}

/// "CPU" or the GPU's name.
fn device_name(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        if let Ok((name, _, _)) = crate::cuda::device_info(d) {
            return name;
        }
    }
    match device {
        Device::Cpu => "CPU".into(),
        d => format!("{d:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_with_and_without_fp8_attention() {
        let v = Variant::parse("nvfp4:trtllm:fp8+fp8attn").unwrap();
        assert_eq!(v.label, "nvfp4-trtllm-fp8+fp8attn");
        assert!(v.fp8_attention);
        assert!(matches!(v.kind, VariantKind::Nvfp4 { mode: ActMode::Fp8, .. }));
        let b = Variant::parse("bf16").unwrap();
        assert!(!b.fp8_attention && b.kind == VariantKind::Bf16);
        assert!(Variant::parse("bf16+fp8").is_err());
    }

    #[test]
    fn fast_accumulation_parses_in_either_order_for_fp8_only() {
        for s in ["nvfp4:trtllm:fp8+fastacc+fp8attn", "nvfp4:trtllm:fp8+fp8attn+fastacc"] {
            let v = Variant::parse(s).unwrap();
            assert!(v.fast_accum && v.fp8_attention, "{s}");
            assert_eq!(v.nvfp4_options().fp8_accum, Fp8Accum::Fast);
        }
        let plain = Variant::parse("nvfp4:cutlass:fp8").unwrap();
        assert_eq!(plain.nvfp4_options().fp8_accum, Fp8Accum::F32);
        assert_eq!(plain.nvfp4_options().backend, Backend::Cutlass);
        for s in ["nvfp4:trtllm:w4a16+fastacc", "bf16+fastacc", "nvfp4:trtllm:fp8+fastacc+fastacc"] {
            let e = Variant::parse(s).unwrap_err().to_string();
            assert!(e.contains(s), "{e}");
        }
    }

    #[test]
    fn a_scoped_attention_choice_holds_inside_only() {
        use crate::models::ops::{attention_impl, with_attention, AttentionImpl};
        let outside = attention_impl();
        with_attention(Some(AttentionImpl::Fp8), || assert_eq!(attention_impl(), AttentionImpl::Fp8));
        assert_eq!(attention_impl(), outside);
        with_attention(None, || assert_eq!(attention_impl(), outside));
    }
}
