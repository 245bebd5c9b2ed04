//! Fused element-wise ops of the transformer blocks, as Candle custom ops: a CPU reference (plain
//! f32 loops, used on the CPU) and a CUDA kernel (kernels/fused.cu). Both compute in f32 and return
//! the activation's dtype.
//!
//! - [`ln_modulate`]: `LayerNorm(x) * (1 + scale) + shift` (LayerNorm without affine)
//! - [`gated_add`]: `x + u * gate`
//!
//! `x`/`u` are `[B, S, C]`; `shift`/`scale`/`gate` are `[B, C]` (one per sample) or `[B, S, C]`
//! (one per token), any float dtype (used as f32).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// (rows, C, S, Sm) of a `[B, S, C]` activation with `[B, Sm, C]` modulation.
fn dims(x: &Tensor, m: &Tensor) -> Result<(usize, usize, usize, usize, Tensor)> {
    let (b, s, c) = x.dims3()?;
    let m = m.to_dtype(DType::F32)?;
    let m = match m.rank() {
        2 => m.unsqueeze(1)?,
        _ => m,
    };
    let (mb, sm, mc) = m.dims3()?;
    if mb != b || mc != c || (sm != 1 && sm != s) {
        candle_core::bail!("fused op: modulation {:?} does not fit activations {:?}", m.dims(), x.dims());
    }
    Ok((b * s, c, s, sm, m.contiguous()?))
}

fn f32s(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("fused op: non-contiguous input".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        _ => candle_core::bail!("fused ops take f32, bf16 or f16"),
    })
}

