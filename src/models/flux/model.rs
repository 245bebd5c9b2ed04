//! The FLUX.1 transformer, one body for every weight format: dense layers and NVFP4 layers come
//! from [`WeightBuilder::linear`]. Loads diffusers names and BFL names (fused `qkv` / `linear1`,
//! `[shift; scale]` final modulation); field names follow diffusers.
//!
//! Shapes: `img` `[B, S_img, in_channels]` (packed latents), `txt` `[B, S_txt, joint_attention_dim]`,
//! `pooled` `[B, pooled_projection_dim]`, `timestep` / `guidance` `[B]` in [0, 1] (multiplied by 1000
//! inside), `img_ids` `[S_img, 3]`, `txt_ids` `[S_txt, 3]`; output `[B, S_img, out_channels]`.

use candle_core::{DType, Module, Result, Tensor, D};

use super::config::FluxConfig;
use crate::linear::{modulation, Gate, Input, Linear, WeightBuilder};
use crate::models::fused::{cat_act, gated_add, ln_modulate, MlpAct};
use crate::models::ops::{attention, merge_heads, rope_tables, timestep_embedding, RmsNorm};
use crate::parallel::pack::{QkvPack, Slot};
use crate::parallel::{attend_packed_start, attend_start, Attending, Group, Returning, SeqParallel};

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
    /// Separate layers joined into one where [`Linear::concat`] can (one GEMM, its outputs read
    /// as slices); otherwise unchanged.
    pub(crate) fn fused(self) -> Result<Self> {
        match self {
            Proj::Split(ls) => {
                let sizes = ls.iter().map(|l| l.out_features()).collect::<Result<Vec<_>>>()?;
                Ok(match Linear::concat(&ls)? {
                    Some(l) => Proj::Fused(l, sizes),
                    None => Proj::Split(ls),
                })
            }
            fused => Ok(fused),
        }
    }

    /// Its layers (what a shared input is prepared for, [`Input::ln_modulate`]).
    pub(crate) fn layers(&self) -> Vec<&Linear> {
        match self {
            Proj::Split(ls) => ls.iter().collect(),
            Proj::Fused(l, _) => vec![l],
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.forward_input(&Input::Tensor(x.clone()))
    }

    pub(crate) fn forward_input(&self, x: &Input) -> Result<Vec<Tensor>> {
        match self {
            Proj::Split(ls) => ls.iter().map(|l| l.forward_input(x)).collect(),
            Proj::Fused(l, sizes) => Self::split_outputs(&l.forward_input(x)?, sizes),
        }
    }

    /// A fused projection's output as its parts' slices.
    pub(crate) fn split_outputs(y: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(sizes.len());
        let mut start = 0;
        for &s in sizes {
            out.push(y.narrow(D::Minus1, start, s)?);
            start += s;
        }
        Ok(out)
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
        let wb = wb.per_sample();
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

/// One stream's share of a joint attention: its q, k, v projections `[B, S_run, H*D]`, the q/k
/// norms and its rows of the RoPE tables; `v_heads`, where the producer has it, v as a
/// `[B, H, S_run, D]` view of the projection's output ([`heads_view`]).
pub(crate) struct StreamQkv<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub norm_q: &'a RmsNorm,
    pub norm_k: &'a RmsNorm,
    pub rope: &'a Rope,
    pub v_heads: Option<&'a Tensor>,
}

/// Columns `start .. start + heads * d` of a contiguous `[B, S, N]` projection output as a
/// `[B, heads, S, d]` view (no copy), or `None` where the columns do not fall on whole heads.
pub(crate) fn heads_view(y: &Tensor, start: usize, heads: usize, d: usize) -> Result<Option<Tensor>> {
    let (b, s, n) = y.dims3()?;
    if !y.is_contiguous() || !n.is_multiple_of(d) || !start.is_multiple_of(d) || start + heads * d > n {
        return Ok(None);
    }
    Ok(Some(y.reshape((b, s, n / d, d))?.narrow(2, start / d, heads)?.transpose(1, 2)?))
}

/// Whether one stream's attention on one GPU reads v in place (`CANDIFF_V_IN_PLACE=0` copies it
/// into the q/k/v buffer as several streams need, for A/B measurements).
fn v_in_place() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("CANDIFF_V_IN_PLACE").as_deref() != Ok("0"))
}

