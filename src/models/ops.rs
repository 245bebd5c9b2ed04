//! Small numerics shared by the transformers. Norms run in f32 whatever the activation dtype.

use candle_core::{DType, Device, Module, Result, Tensor, D};

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

    /// (weight, eps).
    pub fn parts(&self) -> (&Tensor, f64) {
        (&self.weight, self.eps)
    }

    /// Per-head norm then RoPE of `x` `[B, S, H*D]` (see [`crate::models::fused::qk_norm_rope`]),
    /// returned as `[B, H, S, D]` (a transposed view of a contiguous `[B, S, H, D]`).
    pub fn norm_rope(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        crate::models::fused::qk_norm_rope(x, heads, &self.weight, self.eps, cos, sin)?.transpose(1, 2)
    }
}

impl Module for RmsNorm {
    /// Candle's fused RMSNorm: f32 accumulation, one rounding to `x`'s dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        candle_nn::ops::rms_norm(&x.contiguous()?, &w, self.eps as f32)
    }
}

/// tanh-approximated GELU.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// tanh-GELU on the last dimension's features `>= from` only, the rest as they are (the MLP part
/// of a fused q/k/v/MLP projection's output, where no GEMM epilogue applied it).
pub fn gelu_tanh_from(y: &Tensor, from: usize) -> Result<Tensor> {
    let n = y.dim(D::Minus1)?;
    if from >= n {
        return Ok(y.clone());
    }
    let act = gelu_tanh(&y.narrow(D::Minus1, from, n - from)?)?;
    Tensor::cat(&[&y.narrow(D::Minus1, 0, from)?, &act], D::Minus1)
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
    let freqs = device_constant(&format!("timestep freqs {half} {max_period}"), dev, |dev| {
        let freqs: Vec<f32> = (0..half).map(|i| (((neg_log * i as f32) / half as f32) as f64).exp() as f32).collect();
        Tensor::from_vec(freqs, (1, half), dev)
    })?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// f32 elements of one block of attention scores: queries are processed in chunks so that long
/// video sequences (30k+ tokens) never materialize the full `[B, H, S, S]` score matrix.
const ATTN_SCORE_BLOCK: usize = 1 << 28;

/// Lets cuBLAS run f32 GEMMs on TF32 tensor cores while alive, restoring the previous setting.
/// Used only where the f32 operands hold bf16/f16 values: TF32 keeps 10 mantissa bits, so those
/// products are exact and only the accumulation order changes.
struct Tf32Scope(Option<bool>);

impl Tf32Scope {
    fn new(enable: bool) -> Self {
        if !enable {
            return Self(None);
        }
        let prev = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        Self(Some(prev))
    }
}

impl Drop for Tf32Scope {
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            candle_core::cuda::set_gemm_reduced_precision_f32(prev);
        }
    }
}

/// Which attention implementation runs half-precision attention on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttentionImpl {
    /// cuDNN's fused flash-attention graph in bf16/f16 (builds with the `cudnn` feature).
    Cudnn,
    /// cuDNN's FP8 flash attention on Hopper and newer: q, k, v and the probabilities in E4M3
    /// with one scale per tensor (transformer attention over at least 8192 keys, where it pays;
    /// faster, less exact, see `models::attn_fp8`). Where it cannot run, the run stops with an
    /// error.
    Fp8,
    /// The unfused reference below (f32 score blocks).
    Reference,
}

/// The choice made by `--attention` ([`set_attention_impl`]); unset: `CANDIFF_ATTENTION`.
static CHOSEN: std::sync::OnceLock<AttentionImpl> = std::sync::OnceLock::new();

/// Fixes the attention implementation for this process (the `--attention` flag); a second,
/// different choice is an error.
pub fn set_attention_impl(choice: AttentionImpl) -> Result<()> {
    let set = *CHOSEN.get_or_init(|| choice);
    if set != choice {
        candle_core::bail!(
            "attention implementation already chosen as {set:?}; cannot switch to {choice:?} in one process"
        );
    }
    Ok(())
}

