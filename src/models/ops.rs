//! Small numerics shared by the transformers. Norms run in f32 whatever the activation dtype.

use candle_core::{DType, Module, Result, Tensor, D};

/// LayerNorm over the last dimension without affine parameters.
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// RMSNorm over the last dimension with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        xf.broadcast_div(&rms)?.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?.to_dtype(dtype)
    }
}

/// `x * (1 + scale) + shift` with per-sample modulation `[B, C]` over `[B, S, C]`.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// tanh-approximated GELU.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// Sinusoidal embedding of `t` (`[B]`, any float dtype) with `dim` channels, order [cos, sin],
/// frequencies `exp(-ln(max_period) i / half)`, computed in f32.
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    // f32 throughout, in the reference's order: (-ln(P) * i) / half, then exp (correctly rounded).
    // The angles reach t*1000*freq = 4000 rad for guidance, so the rounding of every step shows in
    // the output; this order matches diffusers' get_timestep_embedding.
    let neg_log = -(max_period.ln() as f32);
    let freqs: Vec<f32> = (0..half).map(|i| (((neg_log * i as f32) / half as f32) as f64).exp() as f32).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// Scaled dot-product attention over `[B, H, S, D]`, scores in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let q = (q.to_dtype(DType::F32)? * scale)?;
    let k = k.to_dtype(DType::F32)?;
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(dtype)
}