/// q, k, v of the streams, one after another along the sequence: q and k normalized and rotated,
/// all three written once into the attention's buffer (the exchange's send buffer when the
/// tokens are sharded), then the attention started.
pub(crate) fn start_joint_attention<'a>(
    sp: Option<&'a SeqParallel>,
    streams: &[StreamQkv],
    heads: usize,
) -> Result<Attending<'a>> {
    // One stream on one GPU: q and k normalized and rotated into their own buffers, and v read by
    // the attention where its projection wrote it (cuDNN takes strided views): the copy of v into
    // a joint buffer, a full pass over it, is not made. (Several streams need the joint buffer.)
    if let [st] = streams {
        let local = sp.is_none_or(|sp| sp.ranks() == 1);
        if let Some(v) = st.v_heads.filter(|v| local && v.device().is_cuda() && v_in_place()) {
            let q = st.norm_q.norm_rope(st.q, heads, &st.rope.0, &st.rope.1)?;
            let k = st.norm_k.norm_rope(st.k, heads, &st.rope.0, &st.rope.1)?;
            return attend_start(sp, &q, &k, v);
        }
    }
    let (b, _, hd) = streams[0].q.dims3()?;
    let s_loc = streams.iter().map(|s| s.q.dim(1)).sum::<Result<usize>>()?;
    let mut pack = QkvPack::new(sp, streams[0].q, s_loc, b, heads, hd / heads)?;
    let mut s0 = 0;
    for st in streams {
        let rope = Some((&st.rope.0, &st.rope.1));
        pack.put(Slot::Q, s0, st.q, Some(st.norm_q.parts()), rope)?;
        pack.put(Slot::K, s0, st.k, Some(st.norm_k.parts()), rope)?;
        pack.put(Slot::V, s0, st.v, None, None)?;
        s0 += st.q.dim(1)?;
    }
    attend_packed_start(sp, pack.finish()?)
}

/// The output projection of a parallel (single-stream) block, applied to `cat(o, act(mlp))`.
/// Split along its inputs where that pays (a dense half-precision or fp8-mode layer on a GPU,
/// [`Linear::split_inputs`]): the MLP part's GEMM runs while the attention output travels back
/// between ranks, the attention part's GEMM then adds onto it, and `cat` is never written.
#[derive(Debug, Clone)]
pub(crate) enum OutProj {
    Whole(Linear),
    Split { o: Linear, mlp: Linear },
}

impl OutProj {
    pub(crate) fn new(layer: Linear, o_dim: usize) -> Result<Self> {
        Ok(match layer.split_inputs(o_dim)? {
            Ok((o, mlp)) => OutProj::Split { o, mlp },
            Err(whole) => OutProj::Whole(whole),
        })
    }

    /// Whether the producer should apply the MLP activation for an input with rows as `like`'s
    /// and `o_dim` attention features: a split projection, or one that reads the attention output
    /// and the activated MLP part where they lie ([`Linear::reads_parts_like`]: no `cat` pass).
    pub(crate) fn wants_activated(&self, like: &Tensor, o_dim: usize) -> Result<bool> {
        match self {
            OutProj::Split { .. } => Ok(true),
            OutProj::Whole(l) => l.reads_parts_like(like, o_dim),
        }
    }

    /// The layers a gate of [`OutProj::forward_gated`] may fold into (a split projection's two
    /// parts; a whole one takes the gated-add pass), for [`crate::linear::modulation`].
    pub(crate) fn gated_layers(&self) -> Vec<&Linear> {
        match self {
            OutProj::Split { o, mlp } => vec![o, mlp],
            OutProj::Whole(_) => Vec::new(),
        }
    }

