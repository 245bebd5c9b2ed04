//! The FLUX.2 transformer, one body for every weight format (dense and NVFP4 layers both come from
//! [`WeightBuilder::linear`]). Loads diffusers names and BFL names (fused `qkv`, `linear1` with the
//! SwiGLU rows, `[shift; scale]` final modulation); field names follow diffusers.
//!
//! Differences from FLUX.1 that matter here: no biases, no pooled text vector, modulation computed
//! once per stream and shared by every block, SwiGLU MLPs, 4-axis RoPE with theta 2000.
//!
//! Shapes: `img` `[B, S_img, in_channels]` (packed latent tokens), `txt` `[B, S_txt,
//! joint_attention_dim]`, `timestep` / `guidance` `[B]` (sigma in [0, 1] and the raw guidance
//! scale; both multiplied by 1000 inside), `img_ids` `[S_img, n_axes]`, `txt_ids` `[S_txt, n_axes]`;
//! output `[B, S_img, out_channels]`.

use candle_core::{DType, Module, Result, Tensor, D};

use super::config::Flux2Config;
use crate::linear::{Gate, Linear, WeightBuilder};
use crate::models::flux::model::{
    chunks, heads_view, split_rope, start_joint_attention, Embedder, OutProj, Proj, StreamQkv,
};
use crate::models::flux::Naming;
use crate::models::fused::{cat_act, ln_modulate, MlpAct};
use crate::models::ops::{attention, merge_heads, rope_tables, timestep_embedding, RmsNorm};
use crate::parallel::{Group, SeqParallel};

/// Timesteps and guidance arrive in [0, 1] / as the raw scale; the model was trained on 1000x.
const TIME_SCALE: f64 = 1000.0;
/// Longest period of the sinusoidal time embedding.
const TIME_MAX_PERIOD: f64 = 10_000.0;

/// `silu(first half) * second half` of the last dimension (one fused pass on the GPU).
fn swiglu(x: &Tensor) -> Result<Tensor> {
    cat_act(None, x, MlpAct::SwiGlu)
}

fn rms(wb: &WeightBuilder, name: &str, cfg: &Flux2Config) -> Result<RmsNorm> {
    Ok(RmsNorm::new(wb.vb().get(cfg.attention_head_dim, name)?, cfg.eps))
}

/// One stream of a double block: its q/k/v, q/k norms, output projection and SwiGLU MLP.
#[derive(Debug, Clone)]
struct Stream {
    qkv: Proj,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    out: Linear,
    mlp_in: Linear,
    mlp_out: Linear,
}

#[derive(Debug, Clone)]
struct DoubleBlock {
    img: Stream,
    txt: Stream,
    heads: usize,
    eps: f64,
}

impl DoubleBlock {
    fn new(wb: &WeightBuilder, naming: Naming, cfg: &Flux2Config) -> Result<Self> {
        let (dim, mlp) = (cfg.inner_dim(), cfg.mlp_hidden());
        let (img, txt) = match naming {
            Naming::Diffusers => {
                let attn = wb.pp("attn");
                let split = |names: [&str; 3]| -> Result<Proj> {
                    Proj::Split(names.iter().map(|n| attn.pp(n).linear(dim, dim, false)).collect::<Result<_>>()?)
                        .fused()
                };
                let ff = |name: &str| -> Result<(Linear, Linear)> {
                    let ff = wb.pp(name);
                    Ok((ff.pp("linear_in").linear(dim, 2 * mlp, false)?, ff.pp("linear_out").linear(mlp, dim, false)?))
                };
                let (img_in, img_out) = ff("ff")?;
                let (txt_in, txt_out) = ff("ff_context")?;
                (
                    Stream {
                        qkv: split(["to_q", "to_k", "to_v"])?,
                        norm_q: rms(&attn.pp("norm_q"), "weight", cfg)?,
                        norm_k: rms(&attn.pp("norm_k"), "weight", cfg)?,
                        out: attn.pp("to_out").pp(0).linear(dim, dim, false)?,
                        mlp_in: img_in,
                        mlp_out: img_out,
                    },
                    Stream {
                        qkv: split(["add_q_proj", "add_k_proj", "add_v_proj"])?,
                        norm_q: rms(&attn.pp("norm_added_q"), "weight", cfg)?,
                        norm_k: rms(&attn.pp("norm_added_k"), "weight", cfg)?,
                        out: attn.pp("to_add_out").linear(dim, dim, false)?,
                        mlp_in: txt_in,
                        mlp_out: txt_out,
                    },
                )
            }
            Naming::Bfl => {
                let stream = |s: &str| -> Result<Stream> {
                    let attn = wb.pp(format!("{s}_attn"));
                    let norm = attn.pp("norm");
                    let mlp_w = wb.pp(format!("{s}_mlp"));
                    Ok(Stream {
                        qkv: Proj::Fused(attn.pp("qkv").linear(dim, 3 * dim, false)?, vec![dim; 3]),
                        norm_q: rms(&norm.pp("query_norm"), "scale", cfg)?,
                        norm_k: rms(&norm.pp("key_norm"), "scale", cfg)?,
                        out: attn.pp("proj").linear(dim, dim, false)?,
                        mlp_in: mlp_w.pp(0).linear(dim, 2 * mlp, false)?,
                        mlp_out: mlp_w.pp(2).linear(mlp, dim, false)?,
                    })
                };
                (stream("img")?, stream("txt")?)
            }
        };
        Ok(Self { img, txt, heads: cfg.num_attention_heads, eps: cfg.eps })
    }

