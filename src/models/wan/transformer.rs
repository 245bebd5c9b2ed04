//! `WanTransformer3DModel` (Wan2.1/2.2 text-to-video: A14B experts and TI2V-5B), diffusers names.
//!
//! One body for bf16 and NVFP4: every projection is a [`crate::linear::Linear`]. Norms,
//! modulation and residual gating run in f32 as in the reference; the time embedder is kept in
//! f32 (diffusers' `_keep_in_fp32_modules`).

use candle_core::{DType, DeviceLocation, Module, Result, Tensor};

use super::config::WanConfig;
use crate::linear::{Gate, Input, Linear, WeightBuilder};
use crate::models::fused::rms_rope;
use crate::models::ops::{attention, gelu_tanh, heads, merge_heads, rope_tables, timestep_embedding, RmsNorm};
use crate::parallel::{attend, Group, SeqParallel};

/// RoPE base of the three axes.
const ROPE_THETA: f64 = 10_000.0;
/// Longest period of the sinusoidal timestep embedding.
const TIME_MAX_PERIOD: f64 = 10_000.0;
/// Per-block modulation vectors: shift, scale, gate of self-attention, then of the FFN.
const BLOCK_MODS: usize = 6;

/// Intermediates the reference exposes, for tests and debugging.
#[derive(Debug, Default)]
pub struct WanTrace {
    pub temb: Option<Tensor>,
    pub timestep_proj: Option<Tensor>,
    pub text_embeds: Option<Tensor>,
    pub block_outputs: Vec<Tensor>,
}

/// Self- or cross-attention with RMS q/k norms over all heads (`rms_norm_across_heads`).
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    heads: usize,
    /// FP8 attention's fixed descales of q and k (the bound the norm puts on them over 448),
    /// computed on first use.
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    qk_descales: std::sync::OnceLock<(f32, f32)>,
}

impl Attention {
    fn new(wb: &WeightBuilder, cfg: &WanConfig, kv_dim: usize) -> Result<Self> {
        let dim = cfg.inner_dim();
        let norm = |n: &str| -> Result<RmsNorm> { Ok(RmsNorm::new(wb.pp(n).vb().get(dim, "weight")?, cfg.eps)) };
        Ok(Self {
            to_q: wb.pp("to_q").linear(dim, dim, true)?,
            to_k: wb.pp("to_k").linear(kv_dim, dim, true)?,
            to_v: wb.pp("to_v").linear(kv_dim, dim, true)?,
            to_out: wb.pp("to_out").pp(0).linear(dim, dim, true)?,
            norm_q: norm("norm_q")?,
            norm_k: norm("norm_k")?,
            heads: cfg.num_attention_heads,
            qk_descales: std::sync::OnceLock::new(),
        })
    }

    /// `h` `[B, S, dim]` (normalized; as a tensor or already in E4M3 for fp8-mode projections);
    /// `ctx` the key/value source for cross-attention; RoPE for self-attention. The output
    /// projection adds onto `residual`. With sharded tokens, self-attention goes through `sp`;
    /// cross-attention stays local (every rank holds the whole text).
    fn forward(
        &self,
        h: &Input,
        ctx: Option<&Tensor>,
        rope: Option<&(Tensor, Tensor)>,
        sp: Option<&SeqParallel>,
        residual: Residual,
    ) -> Result<Tensor> {
        let q = self.to_q.forward_input(h)?;
        let (k, v) = match ctx {
            Some(c) => (self.to_k.forward(c)?, self.to_v.forward(c)?),
            None => (self.to_k.forward_input(h)?, self.to_v.forward_input(h)?),
        };
        let rope = rope.map(|(cos, sin)| (cos, sin));
        let v = heads(&v, self.heads)?;
        let sp = if ctx.is_none() { sp } else { None };
        let o = match self.fp8_descales(sp, &v)? {
            Some(descales) => self.attend_fp8(&q, &k, &v, rope, descales)?,
            None => {
                // The norm over all heads and RoPE per head in one pass, then seen as [B, H, S, D].
                let norm_rope = |x: &Tensor, n: &RmsNorm| -> Result<Tensor> {
                    let (w, eps) = n.parts();
                    heads(&rms_rope(x, w, eps, self.heads, rope)?, self.heads)
                };
                let (q, k) = (norm_rope(&q, &self.norm_q)?, norm_rope(&k, &self.norm_k)?);
                Input::Tensor(merge_heads(&attend(sp, &q, &k, &v, attention)?)?)
            }
        };
        match residual {
            Residual::Gated { gate, x } => self.to_out.forward_gated_input(&o, &Gate::from(gate), x),
            Residual::Add(x) => self.to_out.forward_acc_input(&o, x),
        }
    }

