use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::t2i::{component_patterns, local_repo, parse_device, source_path};
use crate::compare::run::{parse_prompts, Engine, Learned, Runner, Settings, Variant, BUILTIN_PROMPTS};
use crate::manifest::{Family, Manifest};
use crate::nvfp4::{Checkpoint, Overrides};
use crate::pipelines::flux::FluxFiles;
use crate::pipelines::wan::{WanFiles, FRAMES_PER_LATENT};

#[derive(Debug, Args)]
#[command(after_long_help = "Examples:
  candiff compare --model tiny --variants bf16,nvfp4:trtllm:w4a16,nvfp4:trtllm:w4a4 --max-prompts 3   (CPU, offline)
  candiff compare --model flux.1-dev --seeds 0,1 --variants bf16,nvfp4:trtllm:w4a16,nvfp4:cudnn:w4a4,nvfp4:trtllm:fp8 --out cmp
  candiff compare --model wan-tiny --prompts my-prompts.jsonl --exclude proj_out
  candiff compare --model flux.1-dev-random --width 512 --height 512 --clip off   (full size, random weights, no download)
  candiff compare --model wan2.2-ti2v-5b --variants bf16,bf16+fp8attn,nvfp4:trtllm:fp8+fp8attn   (what FP8 attention costs)
  candiff compare --model flux.1-dev --variants bf16,nvfp4:trtllm:fp8,nvfp4:trtllm:fp8+fastacc   (what fast FP8 accumulation costs)

NVFP4 variants quantize the bf16 checkpoint at load with the ModelOpt rule; W4A4 activation scales
come from the reference run (calibration on the same prompts). An interrupted run resumes from --out.")]
pub struct CompareArgs {
    /// A manifest name (`candiff models`) of a bf16 checkpoint, image or video.
    #[arg(long, default_value = "flux.1-dev")]
    pub model: String,
    /// One prompt per line, or JSONL {"prompt": ..., "seeds": [..]}; default: the built-in set.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Use only the first N prompts.
    #[arg(long)]
    pub max_prompts: Option<usize>,
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub seeds: Vec<u64>,
    /// `bf16` or `nvfp4:<trtllm|cutlass|cudnn>:<w4a16|w4a4|fp8>`, each optionally with `+fp8attn`
    /// (its transformer attention in FP8, as `--attention fp8`; GPU, cudnn builds); fp8 ones
    /// also with `+fastacc` (fast FP8 accumulation, as `--fp8-accum fast`).
    #[arg(long, value_delimiter = ',', default_value = "bf16,nvfp4:trtllm:w4a16,nvfp4:trtllm:w4a4,nvfp4:trtllm:fp8")]
    pub variants: Vec<String>,
    /// The variant the others are measured against.
    #[arg(long, default_value = "bf16")]
    pub reference: String,
    /// Output folder (resumable). Default: compare-<model>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    /// Video models: frames (4k+1).
    #[arg(long)]
    pub frames: Option<usize>,
    /// Keep layers matching this in bf16 in the NVFP4 variants (substring or `*` wildcards; repeatable).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Skip the per-layer error diagnosis (one extra dense pass per layer on the first output).
    #[arg(long)]
    pub no_diagnose: bool,
    /// Write the reports from the outputs already in --out (e.g. while a long run goes on).
    #[arg(long)]
    pub report_only: bool,
    /// CLIP for the CLIP score and image similarity: a hub repository or a folder (config.json,
    /// model.safetensors, tokenizer.json, preprocessor_config.json), or `off`. When the default
    /// cannot be had (offline, not cached) the run goes on without it and says so.
    #[arg(long, default_value = crate::compare::learned::DEFAULT_CLIP)]
    pub clip: String,
    /// LPIPS (AlexNet) weights in the `lpips` package's names, as one .safetensors file
    /// (scripts/export-lpips.py writes it); without it LPIPS is not computed.
    #[arg(long)]
    pub lpips: Option<PathBuf>,
    /// FLUX.1 and Wan2.2: random weights for every component, only configs and tokenizers read
    /// (the NVFP4 error of full-size layers without downloading weights; the outputs are noise).
    #[arg(long)]
    pub random_weights: bool,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long, default_value = "main")]
    pub revision: String,
}