    /// `m` / `c`: the six shared modulation vectors of the image / text stream
    /// (shift, scale, gate of attention, then of the MLP).
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        m: &[Tensor],
        c: &[Tensor],
        rope: &(Tensor, Tensor),
        sp: Option<&SeqParallel>,
    ) -> Result<(Tensor, Tensor)> {
        let (h, eps) = (self.heads, self.eps);
        let iq = self.img.qkv.forward(&ln_modulate(img, &m[0], &m[1], eps)?)?;
        let tq = self.txt.qkv.forward(&ln_modulate(txt, &c[0], &c[1], eps)?)?;
        // Joint attention over [txt, img], no mask (padding text rows are attended to, as in
        // the reference); q/k normed and rotated per stream with its rows of the RoPE table.
        let s_txt = txt.dim(1)?;
        let (rope_t, rope_i) = split_rope(rope, s_txt)?;
        let streams = [
            StreamQkv {
                q: &tq[0],
                k: &tq[1],
                v: &tq[2],
                norm_q: &self.txt.norm_q,
                norm_k: &self.txt.norm_k,
                rope: &rope_t,
                v_heads: None,
            },
            StreamQkv {
                q: &iq[0],
                k: &iq[1],
                v: &iq[2],
                norm_q: &self.img.norm_q,
                norm_k: &self.img.norm_k,
                rope: &rope_i,
                v_heads: None,
            },
        ];
        let o = merge_heads(&start_joint_attention(sp, &streams, h)?.finish(attention)?)?;
        let o_txt = o.narrow(1, 0, s_txt)?;
        let o_img = o.narrow(1, s_txt, o.dim(1)? - s_txt)?;

        let run = |s: &Stream, x: &Tensor, o: &Tensor, m: &[Tensor]| -> Result<Tensor> {
            let x = s.out.forward_gated(o, &Gate::from(&m[2]), x)?;
            let xn = ln_modulate(&x, &m[3], &m[4], eps)?;
            s.mlp_out.forward_gated(&swiglu(&s.mlp_in.forward(&xn)?)?, &Gate::from(&m[5]), &x)
        };
        Ok((run(&self.img, img, &o_img, m)?, run(&self.txt, txt, &o_txt, c)?))
    }
}

#[derive(Debug, Clone)]
struct SingleBlock {
    /// q, k, v and the SwiGLU input (gate rows, then up rows) in one projection.
    to_qkv_mlp_proj: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// Input `cat(attention, swiglu)`.
    to_out: OutProj,
    heads: usize,
    dim: usize,
    eps: f64,
}

impl SingleBlock {
    fn new(wb: &WeightBuilder, naming: Naming, cfg: &Flux2Config) -> Result<Self> {
        let (dim, mlp) = (cfg.inner_dim(), cfg.mlp_hidden());
        let (proj, out, norm, q, k, key) = match naming {
            Naming::Diffusers => (
                wb.pp("attn").pp("to_qkv_mlp_proj"),
                wb.pp("attn").pp("to_out"),
                wb.pp("attn"),
                "norm_q",
                "norm_k",
                "weight",
            ),
            Naming::Bfl => (wb.pp("linear1"), wb.pp("linear2"), wb.pp("norm"), "query_norm", "key_norm", "scale"),
        };
        Ok(Self {
            to_qkv_mlp_proj: proj.linear(dim, 3 * dim + 2 * mlp, false)?,
            norm_q: rms(&norm.pp(q), key, cfg)?,
            norm_k: rms(&norm.pp(k), key, cfg)?,
            to_out: OutProj::new(out.linear(dim + mlp, dim, false)?, dim)?,
            heads: cfg.num_attention_heads,
            dim,
            eps: cfg.eps,
        })
    }