    /// Whether this layer's attention runs in FP8 (`--attention fp8` over enough keys on one rank,
    /// see `cuda::attn_fp8::applies`), and then the fixed descales of q and k: the bound their
    /// norm puts on them over 448. `None`: bf16 attention.
    fn fp8_descales(&self, sp: Option<&SeqParallel>, v: &Tensor) -> Result<Option<(f32, f32)>> {
        #[cfg(feature = "cudnn")]
        if sp.is_none()
            && v.device().is_cuda()
            && crate::models::ops::attention_impl() == crate::models::ops::AttentionImpl::Fp8
            && crate::cuda::attn_fp8::applies(v.dim(2)?)
        {
            use crate::models::attn_fp8::QK_TARGET;
            use crate::models::fused::rms_bound;
            if let Some(d) = self.qk_descales.get() {
                return Ok(Some(*d));
            }
            let d = (rms_bound(self.norm_q.parts().0)? / QK_TARGET, rms_bound(self.norm_k.parts().0)? / QK_TARGET);
            return Ok(Some(*self.qk_descales.get_or_init(|| d)));
        }
        let _ = (sp, v);
        Ok(None)
    }

    /// FP8 attention of the q and k projections and v (`[B, H, S, D]`): q and k normalized,
    /// rotated and written as E4M3 in one pass with the fixed `descales` (no amax or quantization
    /// pass), v quantized per tensor, the output heads-merged — left in E4M3 where the output
    /// projection is an fp8-mode layer (the rounding then stands in for its input quantization),
    /// else dequantized.
    #[cfg(feature = "cudnn")]
    fn attend_fp8(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        (dq, dk): (f32, f32),
    ) -> Result<Input> {
        use crate::cuda::attn_fp8::{attention_fp8_act, attention_operands, Operand};
        let fp8 = |x: &Tensor, n: &RmsNorm, descale: f32| -> Result<Tensor> {
            let (w, eps) = n.parts();
            crate::models::fused::rms_rope_fp8(x, w, eps, self.heads, rope, descale)
        };
        let (q8, k8) = (fp8(q, &self.norm_q, dq)?, fp8(k, &self.norm_k, dk)?);
        let (q, k) = (Operand::Fp8 { codes: &q8, descale: dq }, Operand::Fp8 { codes: &k8, descale: dk });
        let dim = v.dim(1)? * v.dim(3)?;
        crate::profile::span(crate::profile::Part::Attention, v.device(), || {
            if self.to_out.reads_fp8_act(dim, v.dtype()) {
                Ok(Input::Fp8(attention_fp8_act(q, k, v)?))
            } else {
                Ok(Input::Tensor(attention_operands(q, k, v)?.flatten_from(2)?))
            }
        })
    }

    #[cfg(not(feature = "cudnn"))]
    fn attend_fp8(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<(&Tensor, &Tensor)>,
        _: (f32, f32),
    ) -> Result<Input> {
        unreachable!("fp8_descales is None without the cudnn feature")
    }
}

/// What an attention's output projection adds onto.
enum Residual<'a> {
    /// `x + gate ⊙ out`.
    Gated { gate: &'a Tensor, x: &'a Tensor },
    /// `x + out`.
    Add(&'a Tensor),
}

/// LayerNorm with affine parameters, in f32: the fused modulated norm with `scale = weight - 1`.
#[derive(Debug, Clone)]
struct AffineNorm {
    /// `weight - 1`, f32 `[C]`.
    scale: Tensor,
    bias: Tensor,
    eps: f64,
}