    /// Whether [`OutProj::forward_gated`] folds `gate` into its GEMMs (both parts of a split
    /// projection fold it; `x`: any tensor on the activations' device).
    pub(crate) fn folds_gate(&self, x: &Tensor, gate: &Tensor) -> bool {
        matches!(self, OutProj::Split { o, mlp } if o.folds_gate(x, gate) && mlp.folds_gate(x, gate))
    }

    /// `residual + gate ⊙ forward(..)`. Split into fp8-mode layers (which fold the gate), the MLP
    /// part's GEMM takes the residual as C and the attention part's accumulates onto it: no
    /// gated-add pass. Any other projection: `forward`, then the fused gated add.
    pub(crate) fn forward_gated(
        &self,
        returning: Returning,
        mlp: &Tensor,
        act: MlpAct,
        activated: bool,
        gate: &Gate,
        residual: &Tensor,
    ) -> Result<Tensor> {
        if let OutProj::Split { o: wo, mlp: wm } = self {
            if self.folds_gate(mlp, &gate.vec) {
                let a = if activated { mlp.clone() } else { cat_act(None, mlp, act)? };
                let y = wm.forward_gated(&a, gate, residual)?;
                let o = merge_heads(&returning.wait()?)?;
                return wo.forward_gated(&o, gate, &y);
            }
        }
        gated_add(residual, &self.forward(returning, mlp, act, activated)?, &gate.vec)
    }

    /// `W cat(o, act(mlp))` with `o` from `returning` (`[B, H, S, D]`); `mlp` has its activation
    /// applied already when `activated` ([`OutProj::wants_activated`]).
    pub(crate) fn forward(&self, returning: Returning, mlp: &Tensor, act: MlpAct, activated: bool) -> Result<Tensor> {
        match self {
            OutProj::Whole(l) => {
                let o = merge_heads(&returning.wait()?)?;
                if activated {
                    l.forward_parts(&o, mlp)
                } else {
                    l.forward(&cat_act(Some(&o), mlp, act)?)
                }
            }
            OutProj::Split { o: wo, mlp: wm } => {
                let a = if activated { mlp.clone() } else { cat_act(None, mlp, act)? };
                let y = wm.forward(&a)?;
                let o = merge_heads(&returning.wait()?)?;
                wo.forward_acc(&o, &y)
            }
        }
    }
}

pub(crate) fn chunks(t: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    t.chunk(n, D::Minus1)
}

fn rms(wb: &WeightBuilder, name: &str, dim: usize) -> Result<RmsNorm> {
    Ok(RmsNorm::new(wb.vb().get(dim, name)?, EPS))
}

/// A block's modulation vectors and gates ([`modulation`]): a double-stream block's image and
/// text streams', or a single-stream block's.
enum BlockMods {
    Double((Vec<Tensor>, Vec<Gate>), (Vec<Tensor>, Vec<Gate>)),
    Single((Vec<Tensor>, Vec<Gate>)),
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
                    norm1: wb.per_sample().pp("norm1").pp("linear").linear(dim, 6 * dim, true)?,
                    norm1_context: wb.per_sample().pp("norm1_context").pp("linear").linear(dim, 6 * dim, true)?,
                    qkv: split(["to_q", "to_k", "to_v"])?.fused()?,
                    add_qkv: split(["add_q_proj", "add_k_proj", "add_v_proj"])?.fused()?,
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
                        wb.per_sample().pp(format!("{s}_mod")).pp("lin").linear(dim, 6 * dim, true)?,
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

    /// The image and text streams' modulations. Gates 2 and 5 multiply the attention and MLP
    /// outputs (folded into fp8 layers' GEMMs).
    fn modulations(&self, temb_act: &Tensor) -> Result<BlockMods> {
        let img = modulation(&self.norm1, temb_act, 6, &[(2, &[&self.to_out]), (5, &[&self.ff.1])])?;
        let txt =
            modulation(&self.norm1_context, temb_act, 6, &[(2, &[&self.to_add_out]), (5, &[&self.ff_context.1])])?;
        Ok(BlockMods::Double(img, txt))
    }

