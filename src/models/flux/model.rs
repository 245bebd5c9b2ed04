//! The FLUX.1 transformer, one body for every weight format: dense layers and NVFP4 layers come
//! from [`WeightBuilder::linear`]. Loads diffusers names and BFL names (fused `qkv` / `linear1`,
//! `[shift; scale]` final modulation); field names follow diffusers.
//!
//! Shapes: `img` `[B, S_img, in_channels]` (packed latents), `txt` `[B, S_txt, joint_attention_dim]`,
//! `pooled` `[B, pooled_projection_dim]`, `timestep` / `guidance` `[B]` in [0, 1] (multiplied by 1000
//! inside), `img_ids` `[S_img, 3]`, `txt_ids` `[S_txt, 3]`; output `[B, S_img, out_channels]`.

use candle_core::{DType, Module, Result, Tensor, D};

use super::config::FluxConfig;
use crate::linear::{Linear, WeightBuilder};
use crate::models::fused::{cat_act, gated_add, ln_modulate, MlpAct};
use crate::models::ops::{attention, heads, merge_heads, rope_tables, timestep_embedding, RmsNorm};
use crate::parallel::{attend, attend_start, Group, SeqParallel};

/// Norm epsilon of every LayerNorm and q/k RMSNorm in FLUX.
const EPS: f64 = 1e-6;
/// Channels of the sinusoidal timestep / guidance embedding.
const TIME_DIM: usize = 256;
/// Timesteps and guidance arrive in [0, 1]; the model was trained on 1000x.
const TIME_SCALE: f64 = 1000.0;
/// RoPE base of every axis.
const ROPE_THETA: f64 = 10_000.0;
/// Longest period of the sinusoidal time embedding.
const TIME_MAX_PERIOD: f64 = 10_000.0;
/// FLUX's MLP widening.
const MLP_RATIO: usize = 4;

/// Which key names a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Diffusers,
    /// BFL / Comfy single files.
    Bfl,
}

impl Naming {
    /// From the tensor names: `double_blocks.` means BFL.
    pub fn detect<'a>(mut keys: impl Iterator<Item = &'a String>) -> Self {
        if keys.any(|k| k.starts_with("double_blocks.") || k.contains(".double_blocks.")) {
            Naming::Bfl
        } else {
            Naming::Diffusers
        }
    }
}

/// One projection producing several outputs: fused in BFL files, separate in diffusers ones.
#[derive(Debug, Clone)]
pub(crate) enum Proj {
    Fused(Linear, Vec<usize>),
    Split(Vec<Linear>),
}

impl Proj {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Proj::Split(ls) => ls.iter().map(|l| l.forward(x)).collect(),
            Proj::Fused(l, sizes) => {
                let y = l.forward(x)?;
                let mut out = Vec::with_capacity(sizes.len());
                let mut start = 0;
                for &s in sizes {
                    out.push(y.narrow(D::Minus1, start, s)?);
                    start += s;
                }
                Ok(out)
            }
        }
    }
}