thread_local! {
    /// A choice for the work of one thread ([`with_attention`]), ahead of the process's.
    static SCOPED: std::cell::Cell<Option<AttentionImpl>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with `choice` as this thread's attention implementation (`None`: unchanged), e.g. one
/// variant of `candiff compare` in FP8 attention.
pub fn with_attention<R>(choice: Option<AttentionImpl>, f: impl FnOnce() -> R) -> R {
    let prev = SCOPED.with(|c| c.replace(choice.or(c.get())));
    let out = f();
    SCOPED.with(|c| c.set(prev));
    out
}

/// `--attention` / `CANDIFF_ATTENTION` (`cudnn`, `fp8` or `reference`); default: cuDNN's fused
/// kernel wherever it applies (CUDA, bf16/f16, head dim <= 256 and a multiple of 8, cudnn build).
pub fn attention_impl() -> AttentionImpl {
    if let Some(c) = SCOPED.with(|c| c.get()) {
        return c;
    }
    *CHOSEN.get_or_init(|| match std::env::var("CANDIFF_ATTENTION").as_deref() {
        Ok("reference") => AttentionImpl::Reference,
        Ok("fp8") => AttentionImpl::Fp8,
        Ok("cudnn") | Ok("") | Err(_) => AttentionImpl::Cudnn,
        Ok(other) => {
            log::warn!("CANDIFF_ATTENTION={other} is not `cudnn`, `fp8` or `reference`; using cudnn where it applies");
            AttentionImpl::Cudnn
        }
    })
}

#[cfg(feature = "cudnn")]
fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, fp8: bool) -> Option<Result<Tensor>> {
    use crate::cuda::cudnn::{Sdpa, SDPA_HEAD_DIM_ALIGN, SDPA_MAX_HEAD_DIM};
    let d = q.dim(D::Minus1).ok()?;
    if fp8 && q.device().is_cuda() && crate::cuda::attn_fp8::applies(k.dim(2).ok()?) {
        // Chosen explicitly: it runs or the error says why (no quiet bf16 fallback).
        return Some(crate::cuda::attn_fp8::attention(q, k, v).and_then(|o| o.transpose(1, 2)));
    }
    let applies = attention_impl() != AttentionImpl::Reference
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && d <= SDPA_MAX_HEAD_DIM
        && d % SDPA_HEAD_DIM_ALIGN == 0;
    if !applies {
        return None;
    }
    let op = Sdpa { scale: (1.0 / (d as f64).sqrt()) as f32 };
    // cuDNN takes any strides with unit stride along D; other views (e.g. channel-first VAE
    // attention) are copied once.
    let unit_d = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(q.dtype())?;
        if t.stride()[3] == 1 {
            Ok(t)
        } else {
            t.contiguous()
        }
    };
    let run = || -> Result<Tensor> {
        let out = unit_d(q)?.apply_op3_no_bwd(&unit_d(k)?, &unit_d(v)?, &op)?;
        // [B, Sq, H, D] -> [B, H, Sq, D] view (merging heads afterwards is free).
        out.transpose(1, 2)
    };
    Some(run())
}

#[cfg(not(feature = "cudnn"))]
fn fused_attention(q: &Tensor, _: &Tensor, _: &Tensor, fp8: bool) -> Option<Result<Tensor>> {
    (fp8 && q.device().is_cuda()).then(|| {
        Err(crate::error::CandiffError::Unsupported(
            "--attention fp8 runs through cuDNN, and this binary was built without the `cudnn` feature: rebuild with `--features cudnn` (see README) or use --attention cudnn".into(),
        )
        .into())
    })
}

/// A transformer's scaled dot-product attention over `[B, H, S, D]`: cuDNN's fused kernel where
/// it applies, its FP8 form when chosen (see [`attention_impl`]), else the reference with scores
/// and softmax in f32. The reference applies the scale to the scores (not to q) so that
/// half-precision q/k stay exactly representable.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    match fused_attention(q, k, v, attention_impl() == AttentionImpl::Fp8) {
        Some(out) => out,
        None => attention_reference(q, k, v),
    }
}

/// [`attention`] without the FP8 form: for the VAE, whose attention is a small part of a decode
/// and has head dimensions FP8 attention does not take.
pub fn attention_half(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    match fused_attention(q, k, v, false) {
        Some(out) => out,
        None => attention_reference(q, k, v),
    }
}

/// The unfused attention: f32 score blocks of at most `ATTN_SCORE_BLOCK` elements.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let dtype = q.dtype();
    let (b, h, sq, d) = q.dims4()?;
    let sk = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    // Half-precision runs on the GPU: TF32 for the score and value GEMMs (QK^T is exact there;
    // the probabilities lose f32 bits, well inside bf16 tolerances).
    let _tf32 = Tf32Scope::new(dtype != DType::F32 && q.device().is_cuda());
    let kt = k.to_dtype(DType::F32)?.t()?.contiguous()?;
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let rows = (ATTN_SCORE_BLOCK / (b * h * sk).max(1)).clamp(1, sq);
    let mut outs = Vec::with_capacity(sq.div_ceil(rows));
    for start in (0..sq).step_by(rows) {
        let n = rows.min(sq - start);
        let qc = q.narrow(2, start, n)?.to_dtype(DType::F32)?.contiguous()?;
        let probs = candle_nn::ops::softmax_last_dim(&(qc.matmul(&kt)? * scale)?)?;
        outs.push(probs.matmul(&v)?.to_dtype(dtype)?);
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Tensor::cat(&outs, 2)
}