    /// `mods` from [`Self::modulations`]; `fill` queues independent work (the next block's
    /// modulation) where this block would otherwise wait for an exchange.
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        mods: BlockMods,
        rope: &(Tensor, Tensor),
        sp: Option<&SeqParallel>,
        fill: &mut dyn FnMut() -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let BlockMods::Double((m, mg), (c, cg)) = mods else {
            candle_core::bail!("a double-stream block given a single-stream block's modulation")
        };
        // Normalized inputs straight to E4M3 where every reader is an fp8 layer (Input::ln_modulate).
        let img_n = Input::ln_modulate(img, &m[0], &m[1], EPS, &self.qkv.layers())?;
        let txt_n = Input::ln_modulate(txt, &c[0], &c[1], EPS, &self.add_qkv.layers())?;
        let iq = self.qkv.forward_input(&img_n)?;
        let tq = self.add_qkv.forward_input(&txt_n)?;
        let s_txt = txt.dim(1)?;
        // Joint attention over [txt, img]: each stream's q/k normed and rotated with its rows of
        // the RoPE table, written with v straight into the attention's buffer.
        let (rope_t, rope_i) = split_rope(rope, s_txt)?;
        let streams = [
            StreamQkv {
                q: &tq[0],
                k: &tq[1],
                v: &tq[2],
                norm_q: &self.norm_added_q,
                norm_k: &self.norm_added_k,
                rope: &rope_t,
                v_heads: None,
            },
            StreamQkv {
                q: &iq[0],
                k: &iq[1],
                v: &iq[2],
                norm_q: &self.norm_q,
                norm_k: &self.norm_k,
                rope: &rope_i,
                v_heads: None,
            },
        ];
        let attending = start_joint_attention(sp, &streams, self.heads)?;
        // Sharded, nothing else of this block can run until the first heads' q, k, v arrive.
        fill()?;
        let o = merge_heads(&attending.finish(attention)?)?;
        let o_txt = o.narrow(1, 0, s_txt)?;
        let o_img = o.narrow(1, s_txt, o.dim(1)? - s_txt)?;

        // Gated residuals: in the GEMMs' epilogues where the layers allow (Linear::forward_gated).
        let img = self.to_out.forward_gated(&o_img, &mg[0], img)?;
        let img_n = Input::ln_modulate(&img, &m[3], &m[4], EPS, &[&self.ff.0])?;
        let img = self.ff.1.forward_gated(&self.ff.0.forward_gelu_input(&img_n)?, &mg[1], &img)?;

        let txt = self.to_add_out.forward_gated(&o_txt, &cg[0], txt)?;
        let txt_n = Input::ln_modulate(&txt, &c[3], &c[4], EPS, &[&self.ff_context.0])?;
        let txt = self.ff_context.1.forward_gated(&self.ff_context.0.forward_gelu_input(&txt_n)?, &cg[1], &txt)?;
        Ok((img, txt))
    }
}

#[derive(Debug, Clone)]
struct SingleBlock {
    norm: Linear,
    /// q, k, v, and the MLP input projection when the checkpoint fuses it with them (BFL
    /// `linear1`); diffusers' `attn.to_q/k/v` (joined where they can be, [`Proj::fused`]).
    qkv: Proj,
    /// Diffusers' `proj_mlp`, kept apart so its GEMM runs while q, k, v travel between ranks.
    proj_mlp: Option<Linear>,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// BFL `linear2`.
    proj_out: OutProj,
    heads: usize,
    /// Attention features (the output projection's first input part).
    dim: usize,
}