fn store(v: Vec<f32>, like: &CpuStorage) -> CpuStorage {
    match like {
        CpuStorage::BF16(_) => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        CpuStorage::F16(_) => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// Row of the modulation for activation row `r`.
fn mod_row(r: usize, s: usize, sm: usize) -> usize {
    if sm == 1 {
        r / s
    } else {
        r
    }
}

struct LnModulate {
    rows: usize,
    c: usize,
    s: usize,
    sm: usize,
    eps: f32,
}

impl CustomOp3 for LnModulate {
    fn name(&self) -> &'static str {
        "ln-modulate"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        shift: &CpuStorage,
        shl: &Layout,
        scale: &CpuStorage,
        scl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xv, sh, sc) = (f32s(x, xl)?, f32s(shift, shl)?, f32s(scale, scl)?);
        let c = self.c;
        let mut y = vec![0f32; self.rows * c];
        for r in 0..self.rows {
            let row = &xv[r * c..(r + 1) * c];
            let mean = row.iter().sum::<f32>() / c as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
            let rstd = 1.0 / (var + self.eps).sqrt();
            let m = mod_row(r, self.s, self.sm) * c;
            for i in 0..c {
                y[r * c + i] = (row[i] - mean) * rstd * (1.0 + sc[m + i]) + sh[m + i];
            }
        }
        Ok((store(y, x), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        shift: &candle_core::CudaStorage,
        shl: &Layout,
        scale: &candle_core::CudaStorage,
        scl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::fused::ln_modulate(
            x,
            xl,
            shift,
            shl,
            scale,
            scl,
            (self.rows, self.c, self.s, self.sm),
            self.eps,
        )?;
        Ok((y, xl.shape().clone()))
    }
}

struct GatedAdd {
    rows: usize,
    c: usize,
    s: usize,
    sm: usize,
}

impl CustomOp3 for GatedAdd {
    fn name(&self) -> &'static str {
        "gated-add"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        gate: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xv, uv, g) = (f32s(x, xl)?, f32s(u, ul)?, f32s(gate, gl)?);
        let c = self.c;
        let y = (0..self.rows * c)
            .map(|i| {
                let (r, col) = (i / c, i % c);
                xv[i] + uv[i] * g[mod_row(r, self.s, self.sm) * c + col]
            })
            .collect();
        Ok((store(y, x), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        gate: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::fused::gated_add(x, xl, u, ul, gate, gl, (self.rows, self.c, self.s, self.sm))?;
        Ok((y, xl.shape().clone()))
    }
}

struct ChannelRms {
    b: usize,
    c: usize,
    p: usize,
    eps: f32,
    silu: bool,
}

impl candle_core::CustomOp2 for ChannelRms {
    fn name(&self) -> &'static str {
        "channel-rms"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, gamma: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (xv, g) = (f32s(x, xl)?, f32s(gamma, gl)?);
        let (c, p) = (self.c, self.p);
        let mut y = vec![0f32; xv.len()];
        for b in 0..self.b {
            for pos in 0..p {
                let at = |ch: usize| b * c * p + ch * p + pos;
                let ss: f32 = (0..c).map(|ch| xv[at(ch)] * xv[at(ch)]).sum();
                let inv = (c as f32).sqrt() / ss.sqrt().max(self.eps);
                for ch in 0..c {
                    let v = xv[at(ch)] * inv * g[ch];
                    y[at(ch)] = if self.silu { v / (1.0 + (-v).exp()) } else { v };
                }
            }
        }
        Ok((store(y, x), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        gamma: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::fused::channel_rms(x, xl, gamma, gl, (self.b, self.c, self.p), self.eps, self.silu)?;
        Ok((y, xl.shape().clone()))
    }
}

/// The Wan VAE's channel RMS norm: `x / max(||x||_2 over dim 1, eps) * sqrt(C) * gamma`, then SiLU
/// when `silu`; `x` is `[B, C, ...]`, `gamma` `[C]` (any float dtype); f32 math, `x`'s dtype out.
pub fn channel_rms(x: &Tensor, gamma: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || gamma.elem_count() != dims[1] {
        candle_core::bail!("channel_rms: gamma of {} values for activations {:?}", gamma.elem_count(), dims);
    }
    let (b, c) = (dims[0], dims[1]);
    let p = dims[2..].iter().product();
    let g = gamma.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
    x.contiguous()?.apply_op2_no_bwd(&g, &ChannelRms { b, c, p, eps: eps as f32, silu })
}

/// `LayerNorm(x) * (1 + scale) + shift`, f32 math, in `x`'s dtype.
pub fn ln_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let (rows, c, s, sm, shift) = dims(x, shift)?;
    let (_, _, _, _, scale) = dims(x, scale)?;
    let op = LnModulate { rows, c, s, sm, eps: eps as f32 };
    x.contiguous()?.apply_op3_no_bwd(&shift, &scale, &op)
}

/// [`ln_modulate`] of bf16 GPU activations straight to what fp8-mode layers read (E4M3 rows, one
/// scale per row; the same bytes as `ln_modulate` then the layers' own quantization).
#[cfg(feature = "cuda")]
pub fn ln_modulate_fp8(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<crate::cuda::fp8::Fp8Act> {
    let (rows, c, s, sm, shift) = dims(x, shift)?;
    let (_, _, _, _, scale) = dims(x, scale)?;
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ss, sl) = shift.storage_and_layout();
    let (cs, cl) = scale.storage_and_layout();
    let (candle_core::Storage::Cuda(xs), candle_core::Storage::Cuda(ss), candle_core::Storage::Cuda(cs)) =
        (&*xs, &*ss, &*cs)
    else {
        candle_core::bail!("ln_modulate_fp8: GPU tensors only");
    };
    let (q, sa) = crate::cuda::fused::ln_modulate_fp8(xs, xl, ss, sl, cs, cl, (rows, c, s, sm), eps as f32)?;
    Ok(crate::cuda::fp8::Fp8Act::from_parts(&xs.device, q, sa, rows, x.dims(), x.dtype()))
}

/// `x + u * gate`, f32 math, in `x`'s dtype (`u` is converted to it).
pub fn gated_add(x: &Tensor, u: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (rows, c, s, sm, gate) = dims(x, gate)?;
    if u.dims() != x.dims() {
        candle_core::bail!("gated_add: u {:?} does not match x {:?}", u.dims(), x.dims());
    }
    let u = u.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op3_no_bwd(&u, &gate, &GatedAdd { rows, c, s, sm })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `rms_bound` holds for any row, RoPE included, and is reached by a row whose energy sits in
    /// one value (so a scale from it wastes no range it need not).
    #[test]
    fn rms_rope_stays_within_rms_bound_which_a_spike_reaches() {
        let (s, heads, d) = (6, 3, 8);
        let c = heads * d;
        let w = Tensor::randn(0f32, 1.0, c, &Device::Cpu).unwrap();
        let bound = rms_bound(&w).unwrap();
        let ang = Tensor::randn(0f32, 3.0, (s, d / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let absmax = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let x = Tensor::randn(0f32, 5.0, (2, s, c), &Device::Cpu).unwrap();
        for rope in [None, Some((&cos, &sin))] {
            let y = rms_rope(&x, &w, 1e-6, heads, rope).unwrap();
            assert!(absmax(&y) <= bound * (1.0 + 1e-5), "random rows: {} over the bound {bound}", absmax(&y));
        }
        // All of each token's energy in the value whose weight is largest.
        let top = w.abs().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap() as usize;
        let spike: Vec<f32> = (0..s * c).map(|i| if i % c == top { 3.0 } else { 0.0 }).collect();
        let x = Tensor::from_vec(spike, (1, s, c), &Device::Cpu).unwrap();
        let y = rms_rope(&x, &w, 0.0, heads, None).unwrap();
        assert!((absmax(&y) - bound).abs() <= bound * 1e-5, "spike: {} against the bound {bound}", absmax(&y));
    }

    #[test]
    fn bias_act_reference_matches_the_unfused_ops() {
        let x = Tensor::randn(0f32, 2.0, (2, 5, 24), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, 24, &Device::Cpu).unwrap();
        let plain = x.broadcast_add(&b).unwrap();
        for (gelu, want) in [(false, plain.clone()), (true, plain.gelu().unwrap())] {
            let got = bias_act(&x, &b, gelu).unwrap();
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-6, "gelu={gelu}: {d}");
        }
    }

    /// The loops against the same math in Candle ops (f32).
    #[test]
    fn references_match_candle_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 5, 48), &dev).unwrap();
        for m in [Shape::from((2, 48)), Shape::from((2, 5, 48))] {
            let shift = Tensor::randn(0f32, 1.0, m.clone(), &dev).unwrap();
            let scale = Tensor::randn(0f32, 1.0, m.clone(), &dev).unwrap();
            let b = |t: &Tensor| if t.rank() == 2 { t.unsqueeze(1).unwrap() } else { t.clone() };
            let want = crate::models::ops::layer_norm_no_affine(&x, 1e-6)
                .unwrap()
                .broadcast_mul(&(b(&scale) + 1.0).unwrap())
                .unwrap()
                .broadcast_add(&b(&shift))
                .unwrap();
            let got = ln_modulate(&x, &shift, &scale, 1e-6).unwrap();
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "ln_modulate {m:?}: {d}");
            let u = Tensor::randn(0f32, 1.0, (2, 5, 48), &dev).unwrap();
            let want = (&x + u.broadcast_mul(&b(&scale)).unwrap()).unwrap();
            let got = gated_add(&x, &u, &scale).unwrap();
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-6, "gated_add {m:?}: {d}");
        }
        // Channel RMS (+ SiLU) against Candle ops.
        let v = Tensor::randn(0f32, 1.0, (2, 6, 3, 4, 5), &dev).unwrap();
        let gamma = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let norm = v.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap().maximum(1e-12).unwrap();
        let want = (v.broadcast_div(&norm).unwrap() * 6f64.sqrt())
            .unwrap()
            .broadcast_mul(&gamma.reshape((1, 6, 1, 1, 1)).unwrap())
            .unwrap();
        for silu in [false, true] {
            let w = if silu { want.silu().unwrap() } else { want.clone() };
            let got = channel_rms(&v, &gamma, 1e-12, silu).unwrap();
            let d = (got - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "channel_rms silu={silu}: {d}");
        }
        // bf16 storage: f32 math, one rounding at the end.
        let xb = x.to_dtype(DType::BF16).unwrap();
        let g = Tensor::ones((2, 48), DType::F32, &dev).unwrap();
        let y = gated_add(&xb, &xb, &g).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let d = (y.to_dtype(DType::F32).unwrap() - (xb.to_dtype(DType::F32).unwrap() * 2.0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }
}

