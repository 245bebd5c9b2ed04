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

/// Builds a model's modules from one checkpoint: `pp` walks the module tree like a `VarBuilder`
/// (checkpoint names), `linear` returns the right kind of layer for the current path.
#[derive(Clone)]
pub struct WeightBuilder<'a> {
    vb: VarBuilder<'a>,
    ckpt: Arc<Checkpoint>,
    borrow: Option<Arc<MappedFile>>,
    opts: Nvfp4Options,
}

impl<'a> WeightBuilder<'a> {
    /// `dtype` is the compute dtype of dense tensors; NVFP4 layers keep their own storage.
    pub fn new(ckpt: Arc<Checkpoint>, dtype: DType, device: &Device, opts: Nvfp4Options) -> Result<Self> {
        // SAFETY: read-only mapping of checkpoint files (see `MappedFile::open`).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&ckpt.file_paths(), dtype, device)? };
        Ok(Self { vb, ckpt, borrow: None, opts })
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

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    /// The linear at the current path (`weight` `[out, in]`, optional `bias`).
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let module = self.vb.prefix();
        let is_nvfp4 = self.ckpt.plan.as_ref().is_some_and(|p| p.is_quantized(&module));
        if !is_nvfp4 {
            let w = self.vb.get((out_dim, in_dim), "weight")?;
            let b = if bias { Some(self.vb.get(out_dim, "bias")?) } else { None };
            return Ok(Linear::Dense(candle_nn::Linear::new(w, b)));
        }
        let (w, input_scale) = self.ckpt.load_nvfp4(&module, self.borrow.as_deref())?;
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
