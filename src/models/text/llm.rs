//! Decoder-only language models used as text encoders (FLUX.2: Mistral-Small-3.2 for dev, Qwen3
//! for klein). Only the residual stream of chosen layers is needed, so the model runs up to the
//! deepest requested layer and stops; there is no final norm, LM head or KV cache.
//!
//! candle-transformers' Mistral and Qwen3 models do not fit: they take no padding mask and return
//! only the last layer. Differences between the two families here: Qwen3 normalizes q and k per
//! head (`q_norm` / `k_norm`) before RoPE. Both use GQA, q width `heads * head_dim` that may differ
//! from the hidden size, and rotate-half RoPE.
//!
//! Attention follows transformers' default `sdpa` path: mask = causal AND key valid; a query row
//! with no valid key (left padding) outputs exactly 0.

use candle_core::{DType, Device, Module, Result, Tensor};
use serde::Deserialize;

use crate::linear::{Linear, WeightBuilder};
use crate::models::ops::RmsNorm;

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeParameters {
    pub rope_theta: f64,
}

/// The text model's `config.json` fields (Mistral's `text_config` inside a Mistral3 config, or a
/// Qwen3 config). Both transformers 4 (`rope_theta`) and 5 (`rope_parameters`) spellings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LlmConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    pub vocab_size: usize,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: String,
}

/// transformers' default RoPE base when a config names none.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl LlmConfig {
    /// Reads `config.json`; a multimodal config's `text_config` is used when present.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let v: serde_json::Value = crate::error::read_json_config(path, "text encoder config.json")?;
        let text = v.get("text_config").cloned().unwrap_or(v);
        serde_json::from_value(text).map_err(|e| {
            crate::error::CandiffError::bad_config(
                path.display(),
                format!("not a Mistral/Qwen3 text config: {e}"),
                "Point at the text encoder's config.json.",
            )
            .into()
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters.as_ref().map(|r| r.rope_theta).or(self.rope_theta).unwrap_or(DEFAULT_ROPE_THETA)
    }
}

/// Where the decoder's tensors live in a checkpoint: transformers 5 saves Mistral3 under the
/// legacy `language_model.model.`, in-memory names are `model.language_model.`, causal LMs use
/// `model.`.
pub fn detect_prefix<'a>(mut keys: impl Iterator<Item = &'a String>) -> Option<&'static str> {
    const PREFIXES: [&str; 4] = ["language_model.model.", "model.language_model.", "model.", ""];
    let keys: Vec<&String> = keys.by_ref().filter(|k| k.ends_with("embed_tokens.weight")).collect();
    PREFIXES.iter().copied().find(|p| keys.iter().any(|k| **k == format!("{p}embed_tokens.weight")))
}

struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

pub struct LlmEncoder {
    cfg: LlmConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
}