/// tanh-approximated GELU in f32, in Candle's operation order (the CPU reference of the fused pass).
fn gelu_tanh_f32(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    const CUBIC: f32 = 0.044715;
    0.5 * v * (1.0 + (SQRT_TWO_OVER_PI * v * (1.0 + CUBIC * v * v)).tanh())
}

struct BiasAct {
    c: usize,
    gelu: bool,
}

impl candle_core::CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (xv, bv) = (f32s(x, xl)?, f32s(b, bl)?);
        let y = xv
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let v = v + bv[i % self.c];
                if self.gelu {
                    gelu_tanh_f32(v)
                } else {
                    v
                }
            })
            .collect();
        Ok((store(y, x), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::fused::bias_act(x, xl, b, bl, self.c, self.gelu)?, xl.shape().clone()))
    }
}

/// `act(x + bias)` over the last dimension in one pass (`act` = identity or tanh-GELU when
/// `gelu`); f32 math, `x`'s dtype out.
pub fn bias_act(x: &Tensor, bias: &Tensor, gelu: bool) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    if bias.elem_count() != c {
        candle_core::bail!("bias_act: bias of {} values for activations {:?}", bias.elem_count(), x.dims());
    }
    // A no-op for the model's own bias (already in the activations' dtype).
    let b = bias.to_dtype(x.dtype())?.flatten_all()?.contiguous()?;
    x.contiguous()?.apply_op2_no_bwd(&b, &BiasAct { c, gelu })
}