    /// `m`: shift, scale, gate.
    fn forward(&self, x: &Tensor, m: &[Tensor], rope: &(Tensor, Tensor), sp: Option<&SeqParallel>) -> Result<Tensor> {
        let (h, dim) = (self.heads, self.dim);
        let p = self.to_qkv_mlp_proj.forward(&ln_modulate(x, &m[0], &m[1], self.eps)?)?;
        let part = |i: usize| p.narrow(D::Minus1, i * dim, dim);
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let v_heads = heads_view(&p, 2 * dim, h, dim / h)?;
        let stream = StreamQkv {
            q: &q,
            k: &k,
            v: &v,
            norm_q: &self.norm_q,
            norm_k: &self.norm_k,
            rope,
            v_heads: v_heads.as_ref(),
        };
        let returning = start_joint_attention(sp, &[stream], h)?.finish_start(attention)?;
        // cat(attention, swiglu(mlp)) through the output projection, reading the projection's MLP
        // columns in place.
        let mlp = p.narrow(D::Minus1, 3 * dim, p.dim(D::Minus1)? - 3 * dim)?;
        self.to_out.forward_gated(returning, &mlp, MlpAct::SwiGlu, false, &Gate::from(&m[2]), x)
    }
}

/// What [`Flux2Transformer::forward_traced`] reports: `temb`, `double.{i}.img` / `.txt`,
/// `single.{i}`, in the reference's names.
pub type Trace<'a> = &'a mut dyn FnMut(&str, &Tensor);

#[derive(Debug, Clone)]
pub struct Flux2Transformer {
    cfg: Flux2Config,
    naming: Naming,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Embedder,
    guidance_embedder: Option<Embedder>,
    double_stream_modulation_img: Linear,
    double_stream_modulation_txt: Linear,
    single_stream_modulation: Linear,
    transformer_blocks: Vec<DoubleBlock>,
    single_transformer_blocks: Vec<SingleBlock>,
    /// diffusers `norm_out.linear` rows `[scale; shift]`; BFL `final_layer.adaLN_modulation.1`
    /// rows `[shift; scale]`.
    norm_out: Linear,
    proj_out: Linear,
}

impl Flux2Transformer {
    /// `wb` is rooted at the transformer's tensors (any prefix already applied).
    pub fn new(cfg: &Flux2Config, wb: &WeightBuilder, naming: Naming) -> Result<Self> {
        let dim = cfg.inner_dim();
        let p = cfg.patch_size * cfg.patch_size;
        let tc = cfg.timestep_guidance_channels;
        let n = |d: &str, b: &str| match naming {
            Naming::Diffusers => d.to_string(),
            Naming::Bfl => b.to_string(),
        };
        let tge = wb.pp("time_guidance_embed");
        let (time, guid, lin, norm_out, proj_out) = match naming {
            Naming::Diffusers => (
                tge.pp("timestep_embedder"),
                tge.pp("guidance_embedder"),
                "linear",
                wb.pp("norm_out").pp("linear"),
                wb.pp("proj_out"),
            ),
            Naming::Bfl => (
                wb.pp("time_in"),
                wb.pp("guidance_in"),
                "lin",
                wb.pp("final_layer").pp("adaLN_modulation").pp(1),
                wb.pp("final_layer").pp("linear"),
            ),
        };
        let double = n("transformer_blocks", "double_blocks");
        let single = n("single_transformer_blocks", "single_blocks");
        Ok(Self {
            cfg: cfg.clone(),
            naming,
            x_embedder: wb.pp(n("x_embedder", "img_in")).linear(cfg.in_channels * p, dim, false)?,
            context_embedder: wb.pp(n("context_embedder", "txt_in")).linear(cfg.joint_attention_dim, dim, false)?,
            timestep_embedder: Embedder::new(&time, naming, tc, dim, false)?,
            guidance_embedder: if cfg.guidance_embeds {
                Some(Embedder::new(&guid, naming, tc, dim, false)?)
            } else {
                None
            },
            double_stream_modulation_img: wb.per_sample().pp("double_stream_modulation_img").pp(lin).linear(
                dim,
                6 * dim,
                false,
            )?,
            double_stream_modulation_txt: wb.per_sample().pp("double_stream_modulation_txt").pp(lin).linear(
                dim,
                6 * dim,
                false,
            )?,
            single_stream_modulation: wb.per_sample().pp("single_stream_modulation").pp(lin).linear(
                dim,
                3 * dim,
                false,
            )?,
            transformer_blocks: (0..cfg.num_layers)
                .map(|i| DoubleBlock::new(&wb.pp(&double).pp(i), naming, cfg))
                .collect::<Result<_>>()?,
            single_transformer_blocks: (0..cfg.num_single_layers)
                .map(|i| SingleBlock::new(&wb.pp(&single).pp(i), naming, cfg))
                .collect::<Result<_>>()?,
            norm_out: norm_out.per_sample().linear(dim, 2 * dim, false)?,
            proj_out: proj_out.linear(dim, p * cfg.out_channels(), false)?,
        })
    }

