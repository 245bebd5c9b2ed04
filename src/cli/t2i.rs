use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::manifest::{Manifest, Source};
use crate::nvfp4::Backend;
use crate::pipelines::flux::{FluxFiles, FluxRun, T2iRequest};
use crate::pipelines::flux2::{EncoderMode, Flux2Files, Flux2Request, Flux2Run};

#[derive(Debug, Args)]
#[command(after_long_help = "Examples:
  candiff t2i --model tiny --prompt \"a red fox\"                    (offline, CPU, seconds)
  candiff t2i --model flux.1-dev --prompt \"a red fox in snow\" --device cuda:0
  candiff t2i --model flux.1-dev-nvfp4 --nvfp4-backend trtllm --prompt \"...\" --output fox.png
  candiff t2i --model flux.1-dev --transformer-path flux1-dev-nvfp4.safetensors --prompt \"...\"
  candiff t2i --model flux.2-tiny --prompt \"a red fox\"                (FLUX.2, offline, CPU)
  candiff t2i --model flux.2-dev-nvfp4 --text-encoder nvfp4 --prompt \"...\" --device cuda:0")]
pub struct T2iArgs {
    /// A manifest name (`candiff models`).
    #[arg(long, default_value = "flux.1-dev")]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt for true classifier-free guidance (with --true-cfg > 1).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[arg(long, default_value_t = 4.0)]
    pub true_cfg: f64,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long)]
    pub steps: Option<usize>,
    /// Distilled guidance (FLUX.1-dev).
    #[arg(long)]
    pub guidance: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value = "out.png")]
    pub output: PathBuf,
    /// A transformer repo id, folder or single .safetensors file (diffusers or BFL names).
    #[arg(long)]
    pub transformer_path: Option<String>,
    /// Text tokens for the text encoder (default from the manifest: 512 for FLUX.1-dev / FLUX.2,
    /// 256 for schnell).
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// FLUX.2 text encoder: `native` (the run's dtype and device), `nvfp4` (decoder linears
    /// quantized at load: the 24B Mistral in ~14 GB instead of ~48 GB) or `cpu` (f32).
    #[arg(long, default_value = "native")]
    pub text_encoder: EncoderMode,
    /// FLUX.1: random weights for every component, only configs and tokenizers read (full-size
    /// kernel and NVFP4 runs without downloading weights; the image is noise).
    #[arg(long)]
    pub random_weights: bool,
    #[command(flatten)]
    pub run: super::RunArgs,
}

pub(crate) fn parse_backend(s: &str) -> Result<Backend, String> {
    Ok(Backend::from_name(s).unwrap_or_else(|| {
        log::warn!("`{s}` is not an NVFP4 backend (trtllm, cutlass, cudnn); using trtllm");
        Backend::default()
    }))
}

pub fn parse_device(s: Option<&str>) -> anyhow::Result<candle_core::Device> {
    let s = s.unwrap_or(if cfg!(feature = "cuda") { "cuda:0" } else { "cpu" });
    if s == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("bad device `{s}`: use cpu, cuda or cuda:N"))?,
        None => anyhow::bail!("unknown device `{s}`: use cpu, cuda or cuda:N"),
    };
    if !cfg!(feature = "cuda") {
        anyhow::bail!("`--device {s}` needs a build with --features cuda (see README); this one runs on the CPU only");
    }
    crate::cuda_support::cuda_device(ordinal, false).with_context(|| format!("no usable CUDA device {ordinal}"))
}

/// `--dtype`: bf16, f16 or f32; by default bf16 on a GPU, f32 on the CPU.
pub(crate) fn parse_dtype(s: Option<&str>, device: &candle_core::Device) -> anyhow::Result<candle_core::DType> {
    Ok(match s {
        Some("bf16") => candle_core::DType::BF16,
        Some("f16") => candle_core::DType::F16,
        Some("f32") => candle_core::DType::F32,
        Some(o) => anyhow::bail!("unknown --dtype `{o}` (bf16, f16 or f32)"),
        None if device.is_cpu() => candle_core::DType::F32,
        None => candle_core::DType::BF16,
    })
}

/// A repository as a local folder: a folder on disk (relative to the working directory or to the
/// candiff source tree), else a Hub snapshot with the files `patterns` name.
pub fn local_repo(repo: &str, revision: &str, patterns: &[String]) -> anyhow::Result<PathBuf> {
    for base in [PathBuf::from("."), PathBuf::from(env!("CARGO_MANIFEST_DIR"))] {
        let p = base.join(repo);
        if p.exists() {
            return Ok(p);
        }
    }
    Ok(crate::hub::snapshot(repo, revision, patterns)?)
}