/// Per-head RMSNorm (weight `[D]`, `eps`) then interleaved-pair RoPE (`cos`/`sin` `[S, D/2]` f32)
/// of `x` `[B, S, H*D]` (any token stride: e.g. a slice of a fused qkv output), returned as a
/// contiguous `[B, S, H, D]`. The CUDA kernel reads the strided view in place; elsewhere this is
/// the unfused composition (its reference).
pub fn qk_norm_rope(x: &Tensor, heads: usize, weight: &Tensor, eps: f64, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    norm_rope_impl(x, heads, Some((weight, eps)), cos, sin)
}

/// Interleaved-pair RoPE alone of `x` `[B, S, H*D]` into a contiguous `[B, S, H, D]` (one pass on
/// the GPU instead of an f32 round trip of a strided view); models whose q/k norm spans all heads
/// (Wan) normalize first.
pub fn rope_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    norm_rope_impl(x, heads, None, cos, sin)
}

/// RMSNorm over each token's whole row (all heads; `weight` `[C]`, Wan's
/// `rms_norm_across_heads`), then, with `rope` (cos/sin `[S, D/2]` f32), interleaved-pair RoPE per
/// head of `x` `[B, S, C]`; `[B, S, C]` out. One pass on the GPU (values rounded to `x`'s dtype
/// after the norm, as the unfused ops do); elsewhere the unfused ops, its reference.
pub fn rms_rope(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    rms_rope_impl(x, weight, eps, heads, rope, None)
}

/// [`rms_rope`] written as E4M3 codes of `value * (1 / descale)` (u8 `[B, S, C]`, GPU only): FP8
/// attention's q or k with a scale fixed beforehand, e.g. from the bound the norm puts on the
/// values ([`rms_bound`]). The same bytes as [`rms_rope`] then quantizing with that scale.
#[cfg(feature = "cuda")]
pub fn rms_rope_fp8(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
    descale: f32,
) -> Result<Tensor> {
    if !x.device().is_cuda() {
        candle_core::bail!("rms_rope_fp8: GPU tensors only");
    }
    rms_rope_impl(x, weight, eps, heads, rope, Some(descale))
}

/// The largest magnitude [`rms_rope`] can produce with norm weight `weight` over rows of `c`:
/// RMSNorm bounds every value by `sqrt(c) * |w_i|` (one value holding the whole row's energy),
/// and RoPE rotates pairs, so a rotated value is bounded by the larger of its pair's bounds.
pub fn rms_bound(weight: &Tensor) -> Result<f32> {
    let c = weight.elem_count();
    let wmax = weight.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok((c as f32).sqrt() * wmax)
}

