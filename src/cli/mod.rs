//! Command-line interface: one module per subcommand.

pub mod bench;
pub mod compare;
pub mod doctor;
pub mod inspect;
pub mod models;
pub mod t2i;
pub mod t2v;

use clap::{Args, Parser, Subcommand};

use crate::nvfp4::{NibbleOrder, Overrides, ScaleLayout};

#[derive(Debug, Parser)]
#[command(
    name = "candiff",
    version,
    about = "Diffusion inference (FLUX.1, FLUX.2, Wan2.2) in bf16 and NVFP4 on Candle"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Text to image (FLUX.1).
    T2i(Box<t2i::T2iArgs>),
    /// Text to video (Wan2.2).
    T2v(Box<t2v::T2vArgs>),
    /// Quality of NVFP4 variants against bf16 on the same prompts and seeds, with reports.
    Compare(Box<compare::CompareArgs>),
    /// List the supported models.
    Models(models::ModelsArgs),
    /// Show what a checkpoint holds and how it will be loaded.
    Inspect(inspect::InspectArgs),
    /// Report the GPU and check every NVFP4 variant against the CPU reference.
    Doctor(doctor::DoctorArgs),
    /// Measure kernels (and, later, pipelines) against baselines run in the same process.
    Bench(bench::BenchArgs),
}

/// Flags every generating command shares: where and how to run, and how NVFP4 layers execute.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// bf16 (default on GPU), f16 or f32 (default on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// `cpu`, `cuda` or `cuda:N` (default: cuda:0 when built with CUDA, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Revision of the Hub repositories.
    #[arg(long, default_value = "main")]
    pub revision: String,
    #[arg(long, env = "CANDIFF_NVFP4_BACKEND", value_parser = t2i::parse_backend)]
    pub nvfp4_backend: Option<crate::nvfp4::Backend>,
    #[arg(long, default_value = "w4a16")]
    pub nvfp4_mode: crate::nvfp4::ActMode,
    /// Transformer attention: `cudnn` (fused, bf16; the default), `fp8` (cuDNN's FP8 flash
    /// attention on Hopper and newer, over 8192 keys or more — Wan video, not FLUX at 1024²: ~1.4x
    /// faster there, q/k/v, probabilities and output rounded to E4M3, rel. L2 ~6e-2 against bf16;
    /// `candiff compare` with `+fp8attn` variants shows what it costs) or `reference` (unfused,
    /// f32 scores).
    #[arg(long, env = "CANDIFF_ATTENTION", value_enum)]
    pub attention: Option<crate::models::ops::AttentionImpl>,
    /// How `--nvfp4-mode fp8` GEMMs accumulate: `f32` (partial sums promoted to f32, the default)
    /// or `fast` (the FP8 tensor cores' own accumulator for all of K: 7% faster FLUX.1 step on an
    /// H200, a random-weight step 2.5e-2 rel. L2 off the f32 one (FLUX.2-dev 0.29), and several GPUs
    /// no longer match one exactly; `candiff compare` with `+fastacc` variants shows what it costs).
    #[arg(long, env = "CANDIFF_FP8_ACCUM", value_enum, default_value_t)]
    pub fp8_accum: crate::nvfp4::fp8::Fp8Accum,
    #[command(flatten)]
    pub nvfp4: Nvfp4ReadArgs,
    /// Generate on N GPUs (0..N-1) at once: each transformer call's tokens sharded over them
    /// (Ulysses), the guidance branches on two halves when N is even. Needs a build with the
    /// `nccl` feature; the attention heads must divide by N (N/2 with guidance).
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    /// Run N ranks on the one --device, exchanging in-process: the sharded code paths without
    /// several GPUs (checks that a sharded run matches a single one; no speed-up).
    #[arg(long, value_name = "N", conflicts_with = "gpus")]
    pub ranks: Option<usize>,
    /// Seconds a rank waits for its peers before declaring the run hung (a peer that fails
    /// stops the others at once).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub parallel_timeout: u64,
}

impl RunArgs {
    /// Where the ranks of a multi-rank run go (`None`: one device, no ranks).
    pub fn placement(&self, device: &candle_core::Device) -> anyhow::Result<Option<crate::parallel::Placement>> {
        use crate::parallel::Placement;
        match (self.gpus, self.ranks) {
            (Some(0), _) | (_, Some(0)) => anyhow::bail!("--gpus / --ranks must be at least 1"),
            (Some(1), _) | (_, Some(1)) | (None, None) => Ok(None),
            (Some(n), _) => {
                if !cfg!(feature = "nccl") {
                    anyhow::bail!(
                        "--gpus {n} needs NCCL and this binary was built without it: rebuild with `--features nccl` (see README), or use --ranks {n} to check the sharded code paths on one device"
                    );
                }
                if device.is_cpu() {
                    anyhow::bail!("--gpus {n} runs on CUDA devices 0..{}; drop --device cpu (or use --ranks {n} to shard on the CPU)", n - 1);
                }
                if let Some(d) = self.device.as_deref().filter(|d| !matches!(*d, "cuda" | "cuda:0")) {
                    anyhow::bail!("--gpus {n} uses CUDA devices 0..{} (select others with CUDA_VISIBLE_DEVICES), not --device {d}", n - 1);
                }
                Ok(Some(Placement::Gpus(n)))
            }
            (None, Some(n)) => Ok(Some(Placement::Shared(n, device.clone()))),
        }
    }

