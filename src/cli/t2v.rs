use std::path::{Path, PathBuf};

use clap::Args;

use super::t2i::{component_patterns, local_repo, parse_device, parse_dtype, source_path};
use crate::manifest::{Family, Manifest, Source};
use crate::pipelines::wan::{T2vRequest, WanFiles, WanRun, FRAMES_PER_LATENT};
use crate::video::{Format, Video};

#[derive(Debug, Args)]
#[command(after_long_help = "Examples:
  candiff t2v --model wan-tiny --prompt \"a red fox running\"             (offline, CPU, seconds)
  candiff t2v --model wan2.2-ti2v-5b --prompt \"a red fox running in snow\" --output fox.mp4
  candiff t2v --model wan2.2-t2v-a14b --width 1280 --height 720 --prompt \"...\"
  candiff t2v --model wan2.2-t2v-a14b-nvfp4 --nvfp4-backend trtllm --prompt \"...\" --output fox.gif")]
pub struct T2vArgs {
    /// A Wan manifest name (`candiff models`).
    #[arg(long, default_value = "wan2.2-ti2v-5b")]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt for classifier-free guidance.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    /// Number of frames, 4k+1.
    #[arg(long)]
    pub frames: Option<usize>,
    /// Frame rate of the output file (default: the model's).
    #[arg(long)]
    pub fps: Option<u32>,
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale (of the high-noise expert for two-expert models).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Guidance scale of the low-noise expert.
    #[arg(long)]
    pub guidance_2: Option<f64>,
    /// Expert switch as a fraction of the training timesteps (high-noise expert for t >= b*1000).
    #[arg(long)]
    pub boundary: Option<f64>,
    /// Overrides the sampler shift of the repository's scheduler_config.json.
    #[arg(long)]
    pub flow_shift: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// .mp4 (H.264), .gif, or .png (one numbered PNG per frame).
    #[arg(long, default_value = "out.mp4")]
    pub output: PathBuf,
    /// Replaces the (first) transformer: a repo id or folder (diffusers layout).
    #[arg(long)]
    pub transformer_path: Option<String>,
    /// Replaces the second (low-noise) expert.
    #[arg(long)]
    pub transformer_2_path: Option<String>,
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// Random weights for every component, only configs and the tokenizer read (full-size
    /// kernel and NVFP4 runs without downloading weights; the video is noise).
    #[arg(long)]
    pub random_weights: bool,
    #[command(flatten)]
    pub run: super::RunArgs,
}

fn override_path(p: &Option<String>, manifest: &Option<Source>, revision: &str) -> anyhow::Result<Option<PathBuf>> {
    Ok(match (p, manifest) {
        (Some(p), _) if Path::new(p).exists() => Some(PathBuf::from(p)),
        (Some(p), _) => Some(source_path(&Source { repo: p.clone(), subfolder: None, file: None }, revision)?),
        (None, Some(src)) => Some(source_path(src, revision)?),
        (None, None) => None,
    })
}