impl SingleBlock {
    fn new(wb: &WeightBuilder, naming: Naming, cfg: &FluxConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let hidden = dim * MLP_RATIO;
        Ok(match naming {
            Naming::Diffusers => {
                let attn = wb.pp("attn");
                Self {
                    norm: wb.per_sample().pp("norm").pp("linear").linear(dim, 3 * dim, true)?,
                    qkv: Proj::Split(vec![
                        attn.pp("to_q").linear(dim, dim, true)?,
                        attn.pp("to_k").linear(dim, dim, true)?,
                        attn.pp("to_v").linear(dim, dim, true)?,
                    ])
                    .fused()?,
                    proj_mlp: Some(wb.pp("proj_mlp").linear(dim, hidden, true)?),
                    norm_q: rms(&attn.pp("norm_q"), "weight", cfg.attention_head_dim)?,
                    norm_k: rms(&attn.pp("norm_k"), "weight", cfg.attention_head_dim)?,
                    proj_out: OutProj::new(wb.pp("proj_out").linear(dim + hidden, dim, true)?, dim)?,
                    heads: cfg.num_attention_heads,
                    dim,
                }
            }
            Naming::Bfl => Self {
                norm: wb.per_sample().pp("modulation").pp("lin").linear(dim, 3 * dim, true)?,
                qkv: Proj::Fused(wb.pp("linear1").linear(dim, 3 * dim + hidden, true)?, vec![dim, dim, dim, hidden]),
                proj_mlp: None,
                norm_q: rms(&wb.pp("norm").pp("query_norm"), "scale", cfg.attention_head_dim)?,
                norm_k: rms(&wb.pp("norm").pp("key_norm"), "scale", cfg.attention_head_dim)?,
                proj_out: OutProj::new(wb.pp("linear2").linear(dim + hidden, dim, true)?, dim)?,
                heads: cfg.num_attention_heads,
                dim,
            },
        })
    }

    fn modulations(&self, temb_act: &Tensor) -> Result<BlockMods> {
        Ok(BlockMods::Single(modulation(&self.norm, temb_act, 3, &[(2, &self.proj_out.gated_layers())])?))
    }