fn rms_rope_impl(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
    fp8_descale: Option<f32>,
) -> Result<Tensor> {
    let (b, s, c) = x.dims3()?;
    let d = c / heads;
    if d * heads != c
        || weight.elem_count() != c
        || rope.is_some_and(|(cs, sn)| cs.dims() != [s, d / 2] || sn.dims() != [s, d / 2])
    {
        candle_core::bail!("rms_rope: x {:?} with {heads} heads and weight {:?} do not fit", x.dims(), weight.dims());
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let x = x.contiguous()?;
        let w = weight.to_dtype(x.dtype())?.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (candle_core::Storage::Cuda(xs), candle_core::Storage::Cuda(ws)) = (&*xs, &*ws) else {
            candle_core::bail!("rms_rope: GPU tensors only")
        };
        let tables = match rope {
            Some((cs, sn)) => Some((cs.to_dtype(DType::F32)?.contiguous()?, sn.to_dtype(DType::F32)?.contiguous()?)),
            None => None,
        };
        let guards = tables.as_ref().map(|(cs, sn)| (cs.storage_and_layout(), sn.storage_and_layout()));
        let rope_parts = match &guards {
            Some(((cst, cl), (sst, sl))) => match (&**cst, &**sst) {
                (candle_core::Storage::Cuda(cs), candle_core::Storage::Cuda(ss)) => Some(((cs, *cl), (ss, *sl))),
                _ => candle_core::bail!("rms_rope: RoPE tables on the GPU only"),
            },
            None => None,
        };
        let y = crate::cuda::fused::rms_rope(xs, xl, (ws, wl), rope_parts, (b * s, c, d, s), eps as f32, fp8_descale)?;
        return Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(y),
            (b, s, c),
            candle_core::op::BackpropOp::none(),
            false,
        ));
    }
    let _ = fp8_descale;
    use candle_core::Module;
    let normed = crate::models::ops::RmsNorm::new(weight.clone(), eps).forward(x)?;
    match rope {
        Some((cs, sn)) => rope_heads(&normed, heads, cs, sn)?.reshape((b, s, c)),
        None => Ok(normed),
    }
}

fn norm_rope_impl(
    x: &Tensor,
    heads: usize,
    norm: Option<(&Tensor, f64)>,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    let d = hd / heads;
    if d * heads != hd
        || norm.is_some_and(|(w, _)| w.elem_count() != d)
        || cos.dims() != [s, d / 2]
        || sin.dims() != [s, d / 2]
    {
        candle_core::bail!(
            "qk_norm_rope: x {:?} with {heads} heads, cos {:?}, sin {:?} do not fit",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.stride()[2] == 1 {
        let mut y = crate::cuda::fused::uninit_like(x, b * s * hd)?;
        write_heads(x, heads, norm, Some((cos, sin)), &mut y, HeadsOut::contiguous(s, heads, d))?;
        return Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(y),
            (b, s, heads, d),
            candle_core::op::BackpropOp::none(),
            false,
        ));
    }
    let _ = b;
    let xh = crate::models::ops::heads(x, heads)?;
    let xh = match norm {
        Some((w, eps)) => {
            use candle_core::Module;
            crate::models::ops::RmsNorm::new(w.clone(), eps).forward(&xh)?
        }
        None => xh,
    };
    crate::models::ops::apply_rope(&xh, cos, sin)?.transpose(1, 2)?.contiguous()
}

/// Division by a divisor fixed for a launch, as kernels/fastdiv.cuh computes it: `n / d` =
/// `(n * mul) >> shift` for every `n < 2^31`, with `shift = 31 + ceil(log2 d)` and
/// `mul = ceil(2^shift / d)` (below 2^32 for `d < 2^31`). The kernels take (mul, shift) in place
/// of 64-bit divisions in their index arithmetic.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastDiv {
    pub mul: u32,
    pub shift: u32,
}

impl FastDiv {
    /// Largest dividend (exclusive) and divisor the form is exact for.
    pub const LIMIT: usize = 1 << 31;

    pub fn new(d: usize) -> Result<Self> {
        if d == 0 || d >= Self::LIMIT {
            candle_core::bail!("FastDiv: divisor {d} outside [1, 2^31)");
        }
        let shift = 31 + d.next_power_of_two().trailing_zeros();
        let mul = (1u64 << shift).div_ceil(d as u64);
        Ok(Self { mul: u32::try_from(mul).map_err(|_| candle_core::Error::Msg(format!("FastDiv: {d}")))?, shift })
    }

    /// The kernels' formula (the reference their index arithmetic is tested against).
    pub fn div(&self, n: u32) -> u32 {
        ((n as u64 * self.mul as u64) >> self.shift) as u32
    }
}