pub(crate) fn component_patterns(dir: &str) -> Vec<String> {
    vec![format!("{dir}/*.json"), format!("{dir}/*.safetensors")]
}

pub(crate) fn source_path(src: &Source, revision: &str) -> anyhow::Result<PathBuf> {
    let patterns = match (&src.file, &src.subfolder) {
        (Some(f), _) => vec![f.clone()],
        (None, Some(d)) => component_patterns(d),
        (None, None) => vec!["*.json".into(), "*.safetensors".into()],
    };
    let root = local_repo(&src.repo, revision, &patterns)?;
    Ok(match (&src.file, &src.subfolder) {
        (Some(f), _) => root.join(f),
        (None, Some(d)) => root.join(d),
        (None, None) => root,
    })
}

fn write_png(path: &Path, img: &candle_core::Tensor, meta: &[(&str, String)]) -> anyhow::Result<()> {
    let (h, w, _) = img.dims3()?;
    let px: Vec<u8> =
        (img * 255.0)?.round()?.clamp(0f32, 255f32)?.to_dtype(candle_core::DType::U8)?.flatten_all()?.to_vec1()?;
    let tmp = path.with_extension("png.partial");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in meta {
        enc.add_itxt_chunk(k.to_string(), v.clone())?;
    }
    let mut writer = enc.write_header()?;
    writer.write_image_data(&px)?;
    writer.finish()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A FLUX.2 manifest's files (downloading what is missing) and, for a single-file transformer
/// whose manifest names a sibling to borrow scales from, that sibling if it is already on disk.
pub(crate) fn flux2_files(
    m: &Manifest,
    revision: &str,
    transformer_path: Option<&str>,
) -> anyhow::Result<(Flux2Files, Option<PathBuf>)> {
    let mut base = vec!["scheduler/*.json".to_string(), "model_index.json".into(), "tokenizer/*".into()];
    for c in ["vae", "text_encoder"] {
        base.extend(component_patterns(c));
    }
    if m.transformer.is_none() && transformer_path.is_none() {
        base.extend(component_patterns("transformer"));
    } else {
        base.push("transformer/config.json".into());
    }
    let root = local_repo(&m.repo, revision, &base)?;
    let transformer = match (transformer_path, &m.transformer) {
        (Some(p), _) if Path::new(p).exists() => Some(PathBuf::from(p)),
        (Some(p), _) => Some(source_path(&Source { repo: p.to_string(), subfolder: None, file: None }, revision)?),
        (None, Some(src)) => Some(source_path(src, revision)?),
        (None, None) => None,
    };
    let sibling = match (&m.scales_from, &transformer) {
        (Some(src), Some(t)) if transformer_path.is_none() => {
            let name = src.file.as_deref().unwrap_or_default();
            let p = t.parent().map(|d| d.join(name)).filter(|p| p.is_file());
            if p.is_none() {
                log::warn!(
                    "{} lacks some NVFP4 input scales; {name} (from {}) is not downloaded beside it, so W4A4 uses 1.0 for those layers. Download it, or pass --nvfp4-scales-from FILE.",
                    t.display(),
                    src.repo
                );
            }
            p
        }
        _ => None,
    };
    Ok((Flux2Files::new(&root, transformer.as_deref()), sibling))
}

fn run_flux2(
    a: &T2iArgs,
    m: &Manifest,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    placement: Option<&crate::parallel::Placement>,
) -> anyhow::Result<()> {
    let d = &m.defaults;
    let t0 = std::time::Instant::now();
    let (files, sibling) = flux2_files(m, &a.run.revision, a.transformer_path.as_deref())?;
    let vae = crate::models::flux2::vae::Flux2VaeConfig::from_file(&files.root.join("vae/config.json"))?;
    let (width, height) = (a.width.unwrap_or(d.width), a.height.unwrap_or(d.height));
    let tok = vae.token_size();
    anyhow::ensure!(
        width % tok == 0 && height % tok == 0,
        "--width and --height must be multiples of {tok} for {}, found {width}x{height}",
        m.name
    );
    let mut hooks = a.run.nvfp4.hooks()?;
    if hooks.borrow_scales.is_none() {
        if let Some(p) = &sibling {
            hooks.borrow_scales = Some(std::sync::Arc::new(crate::safetensors::MappedFile::open(p)?));
        }
    }
    let run = Flux2Run {
        files: &files,
        opts: a.run.pipeline_options(dtype, device, hooks),
        encoder: a.text_encoder,
        distilled: d.distilled,
    };
    let req = Flux2Request {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        width,
        height,
        steps: a.steps.unwrap_or(d.steps),
        guidance: a.guidance.unwrap_or(d.guidance),
        seed: a.seed,
        batch: a.batch,
        max_sequence_length: a.max_sequence_length.unwrap_or(d.max_sequence_length),
    };
    if let Some(p) = placement {
        let cfg = crate::models::flux2::Flux2Config::from_file(&files.transformer_config)?;
        let with_cfg = !cfg.guidance_embeds && !d.distilled && req.guidance > 1.0;
        crate::parallel::check_split(p.ranks(), cfg.num_attention_heads, with_cfg)?;
        eprintln!("{}", crate::parallel::describe_split(p.ranks(), with_cfg, p.unit()));
    }
    let fetch_s = t0.elapsed().as_secs_f64();
    let out =
        Output { a, m, steps: req.steps, guidance: req.guidance, backend: run.opts.nvfp4.backend, dtype, fetch_s };
    out.write(|bar| {
        crate::parallel::run_on(placement, a.run.timeout(), device, |device, world| {
            let run = Flux2Run { opts: run.opts.on(device, world), ..run.clone() };
            run.generate(&req, |i, _, _| {
                if crate::parallel::is_root(world) {
                    bar.set_position(i as u64)
                }
            })
        })
    })?;
    Ok(())
}

/// What every text-to-image run ends with: progress while generating, the PNGs with their metadata,
/// and the summary line.
struct Output<'a> {
    a: &'a T2iArgs,
    m: &'a Manifest,
    steps: usize,
    guidance: f64,
    backend: Backend,
    dtype: candle_core::DType,
    fetch_s: f64,
}

