//! UMT5 encoder (`UMT5EncoderModel`, Wan's text encoder). Unlike T5, every layer has its own
//! relative-position bias table; logits are not scaled by 1/sqrt(d_kv); padding is masked.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::ops::RmsNorm;

fn d_eps() -> f64 {
    1e-6
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub feed_forward_proj: Option<String>,
}

impl Umt5Config {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        Ok(crate::error::read_json_config(path, "UMT5 config.json")?)
    }
}

/// Bidirectional T5 bucket of `rel = key - query`, in the reference's f32 arithmetic.
fn bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut b = if rel > 0 { half } else { 0 };
    let n = rel.abs();
    let max_exact = half / 2;
    if n < max_exact {
        b += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln() / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        b += large.min(half - 1);
    }
    b as usize
}

struct Layer {
    ln_attn: RmsNorm,
    q: candle_nn::Linear,
    k: candle_nn::Linear,
    v: candle_nn::Linear,
    o: candle_nn::Linear,
    /// `[buckets, heads]`.
    rel_bias: Tensor,
    ln_ff: RmsNorm,
    wi_0: candle_nn::Linear,
    wi_1: candle_nn::Linear,
    wo: candle_nn::Linear,
}

pub struct Umt5Encoder {
    cfg: Umt5Config,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
}

impl Umt5Encoder {
    pub fn new(cfg: &Umt5Config, vb: VarBuilder) -> Result<Self> {
        if vb.dtype() == DType::F16 {
            candle_core::bail!("UMT5 overflows in f16: load the text encoder in bf16 or f32");
        }
        match cfg.feed_forward_proj.as_deref() {
            None | Some("gated-gelu") => {}
            Some(other) => candle_core::bail!("UMT5 config: feed_forward_proj `{other}` (expected gated-gelu)"),
        }
        let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
        let embed = if vb.contains_tensor("shared.weight") {
            vb.get((cfg.vocab_size, d), "shared.weight")?
        } else {
            vb.get((cfg.vocab_size, d), "encoder.embed_tokens.weight")?
        };
        let enc = vb.pp("encoder");
        let lin = |vb: VarBuilder, i: usize, o: usize| -> Result<candle_nn::Linear> {
            Ok(candle_nn::Linear::new(vb.get((o, i), "weight")?, None))
        };
        let norm =
            |vb: VarBuilder| -> Result<RmsNorm> { Ok(RmsNorm::new(vb.get(d, "weight")?, cfg.layer_norm_epsilon)) };
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let b = enc.pp("block").pp(i).pp("layer");
                let sa = b.pp(0).pp("SelfAttention");
                let f = b.pp(1).pp("DenseReluDense");
                Ok(Layer {
                    ln_attn: norm(b.pp(0).pp("layer_norm"))?,
                    q: lin(sa.pp("q"), d, inner)?,
                    k: lin(sa.pp("k"), d, inner)?,
                    v: lin(sa.pp("v"), d, inner)?,
                    o: lin(sa.pp("o"), inner, d)?,
                    rel_bias: sa
                        .pp("relative_attention_bias")
                        .get((cfg.relative_attention_num_buckets, cfg.num_heads), "weight")?,
                    ln_ff: norm(b.pp(1).pp("layer_norm"))?,
                    wi_0: lin(f.pp("wi_0"), d, ff)?,
                    wi_1: lin(f.pp("wi_1"), d, ff)?,
                    wo: lin(f.pp("wo"), ff, d)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg: cfg.clone(), embed, layers, final_norm: norm(enc.pp("final_layer_norm"))? })
    }

    /// Bucket index matrix `[S, S]` (row = query).
    fn buckets(&self, s: usize, device: &Device) -> Result<Tensor> {
        let mut v = Vec::with_capacity(s * s);
        for q in 0..s {
            for k in 0..s {
                let rel = k as i64 - q as i64;
                v.push(bucket(rel, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance)
                    as u32);
            }
        }
        Tensor::from_vec(v, (s, s), device)
    }

    /// `input_ids` `[B, S]`, `mask` `[B, S]` (1 = token, 0 = padding) -> every hidden state:
    /// index i is the input of layer i, the last one is after the final norm (`last_hidden_state`).
    pub fn forward_all(&self, input_ids: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>> {
        let (b, s) = input_ids.dims2()?;
        let device = input_ids.device();
        let (h, dk) = (self.cfg.num_heads, self.cfg.d_kv);
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self.embed.index_select(&ids, 0)?.reshape((b, s, self.cfg.d_model))?;
        // Additive mask [B, 1, 1, S]: the most negative f32 where padded, as the reference.
        let keep = mask.to_dtype(DType::F32)?;
        let mask_add = ((keep.ones_like()? - &keep)? * f32::MIN as f64)?.reshape((b, 1, 1, s))?;
        let buckets = self.buckets(s, device)?.flatten_all()?;
        let mut states = vec![x.clone()];
        for layer in &self.layers {
            let bias = layer
                .rel_bias
                .to_dtype(DType::F32)?
                .index_select(&buckets, 0)?
                .reshape((s, s, h))?
                .permute((2, 0, 1))?
                .unsqueeze(0)?;
            let y = layer.ln_attn.forward(&x)?;
            let split = |t: Tensor| -> Result<Tensor> { t.reshape((b, s, h, dk))?.transpose(1, 2)?.contiguous() };
            let q = split(layer.q.forward(&y)?)?.to_dtype(DType::F32)?;
            let k = split(layer.k.forward(&y)?)?.to_dtype(DType::F32)?;
            let v = split(layer.v.forward(&y)?)?.to_dtype(DType::F32)?;
            let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(&bias)?.broadcast_add(&mask_add)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h * dk))?.to_dtype(x.dtype())?;
            x = (&x + layer.o.forward(&o)?)?;
            let y = layer.ln_ff.forward(&x)?;
            let gated = (layer.wi_0.forward(&y)?.gelu()? * layer.wi_1.forward(&y)?)?;
            x = (&x + layer.wo.forward(&gated)?)?;
            states.push(x.clone());
        }
        let last = self.final_norm.forward(&x)?;
        *states.last_mut().expect("at least the embeddings") = last;
        Ok(states)
    }

    /// The prompt embeddings Wan's pipeline feeds the transformer: the last hidden state with
    /// every row at or past the prompt's length zeroed, `[B, S, d_model]`.
    pub fn prompt_embeds(&self, input_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let states = self.forward_all(input_ids, mask)?;
        let last = states.last().expect("non-empty");
        last.broadcast_mul(&mask.to_dtype(last.dtype())?.unsqueeze(D::Minus1)?)
    }
}
