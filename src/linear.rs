//! The one linear abstraction every model uses: a dense Candle linear or an NVFP4 linear, chosen
//! per module from the checkpoint's NVFP4 plan. Models never see the difference.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nvfp4::{ActMode, Backend, Checkpoint, Nvfp4Linear};
use crate::safetensors::MappedFile;

#[derive(Debug, Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
    Nvfp4(Nvfp4Linear),
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => l.forward(x),
            Linear::Nvfp4(l) => l.forward(x),
        }
    }
}

impl Linear {
    pub fn is_nvfp4(&self) -> bool {
        matches!(self, Linear::Nvfp4(_))
    }
}

/// How NVFP4 layers are executed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Nvfp4Options {
    pub backend: Backend,
    pub mode: ActMode,
}

/// Where weights come from.
#[derive(Clone)]
enum WeightSource {
    Checkpoint(Arc<Checkpoint>),
    /// Random weights of the right shapes (benchmarks of full-size models without downloads);
    /// linears whose path matches one of `nvfp4` are random NVFP4 layers.
    Synthetic {
        nvfp4: Arc<Vec<String>>,
    },
}

/// Standard deviation of synthetic dense weights: keeps activations of deep random stacks finite.
const SYNTHETIC_STD: f64 = 0.02;

/// Normal(0, `SYNTHETIC_STD`) tensors for any requested name, generated on the device.
struct RandomBackend;

impl candle_nn::var_builder::SimpleBackend for RandomBackend {
    fn get(&self, s: candle_core::Shape, _: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        Tensor::randn(0f32, SYNTHETIC_STD as f32, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("synthetic weights need a shape for `{name}`")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A `VarBuilder` of random Normal(0, 0.02) tensors for any name (benchmarks of full-size
/// components without downloads).
pub fn random_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomBackend), dtype, device.clone())
}

/// Builds a model's modules from one checkpoint: `pp` walks the module tree like a `VarBuilder`
/// (checkpoint names), `linear` returns the right kind of layer for the current path.
#[derive(Clone)]
pub struct WeightBuilder<'a> {
    vb: VarBuilder<'a>,
    source: WeightSource,
    borrow: Option<Arc<MappedFile>>,
    opts: Nvfp4Options,
}

impl<'a> WeightBuilder<'a> {
    /// `dtype` is the compute dtype of dense tensors; NVFP4 layers keep their own storage.
    pub fn new(ckpt: Arc<Checkpoint>, dtype: DType, device: &Device, opts: Nvfp4Options) -> Result<Self> {
        // SAFETY: read-only mapping of checkpoint files (see `MappedFile::open`).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&ckpt.file_paths(), dtype, device)? };
        Ok(Self { vb, source: WeightSource::Checkpoint(ckpt), borrow: None, opts })
    }

    /// Random weights; linears whose path contains one of `nvfp4_paths` become NVFP4 layers
    /// (random codes and scales, prepared for `opts.backend`).
    pub fn synthetic(dtype: DType, device: &Device, nvfp4_paths: Vec<String>, opts: Nvfp4Options) -> Self {
        let vb = VarBuilder::from_backend(Box::new(RandomBackend), dtype, device.clone());
        Self { vb, source: WeightSource::Synthetic { nvfp4: Arc::new(nvfp4_paths) }, borrow: None, opts }
    }

    /// Supplies missing `input_scale` / `weight_scale_2` tensors from a sibling file.
    pub fn with_borrowed_scales(mut self, file: Arc<MappedFile>) -> Self {
        self.borrow = Some(file);
        self
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        Self { vb: self.vb.pp(s), ..self.clone() }
    }

    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    /// The linear at the current path (`weight` `[out, in]`, optional `bias`).
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let module = self.vb.prefix();
        let ckpt = match &self.source {
            WeightSource::Checkpoint(c) => c,
            WeightSource::Synthetic { nvfp4 } => {
                let b = if bias { Some(self.vb.get(out_dim, "bias")?) } else { None };
                if !nvfp4.iter().any(|p| module.contains(p.as_str())) || in_dim % crate::nvfp4::format::GROUP_SIZE != 0
                {
                    let w = self.vb.get((out_dim, in_dim), "weight")?;
                    return Ok(Linear::Dense(candle_nn::Linear::new(w, b)));
                }
                let w = random_nvfp4(out_dim, in_dim, module.len() as u64)?;
                let l = Nvfp4Linear::new(&w, Some(1.0), b, self.opts.backend, self.opts.mode, self.vb.device())?;
                return Ok(Linear::Nvfp4(l));
            }
        };
        let is_nvfp4 = ckpt.plan.as_ref().is_some_and(|p| p.is_quantized(&module));
        if !is_nvfp4 {
            let w = self.vb.get((out_dim, in_dim), "weight")?;
            let b = if bias { Some(self.vb.get(out_dim, "bias")?) } else { None };
            return Ok(Linear::Dense(candle_nn::Linear::new(w, b)));
        }
        let (w, input_scale) = ckpt.load_nvfp4(&module, self.borrow.as_deref())?;
        if (w.n, w.k) != (out_dim, in_dim) {
            candle_core::bail!(
                "`{module}`: the model expects a [{out_dim}, {in_dim}] weight, the checkpoint holds NVFP4 [{}, {}]; is this the right checkpoint for the config?",
                w.n,
                w.k
            );
        }
        let b = if bias { Some(self.vb.get(out_dim, "bias")?) } else { None };
        let l = Nvfp4Linear::new(&w, input_scale, b, self.opts.backend, self.opts.mode, self.vb.device())?;
        Ok(Linear::Nvfp4(l))
    }
}

/// Random NVFP4 weight: uniform codes, block scales around 1, and a global scale giving weights of
/// roughly `SYNTHETIC_STD`.
fn random_nvfp4(n: usize, k: usize, seed: u64) -> Result<crate::nvfp4::Nvfp4Weight> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut packed = vec![0u8; n * k / 2];
    for chunk in packed.chunks_mut(8) {
        let r = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    // E4M3 0x30..0x3F: 0.5 to 1.875.
    let scales: Vec<u8> = (0..n * k / 16).map(|_| 0x30 | (rng.next_u64() as u8 & 0x0F)).collect();
    const TYPICAL_CODE_TIMES_SCALE: f64 = 2.5;
    Ok(crate::nvfp4::Nvfp4Weight::new(n, k, packed, scales, (SYNTHETIC_STD / TYPICAL_CODE_TIMES_SCALE) as f32)?)
}
