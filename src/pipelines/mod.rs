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

/// Peak device memory of a run: the device's memory in use where a pipeline calls
/// [`PeakMemory::sample`], and at least what was in use outside the stream-ordered allocator's pool
/// at the start plus that pool's high-water mark over the run (every tensor comes from the pool, so
/// this counts the moments between samples too: a text encoder freed before the next sample).
pub(crate) struct PeakMemory {
    sampled: Option<usize>,
    outside_pool: Option<usize>,
    device: Device,
}

impl PeakMemory {
    pub(crate) fn start(device: &Device) -> Self {
        let used = gpu_used(device);
        let pool = pool_reset_high(device);
        Self { sampled: used, outside_pool: used.zip(pool).map(|(u, p)| u.saturating_sub(p)), device: device.clone() }
    }

    pub(crate) fn sample(&mut self, device: &Device) {
        if let (Some(p), Some(now)) = (self.sampled.as_mut(), gpu_used(device)) {
            *p = (*p).max(now);
        }
    }

    pub(crate) fn get(&self) -> Option<usize> {
        let through_pool = self.outside_pool.zip(pool_high(&self.device)).map(|(o, h)| o + h);
        match (self.sampled, through_pool) {
            (Some(s), Some(t)) => Some(s.max(t)),
            (s, t) => s.or(t),
        }
    }
}

/// The default memory pool of `device`'s GPU (where cudarc's stream-ordered allocations come from).
#[cfg(feature = "cuda")]
fn default_pool(device: &Device) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = device else { return None };
    let ctx = d.cuda_stream().context().clone();
    if !ctx.has_async_alloc() || ctx.bind_to_thread().is_err() {
        return None;
    }
    let mut pool = std::ptr::null_mut();
    // SAFETY: a valid device ordinal of a live context; the driver writes the pool handle.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
}

/// Resets the pool's high-water mark to what it holds in use now, and returns that.
#[cfg(feature = "cuda")]
fn pool_reset_high(device: &Device) -> Option<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(device)?;
    let mut used = 0u64;
    let mut zero = 0u64;
    // SAFETY: u64 attributes of a valid pool; setting USED_MEM_HIGH takes 0 (reset to current).
    unsafe {
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
        if sys::cuMemPoolGetAttribute(pool, attr, (&mut used as *mut u64).cast()) != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
        let high = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        if sys::cuMemPoolSetAttribute(pool, high, (&mut zero as *mut u64).cast()) != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
    }
    Some(used as usize)
}

/// The pool's high-water mark since the last reset.
#[cfg(feature = "cuda")]
fn pool_high(device: &Device) -> Option<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(device)?;
    let mut high = 0u64;
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    // SAFETY: a u64 attribute of a valid pool.
    let r = unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut high as *mut u64).cast()) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(high as usize)
}

#[cfg(not(feature = "cuda"))]
fn pool_reset_high(_: &Device) -> Option<usize> {
    None
}

#[cfg(not(feature = "cuda"))]
fn pool_high(_: &Device) -> Option<usize> {
    None
}

/// Errors unless the image size is a positive multiple of `multiple` pixels on both sides.
pub(crate) fn check_size(width: usize, height: usize, multiple: usize) -> Result<()> {
    if !width.is_multiple_of(multiple) || !height.is_multiple_of(multiple) || width == 0 || height == 0 {
        return Err(CandiffError::Unsupported(format!(
            "width and height must be positive multiples of {multiple} for this model, found {width}x{height}"
        ))
        .into());
    }
    Ok(())
}

/// What every pipeline run shares: precision, device, NVFP4 choices, load hooks and the ranks.
#[derive(Clone)]
pub struct RunOptions<'a> {
    pub dtype: DType,
    pub device: &'a Device,
    pub nvfp4: crate::linear::Nvfp4Options,
    pub nvfp4_overrides: crate::nvfp4::Overrides,
    /// On-the-fly quantization and probes (`candiff compare`).
    pub hooks: crate::linear::LoadHooks,
    /// The ranks sharing this run (`--gpus` / `--ranks`); absent for one device.
    pub world: Option<&'a crate::parallel::Group>,
}

impl<'a> RunOptions<'a> {
    /// The same options for one rank of `world`, on its device.
    pub fn on(&self, device: &'a Device, world: Option<&'a crate::parallel::Group>) -> Self {
        Self { device, world, ..self.clone() }
    }

    /// Random weights drawn per tensor name (`--random-weights`), with the run's hooks; linears
    /// whose names contain one of `nvfp4_paths` are random NVFP4 layers.
    pub(crate) fn random_weights(&self, nvfp4_paths: Vec<String>) -> crate::linear::WeightBuilder<'a> {
        crate::linear::WeightBuilder::synthetic(self.dtype, self.device, nvfp4_paths, self.nvfp4)
            .with_hooks(self.hooks.clone())
    }

    /// A transformer checkpoint opened for loading: its NVFP4 plan's warnings logged (those about
    /// missing scales only when no sibling file supplies them), the builder with the run's hooks,
    /// and the key naming it uses.
    pub(crate) fn transformer_weights(
        &self,
        path: &Path,
    ) -> Result<(crate::linear::WeightBuilder<'a>, crate::models::flux::Naming)> {
        let ckpt = std::sync::Arc::new(crate::nvfp4::Checkpoint::open(path, &self.nvfp4_overrides)?);
        if let Some(plan) = &ckpt.plan {
            for w in &plan.warnings {
                if self.hooks.borrow_scales.is_none() || !w.contains("--nvfp4-scales-from") {
                    log::warn!("{w}");
                }
            }
        }
        let naming = crate::models::flux::Naming::detect(ckpt.files.iter().flat_map(|f| f.header.tensors.keys()));
        let wb = crate::linear::WeightBuilder::new(ckpt, self.dtype, self.device, self.nvfp4)?
            .with_hooks(self.hooks.clone());
        Ok((wb, naming))
    }
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