impl LlmEncoder {
    /// Builds layers `0..num_layers` (the deepest one the caller needs) from `wb` rooted at the
    /// decoder (`embed_tokens`, `layers.N`). q/k norms are loaded when the checkpoint has them.
    pub fn new(cfg: &LlmConfig, wb: &WeightBuilder, num_layers: usize) -> Result<Self> {
        if num_layers > cfg.num_hidden_layers {
            candle_core::bail!(
                "text encoder: layer {num_layers} requested, the model has {} layers",
                cfg.num_hidden_layers
            );
        }
        if !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads) {
            candle_core::bail!(
                "text encoder: {} query heads do not divide into {} KV heads",
                cfg.num_attention_heads,
                cfg.num_key_value_heads
            );
        }
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (q_w, kv_w) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let norm = |wb: &WeightBuilder, dim: usize| -> Result<RmsNorm> {
            Ok(RmsNorm::new(wb.vb().get(dim, "weight")?, cfg.rms_norm_eps))
        };
        let layers = (0..num_layers)
            .map(|i| -> Result<Layer> {
                let l = wb.pp("layers").pp(i);
                let a = l.pp("self_attn");
                let m = l.pp("mlp");
                let qk_norm = a.vb().contains_tensor("q_norm.weight");
                Ok(Layer {
                    q_proj: a.pp("q_proj").linear(h, q_w, false)?,
                    k_proj: a.pp("k_proj").linear(h, kv_w, false)?,
                    v_proj: a.pp("v_proj").linear(h, kv_w, false)?,
                    o_proj: a.pp("o_proj").linear(q_w, h, false)?,
                    q_norm: if qk_norm { Some(norm(&a.pp("q_norm"), d)?) } else { None },
                    k_norm: if qk_norm { Some(norm(&a.pp("k_norm"), d)?) } else { None },
                    gate_proj: m.pp("gate_proj").linear(h, cfg.intermediate_size, false)?,
                    up_proj: m.pp("up_proj").linear(h, cfg.intermediate_size, false)?,
                    down_proj: m.pp("down_proj").linear(cfg.intermediate_size, h, false)?,
                    input_layernorm: norm(&l.pp("input_layernorm"), h)?,
                    post_attention_layernorm: norm(&l.pp("post_attention_layernorm"), h)?,
                })
            })
            .collect::<Result<_>>()?;
        let embed_tokens = wb.pp("embed_tokens").vb().get((cfg.vocab_size, h), "weight")?;
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers })
    }

    /// Rotate-half RoPE tables `[S, D/2]` for positions `0..len`, in transformers' f32 arithmetic.
    fn rope(&self, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim();
        let base = self.cfg.rope_theta() as f32;
        let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32)).collect();
        let (mut cos, mut sin) = (Vec::with_capacity(len * d / 2), Vec::with_capacity(len * d / 2));
        for p in 0..len {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((Tensor::from_vec(cos, (len, d / 2), device)?, Tensor::from_vec(sin, (len, d / 2), device)?))
    }

    /// Residual stream after each layer in `layers` (1-based: `k` = output of decoder layer k),
    /// for `ids` / `mask` `[B, S]` (mask 1 = real token). Returns `[B, S, len(layers) * hidden]`,
    /// feature `j * hidden + d` being dim `d` of layer `layers[j]`.
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor, layers: &[usize], dtype: DType) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let device = ids.device();
        let last = layers.iter().copied().max().unwrap_or(0);
        if last > self.layers.len() || layers.contains(&0) {
            candle_core::bail!("text encoder: layers {layers:?} requested, {} loaded (1-based)", self.layers.len());
        }
        let (heads, kv, d) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim());
        let rope = self.rope(s, device)?;
        // Additive mask [B, 1, S, S]: causal AND key valid; rows with no valid key are zeroed after.
        let valid: Vec<Vec<f32>> = mask.to_dtype(DType::F32)?.to_vec2()?;
        let mut bias = vec![0f32; b * s * s];
        let mut row_ok = vec![0f32; b * s];
        for bi in 0..b {
            for q in 0..s {
                // Fully masked rows keep finite (zero) scores and are zeroed after the softmax.
                if !(0..=q).any(|k| valid[bi][k] > 0.0) {
                    continue;
                }
                row_ok[bi * s + q] = 1.0;
                for k in 0..s {
                    if k > q || valid[bi][k] <= 0.0 {
                        bias[(bi * s + q) * s + k] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, s, s), device)?;
        let row_ok = Tensor::from_vec(row_ok, (b, 1, s, 1), device)?;

        let mut x = self.embed_tokens.embedding(&ids.flatten_all()?.to_dtype(DType::U32)?)?.reshape((b, s, ()))?;
        x = x.to_dtype(dtype)?;
        let mut out = Vec::with_capacity(layers.len());
        let scale = 1.0 / (d as f64).sqrt();
        for (i, l) in self.layers.iter().take(last).enumerate() {
            let xn = l.input_layernorm.forward(&x)?;
            let split = |t: Tensor, n: usize| t.reshape((b, s, n, d))?.transpose(1, 2);
            let mut q = split(l.q_proj.forward(&xn)?, heads)?;
            let mut k = split(l.k_proj.forward(&xn)?, kv)?;
            let v = split(l.v_proj.forward(&xn)?, kv)?;
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            }
            let rot = |t: &Tensor| -> Result<Tensor> {
                candle_nn::rotary_emb::rope(&t.to_dtype(DType::F32)?.contiguous()?, &rope.0, &rope.1)
            };
            let (q, k) = (rot(&q)?, rot(&k)?);
            // GQA: query head h uses KV head h / (heads / kv).
            let rep = |t: &Tensor| -> Result<Tensor> {
                let t = t.to_dtype(DType::F32)?;
                t.unsqueeze(2)?.broadcast_as((b, kv, heads / kv, s, d))?.reshape((b, heads, s, d))
            };
            let (k, v) = (rep(&k)?, rep(&v)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = p.matmul(&v.contiguous()?)?.broadcast_mul(&row_ok)?;
            let o = o.transpose(1, 2)?.reshape((b, s, heads * d))?.to_dtype(dtype)?;
            x = (x + l.o_proj.forward(&o)?)?;
            let xn = l.post_attention_layernorm.forward(&x)?;
            let mlp = l.down_proj.forward(&(l.gate_proj.forward(&xn)?.silu()? * l.up_proj.forward(&xn)?)?)?;
            x = (x + mlp)?;
            if layers.contains(&(i + 1)) {
                out.push((i + 1, x.clone()));
            }
        }
        let stacked: Vec<Tensor> =
            layers.iter().map(|k| out.iter().find(|(i, _)| i == k).expect("collected").1.clone()).collect();
        let h = self.cfg.hidden_size;
        // [B, S, n, H] -> [B, S, n*H].
        Tensor::stack(&stacked, 2)?.reshape((b, s, layers.len() * h))?.to_dtype(dtype)
    }
}

/// The hidden-state layers FLUX.2 stacks: Mistral-Small-3.2 (dev) and Qwen3 (klein).
pub const MISTRAL_LAYERS: [usize; 3] = [10, 20, 30];
pub const QWEN3_LAYERS: [usize; 3] = [9, 18, 27];