/// `linear_2(silu(linear_1(x)))` (BFL: `in_layer` / `out_layer`).
#[derive(Debug, Clone)]
pub(crate) struct Embedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl Embedder {
    pub(crate) fn new(wb: &WeightBuilder, naming: Naming, in_dim: usize, dim: usize, bias: bool) -> Result<Self> {
        let (a, b) = match naming {
            Naming::Diffusers => ("linear_1", "linear_2"),
            Naming::Bfl => ("in_layer", "out_layer"),
        };
        Ok(Self { linear_1: wb.pp(a).linear(in_dim, dim, bias)?, linear_2: wb.pp(b).linear(dim, dim, bias)? })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// The RoPE table rows of the first `n` tokens and of the rest.
pub(crate) type Rope = (Tensor, Tensor);
pub(crate) fn split_rope(rope: &Rope, n: usize) -> Result<(Rope, Rope)> {
    let rest = rope.0.dim(0)? - n;
    Ok(((rope.0.narrow(0, 0, n)?, rope.1.narrow(0, 0, n)?), (rope.0.narrow(0, n, rest)?, rope.1.narrow(0, n, rest)?)))
}

pub(crate) fn chunks(t: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    t.chunk(n, D::Minus1)
}

fn rms(wb: &WeightBuilder, name: &str, dim: usize) -> Result<RmsNorm> {
    Ok(RmsNorm::new(wb.vb().get(dim, name)?, EPS))
}

#[derive(Debug, Clone)]
struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    qkv: Proj,
    add_qkv: Proj,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    norm_added_q: RmsNorm,
    norm_added_k: RmsNorm,
    to_out: Linear,
    to_add_out: Linear,
    ff: (Linear, Linear),
    ff_context: (Linear, Linear),
    heads: usize,
}

impl DoubleBlock {
    fn new(wb: &WeightBuilder, naming: Naming, cfg: &FluxConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let hidden = dim * MLP_RATIO;
        Ok(match naming {
            Naming::Diffusers => {
                let attn = wb.pp("attn");
                let split = |names: [&str; 3]| -> Result<Proj> {
                    Ok(Proj::Split(names.iter().map(|n| attn.pp(n).linear(dim, dim, true)).collect::<Result<_>>()?))
                };
                Self {
                    norm1: wb.pp("norm1").pp("linear").linear(dim, 6 * dim, true)?,
                    norm1_context: wb.pp("norm1_context").pp("linear").linear(dim, 6 * dim, true)?,
                    qkv: split(["to_q", "to_k", "to_v"])?,
                    add_qkv: split(["add_q_proj", "add_k_proj", "add_v_proj"])?,
                    norm_q: rms(&attn.pp("norm_q"), "weight", cfg.attention_head_dim)?,
                    norm_k: rms(&attn.pp("norm_k"), "weight", cfg.attention_head_dim)?,
                    norm_added_q: rms(&attn.pp("norm_added_q"), "weight", cfg.attention_head_dim)?,
                    norm_added_k: rms(&attn.pp("norm_added_k"), "weight", cfg.attention_head_dim)?,
                    to_out: attn.pp("to_out").pp(0).linear(dim, dim, true)?,
                    to_add_out: attn.pp("to_add_out").linear(dim, dim, true)?,
                    ff: (
                        wb.pp("ff").pp("net").pp(0).pp("proj").linear(dim, hidden, true)?,
                        wb.pp("ff").pp("net").pp(2).linear(hidden, dim, true)?,
                    ),
                    ff_context: (
                        wb.pp("ff_context").pp("net").pp(0).pp("proj").linear(dim, hidden, true)?,
                        wb.pp("ff_context").pp("net").pp(2).linear(hidden, dim, true)?,
                    ),
                    heads: cfg.num_attention_heads,
                }
            }
            Naming::Bfl => {
                let stream = |s: &str| -> Result<(Linear, Proj, RmsNorm, RmsNorm, Linear, (Linear, Linear))> {
                    let attn = wb.pp(format!("{s}_attn"));
                    let norm = attn.pp("norm");
                    Ok((
                        wb.pp(format!("{s}_mod")).pp("lin").linear(dim, 6 * dim, true)?,
                        Proj::Fused(attn.pp("qkv").linear(dim, 3 * dim, true)?, vec![dim; 3]),
                        rms(&norm.pp("query_norm"), "scale", cfg.attention_head_dim)?,
                        rms(&norm.pp("key_norm"), "scale", cfg.attention_head_dim)?,
                        attn.pp("proj").linear(dim, dim, true)?,
                        (
                            wb.pp(format!("{s}_mlp")).pp(0).linear(dim, hidden, true)?,
                            wb.pp(format!("{s}_mlp")).pp(2).linear(hidden, dim, true)?,
                        ),
                    ))
                };
                let (norm1, qkv, norm_q, norm_k, to_out, ff) = stream("img")?;
                let (norm1_context, add_qkv, norm_added_q, norm_added_k, to_add_out, ff_context) = stream("txt")?;
                Self {
                    norm1,
                    norm1_context,
                    qkv,
                    add_qkv,
                    norm_q,
                    norm_k,
                    norm_added_q,
                    norm_added_k,
                    to_out,
                    to_add_out,
                    ff,
                    ff_context,
                    heads: cfg.num_attention_heads,
                }
            }
        })
    }

    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        sp: Option<&SeqParallel>,
    ) -> Result<(Tensor, Tensor)> {
        let m = chunks(&self.norm1.forward(&temb.silu()?)?, 6)?;
        let c = chunks(&self.norm1_context.forward(&temb.silu()?)?, 6)?;
        let img_n = ln_modulate(img, &m[0], &m[1], EPS)?;
        let txt_n = ln_modulate(txt, &c[0], &c[1], EPS)?;
        let iq = self.qkv.forward(&img_n)?;
        let tq = self.add_qkv.forward(&txt_n)?;
        let h = self.heads;
        let s_txt = txt.dim(1)?;
        // Joint attention over [txt, img]: each stream's q/k normed and rotated with its rows of
        // the RoPE table (one fused pass each), then joined along the sequence.
        let (rope_t, rope_i) = split_rope(rope, s_txt)?;
        let qk = |t: &Tensor, n: &RmsNorm, i: &Tensor, m: &RmsNorm| -> Result<Tensor> {
            Tensor::cat(&[n.norm_rope(t, h, &rope_t.0, &rope_t.1)?, m.norm_rope(i, h, &rope_i.0, &rope_i.1)?], 2)
        };
        let q = qk(&tq[0], &self.norm_added_q, &iq[0], &self.norm_q)?;
        let k = qk(&tq[1], &self.norm_added_k, &iq[1], &self.norm_k)?;
        let v = heads(&Tensor::cat(&[&tq[2], &iq[2]], 1)?, h)?;
        let o = merge_heads(&attend(sp, &q, &k, &v, attention)?)?;
        let o_txt = o.narrow(1, 0, s_txt)?;
        let o_img = o.narrow(1, s_txt, o.dim(1)? - s_txt)?;

        let img = gated_add(img, &self.to_out.forward(&o_img)?, &m[2])?;
        let img_n = ln_modulate(&img, &m[3], &m[4], EPS)?;
        let ff = self.ff.1.forward(&self.ff.0.forward_gelu(&img_n)?)?;
        let img = gated_add(&img, &ff, &m[5])?;

        let txt = gated_add(txt, &self.to_add_out.forward(&o_txt)?, &c[2])?;
        let txt_n = ln_modulate(&txt, &c[3], &c[4], EPS)?;
        let ff = self.ff_context.1.forward(&self.ff_context.0.forward_gelu(&txt_n)?)?;
        let txt = gated_add(&txt, &ff, &c[5])?;
        Ok((img, txt))
    }
}