/// `[B, S, H*D]` -> `[B, H, S, D]`.
pub fn heads(x: &Tensor, h: usize) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    x.reshape((b, s, h, hd / h))?.transpose(1, 2)
}

/// `[B, H, S, D]` -> `[B, S, H*D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, s, h * d))
}

/// Rotary embedding on interleaved pairs `(x[2i], x[2i+1])`; `cos`/`sin` are `[S, D/2]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // Candle's fused interleaved rotation, in f32 (the references rotate in f32).
    let dtype = x.dtype();
    candle_nn::rotary_emb::rope_i(&x.to_dtype(DType::F32)?.contiguous()?, cos, sin)?.to_dtype(dtype)
}

/// RoPE tables for position ids `[S, n_axes]`: per axis `d_a / 2` frequencies `theta^(-2i/d_a)`,
/// angles in f64, then `cos`/`sin` as f32 `[S, sum(d_a) / 2]`. Computed where `device` is: on a
/// GPU no host round trip (reading GPU ids back waited for the stream's queued work, and the host
/// then spent milliseconds on trigonometry while the GPU idled, once per step).
pub fn rope_tables(ids: &Tensor, axes: &[usize], theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let n_axes = axes.len();
    if ids.rank() != 2 || ids.dim(1)? != n_axes {
        candle_core::bail!("rope ids must be [S, {n_axes}], found {:?}", ids.dims());
    }
    let half: usize = axes.iter().sum::<usize>() / 2;
    // [n_axes, half]: column j holds its frequency in its axis's row and zeros elsewhere, so
    // `ids @ freqs` is each position times its frequency, exactly (one nonzero term per column).
    let freqs = device_constant(&format!("rope freqs {axes:?} {theta}"), device, |device| {
        let mut m = vec![0f64; n_axes * half];
        let mut col = 0;
        for (a, &d) in axes.iter().enumerate() {
            for i in 0..d / 2 {
                m[a * half + col] = 1.0 / theta.powf((2 * i) as f64 / d as f64);
                col += 1;
            }
        }
        Tensor::from_vec(m, (n_axes, half), device)
    })?;
    let angles = ids.to_device(device)?.to_dtype(DType::F64)?.contiguous()?.matmul(&freqs)?;
    Ok((angles.cos()?.to_dtype(DType::F32)?, angles.sin()?.to_dtype(DType::F32)?))
}

/// A constant tensor made once per `key` and device (frequency tables read every step), so that
/// steps do not copy it from the host again.
fn device_constant(key: &str, device: &Device, make: impl FnOnce(&Device) -> Result<Tensor>) -> Result<Tensor> {
    type Cache = std::sync::Mutex<std::collections::HashMap<(String, candle_core::DeviceLocation), Tensor>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let k = (key.to_string(), device.location());
    if let Some(t) = cache.lock().expect("constant cache poisoned").get(&k) {
        return Ok(t.clone());
    }
    let t = make(device)?;
    cache.lock().expect("constant cache poisoned").insert(k, t.clone());
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables as a product `ids @ freqs` equal the per-element formula (f64 angle, f32 cos
    /// and sin) bit for bit: each angle has one nonzero term.
    #[test]
    fn rope_tables_match_the_formula() {
        let axes = [16, 56, 56];
        let theta = 10_000.0;
        let ids: Vec<f32> = (0..40).flat_map(|s| [(s % 3) as f32, (s / 3) as f32, (s * 7 % 61) as f32]).collect();
        let ids = Tensor::from_vec(ids.clone(), (40, 3), &Device::Cpu).unwrap();
        let (cos, sin) = rope_tables(&ids, &axes, theta, &Device::Cpu).unwrap();
        let (cos, sin) = (cos.to_vec2::<f32>().unwrap(), sin.to_vec2::<f32>().unwrap());
        let rows = ids.to_vec2::<f32>().unwrap();
        for (s, row) in rows.iter().enumerate() {
            let mut j = 0;
            for (a, &d) in axes.iter().enumerate() {
                for i in 0..d / 2 {
                    let angle = row[a] as f64 * (1.0 / theta.powf((2 * i) as f64 / d as f64));
                    assert_eq!(cos[s][j].to_bits(), (angle.cos() as f32).to_bits(), "cos at {s},{j}");
                    assert_eq!(sin[s][j].to_bits(), (angle.sin() as f32).to_bits(), "sin at {s},{j}");
                    j += 1;
                }
            }
        }
    }
}