pub fn run(a: &T2vArgs) -> anyhow::Result<()> {
    // Everything that can be checked cheaply is checked before any weight is read.
    if a.prompt.trim().is_empty() {
        anyhow::bail!("the prompt is empty: pass --prompt \"...\"");
    }
    let m = Manifest::find(&a.model)?;
    if m.family != Family::Wan22 {
        anyhow::bail!("`{}` is an image model: use `candiff t2i --model {}`", m.name, m.name);
    }
    let d = &m.defaults;
    let frames = a.frames.or(d.frames).unwrap_or(FRAMES_PER_LATENT + 1);
    if frames == 0 || !(frames - 1).is_multiple_of(FRAMES_PER_LATENT) {
        anyhow::bail!("--frames must be 4k+1 (e.g. 81 or 121), found {frames}");
    }
    let fps = a.fps.or(d.fps).unwrap_or(16);
    anyhow::ensure!(fps > 0, "--fps must be positive");
    Format::from_path(&a.output)?;
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        anyhow::ensure!(parent.is_dir(), "the output folder {} does not exist", parent.display());
    }
    if let Some(b) = a.boundary {
        anyhow::ensure!((0.0..=1.0).contains(&b), "--boundary is a fraction in [0, 1], found {b}");
    }
    let device = parse_device(a.run.device.as_deref())?;
    let dtype = parse_dtype(a.run.dtype.as_deref(), &device)?;
    let placement = a.run.placement(&device)?;
    a.run.apply_choices(&device)?;

    let t0 = std::time::Instant::now();
    // Configs first (a few KB): sizes are validated before the weights are fetched.
    let configs: Vec<String> = vec!["model_index.json".into(), "*/config.json".into(), "scheduler/*.json".into()];
    let root = local_repo(&m.repo, &a.run.revision, &configs)?;
    let t1 = override_path(&a.transformer_path, &m.transformer, &a.run.revision)?;
    let t2 = override_path(&a.transformer_2_path, &m.transformer_2, &a.run.revision)?;
    let mut files = WanFiles::new(&root, t1.as_deref(), t2.as_deref())?;
    files.random_weights = a.random_weights || m.random_weights;
    let run = WanRun { files: &files, opts: a.run.pipeline_options(dtype, &device, a.run.nvfp4.hooks()?) };
    let backend = run.opts.nvfp4.backend;
    let req = T2vRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        width: a.width.unwrap_or(d.width),
        height: a.height.unwrap_or(d.height),
        frames,
        steps: a.steps.unwrap_or(d.steps),
        guidance: a.guidance.unwrap_or(d.guidance),
        guidance_2: a.guidance_2.or(d.guidance_2),
        boundary: a.boundary.or(files.boundary_ratio).or(d.boundary),
        flow_shift: a.flow_shift,
        seed: a.seed,
        max_sequence_length: a.max_sequence_length.unwrap_or(d.max_sequence_length),
    };
    run.geometry(&req)?;
    if let Some(p) = &placement {
        let heads = crate::models::wan::WanConfig::from_file(&files.transformer.join("config.json"))
            .or_else(|_| crate::models::wan::WanConfig::from_file(&root.join("transformer/config.json")))?
            .num_attention_heads;
        crate::parallel::check_split(p.ranks(), heads, req.guidance > 1.0)?;
        eprintln!("{}", crate::parallel::describe_split(p.ranks(), req.guidance > 1.0, p.unit()));
    }
    let mut weights = vec!["tokenizer/*".to_string()];
    for c in ["text_encoder", "vae"] {
        weights.extend(component_patterns(c));
    }
    if t1.is_none() {
        weights.extend(component_patterns("transformer"));
    }
    if t2.is_none() && files.transformer_2.is_some() {
        weights.extend(component_patterns("transformer_2"));
    }
    if files.random_weights {
        weights.retain(|p| !p.ends_with(".safetensors"));
    }
    local_repo(&m.repo, &a.run.revision, &weights)?;
    let fetch_s = t0.elapsed().as_secs_f64();

    let bar = indicatif::ProgressBar::new(req.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} step {pos}/{len} {bar:30} {elapsed} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("encoding");
    let decode_bar = indicatif::ProgressBar::hidden();
    let on_step = |s: &crate::pipelines::wan::StepReport| {
        bar.set_message(if files.transformer_2.is_some() {
            ["high-noise expert", "low-noise expert"][s.expert].to_string()
        } else {
            "denoising".into()
        });
        bar.set_position(s.index as u64 + 1);
    };
    let on_chunk = |i: usize, n: usize| {
        if i == 1 {
            bar.finish_and_clear();
            decode_bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            decode_bar.set_length(n as u64);
            decode_bar.set_style(
                indicatif::ProgressStyle::with_template("decoding latent frame {pos}/{len} {bar:30} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
        }
        decode_bar.set_position(i as u64);
    };
    // Every rank runs the pipeline; rank 0 reports progress, decodes and returns the frames.
    let (frames_t, stats) = crate::parallel::run_on(placement.as_ref(), a.run.timeout(), &device, |device, world| {
        let root = crate::parallel::is_root(world);
        let run = WanRun { opts: run.opts.on(device, world), ..run.clone() };
        run.generate(
            &req,
            |s| {
                if root {
                    on_step(s)
                }
            },
            |i, n| {
                if root {
                    on_chunk(i, n)
                }
            },
        )
    })?;
    bar.finish_and_clear();
    decode_bar.finish_and_clear();

    let (f, h, w, _) = frames_t.dims4()?;
    let rgb: Vec<u8> =
        (frames_t * 255.0)?.round()?.clamp(0f32, 255f32)?.to_dtype(candle_core::DType::U8)?.flatten_all()?.to_vec1()?;
    let video = Video { width: w, height: h, fps, rgb };
    let guidance = match req.guidance_2 {
        Some(g2) if files.transformer_2.is_some() => format!("{} (high noise), {g2} (low noise)", req.guidance),
        _ => req.guidance.to_string(),
    };
    let meta = [
        ("prompt", req.prompt.clone()),
        ("negative_prompt", req.negative_prompt.clone()),
        ("seed", req.seed.to_string()),
        ("model", m.name.clone()),
        ("steps", req.steps.to_string()),
        ("guidance", guidance),
        ("size", format!("{w}x{h}, {f} frames at {fps} fps")),
        (
            "backend",
            format!(
                "{dtype:?}; NVFP4 layers (if any): {backend} {}; attention {:?}",
                a.run.nvfp4_mode,
                crate::models::ops::attention_impl()
            ),
        ),
        ("software", format!("candiff {}", env!("CARGO_PKG_VERSION"))),
    ];
    let written = crate::video::write(&a.output, &video, &meta)?;
    match written.as_slice() {
        [one] => println!("wrote {} ({f} frames, {w}x{h}, {fps} fps)", one.display()),
        many => println!("wrote {} PNG frames {} .. {}", many.len(), many[0].display(), many[many.len() - 1].display()),
    }
    let per_step = stats.step_s.iter().sum::<f64>() / stats.step_s.len().max(1) as f64;
    println!(
        "files {fetch_s:.1}s, text encoder {:.1}s, transformer load {:.1}s ({} expert{}), {} steps at {:.3}s, decode {:.1}s, total {:.1}s{}",
        stats.encode_s,
        stats.load_s,
        stats.experts.len(),
        if stats.experts.len() == 1 { "" } else { "s" },
        stats.step_s.len(),
        per_step,
        stats.decode_s,
        stats.total_s + fetch_s,
        stats.peak_gpu_bytes.map(|b| format!(", peak GPU memory {:.1} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_default()
    );
    Ok(())
}