    /// `mods` from [`Self::modulations`]; `fill` as in [`DoubleBlock::forward`].
    fn forward(
        &self,
        x: &Tensor,
        mods: BlockMods,
        rope: &(Tensor, Tensor),
        sp: Option<&SeqParallel>,
        fill: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let BlockMods::Single((m, g)) = mods else {
            candle_core::bail!("a single-stream block given a double-stream block's modulation")
        };
        // One normalized input for q, k, v and the MLP projection (quantized once in fp8 mode).
        let mut readers = self.qkv.layers();
        readers.extend(self.proj_mlp.as_ref());
        let xn = Input::ln_modulate(x, &m[0], &m[1], EPS, &readers)?;
        // q, k, v first; a separate MLP projection's GEMM (independent of attention) then runs
        // while they travel between ranks.
        // The MLP activation goes to its producer's epilogue where the output projection takes
        // it as is (split, or reading attention and MLP parts in place).
        let dim = self.dim;
        let want_act = match &xn {
            Input::Tensor(t) => self.proj_out.wants_activated(t, dim)?,
            #[cfg(feature = "cuda")]
            Input::Fp8(_) => matches!(self.proj_out, OutProj::Split { .. }),
        };
        let (whole, fused_act) = match (&self.qkv, &xn) {
            (Proj::Fused(l, sizes), Input::Tensor(t))
                if want_act && self.proj_mlp.is_none() && sizes.len() == 4 && l.gelu_from_in_gemm(t)? =>
            {
                (Some(l.forward_gelu_from(t, sizes[..3].iter().sum())?), true)
            }
            (Proj::Fused(l, _), _) => (Some(l.forward_input(&xn)?), false),
            _ => (None, false),
        };
        let (p, v_heads) = match (&whole, &self.qkv) {
            (Some(y), Proj::Fused(_, sizes)) => {
                (Proj::split_outputs(y, sizes)?, heads_view(y, sizes[0] + sizes[1], self.heads, dim / self.heads)?)
            }
            // Separate projections: v is its own (contiguous) output.
            _ => {
                let p = self.qkv.forward_input(&xn)?;
                let v = heads_view(&p[2], 0, self.heads, dim / self.heads)?;
                (p, v)
            }
        };
        let stream = StreamQkv {
            q: &p[0],
            k: &p[1],
            v: &p[2],
            norm_q: &self.norm_q,
            norm_k: &self.norm_k,
            rope,
            v_heads: v_heads.as_ref(),
        };
        let attending = start_joint_attention(sp, &[stream], self.heads)?;
        // The MLP projection (GELU in its epilogue where the output projection is split) queued
        // while q, k, v travel; its share of the output projection while the attention output
        // travels back. A whole output projection waits for the attention output instead: the
        // next block's modulation goes there, else here beside the MLP projection.
        let split = matches!(self.proj_out, OutProj::Split { .. });
        if split {
            fill()?;
        }
        let (mlp, activated) = match &self.proj_mlp {
            Some(l) if want_act => (l.forward_gelu_input(&xn)?, true),
            Some(l) => (l.forward_input(&xn)?, false),
            None => (p[3].clone(), fused_act),
        };
        let returning = attending.finish_start(attention)?;
        if !split {
            fill()?;
        }
        self.proj_out.forward_gated(returning, &mlp, MlpAct::GeluTanh, activated, &g[0], x)
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
            norm_out: norm_out.per_sample().linear(dim, 2 * dim, true)?,
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
        // Every modulation projection reads silu(temb): computed once.
        let temb_act = temb.silu()?;
        // Block kinds label the profiler's timeline (CANDIFF_PROFILE_TIMELINE).
        let outer = crate::profile::set_scope("double");
        // Sharded, each block's modulation (a projection of temb alone) is made while the block
        // before it waits for an exchange ([`DoubleBlock::forward`]'s `fill`): on 2 H200s the
        // exchange waits of a FLUX.1 fp8 step fell from 8.8 to 3.3 ms (docs/PERF.md, session 23).
        // Unsharded there is nothing to wait for, and each block makes its own first.
        let prefetch = sp.is_some_and(|sp| sp.ranks() > 1);
        let nd = self.transformer_blocks.len();
        let blocks = nd + self.single_transformer_blocks.len();
        let mods_of = |i: usize| -> Result<Option<BlockMods>> {
            match i {
                i if i < nd => self.transformer_blocks[i].modulations(&temb_act).map(Some),
                i if i < blocks => self.single_transformer_blocks[i - nd].modulations(&temb_act).map(Some),
                _ => Ok(None),
            }
        };
        let mut next = if prefetch { mods_of(0)? } else { None };
        // Block i's modulation: prefetched, else made now.
        let take = |i: usize, next: &mut Option<BlockMods>| -> Result<BlockMods> {
            match next.take() {
                Some(m) => Ok(m),
                None => mods_of(i)?.ok_or_else(|| candle_core::Error::Msg(format!("no block {i}"))),
            }
        };
        // Block i's `fill`: block i + 1's modulation, when prefetching.
        let fill = |i: usize, next: &mut Option<BlockMods>| -> Result<()> {
            if prefetch {
                *next = mods_of(i + 1)?;
            }
            Ok(())
        };
        for (i, b) in self.transformer_blocks.iter().enumerate() {
            let mods = take(i, &mut next)?;
            (img, txt) = b.forward(&img, &txt, mods, &rope, sp, &mut || fill(i, &mut next))?;
        }
        let s_txt = txt.dim(1)?;
        let mut x = Tensor::cat(&[txt, img], 1)?;
        crate::profile::set_scope("single");
        for (j, b) in self.single_transformer_blocks.iter().enumerate() {
            let i = nd + j;
            let mods = take(i, &mut next)?;
            x = b.forward(&x, mods, &rope, sp, &mut || fill(i, &mut next))?;
        }
        crate::profile::set_scope(outer);
        let img = x.narrow(1, s_txt, x.dim(1)? - s_txt)?;
        let (mods, _) = modulation(&self.norm_out, &temb_act, 2, &[])?;
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