impl AffineNorm {
    /// The normalized `x` for `layers` (in E4M3 where they all read it so, see
    /// [`Input::ln_modulate`]).
    fn forward(&self, x: &Tensor, layers: &[&Linear]) -> Result<Input> {
        let (b, _, c) = x.dims3()?;
        let per_sample = |t: &Tensor| t.unsqueeze(0)?.broadcast_as((b, c))?.contiguous();
        Input::ln_modulate(x, &per_sample(&self.bias)?, &per_sample(&self.scale)?, self.eps, layers)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn1: Attention,
    attn2: Attention,
    norm2: Option<AffineNorm>,
    ffn_in: Linear,
    ffn_out: Linear,
    /// `[1, 1, 6, dim]` f32.
    scale_shift_table: Tensor,
    eps: f64,
}

impl Block {
    fn new(wb: &WeightBuilder, cfg: &WanConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let norm2 = if cfg.cross_attn_norm {
            let vb = wb.pp("norm2");
            let vb = vb.vb();
            Some(AffineNorm {
                scale: (vb.get(dim, "weight")?.to_dtype(DType::F32)? - 1.0)?,
                bias: vb.get(dim, "bias")?.to_dtype(DType::F32)?,
                eps: cfg.eps,
            })
        } else {
            None
        };
        let ffn = wb.pp("ffn").pp("net");
        Ok(Self {
            attn1: Attention::new(&wb.pp("attn1"), cfg, dim)?,
            attn2: Attention::new(&wb.pp("attn2"), cfg, dim)?,
            norm2,
            ffn_in: ffn.pp(0).pp("proj").linear(dim, cfg.ffn_dim, true)?,
            ffn_out: ffn.pp(2).linear(cfg.ffn_dim, dim, true)?,
            scale_shift_table: wb
                .vb()
                .get((1, BLOCK_MODS, dim), "scale_shift_table")?
                .to_dtype(DType::F32)?
                .unsqueeze(0)?,
            eps: cfg.eps,
        })
    }

    /// `tproj` `[B, L', 6, dim]` f32 with L' = 1 (one timestep per sample) or the token count.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        tproj: &Tensor,
        rope: &(Tensor, Tensor),
        sp: Option<&SeqParallel>,
    ) -> Result<Tensor> {
        let mods = self.scale_shift_table.broadcast_add(tproj)?;
        let m = |i: usize| -> Result<Tensor> { mods.narrow(2, i, 1)?.squeeze(2) };
        let (shift, scale, gate) = (m(0)?, m(1)?, m(2)?);
        let (c_shift, c_scale, c_gate) = (m(3)?, m(4)?, m(5)?);

        // Modulation `norm(x) * (1 + scale) + shift` in f32, result in x's dtype (or E4M3 for
        // fp8-mode readers); gated residuals `x + gate ⊙ y` in f32.
        let a1 = &self.attn1;
        let h = Input::ln_modulate(x, &shift, &scale, self.eps, &[&a1.to_q, &a1.to_k, &a1.to_v])?;
        let x = a1.forward(&h, None, Some(rope), sp, Residual::Gated { gate: &gate, x })?;

        let h = match &self.norm2 {
            Some(n) => n.forward(&x, &[&self.attn2.to_q])?,
            None => Input::Tensor(x.clone()),
        };
        let x = self.attn2.forward(&h, Some(ctx), None, None, Residual::Add(&x))?;

        let h = Input::ln_modulate(&x, &c_shift, &c_scale, self.eps, &[&self.ffn_in])?;
        self.ffn_out.forward_gated(&self.ffn_in.forward_gelu_input(&h)?, &Gate::from(&c_gate), &x)
    }
}

/// A linear whose dense weights are held in f32 (modules the reference keeps in f32).
fn f32_linear(wb: &WeightBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let l = wb.linear(in_dim, out_dim, true)?;
    Ok(match l.as_dense() {
        Some(d) => Linear::Dense(candle_nn::Linear::new(
            d.weight().to_dtype(DType::F32)?,
            d.bias().map(|b| b.to_dtype(DType::F32)).transpose()?,
        )),
        None => l,
    })
}

pub struct WanTransformer {
    cfg: WanConfig,
    /// The 3D patch embedding, a convolution with kernel = stride = patch, as a linear over
    /// flattened `(C, pt, ph, pw)` patches (dense: bias in the GEMM's epilogue on GPUs, where
    /// Candle's broadcast add took 1.4 ms per TI2V-5B call).
    patch_embedding: Linear,
    time_1: Linear,
    time_2: Linear,
    time_proj: Linear,
    text_1: Linear,
    text_2: Linear,
    blocks: Vec<Block>,
    /// `[1, 1, 2, dim]` f32: (shift, scale) of the output head.
    scale_shift_table: Tensor,
    proj_out: Linear,
    /// RoPE tables per token grid and device: every denoising step of a video uses the same.
    rope_cache: RopeCache,
}

type RopeCache = std::sync::Mutex<std::collections::HashMap<((usize, usize, usize), DeviceLocation), (Tensor, Tensor)>>;