fn writable(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    let probe = dir.join(".candiff-write-test");
    std::fs::write(&probe, b"").with_context(|| format!("the output folder {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// The learned metric models, loaded (and so checked) before any generation.
fn learned_metrics(a: &CompareArgs) -> anyhow::Result<Learned> {
    use crate::compare::learned::{Clip, Lpips, CLIP_FILES, DEFAULT_CLIP};
    if a.report_only {
        let note = "learned metrics: as computed by the runs that made the outputs (--report-only computes none)";
        return Ok(Learned { clip: None, lpips: None, notes: vec![note.into()] });
    }
    let mut notes = Vec::new();
    let lpips = match &a.lpips {
        Some(p) => {
            // Loaded on the CPU here to check it before anything is generated; the metric
            // pass loads it again onto the run's device.
            Lpips::load(p, &candle_core::Device::Cpu).with_context(|| {
                format!("--lpips {}: not LPIPS AlexNet weights (write them with scripts/export-lpips.py)", p.display())
            })?;
            notes.push(format!("LPIPS: AlexNet, v0.1 heads, from {}", p.display()));
            Some(p.clone())
        }
        None => {
            notes.push("LPIPS: not computed (pass --lpips FILE; scripts/export-lpips.py writes it)".into());
            None
        }
    };
    let clip = if a.clip == "off" {
        notes.push("CLIP: not computed (--clip off)".into());
        None
    } else {
        let patterns: Vec<String> = CLIP_FILES.iter().map(|f| f.to_string()).collect();
        let found = local_repo(&a.clip, "main", &patterns).and_then(|dir| {
            Clip::check(&dir)?;
            Ok(dir)
        });
        match found {
            Ok(dir) => {
                notes.push(format!("CLIP: {} ({})", a.clip, dir.display()));
                Some(dir)
            }
            Err(e) if a.clip == DEFAULT_CLIP => {
                let why = format!("{e:#}");
                eprintln!(
                    "warning: CLIP metrics will not be computed: {why}\n         (download {DEFAULT_CLIP}, pass --clip DIR, or --clip off to silence this)"
                );
                notes.push(format!("CLIP: not computed ({DEFAULT_CLIP} unavailable: {why})"));
                None
            }
            Err(e) => return Err(e.context(format!("--clip {}: cannot load a CLIP model", a.clip))),
        }
    };
    Ok(Learned { clip, lpips, notes })
}

pub fn run(a: &CompareArgs) -> anyhow::Result<()> {
    // Everything checkable is checked before any model loads.
    let m = Manifest::find(&a.model)?;
    let variants: Vec<Variant> = a.variants.iter().map(|v| Variant::parse(v)).collect::<Result<_, _>>()?;
    let mut labels: Vec<&str> = variants.iter().map(|v| v.label.as_str()).collect();
    labels.sort();
    labels.dedup();
    anyhow::ensure!(labels.len() == variants.len(), "--variants lists a variant twice");
    let reference = Variant::parse(&a.reference)?;
    let ref_idx = variants
        .iter()
        .position(|v| v.label == reference.label)
        .with_context(|| format!("--reference {} is not one of --variants ({})", a.reference, a.variants.join(",")))?;
    let (text, name) = match &a.prompts {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (BUILTIN_PROMPTS.to_string(), "built-in prompts".into()),
    };
    let mut prompts = parse_prompts(&text, &name)?;
    if let Some(n) = a.max_prompts {
        anyhow::ensure!(n > 0, "--max-prompts must be positive");
        prompts.truncate(n);
    }
    anyhow::ensure!(!a.seeds.is_empty(), "--seeds is empty");
    let items: Vec<(String, u64)> = prompts
        .iter()
        .flat_map(|p| {
            p.seeds.clone().unwrap_or_else(|| a.seeds.clone()).into_iter().map(move |s| (p.prompt.clone(), s))
        })
        .collect();
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("compare-{}", m.name)));
    writable(&out)?;
    let device = parse_device(a.device.as_deref())?;
    let learned = learned_metrics(a)?;
    let d = &m.defaults;
    let (width, height, steps) = (a.width.unwrap_or(d.width), a.height.unwrap_or(d.height), a.steps.unwrap_or(d.steps));

    let random = a.random_weights || m.random_weights;
    anyhow::ensure!(
        !random || m.family != Family::Flux2,
        "random weights are supported for FLUX.1 and Wan2.2 models; {} is FLUX.2",
        m.name
    );
    let (engine, frames) = match m.family {
        Family::Flux1 => {
            anyhow::ensure!(a.frames.is_none(), "--frames is for video models; {} makes images", m.name);
            anyhow::ensure!(
                width % 16 == 0 && height % 16 == 0,
                "--width and --height must be multiples of 16, found {width}x{height}"
            );
            let mut base = vec!["scheduler/*.json".to_string(), "model_index.json".into(), "tokenizer_2/*.json".into()];
            for c in ["vae", "text_encoder", "text_encoder_2", "transformer"] {
                base.extend(component_patterns(c));
            }
            anyhow::ensure!(
                m.transformer.is_none(),
                "{} has an NVFP4 transformer; compare quantizes a bf16 checkpoint itself: use its bf16 model (e.g. flux.1-dev)",
                m.name
            );
            if random {
                base.retain(|p| !p.ends_with(".safetensors"));
            }
            let root = local_repo(&m.repo, &a.revision, &base)?;
            let mut files = FluxFiles::new(&root, None);
            files.random_weights = random;
            if let Some(tok) = &m.clip_tokenizer {
                if !files.clip_tokenizer.is_file() {
                    files.clip_tokenizer = source_path(tok, "main")?;
                }
            }
            (Engine::Flux { files, guidance: d.guidance, max_seq: d.max_sequence_length }, None)
        }
        Family::Flux2 => {
            anyhow::ensure!(a.frames.is_none(), "--frames is for video models; {} makes images", m.name);
            anyhow::ensure!(
                m.transformer.is_none(),
                "{} has an NVFP4 transformer; compare quantizes a bf16 checkpoint itself: use its bf16 model (e.g. flux.2-dev)",
                m.name
            );
            let (files, _) = super::t2i::flux2_files(&m, &a.revision, None)?;
            let tok = files.transformer_config.parent().and_then(|p| p.parent()).map(|r| r.join("vae/config.json"));
            let size = tok
                .and_then(|p| crate::models::flux2::vae::Flux2VaeConfig::from_file(&p).ok())
                .map(|c| c.token_size())
                .unwrap_or(16);
            anyhow::ensure!(
                width % size == 0 && height % size == 0,
                "--width and --height must be multiples of {size}, found {width}x{height}"
            );
            (
                Engine::Flux2 { files, guidance: d.guidance, distilled: d.distilled, max_seq: d.max_sequence_length },
                None,
            )
        }
        Family::Wan22 => {
            let frames = a.frames.or(d.frames).unwrap_or(FRAMES_PER_LATENT + 1);
            anyhow::ensure!(
                frames > 0 && (frames - 1).is_multiple_of(FRAMES_PER_LATENT),
                "--frames must be 4k+1, found {frames}"
            );
            anyhow::ensure!(
                m.transformer.is_none() && m.transformer_2.is_none(),
                "{} has NVFP4 experts; compare quantizes a bf16 checkpoint itself: use its bf16 model",
                m.name
            );
            let mut pats = vec!["model_index.json".to_string(), "scheduler/*.json".into(), "tokenizer/*".into()];
            for c in ["text_encoder", "vae", "transformer", "transformer_2"] {
                pats.extend(component_patterns(c));
            }
            if random {
                pats.retain(|p| !p.ends_with(".safetensors"));
            }
            let root = local_repo(&m.repo, &a.revision, &pats)?;
            let mut files = WanFiles::new(&root, None, None)?;
            files.random_weights = random;
            let engine = Engine::Wan {
                files,
                guidance: d.guidance,
                guidance_2: d.guidance_2,
                frames,
                fps: d.fps.unwrap_or(16),
                max_seq: d.max_sequence_length,
            };
            (engine, Some(frames))
        }
    };
    let transformer = match &engine {
        Engine::Flux { files, .. } => files.transformer.clone(),
        Engine::Flux2 { files, .. } => files.transformer.clone(),
        Engine::Wan { files, .. } => files.transformer.clone(),
    };
    anyhow::ensure!(
        random || Checkpoint::open(&transformer, &Overrides::default())?.plan.is_none(),
        "{} is already NVFP4; compare needs the bf16 checkpoint it quantizes",
        transformer.display()
    );
    let settings = Settings {
        model: m.name.clone(),
        steps,
        width,
        height,
        frames,
        items,
        exclude: a.exclude.clone(),
        random_weights: random,
    };
    let runner = Runner {
        engine: &engine,
        learned: Some(&learned),
        settings,
        device: &device,
        out: out.clone(),
        report_only: a.report_only,
    };
    let report = runner.run(&variants, ref_idx, !a.no_diagnose, |msg| eprintln!("{msg}"))?;
    crate::compare::report::write_all(&report, &out)?;
    println!("{}", crate::compare::report::markdown(&report));
    println!("reports: {0}/report.md, {0}/report.html, {0}/report.json", out.display());
    Ok(())
}
