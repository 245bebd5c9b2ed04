use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::manifest::{Manifest, Source};
use crate::nvfp4::Backend;
use crate::pipelines::flux::{FluxFiles, FluxRun, T2iRequest};

#[derive(Debug, Args)]
#[command(after_long_help = "Examples:
  candiff t2i --model tiny --prompt \"a red fox\"                    (offline, CPU, seconds)
  candiff t2i --model flux.1-dev --prompt \"a red fox in snow\" --device cuda:0
  candiff t2i --model flux.1-dev-nvfp4 --nvfp4-backend trtllm --prompt \"...\" --output fox.png
  candiff t2i --model flux.1-dev --transformer-path flux1-dev-nvfp4.safetensors --prompt \"...\"")]
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
    /// Text tokens for T5 (default from the manifest: 512 for dev, 256 for schnell).
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
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
    candle_core::Device::new_cuda(ordinal).with_context(|| format!("no usable CUDA device {ordinal}"))
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

pub fn run(a: &T2iArgs) -> anyhow::Result<()> {
    // Everything that can be checked cheaply is checked before any weight is read.
    if a.prompt.trim().is_empty() {
        anyhow::bail!("the prompt is empty: pass --prompt \"...\"");
    }
    let m = Manifest::find(&a.model)?;
    if m.family != crate::manifest::Family::Flux1 {
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
    let root = local_repo(&m.repo, &a.run.revision, &base)?;
    let transformer = match (&a.transformer_path, &m.transformer) {
        (Some(p), _) if Path::new(p).exists() => Some(PathBuf::from(p)),
        (Some(p), _) => Some(source_path(&Source { repo: p.clone(), subfolder: None, file: None }, &a.run.revision)?),
        (None, Some(src)) => Some(source_path(src, &a.run.revision)?),
        (None, None) => None,
    };
    let mut files = FluxFiles::new(&root, transformer.as_deref());
    if let Some(tok) = &m.clip_tokenizer {
        if !files.clip_tokenizer.is_file() {
            files.clip_tokenizer = source_path(tok, "main")?;
        }
    }
    let nvfp4 = a.run.nvfp4_options();
    let backend = nvfp4.backend;
    let run = FluxRun {
        files: &files,
        dtype,
        device: &device,
        nvfp4,
        nvfp4_overrides: a.run.nvfp4.overrides(),
        hooks: Default::default(),
    };
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
    let fetch_s = t0.elapsed().as_secs_f64();
    let bar = indicatif::ProgressBar::new(req.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("step {pos}/{len} {bar:30} {elapsed} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (images, stats) = run.generate(&req, |i, _, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();

    let meta = [
        ("prompt", req.prompt.clone()),
        ("seed", req.seed.to_string()),
        ("model", m.name.clone()),
        ("steps", req.steps.to_string()),
        ("guidance", req.guidance.to_string()),
        ("backend", format!("{dtype:?}; NVFP4 layers (if any): {backend} {}", a.run.nvfp4_mode)),
        ("software", format!("candiff {}", env!("CARGO_PKG_VERSION"))),
    ];
    let n = images.dim(0)?;
    for i in 0..n {
        let path = if n == 1 {
            a.output.clone()
        } else {
            let stem = a.output.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
            a.output.with_file_name(format!("{stem}-{i}.png"))
        };
        let mut meta = meta.to_vec();
        if n > 1 {
            meta[1].1 = format!("{} (image {i} of a batch of {n})", req.seed);
        }
        write_png(&path, &images.get(i)?, &meta)?;
        println!("wrote {}", path.display());
    }
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
    Ok(())
}