impl WanTransformer {
    pub fn new(cfg: &WanConfig, wb: &WeightBuilder) -> Result<Self> {
        if cfg.image_dim.is_some() || cfg.added_kv_proj_dim.is_some() {
            candle_core::bail!(
                "this Wan transformer takes image conditioning (I2V: image_dim/added_kv_proj_dim set); candiff runs the text-to-video models (T2V-A14B, TI2V-5B)"
            );
        }
        match cfg.qk_norm.as_deref() {
            Some("rms_norm_across_heads") => {}
            other => candle_core::bail!(
                "Wan transformer config: qk_norm {other:?} is not supported (expected \"rms_norm_across_heads\")"
            ),
        }
        let dim = cfg.inner_dim();
        let [pt, ph, pw] = cfg.patch_size;
        let patch_in = cfg.in_channels * pt * ph * pw;
        let pe = wb.pp("patch_embedding");
        let pe_w = pe.vb().get((dim, cfg.in_channels, pt, ph, pw), "weight")?.reshape((dim, patch_in))?;
        let patch_embedding = Linear::Dense(candle_nn::Linear::new(pe_w, Some(pe.vb().get(dim, "bias")?)));
        let ce = wb.pp("condition_embedder");
        let te = ce.pp("time_embedder");
        let tx = ce.pp("text_embedder");
        let blocks = (0..cfg.num_layers).map(|i| Block::new(&wb.pp("blocks").pp(i), cfg)).collect::<Result<_>>()?;
        Ok(Self {
            patch_embedding,
            time_1: f32_linear(&te.pp("linear_1"), cfg.freq_dim, dim)?,
            time_2: f32_linear(&te.pp("linear_2"), dim, dim)?,
            time_proj: ce.pp("time_proj").linear(dim, BLOCK_MODS * dim, true)?,
            text_1: tx.pp("linear_1").linear(cfg.text_dim, dim, true)?,
            text_2: tx.pp("linear_2").linear(dim, dim, true)?,
            blocks,
            scale_shift_table: wb.vb().get((1, 2, dim), "scale_shift_table")?.to_dtype(DType::F32)?.unsqueeze(0)?,
            proj_out: wb.pp("proj_out").linear(dim, cfg.out_channels() * pt * ph * pw, true)?,
            rope_cache: Default::default(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &WanConfig {
        &self.cfg
    }

    /// Tokens of a latent `[C, F, H, W]` after patching.
    pub fn grid(&self, f: usize, h: usize, w: usize) -> Result<(usize, usize, usize)> {
        let [pt, ph, pw] = self.cfg.patch_size;
        if !f.is_multiple_of(pt) || !h.is_multiple_of(ph) || !w.is_multiple_of(pw) {
            candle_core::bail!("latent {f}x{h}x{w} is not divisible by the patch size {pt}x{ph}x{pw}");
        }
        Ok((f / pt, h / ph, w / pw))
    }

    /// RoPE tables for a token grid, `[L, head_dim / 2]` each (made once per grid and device).
    fn rope(&self, grid: (usize, usize, usize), device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let key = (grid, device.location());
        if let Some(t) = self.rope_cache.lock().expect("rope cache poisoned").get(&key) {
            return Ok(t.clone());
        }
        let tables = self.rope_tables(grid, device)?;
        self.rope_cache.lock().expect("rope cache poisoned").insert(key, tables.clone());
        Ok(tables)
    }

    fn rope_tables(&self, (f, h, w): (usize, usize, usize), device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let mut ids = Vec::with_capacity(f * h * w * 3);
        for i in 0..f {
            for j in 0..h {
                for k in 0..w {
                    ids.extend_from_slice(&[i as f32, j as f32, k as f32]);
                }
            }
        }
        let ids = Tensor::from_vec(ids, (f * h * w, 3), &candle_core::Device::Cpu)?;
        rope_tables(&ids, &self.cfg.rope_axes(), ROPE_THETA, device)
    }

    /// `x` `[B, C, F, H, W]` -> `[B, L, C*pt*ph*pw]` with tokens in (f, h, w) order.
    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, f, h, w) = x.dims5()?;
        let [pt, ph, pw] = self.cfg.patch_size;
        let (gf, gh, gw) = self.grid(f, h, w)?;
        x.reshape(vec![b, c, gf, pt, gh, ph, gw, pw])?.permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?.reshape((
            b,
            gf * gh * gw,
            c * pt * ph * pw,
        ))
    }

    /// `[B, L, pt*ph*pw*C]` (C fastest) -> `[B, C, F, H, W]`.
    fn unpatchify(&self, y: &Tensor, (gf, gh, gw): (usize, usize, usize)) -> Result<Tensor> {
        let b = y.dim(0)?;
        let [pt, ph, pw] = self.cfg.patch_size;
        let c = self.cfg.out_channels();
        y.reshape(vec![b, gf, gh, gw, pt, ph, pw, c])?.permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?.reshape((
            b,
            c,
            gf * pt,
            gh * ph,
            gw * pw,
        ))
    }

    /// Noise prediction `[B, C, F, H, W]` (f32) for latents `x`, timesteps `[B]` (one per sample)
    /// or `[B, L]` (one per token, TI2V's `expand_timesteps`), text embeddings `[B, S, text_dim]`.
    pub fn forward(&self, x: &Tensor, timestep: &Tensor, ctx: &Tensor, dtype: DType) -> Result<Tensor> {
        self.forward_traced(x, timestep, ctx, dtype, None)
    }

    /// [`Self::forward`] with the video tokens sharded over `group` (Ulysses self-attention, as
    /// the Wan reference's sequence parallelism does; the text stays whole on every rank). Every
    /// member passes the full inputs and gets the full output.
    pub fn forward_sharded(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        ctx: &Tensor,
        dtype: DType,
        group: Option<&Group>,
    ) -> Result<Tensor> {
        self.run(x, timestep, ctx, dtype, None, group)
    }

    pub fn forward_traced(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        ctx: &Tensor,
        dtype: DType,
        trace: Option<&mut WanTrace>,
    ) -> Result<Tensor> {
        self.run(x, timestep, ctx, dtype, trace, None)
    }

    fn run(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        ctx: &Tensor,
        dtype: DType,
        mut trace: Option<&mut WanTrace>,
        group: Option<&Group>,
    ) -> Result<Tensor> {
        let device = x.device();
        let (b, _, f, h, w) = x.dims5()?;
        let grid = self.grid(f, h, w)?;
        let tokens = grid.0 * grid.1 * grid.2;
        let rope = self.rope(grid, device)?;
        let dim = self.cfg.inner_dim();

        let per_token = match timestep.rank() {
            1 => 1,
            2 if timestep.dim(1)? == tokens => tokens,
            _ => {
                candle_core::bail!("timestep must be [B] or [B, {tokens}] (one per token), found {:?}", timestep.dims())
            }
        };
        let t = timestep.to_dtype(DType::F32)?.flatten_all()?;
        let sinus = timestep_embedding(&t, self.cfg.freq_dim, TIME_MAX_PERIOD)?;
        let temb = self.time_2.forward(&self.time_1.forward(&sinus)?.silu()?)?.to_dtype(dtype)?;
        let tproj = self.time_proj.forward(&temb.silu()?)?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.temb = Some(temb.to_dtype(DType::F32)?);
            tr.timestep_proj = Some(tproj.to_dtype(DType::F32)?);
        }
        let tproj = tproj.to_dtype(DType::F32)?.reshape((b, per_token, BLOCK_MODS, dim))?;
        let temb = temb.to_dtype(DType::F32)?.reshape((b, per_token, 1, dim))?;
        let sp = group.map(|g| SeqParallel::new(g.clone(), &[tokens]));
        // Per-token rows (RoPE, per-token timesteps) of this rank's tokens.
        let (rope, tproj, temb) = match &sp {
            Some(sp) => {
                let (o, l) = sp.local(0);
                let rows =
                    |t: &Tensor, d: usize| if per_token == 1 && d == 1 { Ok(t.clone()) } else { t.narrow(d, o, l) };
                ((rows(&rope.0, 0)?, rows(&rope.1, 0)?), rows(&tproj, 1)?, rows(&temb, 1)?)
            }
            None => (rope, tproj, temb),
        };
        let sp = sp.as_ref();

        let ctx = self.text_2.forward(&gelu_tanh(&self.text_1.forward(&ctx.to_dtype(dtype)?)?)?)?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.text_embeds = Some(ctx.to_dtype(DType::F32)?);
        }

        let patches = self.patchify(&x.to_dtype(dtype)?)?;
        let patches = match sp {
            Some(sp) => sp.shard(&patches, 1, 0)?,
            None => patches,
        };
        let mut hs = self.patch_embedding.forward(&patches)?;
        for block in &self.blocks {
            hs = block.forward(&hs, &ctx, &tproj, &rope, sp)?;
            if let Some(tr) = trace.as_deref_mut() {
                tr.block_outputs.push(hs.to_dtype(DType::F32)?);
            }
        }
        let mods = self.scale_shift_table.broadcast_add(&temb)?;
        let shift = mods.narrow(2, 0, 1)?.squeeze(2)?;
        let scale = mods.narrow(2, 1, 1)?.squeeze(2)?;
        let hs = crate::models::fused::ln_modulate(&hs, &shift, &scale, self.cfg.eps)?;
        let out = self.proj_out.forward(&hs)?;
        let out = match sp {
            Some(sp) => sp.gather(&out, 1, 0)?,
            None => out,
        };
        self.unpatchify(&out.to_dtype(DType::F32)?, grid)?.contiguous()
    }
}