impl Output<'_> {
    fn write(
        &self,
        generate: impl FnOnce(
            &indicatif::ProgressBar,
        ) -> candle_core::Result<(candle_core::Tensor, crate::pipelines::RunStats)>,
    ) -> anyhow::Result<()> {
        let bar = progress_bar(self.steps);
        let (images, stats) = generate(&bar)?;
        bar.finish_and_clear();
        let a = self.a;
        let mut meta = vec![
            ("prompt", a.prompt.clone()),
            ("seed", a.seed.to_string()),
            ("model", self.m.name.clone()),
            ("steps", self.steps.to_string()),
            ("guidance", self.guidance.to_string()),
            (
                "backend",
                format!(
                    "{:?}; NVFP4 layers (if any): {} {}; attention {:?}",
                    self.dtype,
                    self.backend,
                    a.run.nvfp4_mode,
                    crate::models::ops::attention_impl()
                ),
            ),
        ];
        if let Some(t) = &stats.text_encoder {
            meta.push(("text_encoder", t.clone()));
            println!("text encoder: {t}");
        }
        meta.push(("software", format!("candiff {}", env!("CARGO_PKG_VERSION"))));
        write_images(&a.output, &images, &meta)?;
        print_summary(self.fetch_s, &stats);
        Ok(())
    }
}