/// Where the `qk_norm_rope` kernel reads: element (b, s, h, d) at `start + b*sb + s*ss + h*sh + d`.
#[derive(Debug, Clone, Copy)]
pub struct HeadsIn {
    pub start: usize,
    pub sb: usize,
    pub ss: usize,
    pub sh: usize,
}

/// Where the `qk_norm_rope` kernel writes: row (b, s, h) of `d` values at
/// `start + (h / hl)*yp + b*yb + s*ys + (h % hl)*d` (kernels/fused.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadsOut {
    pub start: usize,
    pub yb: usize,
    pub ys: usize,
    pub yp: usize,
    pub hl: usize,
}

impl HeadsOut {
    /// A contiguous `[B, S, H, D]`.
    pub fn contiguous(s: usize, h: usize, d: usize) -> Self {
        Self { start: 0, yb: s * h * d, ys: h * d, yp: 0, hl: h }
    }

    /// First element of row (b, s, h) (the kernel's formula).
    pub fn row(&self, b: usize, s: usize, h: usize, d: usize) -> usize {
        self.start + (h / self.hl) * self.yp + b * self.yb + s * self.ys + (h % self.hl) * d
    }
}

/// Launches `qk_norm_rope` (kernels/fused.cu) on `x`, a `[B, S, H*D]` view with heads contiguous
/// in a token (`H` = `heads`) or a `[B, H, S, D]` view with unit stride along D, writing its rows
/// into `y` where `dst` puts them. `norm` / `rope` (tables `[S, D/2]`, read as contiguous f32: a
/// no-op for the model's own) select the mode; neither copies. The caller sizes `y` for `dst`.
#[cfg(feature = "cuda")]
pub(crate) fn write_heads(
    x: &Tensor,
    heads: usize,
    norm: Option<(&Tensor, f64)>,
    rope: Option<(&Tensor, &Tensor)>,
    y: &mut candle_core::CudaStorage,
    dst: HeadsOut,
) -> Result<()> {
    let st = x.stride();
    let (b, s, d, src) = match x.rank() {
        3 if st[2] == 1 => {
            let (b, s, hd) = x.dims3()?;
            (b, s, hd / heads, HeadsIn { start: 0, sb: st[0], ss: st[1], sh: hd / heads })
        }
        4 if st[3] == 1 && x.dim(1)? == heads => {
            let (b, _, s, d) = x.dims4()?;
            (b, s, d, HeadsIn { start: 0, sb: st[0], ss: st[2], sh: st[1] })
        }
        _ => candle_core::bail!(
            "write_heads: expected [B, S, H*D] or [B, H, S, D] ({heads} heads) with unit last stride, found {:?} / {st:?}",
            x.dims()
        ),
    };
    let w = match norm {
        Some((w, _)) => Some(w.to_dtype(x.dtype())?.contiguous()?),
        None => None,
    };
    let f32c = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.contiguous() };
    let rope = match rope {
        Some((c, s)) => Some((f32c(c)?, f32c(s)?)),
        None => None,
    };
    let rope = rope.as_ref().map(|(c, s)| (c, s));
    let (xs, xl) = x.storage_and_layout();
    let candle_core::Storage::Cuda(xs) = &*xs else { candle_core::bail!("write_heads: a GPU tensor") };
    let src = HeadsIn { start: xl.start_offset(), ..src };
    let wg = w.as_ref().map(|w| w.storage_and_layout());
    let w_arg = match &wg {
        Some((st, wl)) => match &**st {
            candle_core::Storage::Cuda(ws) => Some((ws, *wl)),
            _ => candle_core::bail!("write_heads: the norm weight is not on the GPU"),
        },
        None => None,
    };
    let rg = rope.map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
    let r_arg = match &rg {
        Some(((cs, cl), (ss, sl))) => match (&**cs, &**ss) {
            (candle_core::Storage::Cuda(cs), candle_core::Storage::Cuda(ss)) => Some(((cs, *cl), (ss, *sl))),
            _ => candle_core::bail!("write_heads: RoPE tables not on the GPU"),
        },
        None => None,
    };
    if rope.is_some_and(|(c, _)| c.dims() != [s, d / 2]) {
        candle_core::bail!("write_heads: RoPE table {:?} for {s} tokens of head size {d}", rope.map(|r| r.0.dims()));
    }
    let eps = norm.map_or(0.0, |n| n.1) as f32;
    crate::cuda::fused::qk_norm_rope(xs, src, (b, s, heads, d), w_arg, r_arg, eps, y, dst)
}