#[derive(Debug, Clone)]
struct SingleBlock {
    norm: Linear,
    /// q, k, v, mlp-in (BFL `linear1`; diffusers `attn.to_q/k/v` + `proj_mlp`).
    qkv_mlp: Proj,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// BFL `linear2`.
    proj_out: Linear,
    heads: usize,
}

impl SingleBlock {
    fn new(wb: &WeightBuilder, naming: Naming, cfg: &FluxConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let hidden = dim * MLP_RATIO;
        Ok(match naming {
            Naming::Diffusers => {
                let attn = wb.pp("attn");
                Self {
                    norm: wb.pp("norm").pp("linear").linear(dim, 3 * dim, true)?,
                    qkv_mlp: Proj::Split(vec![
                        attn.pp("to_q").linear(dim, dim, true)?,
                        attn.pp("to_k").linear(dim, dim, true)?,
                        attn.pp("to_v").linear(dim, dim, true)?,
                        wb.pp("proj_mlp").linear(dim, hidden, true)?,
                    ]),
                    norm_q: rms(&attn.pp("norm_q"), "weight", cfg.attention_head_dim)?,
                    norm_k: rms(&attn.pp("norm_k"), "weight", cfg.attention_head_dim)?,
                    proj_out: wb.pp("proj_out").linear(dim + hidden, dim, true)?,
                    heads: cfg.num_attention_heads,
                }
            }
            Naming::Bfl => Self {
                norm: wb.pp("modulation").pp("lin").linear(dim, 3 * dim, true)?,
                qkv_mlp: Proj::Fused(
                    wb.pp("linear1").linear(dim, 3 * dim + hidden, true)?,
                    vec![dim, dim, dim, hidden],
                ),
                norm_q: rms(&wb.pp("norm").pp("query_norm"), "scale", cfg.attention_head_dim)?,
                norm_k: rms(&wb.pp("norm").pp("key_norm"), "scale", cfg.attention_head_dim)?,
                proj_out: wb.pp("linear2").linear(dim + hidden, dim, true)?,
                heads: cfg.num_attention_heads,
            },
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor, rope: &(Tensor, Tensor), sp: Option<&SeqParallel>) -> Result<Tensor> {
        let m = chunks(&self.norm.forward(&temb.silu()?)?, 3)?;
        let xn = ln_modulate(x, &m[0], &m[1], EPS)?;
        // Separate layers: q, k, v first, so the MLP projection's GEMM (independent of attention)
        // runs while q, k, v travel between ranks; a fused layer yields all four at once.
        let (p, mlp_layer) = match &self.qkv_mlp {
            Proj::Split(ls) if ls.len() == 4 => {
                (ls[..3].iter().map(|l| l.forward(&xn)).collect::<Result<Vec<_>>>()?, Some(&ls[3]))
            }
            proj => (proj.forward(&xn)?, None),
        };
        let h = self.heads;
        let q = self.norm_q.norm_rope(&p[0], h, &rope.0, &rope.1)?;
        let k = self.norm_k.norm_rope(&p[1], h, &rope.0, &rope.1)?;
        let attending = attend_start(sp, &q, &k, &heads(&p[2], h)?)?;
        let mlp = match mlp_layer {
            Some(l) => l.forward(&xn)?,
            None => p[3].clone(),
        };
        let o = merge_heads(&attending.finish(attention)?)?;
        // cat(attention, gelu(mlp)) in one pass.
        let y = self.proj_out.forward(&cat_act(Some(&o), &mlp, MlpAct::GeluTanh)?)?;
        gated_add(x, &y, &m[2])
    }
}

#[derive(Debug, Clone)]
pub struct FluxTransformer {
    cfg: FluxConfig,
    naming: Naming,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Embedder,
    guidance_embedder: Option<Embedder>,
    text_embedder: Embedder,
    transformer_blocks: Vec<DoubleBlock>,
    single_transformer_blocks: Vec<SingleBlock>,
    /// `norm_out.linear`: diffusers `[scale; shift]`, BFL `final_layer.adaLN_modulation.1` `[shift; scale]`.
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer {
    /// `wb` is rooted at the transformer's tensors (any prefix already applied).
    pub fn new(cfg: &FluxConfig, wb: &WeightBuilder, naming: Naming) -> Result<Self> {
        let dim = cfg.inner_dim();
        let p = cfg.patch_size * cfg.patch_size;
        let (x_emb, ctx_emb, time, guid, text, double, single, norm_out, proj_out) = match naming {
            Naming::Diffusers => (
                "x_embedder",
                "context_embedder",
                wb.pp("time_text_embed").pp("timestep_embedder"),
                wb.pp("time_text_embed").pp("guidance_embedder"),
                wb.pp("time_text_embed").pp("text_embedder"),
                "transformer_blocks",
                "single_transformer_blocks",
                wb.pp("norm_out").pp("linear"),
                wb.pp("proj_out"),
            ),
            Naming::Bfl => (
                "img_in",
                "txt_in",
                wb.pp("time_in"),
                wb.pp("guidance_in"),
                wb.pp("vector_in"),
                "double_blocks",
                "single_blocks",
                wb.pp("final_layer").pp("adaLN_modulation").pp(1),
                wb.pp("final_layer").pp("linear"),
            ),
        };
        Ok(Self {
            cfg: cfg.clone(),
            naming,
            x_embedder: wb.pp(x_emb).linear(cfg.in_channels * p, dim, true)?,
            context_embedder: wb.pp(ctx_emb).linear(cfg.joint_attention_dim, dim, true)?,
            timestep_embedder: Embedder::new(&time, naming, TIME_DIM, dim, true)?,
            guidance_embedder: if cfg.guidance_embeds {
                Some(Embedder::new(&guid, naming, TIME_DIM, dim, true)?)
            } else {
                None
            },
            text_embedder: Embedder::new(&text, naming, cfg.pooled_projection_dim, dim, true)?,
            transformer_blocks: (0..cfg.num_layers)
                .map(|i| DoubleBlock::new(&wb.pp(double).pp(i), naming, cfg))
                .collect::<Result<_>>()?,
            single_transformer_blocks: (0..cfg.num_single_layers)
                .map(|i| SingleBlock::new(&wb.pp(single).pp(i), naming, cfg))
                .collect::<Result<_>>()?,
            norm_out: norm_out.linear(dim, 2 * dim, true)?,
            proj_out: proj_out.linear(dim, p * cfg.out_channels(), true)?,
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    /// The conditioning vector `temb` `[B, inner]` in the model dtype.
    fn temb(&self, timestep: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor, dtype: DType) -> Result<Tensor> {
        let t = timestep_embedding(&(timestep.to_dtype(DType::F32)? * TIME_SCALE)?, TIME_DIM, TIME_MAX_PERIOD)?;
        let mut temb = self.timestep_embedder.forward(&t.to_dtype(dtype)?)?;
        if let Some(g_emb) = &self.guidance_embedder {
            let g = guidance.ok_or_else(|| {
                candle_core::Error::Msg(
                    "this FLUX transformer embeds guidance (FLUX.1-dev): pass a guidance value".into(),
                )
            })?;
            let g = timestep_embedding(&(g.to_dtype(DType::F32)? * TIME_SCALE)?, TIME_DIM, TIME_MAX_PERIOD)?;
            temb = (temb + g_emb.forward(&g.to_dtype(dtype)?)?)?;
        }
        temb + self.text_embedder.forward(&pooled.to_dtype(dtype)?)?
    }

    /// The modulation dtype follows the weights: the model runs in `dtype`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        pooled: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        dtype: DType,
    ) -> Result<Tensor> {
        self.forward_sharded(img, txt, pooled, timestep, guidance, img_ids, txt_ids, dtype, None)
    }

    /// [`Self::forward`] with the tokens sharded over `group` (Ulysses, as diffusers shards FLUX:
    /// each rank holds a share of the text tokens and of the image tokens). Every member passes the
    /// full inputs and gets the full output.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_sharded(
        &self,
        img: &Tensor,
        txt: &Tensor,
        pooled: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        dtype: DType,
        group: Option<&Group>,
    ) -> Result<Tensor> {
        let device = img.device();
        let ids = Tensor::cat(&[txt_ids, img_ids], 0)?;
        let rope = rope_tables(&ids, &self.cfg.axes_dims_rope, ROPE_THETA, device)?;
        let temb = self.temb(timestep, guidance, pooled, dtype)?;
        let (s_txt, s_img) = (txt.dim(1)?, img.dim(1)?);
        let sp = group.map(|g| SeqParallel::new(g.clone(), &[s_txt, s_img]));
        let (txt, img, rope) = match &sp {
            Some(sp) => sp.shard_joint(txt, img, &rope)?,
            None => (txt.clone(), img.clone(), rope),
        };
        let sp = sp.as_ref();
        let mut img = self.x_embedder.forward(&img.to_dtype(dtype)?)?;
        let mut txt = self.context_embedder.forward(&txt.to_dtype(dtype)?)?;
        for b in &self.transformer_blocks {
            (img, txt) = b.forward(&img, &txt, &temb, &rope, sp)?;
        }
        let s_txt = txt.dim(1)?;
        let mut x = Tensor::cat(&[txt, img], 1)?;
        for b in &self.single_transformer_blocks {
            x = b.forward(&x, &temb, &rope, sp)?;
        }
        let img = x.narrow(1, s_txt, x.dim(1)? - s_txt)?;
        let mods = chunks(&self.norm_out.forward(&temb.silu()?)?, 2)?;
        let (shift, scale) = match self.naming {
            Naming::Diffusers => (&mods[1], &mods[0]),
            Naming::Bfl => (&mods[0], &mods[1]),
        };
        let out = self.proj_out.forward(&ln_modulate(&img, shift, scale, EPS)?)?;
        match sp {
            Some(sp) => sp.gather(&out, 1, 1),
            None => Ok(out),
        }
    }
}