    /// Fixes the attention implementation for the run (`--attention`) and checks that
    /// `--fp8-accum fast` comes with fp8 mode on a GPU (elsewhere it would change nothing: the CPU
    /// reference always accumulates in f32).
    pub fn apply_choices(&self, device: &candle_core::Device) -> anyhow::Result<()> {
        if let Some(choice) = self.attention {
            crate::models::ops::set_attention_impl(choice)?;
        }
        if self.fp8_accum != crate::nvfp4::fp8::Fp8Accum::F32 {
            if self.nvfp4_mode != crate::nvfp4::ActMode::Fp8 {
                anyhow::bail!(
                    "--fp8-accum {} applies to --nvfp4-mode fp8 GEMMs; this run is --nvfp4-mode {} (drop --fp8-accum or CANDIFF_FP8_ACCUM, or add --nvfp4-mode fp8)",
                    self.fp8_accum,
                    self.nvfp4_mode
                );
            }
            if !device.is_cuda() {
                anyhow::bail!(
                    "--fp8-accum {} selects how the GPU's FP8 tensor cores accumulate; this run is on the CPU, whose fp8 path always accumulates in f32 (drop --fp8-accum or CANDIFF_FP8_ACCUM, or run on --device cuda)",
                    self.fp8_accum
                );
            }
        }
        Ok(())
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.parallel_timeout.max(1))
    }

    /// How NVFP4 layers execute (flag, else `CANDIFF_NVFP4_BACKEND`, else the default backend).
    pub fn nvfp4_options(&self) -> crate::linear::Nvfp4Options {
        crate::linear::Nvfp4Options {
            backend: crate::nvfp4::Backend::resolve(self.nvfp4_backend),
            mode: self.nvfp4_mode,
            fp8_accum: self.fp8_accum,
        }
    }

    /// A single-device pipeline run's options from these flags, with `hooks` (the NVFP4 flags'
    /// hooks, possibly completed by the caller).
    pub fn pipeline_options<'a>(
        &self,
        dtype: candle_core::DType,
        device: &'a candle_core::Device,
        hooks: crate::linear::LoadHooks,
    ) -> crate::pipelines::RunOptions<'a> {
        crate::pipelines::RunOptions {
            dtype,
            device,
            nvfp4: self.nvfp4_options(),
            nvfp4_overrides: self.nvfp4.overrides(),
            hooks,
            world: None,
        }
    }
}

/// How to read NVFP4 checkpoints whose own description is missing or wrong.
#[derive(Debug, Clone, Default, Args)]
pub struct Nvfp4ReadArgs {
    /// Read NVFP4 block scales as `linear` [N, K/16] or `swizzled` (128x4 tiles), whatever the
    /// checkpoint says.
    #[arg(long, value_name = "LAYOUT")]
    pub nvfp4_scale_layout: Option<ScaleLayout>,
    /// Which nibble holds element 2i (`low` or `high`), whatever the checkpoint says.
    #[arg(long, value_name = "ORDER")]
    pub nvfp4_nibbles: Option<NibbleOrder>,
    /// A sibling NVFP4 .safetensors file to take missing `input_scale` / `weight_scale_2`
    /// tensors from (e.g. the full FLUX.2 NVFP4 file for the `-mixed` one).
    #[arg(long, value_name = "FILE")]
    pub nvfp4_scales_from: Option<std::path::PathBuf>,
}

impl Nvfp4ReadArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides { scale_layout: self.nvfp4_scale_layout, nibbles: self.nvfp4_nibbles }
    }

    /// Load hooks carrying `--nvfp4-scales-from` (checked to open before any model loads).
    pub fn hooks(&self) -> anyhow::Result<crate::linear::LoadHooks> {
        let borrow_scales = match &self.nvfp4_scales_from {
            Some(p) => Some(std::sync::Arc::new(crate::safetensors::MappedFile::open(p)?)),
            None => None,
        };
        Ok(crate::linear::LoadHooks { borrow_scales, ..Default::default() })
    }
}