/// The activation of [`cat_act`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpAct {
    /// tanh-GELU of `w` values (FLUX.1).
    GeluTanh,
    /// `silu(first half) * second half` of `2w` values (FLUX.2).
    SwiGlu,
}

/// `[o, act(m)]` along the last dimension in one pass (`o` `[B, S, C]`, optional: `None` gives
/// `act(m)` alone). `m` `[B, S, W or 2W]` may be a column slice of a wider tensor (read in place on
/// the GPU). Elsewhere the unfused composition.
pub fn cat_act(o: Option<&Tensor>, m: &Tensor, act: MlpAct) -> Result<Tensor> {
    let (b, s, mw) = m.dims3()?;
    let w = match act {
        MlpAct::GeluTanh => mw,
        MlpAct::SwiGlu => mw / 2,
    };
    let c = match o {
        Some(o) => {
            let (ob, os, oc) = o.dims3()?;
            if (ob, os) != (b, s) || o.dtype() != m.dtype() {
                candle_core::bail!(
                    "cat_act: o {:?} {:?} does not fit m {:?} {:?}",
                    o.dims(),
                    o.dtype(),
                    m.dims(),
                    m.dtype()
                );
            }
            oc
        }
        None => 0,
    };
    #[cfg(feature = "cuda")]
    if m.device().is_cuda() && m.stride()[2] == 1 && (b == 1 || m.stride()[0] == s * m.stride()[1]) {
        let o = o.map(|o| o.contiguous()).transpose()?;
        let (ms, ml) = m.storage_and_layout();
        let candle_core::Storage::Cuda(ms) = &*ms else { unreachable!("cuda tensor") };
        let guard = o.as_ref().map(|o| o.storage_and_layout());
        let o_arg = match &guard {
            Some((st, ol)) => match &**st {
                candle_core::Storage::Cuda(os) => Some((os, *ol)),
                _ => unreachable!("cuda tensor"),
            },
            None => None,
        };
        let y = crate::cuda::fused::cat_act(
            o_arg,
            ms,
            (ml.start_offset(), m.stride()[1]),
            (b * s, c, w),
            act == MlpAct::SwiGlu,
        )?;
        drop(guard);
        return Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(y),
            (b, s, c + w),
            candle_core::op::BackpropOp::none(),
            false,
        ));
    }
    let _ = c;
    let a = match act {
        MlpAct::GeluTanh => m.gelu()?,
        MlpAct::SwiGlu => (m.narrow(2, 0, w)?.silu()? * m.narrow(2, w, w)?)?,
    };
    match o {
        Some(o) => Tensor::cat(&[o, &a], 2),
        None => Ok(a),
    }
}

#[cfg(test)]
mod fast_div_tests {
    use super::FastDiv;

    /// Exact against integer division over divisors from 1 to large, powers of two and their
    /// neighbours, and dividends up to 2^31 - 1 (edges and pseudo-random ones).
    #[test]
    fn fast_division_is_exact_below_2_pow_31() {
        let mut divisors: Vec<usize> = (1..=300).collect();
        for k in 1..31 {
            let p = 1usize << k;
            divisors.extend([p - 1, p, p + 1]);
        }
        divisors.extend([3072, 4608, 27280, 76_000, 1_000_003, (1 << 31) - 1]);
        let mut rng = crate::rng::Rng::new(11);
        for &d in &divisors {
            let f = FastDiv::new(d).unwrap();
            let mut ns: Vec<u32> = vec![0, 1, (1 << 31) - 1, (1 << 31) - 2];
            for m in [1usize, 2, 3, 1000, 77_777] {
                let q = (m * d).min((1 << 31) - 1) as u32;
                ns.extend([q, q.saturating_sub(1), q.saturating_add(1).min((1 << 31) - 1)]);
            }
            ns.extend((0..200).map(|_| (rng.next_u64() % (1 << 31)) as u32));
            for n in ns {
                assert_eq!(f.div(n), n / d as u32, "{n} / {d} with {f:?}");
            }
        }
        assert!(FastDiv::new(0).is_err() && FastDiv::new(1 << 31).is_err());
    }
}