fn progress_bar(steps: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("step {pos}/{len} {bar:30} {elapsed} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// One PNG per image (`out-<i>.png` for batches), metadata in iTXt chunks.
fn write_images(output: &Path, images: &candle_core::Tensor, meta: &[(&str, String)]) -> anyhow::Result<()> {
    let n = images.dim(0)?;
    for i in 0..n {
        let path = if n == 1 {
            output.to_path_buf()
        } else {
            let stem = output.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
            output.with_file_name(format!("{stem}-{i}.png"))
        };
        let mut meta = meta.to_vec();
        if n > 1 {
            meta[1].1 = format!("{} (image {i} of a batch of {n})", meta[1].1);
        }
        write_png(&path, &images.get(i)?, &meta)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn print_summary(fetch_s: f64, stats: &crate::pipelines::RunStats) {
    let per_step = stats.step_s.iter().sum::<f64>() / stats.step_s.len().max(1) as f64;
    println!(
        "files {fetch_s:.1}s, text encoders {:.1}s, transformer load {:.1}s, {} steps at {:.3}s, decode {:.1}s, total {:.1}s{}",
        stats.encode_s,
        stats.load_s,
        stats.step_s.len(),
        per_step,
        stats.decode_s,
        stats.total_s + fetch_s,
        stats.peak_gpu_bytes.map(|b| format!(", peak GPU memory {:.1} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_default()
    );
}

pub fn run(a: &T2iArgs) -> anyhow::Result<()> {
    // Everything that can be checked cheaply is checked before any weight is read.
    if a.prompt.trim().is_empty() {
        anyhow::bail!("the prompt is empty: pass --prompt \"...\"");
    }
    let m = Manifest::find(&a.model)?;
    if m.family == crate::manifest::Family::Wan22 {
        anyhow::bail!("`{}` is a video model: use `candiff t2v --model {}`", m.name, m.name);
    }
    let d = &m.defaults;
    let (width, height) = (a.width.unwrap_or(d.width), a.height.unwrap_or(d.height));
    if width % 16 != 0 || height % 16 != 0 {
        anyhow::bail!("--width and --height must be multiples of 16, found {width}x{height}");
    }
    let device = parse_device(a.run.device.as_deref())?;
    let dtype = parse_dtype(a.run.dtype.as_deref(), &device)?;
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        anyhow::ensure!(parent.is_dir(), "the output folder {} does not exist", parent.display());
    }
    let placement = a.run.placement(&device)?;
    a.run.apply_choices(&device)?;
    let random = a.random_weights || m.random_weights;
    if m.family == crate::manifest::Family::Flux2 {
        anyhow::ensure!(!random, "random weights are supported for FLUX.1 and Wan2.2 models; {} is FLUX.2", m.name);
        return run_flux2(a, &m, &device, dtype, placement.as_ref());
    }

    let t0 = std::time::Instant::now();
    let mut base = vec!["scheduler/*.json".to_string(), "model_index.json".into()];
    for c in ["vae", "text_encoder", "text_encoder_2"] {
        base.extend(component_patterns(c));
    }
    base.push("tokenizer_2/*.json".into());
    if m.transformer.is_none() && a.transformer_path.is_none() {
        base.extend(component_patterns("transformer"));
    } else {
        base.push("transformer/config.json".into());
    }
    if random {
        base.retain(|p| !p.ends_with(".safetensors"));
    }
    let root = local_repo(&m.repo, &a.run.revision, &base)?;
    let transformer = match (&a.transformer_path, &m.transformer) {
        (Some(p), _) if Path::new(p).exists() => Some(PathBuf::from(p)),
        (Some(p), _) => Some(source_path(&Source { repo: p.clone(), subfolder: None, file: None }, &a.run.revision)?),
        (None, Some(src)) => Some(source_path(src, &a.run.revision)?),
        (None, None) => None,
    };
    let mut files = FluxFiles::new(&root, transformer.as_deref());
    files.random_weights = random;
    files.random_nvfp4 = m.random_nvfp4.clone();
    if let Some(tok) = &m.clip_tokenizer {
        if !files.clip_tokenizer.is_file() {
            files.clip_tokenizer = source_path(tok, "main")?;
        }
    }
    let run = FluxRun { files: &files, opts: a.run.pipeline_options(dtype, &device, a.run.nvfp4.hooks()?) };
    let backend = run.opts.nvfp4.backend;
    let req = T2iRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        width,
        height,
        steps: a.steps.unwrap_or(d.steps),
        guidance: a.guidance.unwrap_or(d.guidance),
        true_cfg: a.true_cfg,
        seed: a.seed,
        batch: a.batch,
        max_sequence_length: a.max_sequence_length.unwrap_or(d.max_sequence_length),
    };
    if let Some(p) = &placement {
        let heads = crate::models::flux::FluxConfig::from_file(&files.transformer_config)?.num_attention_heads;
        let cfg = req.negative_prompt.is_some() && req.true_cfg > 1.0;
        crate::parallel::check_split(p.ranks(), heads, cfg)?;
        eprintln!("{}", crate::parallel::describe_split(p.ranks(), cfg, p.unit()));
    }
    let fetch_s = t0.elapsed().as_secs_f64();
    let out = Output { a, m: &m, steps: req.steps, guidance: req.guidance, backend, dtype, fetch_s };
    out.write(|bar| {
        crate::parallel::run_on(placement.as_ref(), a.run.timeout(), &device, |device, world| {
            let run = FluxRun { opts: run.opts.on(device, world), ..run.clone() };
            run.generate(&req, |i, _, _| {
                if crate::parallel::is_root(world) {
                    bar.set_position(i as u64)
                }
            })
        })
    })?;
    Ok(())
}
