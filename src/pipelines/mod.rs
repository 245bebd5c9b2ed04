//! End-to-end pipelines: text encoders, transformer, sampler, VAE.

pub mod flux;
pub mod flux2;
pub mod wan;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result};

use crate::error::CandiffError;

/// Timings and memory of a pipeline run.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub encode_s: f64,
    pub load_s: f64,
    pub step_s: Vec<f64>,
    pub decode_s: f64,
    pub total_s: f64,
    pub peak_gpu_bytes: Option<usize>,
    /// Two-expert models: the experts used, in order.
    pub experts: Vec<usize>,
    /// How the text encoder ran, where a pipeline offers choices (FLUX.2).
    pub text_encoder: Option<String>,
}

pub(crate) fn tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path).map_err(|e| {
        CandiffError::bad_config(
            path.display(),
            format!("not a readable tokenizer.json: {e}"),
            "Re-download the tokenizer files.",
        )
        .into()
    })
}

fn safetensors_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(crate::nvfp4::checkpoint::weight_files(dir)?)
}

pub(crate) fn vb<'a>(dir: &Path, dtype: DType, device: &Device) -> Result<candle_nn::VarBuilder<'a>> {
    let files = safetensors_in(dir)?;
    if files.is_empty() {
        return Err(CandiffError::bad_config(
            dir.display(),
            "holds no .safetensors files",
            "Download the component (or check the path).",
        )
        .into());
    }
    // SAFETY: read-only mapping of checkpoint files.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
}

#[cfg(feature = "cuda")]
pub fn gpu_used(device: &Device) -> Option<usize> {
    match device {
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok().map(|(free, total)| total - free),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_used(_: &Device) -> Option<usize> {
    None
}