    pub fn config(&self) -> &Flux2Config {
        &self.cfg
    }

    /// `temb` `[B, inner]`: E_t(sinusoid(1000 t)) (+ E_g(sinusoid(1000 g)) for dev). The sinusoids
    /// are computed in f32 from f32 inputs whatever the model dtype (diffusers rounds t and g to
    /// the model dtype first; we keep them exact).
    fn temb(&self, timestep: &Tensor, guidance: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
        let ch = self.cfg.timestep_guidance_channels;
        let sinus = |x: &Tensor| timestep_embedding(&(x.to_dtype(DType::F32)? * TIME_SCALE)?, ch, TIME_MAX_PERIOD);
        let mut temb = self.timestep_embedder.forward(&sinus(timestep)?.to_dtype(dtype)?)?;
        if let Some(g_emb) = &self.guidance_embedder {
            let g = guidance.ok_or_else(|| {
                candle_core::Error::Msg(
                    "this FLUX.2 transformer embeds guidance (FLUX.2-dev): pass a guidance value".into(),
                )
            })?;
            temb = (temb + g_emb.forward(&sinus(g)?.to_dtype(dtype)?)?)?;
        }
        Ok(temb)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        dtype: DType,
    ) -> Result<Tensor> {
        self.forward_traced(img, txt, timestep, guidance, img_ids, txt_ids, dtype, &mut |_, _| {})
    }

    /// [`Self::forward`] with the tokens sharded over `group` (each rank holds a share of the text
    /// and of the image tokens). Every member passes the full inputs and gets the full output.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_sharded(
        &self,
        img: &Tensor,
        txt: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        dtype: DType,
        group: Option<&Group>,
    ) -> Result<Tensor> {
        self.run(img, txt, timestep, guidance, img_ids, txt_ids, dtype, &mut |_, _| {}, group)
    }

    /// [`Self::forward`], reporting intermediate tensors to `trace`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_traced(
        &self,
        img: &Tensor,
        txt: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        dtype: DType,
        trace: Trace,
    ) -> Result<Tensor> {
        self.run(img, txt, timestep, guidance, img_ids, txt_ids, dtype, trace, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        img: &Tensor,
        txt: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        dtype: DType,
        trace: Trace,
        group: Option<&Group>,
    ) -> Result<Tensor> {
        let ids = Tensor::cat(&[txt_ids, img_ids], 0)?;
        let rope = rope_tables(&ids, &self.cfg.axes_dims_rope, self.cfg.rope_theta, img.device())?;
        let temb = self.temb(timestep, guidance, dtype)?;
        trace("temb", &temb);
        let act = temb.silu()?;
        let m = chunks(&self.double_stream_modulation_img.forward(&act)?, 6)?;
        let c = chunks(&self.double_stream_modulation_txt.forward(&act)?, 6)?;
        let s = chunks(&self.single_stream_modulation.forward(&act)?, 3)?;

        let totals = [txt.dim(1)?, img.dim(1)?];
        let sp = group.map(|g| SeqParallel::new(g.clone(), &totals));
        let (txt, img, rope) = match &sp {
            Some(sp) => sp.shard_joint(txt, img, &rope)?,
            None => (txt.clone(), img.clone(), rope),
        };
        let sp = sp.as_ref();
        let mut img = self.x_embedder.forward(&img.to_dtype(dtype)?)?;
        let mut txt = self.context_embedder.forward(&txt.to_dtype(dtype)?)?;
        for (i, b) in self.transformer_blocks.iter().enumerate() {
            (img, txt) = b.forward(&img, &txt, &m, &c, &rope, sp)?;
            trace(&format!("double.{i}.img"), &img);
            trace(&format!("double.{i}.txt"), &txt);
        }
        let s_txt = txt.dim(1)?;
        let mut x = Tensor::cat(&[txt, img], 1)?;
        for (i, b) in self.single_transformer_blocks.iter().enumerate() {
            x = b.forward(&x, &s, &rope, sp)?;
            trace(&format!("single.{i}"), &x);
        }
        let img = x.narrow(1, s_txt, x.dim(1)? - s_txt)?;
        let mods = chunks(&self.norm_out.forward(&act)?, 2)?;
        let (shift, scale) = match self.naming {
            Naming::Diffusers => (&mods[1], &mods[0]),
            Naming::Bfl => (&mods[0], &mods[1]),
        };
        let out = self.proj_out.forward(&ln_modulate(&img, shift, scale, self.cfg.eps)?)?;
        match sp {
            Some(sp) => sp.gather(&out, 1, 1),
            None => Ok(out),
        }
    }
}
